"""Versions side by side, version policies, repository control modes, zero-downtime swaps, and
traffic routing by labels, weights and sticky keys, against real servers."""

from __future__ import annotations

import json
import shutil
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from conftest import VERSIONED_CONFIG, VERSIONED_MODEL, write_model
from helpers import wait_until

# Each version answers with its own number, so a response proves which version ran it.


def make_model(repo: Path, name: str, versions: list[int], extra_config: str = "") -> Path:
    path = None
    for v in versions:
        path = write_model(repo, name, VERSIONED_CONFIG + "\n" + extra_config, VERSIONED_MODEL, version=v)
    assert path is not None
    return path


def add_version(model: Path, version: int, source: str = VERSIONED_MODEL) -> None:
    (model / str(version)).mkdir()
    (model / str(version) / "model.py").write_text(textwrap.dedent(source))


def ask(url: str, model: str, path: str = "", headers: dict | None = None, **extra) -> requests.Response:
    body = {"inputs": [{"name": "X", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}], **extra}
    return requests.post(f"{url}/v2/models/{model}{path}/infer", json=body, headers=headers, timeout=60)


def served_by(r: requests.Response) -> int:
    assert r.status_code == 200, r.text
    body = r.json()
    version = next(o for o in body["outputs"] if o["name"] == "V")["data"][0]
    assert body["model_version"] == str(version), "model_version names the version that answered"
    return version


@pytest.mark.parametrize(
    ("policy", "served"),
    [
        ("", [3]),
        ("[version_policy]\nlatest = 2\n", [2, 3]),
        ("[version_policy]\nall = true\n", [1, 2, 3]),
        ("[version_policy]\nspecific = [1, 3]\n", [1, 3]),
    ],
    ids=["default", "latest-2", "all", "specific"],
)
def test_version_policies(start_server, tmp_path: Path, policy: str, served: list[int]) -> None:
    make_model(tmp_path, "m", [1, 2, 3], policy)
    server = start_server(tmp_path)
    meta = requests.get(f"{server.url}/v2/models/m", timeout=10).json()
    assert meta["versions"] == [str(v) for v in served]
    for v in (1, 2, 3):
        r = requests.get(f"{server.url}/v2/models/m/versions/{v}/ready", timeout=10)
        assert r.status_code == (200 if v in served else 404)
        if v in served:
            assert served_by(ask(server.url, "m", f"/versions/{v}")) == v
    assert served_by(ask(server.url, "m")) == max(served), "no version: the highest served one"


def test_repository_changes_refused_in_mode_none(start_server, tmp_path: Path) -> None:
    make_model(tmp_path, "m", [1])
    server = start_server(tmp_path)
    index = requests.post(server.url + "/v2/repository/index", timeout=10)
    assert index.status_code == 200, "the index is readable in every control mode"
    assert index.json() == [{"name": "m", "version": "1", "state": "READY", "reason": ""}]
    for path in ["/v2/repository/models/m/load", "/v2/repository/models/m/unload"]:
        r = requests.post(server.url + path, timeout=10)
        assert r.status_code == 403, path
        assert "--model-control-mode explicit or poll" in r.json()["error"]
    client = httpclient.InferenceServerClient(server.address)
    with pytest.raises(Exception, match="explicit model load / unload is not allowed"):
        client.load_model("m")
    assert served_by(ask(server.url, "m")) == 1


