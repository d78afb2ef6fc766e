"""Deployment artefacts: the container images lint clean, the Kubernetes and KServe manifests render
(kubectl kustomize), validate against the Kubernetes schemas, pass checkov, and query metrics a live
server really exports; the pending-requests signal they scale on behaves; fastserve serves a model
mounted the way KServe mounts it, configured the way the manifests configure it."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import kubernetes_validate
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from fastserve.cli import build_parser, env_name
from prometheus_client.parser import text_string_to_metric_families

from conftest import EXAMPLES, ROOT, ServerProcess
from helpers import wait_until

DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
KSERVE = DEPLOY / "kserve"
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "Dockerfile.gpu"]
# What `kubectl kustomize` renders: the overlays and the prometheus-adapter rules.
KUSTOMIZATIONS = ["overlays/cpu", "overlays/gpu", "overlays/cpu-keda", "overlays/cpu-sequences", "prometheus-adapter"]
# A Kubernetes version kubernetes-validate ships schemas for (offline) and every supported cluster has.
K8S_VERSION = "1.30.0"
# Custom resources the schemas do not cover: apiVersion and the spec fields each must have.
CRDS = {
    "ServiceMonitor": ("monitoring.coreos.com/v1", ["selector", "endpoints"]),
    "ScaledObject": ("keda.sh/v1alpha1", ["scaleTargetRef", "triggers"]),
    "ClusterServingRuntime": ("serving.kserve.io/v1alpha1", ["supportedModelFormats", "containers"]),
    "InferenceService": ("serving.kserve.io/v1beta1", ["predictor"]),
}
METRIC = re.compile(r"\bfastserve_[a-z0-9_]+")
HANG_GUARD_S = 60


def tool(name: str) -> str:
    """A console script of the test extra: beside this interpreter, else on PATH."""
    found = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    assert found, f"{name} is missing: pip install '.[test]'"
    return found


def serve_parser() -> argparse.ArgumentParser:
    """The `fastserve serve` parser, built without reading this process's environment."""
    sub = next(a for a in build_parser(environ={})._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def env_names() -> list[str]:
    return [env_name(a) for a in serve_parser()._actions if a.option_strings and a.dest != "help"]


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Every kustomization rendered by the real kustomize (kubectl's), written to files for checkov."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    out = tmp_path_factory.mktemp("rendered")
    result = {}
    for k in KUSTOMIZATIONS:
        text = subprocess.run(
            [kubectl, "kustomize", str(KUBERNETES / k)], check=True, capture_output=True, text=True, timeout=120
        ).stdout
        (out / f"{k.replace('/', '-')}.yaml").write_text(text)
        result[k] = [d for d in yaml.safe_load_all(text) if d]
    result["kserve"] = [d for f in sorted(KSERVE.glob("*.yaml")) for d in docs(f)]
    result["_dir"] = out  # type: ignore[assignment]
    return result


def find(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matches = [o for o in objs if o["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]["containers"][0]


# -- images -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    r = subprocess.run([tool("hadolint"), str(dockerfile)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_contract(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    stages = re.findall(r"^FROM (\S+)(?: AS (\S+))?", text, re.M)
    assert len(stages) == 2 and stages[0][1] == "build" and not stages[1][1], stages
    final = text.split("\nFROM ")[-1]
    assert "maturin build --release --locked" in text
    assert "COPY --from=build /wheels" in final
    assert not re.search(r"\b(gcc|build-essential|cargo|rustc|maturin)\b", final), "build tools in the final stage"
    assert re.search(r"^USER 10001", final, re.M)
    assert re.search(r"^EXPOSE 8000 8001 8002$", final, re.M)
    assert re.search(r"^STOPSIGNAL SIGTERM$", final, re.M)
    assert 'ENTRYPOINT ["fastserve", "serve"]' in final
    assert "FASTSERVE_HOST=0.0.0.0" in final and "FASTSERVE_MODEL_REPOSITORY=/models" in final
    if dockerfile.name.endswith(".gpu"):
        assert "nvidia/cuda:" in stages[1][0] and "[gpu]" in final and "onnxruntime-gpu" in final


def test_dockerignore_keeps_the_build_context_to_the_sources() -> None:
    lines = [x for x in (ROOT / ".dockerignore").read_text().splitlines() if x and not x.startswith("#")]
    assert lines[0] == "*"
    kept = {x[1:].rstrip("/") for x in lines if x.startswith("!")}
    sources = [m for f in DOCKERFILES for m in re.findall(r"^COPY (?!--)(.+) \S+$", f.read_text(), re.M)]
    copied = {p for line in sources for p in line.split()}
    assert copied <= kept, copied - kept


# -- manifests ----------------------------------------------------------------------------------


def test_manifests_validate_against_kubernetes_schemas(rendered) -> None:
    checked = 0
    for name, objs in rendered.items():
        if name == "_dir":
            continue
        for obj in objs:
            if obj["kind"] in CRDS:
                api, required = CRDS[obj["kind"]]
                assert obj["apiVersion"] == api, obj["metadata"]
                assert obj["metadata"].get("name"), obj
                missing = [f for f in required if f not in obj.get("spec", {})]
                assert not missing, f"{obj['kind']} {obj['metadata']['name']} lacks spec.{missing}"
                continue
            try:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']}: {e.message} at {list(e.path)}")
            checked += 1
    assert checked >= 20


def test_kubernetes_validate_rejects_a_broken_deployment(rendered) -> None:
    # The validation above can fail: an unknown field in the pod template is caught.
    broken = json.loads(json.dumps(find(rendered["overlays/cpu"], "Deployment")))
    container(broken)["readOnlyRootFilesytem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


@pytest.fixture(scope="module")
def checkov_reports(rendered, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """One checkov run over the rendered manifests, the KServe manifests and both Dockerfiles (not
    --quiet: the report must list skipped checks too)."""
    scan = tmp_path_factory.mktemp("checkov")
    shutil.copytree(rendered["_dir"], scan / "kubernetes")
    shutil.copytree(KSERVE, scan / "kserve")
    (scan / "images").mkdir()
    for f in DOCKERFILES:
        shutil.copy(f, scan / "images" / f.name)
    r = subprocess.run(
        [
            tool("checkov"),
            "-d",
            str(scan),
            "--framework",
            "kubernetes",
            "dockerfile",
            "--compact",
            "--skip-download",
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    try:
        parsed = json.loads(r.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"checkov gave no JSON report (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return parsed if isinstance(parsed, list) else [parsed]


def test_checkov_reports_no_failed_checks(checkov_reports) -> None:
    by_type = {r["check_type"]: r for r in checkov_reports}
    assert set(by_type) == {"kubernetes", "dockerfile"}
    for check_type, report in by_type.items():
        failed = report["results"]["failed_checks"]
        assert not failed, [(c["check_id"], c["resource"], c["file_path"]) for c in failed]
        assert report["summary"]["passed"] > 50, check_type
        for skipped in report["results"]["skipped_checks"]:
            # Every skip is justified where it is declared.
            assert len(skipped["check_result"].get("suppress_comment", "")) > 20, skipped["check_id"]


def test_deployment_drains_within_its_grace_period_and_is_locked_down(rendered) -> None:
    for overlay in ("overlays/cpu", "overlays/gpu"):
        deployment = find(rendered[overlay], "Deployment")
        pod = deployment["spec"]["template"]["spec"]
        c = container(deployment)
        env = {e["name"]: e["value"] for e in c["env"]}
        pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
        # SIGTERM comes after preStop; fastserve then drains for up to FASTSERVE_DRAIN_TIMEOUT_S.
        assert pod["terminationGracePeriodSeconds"] > pre_stop + float(env["FASTSERVE_DRAIN_TIMEOUT_S"])
        assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 600
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert c["resources"]["requests"] and c["resources"]["limits"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {
            "http": int(env["FASTSERVE_HTTP_PORT"]),
            "grpc": int(env["FASTSERVE_GRPC_PORT"]),
            "metrics": int(env["FASTSERVE_METRICS_PORT"]),
        }
        assert env["FASTSERVE_HOST"] == "0.0.0.0"
        # Every variable the manifest sets is one the CLI reads.
        assert set(env) <= set(env_names()), set(env) - set(env_names())
        has_gpu = "nvidia.com/gpu" in c["resources"]["limits"]
        assert has_gpu == (overlay == "overlays/gpu")
    service = find(rendered["overlays/cpu"], "Service")
    assert {p["name"]: p.get("appProtocol") for p in service["spec"]["ports"]} == {
        "http": "http",
        "grpc": "kubernetes.io/h2c",
        "metrics": "http",
    }
    kinds = {o["kind"] for o in rendered["overlays/cpu"]}
    assert {"PodDisruptionBudget", "ServiceMonitor", "HorizontalPodAutoscaler"} <= kinds
    keda = {o["kind"] for o in rendered["overlays/cpu-keda"]}
    assert "ScaledObject" in keda and "HorizontalPodAutoscaler" not in keda
    # Stateful models: a client's sequences stay on the replica that holds their state.
    assert "sessionAffinity" not in service["spec"]
    pinned = find(rendered["overlays/cpu-sequences"], "Service")["spec"]
    assert pinned["sessionAffinity"] == "ClientIP" and pinned["ports"] == service["spec"]["ports"]


def test_kserve_runtime_and_inference_service(rendered) -> None:
    runtime = find(rendered["kserve"], "ClusterServingRuntime")
    isvc = find(rendered["kserve"], "InferenceService")
    spec = runtime["spec"]
    assert {f["name"] for f in spec["supportedModelFormats"]} == {"onnx", "openvino", "python"}
    assert spec["protocolVersions"] == ["v2", "grpc-v2"]
    args = spec["containers"][0]["args"]
    assert {"--model-repository=/mnt/models", "--http-port=8080", "--grpc-port=8081", "--model-name={{.Name}}"} <= set(
        args
    )
    parsed = build_parser(environ={}).parse_args(["serve", *(a.replace("{{.Name}}", "mlp") for a in args)])
    assert (parsed.model_name, parsed.http_port, parsed.grpc_port) == ("mlp", 8080, 8081)
    predictor = isvc["spec"]["predictor"]
    assert predictor["model"]["runtime"] == runtime["metadata"]["name"]
    assert 0 < predictor["canaryTrafficPercent"] < 100
    assert 1 <= predictor["minReplicas"] < predictor["maxReplicas"]


# -- the metrics the autoscalers query ----------------------------------------------------------


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)] from a live /metrics."""
    text = requests.get(url, timeout=10).text
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def autoscaling_queries(rendered) -> tuple[set[str], set[str], set[str]]:
    """(metric names in PromQL, HPA metric names, metric names the adapter serves)."""
    promql: list[str] = []
    adapter_config = yaml.safe_load(find(rendered["prometheus-adapter"], "ConfigMap")["data"]["config.yaml"])
    served = set()
    for rule in adapter_config["rules"]:
        promql += [rule["seriesQuery"], rule["metricsQuery"]]
        served.add(rule["name"]["as"])
    keda = find(rendered["overlays/cpu-keda"], "ScaledObject")
    promql += [t["metadata"]["query"] for t in keda["spec"]["triggers"] if t["type"] == "prometheus"]
    hpa = find(rendered["overlays/cpu"], "HorizontalPodAutoscaler")
    hpa_names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    return {n for q in promql for n in METRIC.findall(q)}, hpa_names, served


def test_autoscaling_queries_name_metrics_a_live_server_exports(rendered, start_server) -> None:
    queried, hpa_names, served = autoscaling_queries(rendered)
    assert "fastserve_pending_requests" in queried and "fastserve_queue_duration_seconds_bucket" in queried
    server = start_server(EXAMPLES)
    exported = set(scrape(server.metrics_url))
    assert queried <= exported, f"queried but not exported: {queried - exported}"
    # The HPA reads what the adapter serves, and the adapter serves only what it queries.
    assert hpa_names and hpa_names <= served, hpa_names - served
    assert "fastserve_pending_requests" in hpa_names


class Gated:
    """Holds every execute() until ``gate`` is set; ``entered`` tells the first one started."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.entered.set()
        self.gate.wait(HANG_GUARD_S)
        return {"Y": inputs["X"]}


def test_pending_requests_rise_under_load_and_return_to_zero() -> None:
    from fastserve import Server, Tensor

    model = Gated()
    server = Server(http_port=0, metrics_port=0)
    server.add_model(
        "gated", model, inputs=[Tensor("X", "FP32", [-1])], outputs=[Tensor("Y", "FP32", [-1])], max_batch_size=0
    )
    n = 6

    def pending() -> float:
        values = scrape(f"http://127.0.0.1:{server.metrics_port}/metrics")["fastserve_pending_requests"]
        return sum(v for labels, v in values if labels["model"] == "gated")

    def infer(i: int) -> int:
        body = {"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": [float(i)]}]}
        url = f"http://127.0.0.1:{server.http_port}/v2/models/gated/infer"
        return requests.post(url, json=body, timeout=HANG_GUARD_S * 2).status_code

    with server, ThreadPoolExecutor(n + 1) as pool:
        try:
            assert pending() == 0
            # One request occupies the only instance; the next n can only wait in the queue.
            first = pool.submit(infer, 0)
            assert model.entered.wait(HANG_GUARD_S)
            rest = [pool.submit(infer, i) for i in range(1, n + 1)]
            wait_until(lambda: pending() == n, what=f"fastserve_pending_requests == {n}")
        finally:
            model.gate.set()
        assert [f.result() for f in [first, *rest]] == [200] * (n + 1)
        wait_until(lambda: pending() == 0, what="fastserve_pending_requests back to 0")


# -- KServe conventions -------------------------------------------------------------------------


def kserve_server(start_server, mnt: Path, name: str) -> ServerProcess:
    """fastserve started with the ClusterServingRuntime's own args; its ports (8080, 8081, 8002)
    become ephemeral and /mnt/models becomes ``mnt``."""
    runtime = next(d for d in docs(KSERVE / "clusterservingruntime.yaml") if d["kind"] == "ClusterServingRuntime")
    args = []
    for a in runtime["spec"]["containers"][0]["args"]:
        a = a.replace("{{.Name}}", name).replace("/mnt/models", str(mnt))
        args.append(re.sub(r"^(--(?:http|grpc|metrics)-port)=\d+$", r"\1=0", a))
    return start_server(mnt, *args)


def infer_both(server: ServerProcess, name: str) -> None:
    """The same rows through HTTP and gRPC give the same, correct-shaped answer."""
    x = np.linspace(-1, 1, 2 * 64, dtype=np.float32).reshape(2, 64)
    h = httpclient.InferenceServerClient(server.address)
    hi = httpclient.InferInput("INPUT0", [2, 64], "FP32")
    hi.set_data_from_numpy(x)
    http_out = h.infer(name, [hi]).as_numpy("OUTPUT0")
    g = grpcclient.InferenceServerClient(server.grpc_address)
    gi = grpcclient.InferInput("INPUT0", [2, 64], "FP32")
    gi.set_data_from_numpy(x)
    grpc_out = g.infer(name, [gi]).as_numpy("OUTPUT0")
    assert http_out.shape == (2, 10)
    np.testing.assert_array_equal(http_out, grpc_out)
    assert g.is_model_ready(name) and h.is_model_ready(name)


@pytest.fixture
def mnt_models(tmp_path: Path) -> Iterator[Path]:
    """KServe's layout: the model's own files at the mount root (config.toml + 1/model.onnx)."""
    mnt = tmp_path / "mnt" / "models"
    shutil.copytree(EXAMPLES / "mlp", mnt)
    yield mnt


def test_kserve_mode_serves_the_mounted_model_over_http_and_grpc(start_server, mnt_models: Path) -> None:
    assert sorted(p.name for p in mnt_models.iterdir()) == ["1", "config.toml"]
    server = kserve_server(start_server, mnt_models, "my-isvc")
    infer_both(server, "my-isvc")
    r = requests.post(f"{server.url}/v2/models/mlp/infer", json={"inputs": []}, timeout=10)
    assert r.status_code == 404
    assert 'model="my-isvc"' in requests.get(server.metrics_url, timeout=10).text


def test_kserve_mode_serves_a_bare_model_file_as_version_1(start_server, mnt_models: Path) -> None:
    # storageUri pointing at a single file: /mnt/models/model.onnx and nothing else.
    shutil.move(mnt_models / "1" / "model.onnx", mnt_models / "model.onnx")
    (mnt_models / "1").rmdir()
    (mnt_models / "config.toml").unlink()
    server = kserve_server(start_server, mnt_models, "bare")
    infer_both(server, "bare")
    meta = requests.get(f"{server.url}/v2/models/bare", timeout=10).json()
    assert meta["versions"] == ["1"]


def test_kserve_mode_ignores_a_version_directory_linked_out_of_the_mount(
    start_server, mnt_models: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    shutil.copytree(mnt_models / "1", outside)
    (mnt_models / "2").symlink_to(outside, target_is_directory=True)
    server = kserve_server(start_server, mnt_models, "m")
    assert requests.get(f"{server.url}/v2/models/m", timeout=10).json()["versions"] == ["1"]


def test_model_name_from_the_environment_and_flags_win(
    start_server, mnt_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        monkeypatch.setenv("FASTSERVE_MODEL_NAME", "from-env")
        monkeypatch.setenv("FASTSERVE_LOG_FORMAT", "json")
        # A port in use: the server starts only because the --http-port 0 flag wins over it.
        monkeypatch.setenv("FASTSERVE_HTTP_PORT", str(busy))
        server = start_server(mnt_models)
        assert server.port != busy
        assert requests.get(f"{server.url}/v2/models/from-env/ready", timeout=10).status_code == 200
        assert all(json.loads(line)["level"] for line in server.lines if line.strip())


def test_invalid_model_name_is_a_usage_error(mnt_models: Path) -> None:
    for bad in ("../etc", "a/b", ".hidden"):
        r = subprocess.run(
            [sys.executable, "-m", "fastserve", "serve", "--model-repository", str(mnt_models), "--model-name", bad],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 2, r.stderr
        assert f"invalid model name '{bad}'" in r.stderr


# -- FASTSERVE_* environment fallbacks ----------------------------------------------------------


def serve_args(environ: dict[str, str], *argv: str) -> Any:
    return build_parser(environ=environ).parse_args(["serve", *argv])


def test_every_serve_flag_reads_its_environment_variable_and_flags_win(tmp_path: Path) -> None:
    env = {
        "FASTSERVE_MODEL_REPOSITORY": str(tmp_path),
        "FASTSERVE_MODEL_NAME": "m",
        "FASTSERVE_HOST": "0.0.0.0",
        "FASTSERVE_HTTP_PORT": "8080",
        "FASTSERVE_GRPC_PORT": "8081",
        "FASTSERVE_METRICS_PORT": "9090",
        "FASTSERVE_LOG_FORMAT": "json",
        "FASTSERVE_LOG_LEVEL": "debug",
        "FASTSERVE_DRAIN_TIMEOUT_S": "12.5",
        "FASTSERVE_NO_METRICS": "true",
        "FASTSERVE_ACCESS_LOG": "0",
        "FASTSERVE_MODEL_CONTROL_MODE": "explicit",
        "FASTSERVE_LOAD_MODEL": "a, b",
    }
    a = serve_args(env)
    assert (a.model_repository, a.model_name, a.host) == (tmp_path, "m", "0.0.0.0")
    assert (a.http_port, a.grpc_port, a.metrics_port) == (8080, 8081, 9090)
    assert (a.log_format, a.log_level, a.drain_timeout_s) == ("json", "debug", 12.5)
    assert (a.no_metrics, a.access_log, a.model_control_mode, a.load_model) == (True, False, "explicit", ["a", "b"])
    b = serve_args(env, "--http-port", "1234", "--model-name", "n", "--load-model", "c", "--host", "127.0.0.1")
    assert (b.http_port, b.model_name, b.load_model, b.host) == (1234, "n", ["c"], "127.0.0.1")
    c = serve_args({}, "--model-repository", "x")
    assert (c.http_port, c.host, c.model_name, c.load_model) == (8000, "127.0.0.1", None, [])
    # An empty variable counts as unset.
    assert serve_args({"FASTSERVE_HTTP_PORT": ""}, "--model-repository", "x").http_port == 8000


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("FASTSERVE_HTTP_PORT", "eighty", "FASTSERVE_HTTP_PORT='eighty' is not a valid --http-port"),
        ("FASTSERVE_LOG_FORMAT", "xml", "FASTSERVE_LOG_FORMAT='xml' is not one of text, json"),
        ("FASTSERVE_NO_METRICS", "maybe", "FASTSERVE_NO_METRICS='maybe' is not one of"),
    ],
)
def test_invalid_environment_value_is_a_usage_error(variable: str, value: str, message: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "fastserve", "serve", "--model-repository", str(EXAMPLES)],
        env=dict(os.environ, **{variable: value}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_every_environment_variable_is_documented() -> None:
    readme = (ROOT / "README.md").read_text()
    names = env_names()
    assert len(names) > 20
    assert [n for n in names if n not in readme] == []