def test_explicit_mode_load_unload_index_with_tritonclient(start_server, tmp_path: Path) -> None:
    make_model(tmp_path, "a", [1])
    make_model(tmp_path, "b", [1, 2])
    server = start_server(tmp_path, "--model-control-mode", "explicit", "--load-model", "a")
    client = httpclient.InferenceServerClient(server.address)
    index = client.get_model_repository_index()
    assert {(e["name"], e.get("version"), e["state"]) for e in index} == {
        ("a", "1", "READY"),
        ("b", None, "UNAVAILABLE"),
    }
    assert not client.is_model_ready("b")
    assert requests.post(f"{server.url}/v2/models/b/infer", json={"inputs": []}, timeout=10).status_code == 404

    client.load_model("b")
    assert client.is_model_ready("b")
    assert served_by(ask(server.url, "b")) == 2
    ready = client.get_model_repository_index()
    assert ("b", "2", "READY") in {(e["name"], e.get("version"), e["state"]) for e in ready}

    client.unload_model("a")
    assert not client.is_model_ready("a")
    assert ask(server.url, "a").status_code == 404
    index = {(e["name"], e.get("version"), e["state"], e["reason"]) for e in client.get_model_repository_index()}
    assert ("a", None, "UNAVAILABLE", "unloaded") in index
    ready_only = requests.post(f"{server.url}/v2/repository/index", json={"ready": True}, timeout=10).json()
    assert [e["name"] for e in ready_only] == ["b"]

    for bad in ["nope", "..", "a%2F..%2F..%2Fetc"]:
        r = requests.post(f"{server.url}/v2/repository/models/{bad}/load", timeout=10)
        assert r.status_code in (400, 404), bad
        assert str(tmp_path) not in r.text


def test_explicit_load_all_with_star(start_server, tmp_path: Path) -> None:
    make_model(tmp_path, "a", [1])
    make_model(tmp_path, "b", [1])
    server = start_server(tmp_path, "--model-control-mode", "explicit", "--load-model", "*")
    assert served_by(ask(server.url, "a")) == 1 and served_by(ask(server.url, "b")) == 1


def test_a_broken_new_version_leaves_the_serving_one(start_server, tmp_path: Path) -> None:
    model = make_model(tmp_path, "m", [1], "[version_policy]\nall = true\n")
    server = start_server(tmp_path, "--model-control-mode", "explicit", "--load-model", "m")
    add_version(model, 2, "raise ImportError('broken build')\n")
    r = requests.post(f"{server.url}/v2/repository/models/m/load", timeout=60)
    assert r.status_code == 400
    assert (
        "load failed for model 'm': version 2 is at UNAVAILABLE state: model.py raised ImportError: broken build"
        in r.json()["error"]
    )
    assert served_by(ask(server.url, "m")) == 1, "requests without a version stay on the ready version"
    # The failed version is not registered beside the serving one (a failed version makes the
    # server unready, which would take a serving replica out of its load balancer); the index says why.
    assert requests.get(f"{server.url}/v2/models/m/versions/2/ready", timeout=10).status_code == 404
    assert requests.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200
    index = requests.post(f"{server.url}/v2/repository/index", timeout=10).json()
    assert {
        "name": "m",
        "version": "2",
        "state": "UNAVAILABLE",
        "reason": "model.py raised ImportError: broken build",
    } in index


def test_a_failed_reload_keeps_the_old_instances(start_server, tmp_path: Path) -> None:
    model = make_model(tmp_path, "m", [1])
    server = start_server(tmp_path, "--model-control-mode", "explicit", "--load-model", "m")
    (model / "1" / "model.py").write_text("raise RuntimeError('bad edit')\n")
    r = requests.post(f"{server.url}/v2/repository/models/m/load", timeout=60)
    assert r.status_code == 400 and "bad edit" in r.json()["error"]
    assert requests.get(f"{server.url}/v2/models/m/ready", timeout=10).status_code == 200
    assert served_by(ask(server.url, "m")) == 1


def test_poll_mode_picks_up_added_changed_and_removed_versions(start_server, tmp_path: Path) -> None:
    model = make_model(tmp_path, "m", [1], "[version_policy]\nall = true\n")
    server = start_server(tmp_path, "--model-control-mode", "poll", "--repository-poll-secs", "0.2")
    add_version(model, 2)
    server.wait_for_log("loaded model 'm' version 2")
    assert served_by(ask(server.url, "m")) == 2
    assert served_by(ask(server.url, "m", "/versions/1")) == 1
    shutil.rmtree(model / "1")
    server.wait_for_log("unloaded model 'm' version 1")
    assert requests.get(f"{server.url}/v2/models/m/versions/1/ready", timeout=10).status_code == 404
    # A new model directory appears, then a whole model goes away.
    make_model(tmp_path, "late", [1])
    server.wait_for_log("loaded model 'late' version 1")
    assert served_by(ask(server.url, "late")) == 1
    shutil.rmtree(tmp_path / "late")
    server.wait_for_log("unloaded model 'late' version 1")
    assert ask(server.url, "late").status_code == 404
    # The repository API is served in poll mode too.
    assert requests.post(f"{server.url}/v2/repository/index", timeout=10).status_code == 200


def test_swap_and_unload_under_load_lose_nothing(start_server, tmp_path: Path) -> None:
    model = make_model(tmp_path, "m", [1], "[version_policy]\nall = true\n")
    server = start_server(tmp_path, "--model-control-mode", "explicit", "--load-model", "m")
    stop = threading.Event()
    results: list[tuple[int, int | None]] = []
    lock = threading.Lock()

    def hammer() -> None:
        session = requests.Session()
        while not stop.is_set():
            body = {"inputs": [{"name": "X", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}
            r = session.post(f"{server.url}/v2/models/m/infer", json=body, timeout=60)
            version = served_by(r) if r.status_code == 200 else None
            with lock:
                results.append((r.status_code, version))

    def seen() -> int:
        with lock:
            return len(results)

    def more_answered_than(n: int) -> int:
        """Waits (hang guard only) until requests completed after this point, so each change below
        happens with traffic flowing."""
        return wait_until(lambda: seen() > n and seen(), what=f"more than {n} answered requests")

    with ThreadPoolExecutor(8) as pool:
        workers = [pool.submit(hammer) for _ in range(8)]
        try:
            more_answered_than(0)
            # v1 -> v1+v2: the new version is built while v1 serves, then requests move to v2.
            add_version(model, 2)
            client = httpclient.InferenceServerClient(server.address)
            client.load_model("m")
            before_unload = more_answered_than(seen())
            # Drop v1 with a config override (specific = [2]): v1 drains while requests keep coming.
            client.load_model("m", config=json.dumps({"version_policy": {"specific": [2]}}))
            more_answered_than(seen())
            # Reload v2 itself (changed file): new instances swap in while the old ones drain.
            (model / "2" / "model.py").write_text((model / "2" / "model.py").read_text() + "\n# edited\n")
            client.load_model("m", config=json.dumps({"version_policy": {"specific": [2]}}))
            after = more_answered_than(seen())
        finally:
            stop.set()
        for w in workers:
            w.result()
    failed = [r for r in results if r[0] != 200]
    assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:5]}"
    assert {v for _, v in results} <= {1, 2}
    assert after > before_unload > 0, "requests were flowing while versions changed"
    assert served_by(ask(server.url, "m")) == 2
    assert requests.get(f"{server.url}/v2/models/m/versions/1/ready", timeout=10).status_code == 404


ROUTED = (
    '[version_policy]\nall = true\n[routing]\nlabels = { stable = 1, canary = 2 }\nweights = { "1" = 80, "2" = 20 }\n'
)


def test_labels_route_exactly(start_server, tmp_path: Path) -> None:
    make_model(tmp_path, "m", [1, 2], ROUTED)
    server = start_server(tmp_path)
    assert all(served_by(ask(server.url, "m", "/labels/stable")) == 1 for _ in range(20))
    assert all(served_by(ask(server.url, "m", "/labels/canary")) == 2 for _ in range(20))
    assert requests.get(f"{server.url}/v2/models/m/labels/canary/ready", timeout=10).status_code == 200
    assert requests.get(f"{server.url}/v2/models/m/labels/canary", timeout=10).json()["versions"] == ["2"]
    r = requests.get(f"{server.url}/v2/models/m/labels/beta/ready", timeout=10)
    assert r.status_code == 404 and r.json() == {"error": "Request for unknown model: 'm' version beta is not found"}


def test_weights_split_traffic_within_statistical_tolerance(start_server, tmp_path: Path) -> None:
    make_model(tmp_path, "m", [1, 2], ROUTED)
    server = start_server(tmp_path)
    n = 2000
    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(lambda _: served_by(ask(server.url, "m")), range(n)))
    ones = versions.count(1)
    # Binomial(2000, 0.8): sd ≈ 17.9; ±6 sd is never exceeded by chance in practice.
    assert abs(ones - 0.8 * n) < 6 * (n * 0.8 * 0.2) ** 0.5, ones
    assert versions.count(2) == n - ones


def test_sticky_routing_keys(start_server, tmp_path: Path) -> None:
    make_model(tmp_path, "m", [1, 2], ROUTED)
    server = start_server(tmp_path)
    landed = {}
    for key in [f"user-{i}" for i in range(20)]:
        by_header = {served_by(ask(server.url, "m", headers={"X-Routing-Key": key})) for _ in range(10)}
        by_param = {served_by(ask(server.url, "m", parameters={"routing_key": key})) for _ in range(10)}
        assert len(by_header) == 1 and by_header == by_param, key
        landed[key] = by_header.pop()
    assert set(landed.values()) == {1, 2}, "20 keys spread over both versions"


def test_weights_change_through_a_config_override(start_server, tmp_path: Path) -> None:
    make_model(tmp_path, "m", [1, 2], ROUTED)
    server = start_server(tmp_path, "--model-control-mode", "explicit", "--load-model", "m")
    override = {"version_policy": {"all": True}, "routing": {"weights": {"1": 0, "2": 1}}}
    httpclient.InferenceServerClient(server.address).load_model("m", config=json.dumps(override))
    assert all(served_by(ask(server.url, "m")) == 2 for _ in range(50))


def test_warmup_runs_before_ready(start_server, tmp_path: Path) -> None:
    marker = tmp_path / "warmup.log"
    write_model(
        tmp_path / "repo",
        "w",
        VERSIONED_CONFIG + '\n[[warmup]]\nbatch_size = 4\ncount = 3\ndata = "random"\n',
        f"""
        import numpy as np

        class Model:
            def initialize(self, args):
                self.version = args["model_version"]

            def execute(self, inputs):
                with open({str(marker)!r}, "a") as f:
                    f.write(f"{{inputs['X'].shape}}\\n")
                x = inputs["X"]
                return {{"Y": x, "V": np.full(x.shape, self.version, dtype=np.int32)}}
        """,
    )
    server = start_server(tmp_path / "repo")
    assert marker.read_text().splitlines() == ["(4, 1)"] * 3, "three warmup batches ran before serving"
    assert served_by(ask(server.url, "w")) == 1


def test_routing_config_errors_are_clear(start_server, tmp_path: Path) -> None:
    make_model(tmp_path, "m", [1], '[routing]\nlabels = { "2" = 1 }\n')
    server = start_server(tmp_path)
    r = requests.get(f"{server.url}/v2/models/m/ready", timeout=10)
    assert "label '2' must be a non-numeric name" in r.json()["error"]


def test_repository_control_and_labels_over_grpc(start_server, tmp_path: Path) -> None:
    make_model(tmp_path, "m", [1, 2], ROUTED)
    make_model(tmp_path, "other", [1])
    server = start_server(tmp_path, "--model-control-mode", "explicit", "--load-model", "m")
    client = grpcclient.InferenceServerClient(server.grpc_address)
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {(e["name"], e.get("version", ""), e["state"]) for e in index} >= {
        ("m", "1", "READY"),
        ("other", "", "UNAVAILABLE"),
    }
    client.load_model("other")
    assert client.is_model_ready("other")
    client.unload_model("other")
    assert not client.is_model_ready("other")

    def version_of(model_version: str) -> int:
        x = grpcclient.InferInput("X", [1, 1], "FP32")
        x.set_data_from_numpy(np.ones((1, 1), dtype=np.float32))
        result = client.infer("m", [x], model_version=model_version)
        assert result.get_response().model_version == str(int(result.as_numpy("V")[0, 0]))
        return int(result.as_numpy("V")[0, 0])

    assert version_of("stable") == 1 and version_of("canary") == 2 and version_of("1") == 1
    with pytest.raises(Exception, match="'m' version beta is not found"):
        version_of("beta")


def test_grpc_repository_api_is_refused_in_mode_none(start_server, tmp_path: Path) -> None:
    make_model(tmp_path, "m", [1])
    server = start_server(tmp_path)
    with pytest.raises(Exception, match="explicit model load / unload is not allowed"):
        grpcclient.InferenceServerClient(server.grpc_address).load_model("m")
