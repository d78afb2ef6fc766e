"""One-command benchmark: fastserve (dynamic batching on and off) against a FastAPI + onnxruntime
wrapper and the in-process ONNX Runtime ceiling, all measured in the same run so the ratios hold on
a noisy machine.

    python benches/run.py            # full sweep, a few minutes
    python benches/run.py --quick    # smoke run, well under a minute

Builds ``fastserve-loadgen`` (release), then, one server at a time on 127.0.0.1 (port 0, the bound
ports read from the log): fastserve on ``examples/models`` (mlp: ``max_batch_size = 64``), fastserve
on a temporary copy with ``max_batch_size = 0`` (no batching), the mlp on defaults, the serving floor
(a model that does nothing), the transport floors (``fastserve-transport-floor``: hyper, or tonic for
gRPC, answering a fixed reply: what the protocols cost before any fastserve code), and
``benches/baseline_fastapi.py``.
All three stay up and the concurrency levels are interleaved: at each level every server is
measured over each protocol, then the in-process ceiling (ORT single-row runs/s, ORT plus JSON
decode/encode per row, batched ORT rows/s at 1..64 rows, interpolated at the mean batch size the
server formed), so that each ratio compares measurements taken close together in time. Prints a
markdown table and the targets, and writes ``results/latest.json``, ``results/latest.md`` and ``results/latest.png``.

Benchmark a release build of fastserve (``maturin build --release``); every server started here is
stopped on exit, errors included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# The waits are the test suite's (tests/helpers.py), so the harness and the tests share one of each.
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))
from helpers import GRPC_LISTENING, HTTP_LISTENING, wait_until  # noqa: E402

EXAMPLES = ROOT / "examples" / "models"
MODEL = "mlp"
ONNX_PATH = EXAMPLES / MODEL / "1" / "model.onnx"
FEATURES = 64

# Servers, in the order they run.
FASTSERVE = "fastserve"
NO_BATCH = "fastserve-nobatch"
# The mlp with no config.toml: what a newcomer gets.
DEFAULTS = "fastserve-defaults"
# The same server, interface and body sizes, answering from a Python model that does nothing: every
# other figure reads as "model time + this overhead".
FLOOR = "fastserve-floor"
# The HTTP libraries alone (`fastserve-transport-floor`, built with the loadgen): hyper answering a
# fixed mlp reply over HTTP/1.1 and gRPC, so each protocol's cost before any fastserve code is known;
# the "-tonic" twin serves its gRPC through tonic and prost, as fastserve does.
TRANSPORT = "transport-floor"
TRANSPORT_TONIC = "transport-floor-tonic"
TRANSPORTS = (TRANSPORT, TRANSPORT_TONIC)
FASTAPI = "fastapi"
SERVERS = (FASTSERVE, NO_BATCH, DEFAULTS, FLOOR, TRANSPORT, TRANSPORT_TONIC, FASTAPI)
# With --before-python, these also run from that interpreter's fastserve, named e.g. "fastserve@before".
BEFORE = "@before"
COMPARED = (FASTSERVE, DEFAULTS, FLOOR)
FLOOR_CONFIG = """backend = "python"
max_batch_size = 64
[dynamic_batching]
max_queue_delay_us = 0
max_queue_size = 4096
[[input]]
name = "INPUT0"
datatype = "FP32"
dims = [64]
[[output]]
name = "OUTPUT0"
datatype = "FP32"
dims = [10]
"""
FLOOR_MODEL = """import numpy as np


class Model:
    def execute(self, inputs):
        return {"OUTPUT0": np.zeros((inputs["INPUT0"].shape[0], 10), np.float32)}
"""
PROTOCOLS = ("http", "binary", "grpc")
CEILING_BATCHES = [1, 2, 4, 8, 16, 32, 64]


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The load generator


def target_dir() -> Path:
    return Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))


def loadgen_path() -> Path:
    return target_dir() / "release" / "fastserve-loadgen"


def build_loadgen(timeout_s: float = 1200) -> Path:
    log("building fastserve-loadgen (release)")
    subprocess.run(["cargo", "build", "--release", "-p", "fastserve-loadgen"], cwd=ROOT, check=True, timeout=timeout_s)
    return loadgen_path()


def run_loadgen(loadgen: Path, url: str, protocol: str, concurrency: int, **opts: Any) -> dict:
    """One measured point: runs the loadgen (bounded by its own --duration-s) and returns its JSON."""
    cmd = [str(loadgen), "--url", url, "--protocol", protocol, "--concurrency", str(concurrency), "--json"]
    for key, value in opts.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    budget = float(opts.get("duration_s", 5)) + float(opts.get("warmup_s", 1)) + 60
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=budget)
    if done.returncode != 0:
        raise RuntimeError(f"loadgen failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(done.stdout)


# ---------------------------------------------------------------------------------------------
# Servers


class Server:
    """A server subprocess on 127.0.0.1. fastserve is started with port 0 and its ports are parsed
    from the log; the transport floor prints its ports as its first stdout line; the baseline gets a
    free port picked here. Always stop() it (or use `started`)."""

    def __init__(self, name: str, cmd: list[str], port: int | None = None, ports_on_stdout: bool = False) -> None:
        self.name = name
        self.lines: list[str] = []
        self.http_port = port
        self.grpc_port: int | None = None
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        stdout = subprocess.PIPE if ports_on_stdout else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self._listening = threading.Event()
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()
        if ports_on_stdout:
            self._read_ports()

    def _read_ports(self) -> None:
        """`http=PORT grpc=PORT`, printed once both listeners are bound (EOF if it failed to start)."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        ports = re.fullmatch(r"http=(\d+) grpc=(\d+)\s*", line)
        if not ports:
            self.stop()
            raise RuntimeError(f"{self.name} did not start: {line!r}" + "".join(self.lines[-30:]))
        self.http_port, self.grpc_port = int(ports.group(1)), int(ports.group(2))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if len(self.lines) < 10_000:
                self.lines.append(line)
            g = GRPC_LISTENING.search(line)
            if g and self.grpc_port is None:
                self.grpc_port = int(g.group(2))
            h = HTTP_LISTENING.search(line)
            if h and not self._listening.is_set():
                self.http_port = int(h.group(2))
                self._listening.set()
        self._listening.set()

    def wait_ready(self, timeout_s: float = 120, from_log: bool = True) -> None:
        """Waits for the listening line (fastserve) and then for /v2/health/ready, bounded."""
        deadline = time.monotonic() + timeout_s
        if from_log:
            self._listening.wait(timeout_s)

        def ready_or_exited() -> str | None:
            if self.proc.poll() is not None:
                return "exited"
            if self.http_port is not None and http_status(self.url + "/v2/health/ready") == 200:
                return "ready"
            return None

        try:
            left = max(0.0, deadline - time.monotonic())
            outcome = wait_until(ready_or_exited, timeout=left, what=f"{self.name} to become ready", interval=0.1)
        except AssertionError:
            outcome = "timed out"
        if outcome != "ready":
            self.stop()
            raise RuntimeError(f"{self.name} did not become ready ({outcome}):\n" + "".join(self.lines[-30:]))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def stop(self, timeout_s: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout_s)
        self._pump.join(timeout=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str, timeout: float = 2) -> int | None:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except Exception:
        return None


def http_json(url: str, timeout: float = 10) -> Any:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def no_batching_repository(dest: Path) -> Path:
    """A copy of the mlp model with `max_batch_size = 0`: every request runs alone."""
    repo = dest / "models"
    shutil.copytree(EXAMPLES / MODEL, repo / MODEL)
    config = repo / MODEL / "config.toml"
    text = re.sub(r"(?m)^max_batch_size\s*=.*$", "max_batch_size = 0", config.read_text())
    config.write_text(text)
    return repo


def defaults_repository(dest: Path) -> Path:
    """The mlp model without its config.toml: every setting at its default."""
    repo = dest / "defaults"
    shutil.copytree(EXAMPLES / MODEL, repo / MODEL)
    (repo / MODEL / "config.toml").unlink()
    return repo


def floor_repository(dest: Path) -> Path:
    """A model named like the mlp, with its interface, that answers zeros without computing."""
    repo = dest / "floor"
    (repo / MODEL / "1").mkdir(parents=True)
    (repo / MODEL / "config.toml").write_text(FLOOR_CONFIG)
    (repo / MODEL / "1" / "model.py").write_text(FLOOR_MODEL)
    return repo


def repository_of(name: str, tmp: Path, loadgen: Path) -> Path | None:
    return {
        TRANSPORT: lambda: transport_floor_path(loadgen),
        TRANSPORT_TONIC: lambda: transport_floor_path(loadgen),
        FASTSERVE: lambda: EXAMPLES,
        NO_BATCH: lambda: no_batching_repository(tmp),
        DEFAULTS: lambda: defaults_repository(tmp),
        FLOOR: lambda: floor_repository(tmp),
    }.get(name, lambda: None)()


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a process and its waited-for children, from /proc (Linux)."""
    with suppress(OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return None


def cpu_us_per_request(before: float | None, after: float | None, served: float) -> float | None:
    """Server CPU between two `cpu_seconds` readings, per request served in between."""
    return (after - before) * 1e6 / served if before is not None and after is not None and served else None


def served_at_rate(args: argparse.Namespace, requests_per_s: float) -> float:
    """Requests over warmup and measurement when only the measured rate is known (no statistics API):
    the CPU readings cover both, and the warmup is taken to run at the measured rate."""
    return requests_per_s * (args.duration_s + args.warmup_s)


def base_name(server: str) -> str:
    """The server a "@before" twin stands for."""
    return server.removesuffix(BEFORE)


def fastserve_cmd(repo: Path, *extra: str, python: str = sys.executable) -> list[str]:
    cmd = [python, "-m", "fastserve", "serve", "--model-repository", str(repo), "--host", "127.0.0.1"]
    return [*cmd, "--http-port", "0", "--grpc-port", "0", "--no-metrics", "--log-level", "info", *extra]


def transport_floor_path(loadgen: Path) -> Path:
    """The transport floor is a second binary of the loadgen's crate, built beside it."""
    return loadgen.with_name("fastserve-transport-floor")


def start_server(name: str, repo: Path | None = None, python: str = sys.executable) -> Server:
    """`repo` is the model repository (fastserve), or the binary (the transport floors)."""
    if name in TRANSPORTS:
        assert repo is not None
        cmd = [str(repo), "--grpc-server", "tonic" if name == TRANSPORT_TONIC else "hyper"]
        server = Server(name, cmd, ports_on_stdout=True)
    elif name == FASTAPI:
        port = free_port()
        cmd = [sys.executable, str(ROOT / "benches" / "baseline_fastapi.py"), "--port", str(port)]
        server = Server(name, cmd, port=port)
        server.wait_ready(from_log=False)
    else:
        assert repo is not None
        server = Server(name, fastserve_cmd(repo, python=python))
        server.wait_ready()
    return server


@contextmanager
def started(name: str, repo: Path | None = None, python: str = sys.executable) -> Iterator[Server]:
    server = start_server(name, repo, python)
    try:
        yield server
    finally:
        server.stop()


def model_stats(url: str) -> dict:
    """The counters of the statistics API needed to see what batching did during a run."""
    entry = http_json(f"{url}/v2/models/{MODEL}/stats")["model_stats"][0]
    stats = entry["inference_stats"]
    return {
        "inference_count": entry["inference_count"],
        "execution_count": entry["execution_count"],
        "queue_ns": stats["queue"]["ns"],
        "compute_infer_ns": stats["compute_infer"]["ns"],
        "compute_input_ns": stats["compute_input"]["ns"],
        "compute_output_ns": stats["compute_output"]["ns"],
        "batch_sizes": {b["batch_size"]: b["compute_infer"]["count"] for b in entry["batch_stats"]},
    }


def stats_delta(before: dict, after: dict) -> dict:
    executions = after["execution_count"] - before["execution_count"]
    rows = after["inference_count"] - before["inference_count"]
    out: dict[str, Any] = {
        "executions": executions,
        "rows": rows,
        "mean_batch": rows / executions if executions else None,
    }
    for key in ("queue_ns", "compute_infer_ns", "compute_input_ns", "compute_output_ns"):
        out[key.replace("_ns", "_us_per_request")] = (after[key] - before[key]) / 1000 / rows if rows else None
    out["compute_infer_us_per_execution"] = (
        (after["compute_infer_ns"] - before["compute_infer_ns"]) / 1000 / executions if executions else None
    )
    return out


def rss_kib(pid: int) -> int | None:
    with suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def idle_connections_rss(loadgen: Path, server: Server, count: int, hold_s: float = 5) -> dict:
    """RSS of the fastserve process before, while `count` idle keep-alive connections are open, and
    after they are closed."""
    before = rss_kib(server.proc.pid)
    cmd = [str(loadgen), "--url", server.url, "--idle-connections", str(count), "--hold-s", str(hold_s)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    holding = None
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 150
        for line in proc.stderr:  # the loadgen stops opening after 120 s
            if line.startswith("holding"):
                holding = int(line.split()[1])
                break
            if time.monotonic() > deadline:
                break
        time.sleep(min(1.0, hold_s / 2))
        during = rss_kib(server.proc.pid)
        out, _ = proc.communicate(timeout=hold_s + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(1)
    after = rss_kib(server.proc.pid)
    result = json.loads(out) if out.strip() else {}
    per_conn = (during - before) / holding if holding and during and before else None
    return {
        "requested": count,
        "held": holding,
        "failed": result.get("failed"),
        "first_error": result.get("first_error"),
        "rss_kib_before": before,
        "rss_kib_during": during,
        "rss_kib_after_close": after,
        "kib_per_connection": per_conn,
    }


# ---------------------------------------------------------------------------------------------
# The in-process ceiling


def ort_session(threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # As fastserve configures its single CPU instance: all cores intra-op, one inter-op thread.
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(ONNX_PATH), sess_options=options, providers=["CPUExecutionProvider"])


def rate(fn: Callable[[], None], seconds: float, max_iterations: int = 10_000_000, windows: int = 3) -> float:
    """Calls per second of `fn`, bounded by time and by count: the best of `windows` equal windows,
    since a ceiling is what the machine can do when nothing else gets in the way."""
    fn()
    best = 0.0
    for _ in range(windows):
        n, start = 0, time.perf_counter()
        deadline = start + seconds / windows
        while n < max_iterations:
            fn()
            n += 1
            if n % 8 == 0 and time.perf_counter() >= deadline:
                break
        best = max(best, n / (time.perf_counter() - start))
    return best


def request_body(rows: int = 1) -> str:
    data = [(i % 17) * 0.125 - 1.0 for i in range(rows * FEATURES)]
    return json.dumps({"inputs": [{"name": "INPUT0", "shape": [rows, FEATURES], "datatype": "FP32", "data": data}]})


def measure_ceiling(seconds: float, batch_sizes: list[int]) -> dict:
    """In-process ORT: single-row runs/s, ORT + V2 JSON decode/encode per row, batched rows/s."""
    session = ort_session()
    x1 = np.asarray(json.loads(request_body())["inputs"][0]["data"], dtype=np.float32).reshape(1, FEATURES)
    single = rate(lambda: session.run(None, {"INPUT0": x1}), seconds)
    body = request_body()

    def json_round_trip() -> None:
        req = json.loads(body)
        t = req["inputs"][0]
        x = np.asarray(t["data"], dtype=np.float32).reshape(t["shape"])
        (y,) = session.run(None, {"INPUT0": x})
        json.dumps({"outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": list(y.shape), "data": y.tolist()}]})

    with_json = rate(json_round_trip, seconds)
    batched = {}
    for b in sorted(set(batch_sizes)):
        xb = np.tile(x1, (b, 1))
        batched[b] = b * rate(lambda xb=xb: session.run(None, {"INPUT0": xb}), seconds)
    return {
        "ort_single_row_runs_per_s": single,
        "ort_json_rows_per_s": with_json,
        "ort_batched_rows_per_s": batched,
        "ort_intra_op_threads": os.cpu_count() or 1,
    }


def batched_ceiling(ceiling: dict, mean_batch: float | None) -> float | None:
    """Batched ORT rows/s at the batch size the server formed (interpolated between measured sizes)."""
    table = ceiling["ort_batched_rows_per_s"]
    if not table or mean_batch is None:
        return None
    sizes = sorted(int(b) for b in table)
    values = [table[b] if b in table else table[str(b)] for b in sizes]
    return float(np.interp(mean_batch, sizes, values))


# ---------------------------------------------------------------------------------------------
# One external client for both protocols (h2load): neither protocol is measured through our own
# client, whose gRPC path costs more than its HTTP one.

TIME_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}


def grpc_infer_body(rows: int = 1) -> bytes:
    """The mlp request as one gRPC message: a length-prefixed, uncompressed ModelInferRequest."""
    from tritonclient.grpc import service_pb2

    x = np.asarray(json.loads(request_body(rows))["inputs"][0]["data"], dtype=np.float32)
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, FEATURES])
    request.raw_input_contents.append(x.tobytes())
    message = request.SerializeToString()
    return b"\0" + len(message).to_bytes(4, "big") + message


def check_grpc_body(server: Server, body: bytes) -> None:
    """Sends h2load's exact message once through grpcio: a body the server refused would make
    h2load count fast failures (it sees HTTP 200 and no grpc-status) as requests served."""
    import grpc
    from tritonclient.grpc import service_pb2

    with grpc.insecure_channel(server.grpc_url) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        reply = service_pb2.ModelInferResponse.FromString(infer(body[5:], timeout=10))
    if not reply.raw_output_contents:
        raise RuntimeError(f"the gRPC body h2load would send got no output: {reply}")


def h2load_time_us(text: str) -> float:
    value = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    return float(value.group(1)) * TIME_UNITS[value.group(2)] if value else float("nan")


def run_h2load(
    args: argparse.Namespace, server: Server, url: str, body: bytes, c: int, headers: list[str], h1: bool
) -> dict:
    """One h2load point, with the CPU per request of the server and of h2load itself (they share
    the machine's cores, so a protocol that costs the client more leaves the server less)."""
    cpu_before, client_before = cpu_seconds(server.proc.pid), resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.NamedTemporaryFile(suffix=".body") as f:
        f.write(body)
        f.flush()
        duration, warmup = f"{args.duration_s * 1000:.0f}ms", f"{args.warmup_s * 1000:.0f}ms"
        cmd = ["h2load", "-c", str(c), "-m", "1", "-D", duration, "--warm-up-time", warmup]
        cmd += ["-d", f.name, *(["--h1"] if h1 else []), *[x for h in headers for x in ("-H", h)], url]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration_s + args.warmup_s + 60)
    out = done.stdout
    rate = re.search(r"finished in \S+, ([\d.]+) req/s", out)
    counts = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
    timing = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", out)
    if done.returncode != 0 or not rate or not counts:
        raise RuntimeError(f"h2load failed ({done.returncode}): {done.stderr.strip()} {out[-500:]}")
    cpu_after, client_after = cpu_seconds(server.proc.pid), resource.getrusage(resource.RUSAGE_CHILDREN)
    served = served_at_rate(args, float(rate.group(1)))
    client_s = sum(getattr(client_after, f) - getattr(client_before, f) for f in ("ru_utime", "ru_stime"))
    return {
        "requests_per_s": float(rate.group(1)),
        "server_cpu_us_per_request": cpu_us_per_request(cpu_before, cpu_after, served),
        "client_cpu_us_per_request": cpu_us_per_request(0.0, client_s, served),
        "succeeded": int(counts.group(3)),
        "failed": int(counts.group(4)),
        "mean_latency_us": h2load_time_us(timing.group(3)) if timing else None,
        "max_latency_us": h2load_time_us(timing.group(2)) if timing else None,
    }


def external_client(args: argparse.Namespace, servers: dict[str, Server], c: int) -> dict | None:
    """HTTP/1.1 JSON and gRPC batch-1 at `c` connections, both from h2load."""
    if shutil.which("h2load") is None:
        log("h2load not found (Debian: apt-get install nghttp2-client): skipping the same-client comparison")
        return None
    grpc_body = grpc_infer_body()
    out: dict[str, Any] = {"concurrency": c, "client": "h2load", "servers": {}}
    for name in (FASTSERVE, FLOOR, *TRANSPORTS, FASTSERVE + BEFORE, FLOOR + BEFORE):
        server = servers.get(name)
        if server is None:
            continue
        check_grpc_body(server, grpc_body)
        rounds = []
        # Alternating rounds: on a shared 2-core machine one pair of 5 s points varies by ±15%.
        for _ in range(args.h2load_rounds):
            http = run_h2load(
                args,
                server,
                f"{server.url}/v2/models/{MODEL}/infer",
                request_body().encode(),
                c,
                ["content-type: application/json"],
                h1=True,
            )
            grpc = run_h2load(
                args,
                server,
                f"http://{server.grpc_url}/inference.GRPCInferenceService/ModelInfer",
                grpc_body,
                c,
                ["content-type: application/grpc", "te: trailers"],
                h1=False,
            )
            ratio = grpc["requests_per_s"] / http["requests_per_s"] if http["requests_per_s"] else None
            rounds.append({"http": http, "grpc": grpc, "grpc_over_http": ratio})
            log(
                f"h2load {name} c={c}: HTTP JSON {http['requests_per_s']:.0f} req/s, "
                f"gRPC {grpc['requests_per_s']:.0f} req/s ({fmt(ratio)})"
            )
        # The round with the median ratio stands for the server; every round is kept.
        ranked = sorted(rounds, key=lambda r: r["grpc_over_http"] or 0.0)
        out["servers"][name] = {**ranked[len(ranked) // 2], "rounds": rounds}
    main = out["servers"].get(FASTSERVE)
    out["grpc_over_http"] = main["grpc_over_http"] if main else None
    # What the libraries alone allow: each floor's gRPC against its own hyper HTTP/1.1.
    for key, name in (("transport_grpc_over_http", TRANSPORT), ("tonic_grpc_over_http", TRANSPORT_TONIC)):
        floor = out["servers"].get(name)
        out[key] = floor["grpc_over_http"] if floor else None
    return out


def external_markdown(external: dict) -> str:
    lines = [
        f"Same external client for both protocols (h2load, {external['concurrency']} connections, batch-1; "
        "alternating rounds, the round with the median ratio shown):",
        "",
        "| server | HTTP/1.1 JSON req/s | gRPC req/s | gRPC / HTTP | every round | HTTP mean ms | gRPC mean ms "
        "| server CPU us/req HTTP, gRPC | h2load CPU us/req HTTP, gRPC | failed |",
        "|" + "---|" * 10,
    ]
    for name, r in external["servers"].items():
        http, grpc = r["http"], r["grpc"]
        mean = [fmt(x["mean_latency_us"] / 1000 if x["mean_latency_us"] else None) for x in (http, grpc)]
        cpu = {
            k: ", ".join(fmt(x.get(f"{k}_cpu_us_per_request"), ".0f") for x in (http, grpc))
            for k in ("server", "client")
        }
        failed = sum(x[p]["failed"] for x in r["rounds"] for p in ("http", "grpc"))
        each = ", ".join(fmt(x["grpc_over_http"]) for x in r["rounds"])
        lines.append(
            f"| {name} | {http['requests_per_s']:.0f} | {grpc['requests_per_s']:.0f} | {fmt(r['grpc_over_http'])} "
            f"| {each} | {mean[0]} | {mean[1]} | {cpu['server']} | {cpu['client']} | {failed} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Report


def point_ceiling(point: dict, ceiling: dict) -> float | None:
    if base_name(point["server"]) in (FLOOR, *TRANSPORTS):
        return None
    if point["protocol"] == "http":
        return ceiling["ort_json_rows_per_s"]
    if base_name(point["server"]) == NO_BATCH:
        return ceiling["ort_single_row_runs_per_s"]
    return batched_ceiling(ceiling, (point.get("stats") or {}).get("mean_batch") or 1.0)


def find(points: list[dict], server: str, protocol: str, concurrency: int, rows: int = 1) -> dict | None:
    for p in points:
        if (
            p["server"] == server
            and p["protocol"] == protocol
            and p["concurrency"] == concurrency
            and p["rows"] == rows
        ):
            return p
    return None


def annotate(points: list[dict], ceilings: dict[int, dict]) -> None:
    """Adds ratios: against the baseline at the same concurrency, and against the in-process
    ceiling measured in the same round."""
    for p in points:
        ceiling = ceilings.get(p["concurrency"])
        base = find(points, FASTAPI, "http", p["concurrency"])
        p["vs_fastapi"] = p["rows_per_s"] / base["rows_per_s"] if base and base["rows_per_s"] else None
        c = point_ceiling(p, ceiling) if ceiling else None
        p["ceiling_rows_per_s"] = c
        p["vs_ceiling"] = p["rows_per_s"] / c if c else None
        lat = p["latency_us"]
        p["p99_over_p50"] = lat["p99"] / lat["p50"] if lat["p50"] else None


def fmt(v: Any, spec: str = ".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def markdown_table(points: list[dict]) -> str:
    head = (
        "| server | protocol | conns | rows/req | req/s | rows/s | p50 ms | p90 ms | p99 ms | p99/p50 | mean batch "
        "| server CPU us/req | x FastAPI | x ceiling | errors |"
    )
    rows = [head, "|" + "---|" * 15]
    for p in points:
        lat = p["latency_us"]
        stats = p.get("stats") or {}
        rows.append(
            f"| {p['server']} | {p['protocol']} | {p['concurrency']} | {p['rows']} | {p['requests_per_s']:.0f} "
            f"| {p['rows_per_s']:.0f} | {lat['p50'] / 1000:.2f} | {lat['p90'] / 1000:.2f} | {lat['p99'] / 1000:.2f} "
            f"| {fmt(p['p99_over_p50'], '.1f')} | {fmt(stats.get('mean_batch'), '.1f')} "
            f"| {fmt(p.get('server_cpu_us_per_request'), '.0f')} | {fmt(p['vs_fastapi'])} | {fmt(p['vs_ceiling'])} "
            f"| {p['errors']} |"
        )
    return "\n".join(rows)


def before_after_markdown(points: list[dict]) -> str:
    """Each point of a compared server next to its "@before" twin's, measured minutes apart."""
    lines = [
        "Before/after, same run (after / before; req/s above 1 and p50, p99, CPU below 1 are better):",
        "",
        "| server | protocol | conns | rows/req | req/s before | req/s after | x req/s | p50 ms before | p50 ms after "
        "| p99 ms before | p99 ms after | CPU us/req before | CPU us/req after |",
        "|" + "---|" * 13,
    ]
    for p in points:
        b = find(points, p["server"] + BEFORE, p["protocol"], p["concurrency"], p["rows"])
        if b is None:
            continue
        lat, blat = p["latency_us"], b["latency_us"]
        ratio = p["requests_per_s"] / b["requests_per_s"] if b["requests_per_s"] else None
        lines.append(
            f"| {p['server']} | {p['protocol']} | {p['concurrency']} | {p['rows']} | {b['requests_per_s']:.0f} "
            f"| {p['requests_per_s']:.0f} | {fmt(ratio)} | {blat['p50'] / 1000:.2f} | {lat['p50'] / 1000:.2f} "
            f"| {blat['p99'] / 1000:.2f} | {lat['p99'] / 1000:.2f} | {fmt(b.get('server_cpu_us_per_request'), '.0f')} "
            f"| {fmt(p.get('server_cpu_us_per_request'), '.0f')} |"
        )
    return "\n".join(lines) if len(lines) > 4 else ""


def evaluate_targets(points: list[dict], ceilings: dict[int, dict], external: dict | None) -> list[dict]:
    out = []
    ceiling = ceilings.get(16)

    def add(name: str, value: float | None, goal: float, detail: str) -> None:
        met = None if value is None else value >= goal
        out.append({"target": name, "value": value, "goal": goal, "met": met, "detail": detail})

    fs16 = find(points, FASTSERVE, "http", 16)
    base16 = find(points, FASTAPI, "http", 16)
    if fs16 and base16:
        add("JSON batch-1 @16: x FastAPI", fs16["rows_per_s"] / base16["rows_per_s"], 3.0, "fastserve/fastapi rows/s")
    if fs16 and ceiling:
        add(
            "JSON batch-1 @16: x ORT+JSON ceiling",
            fs16["rows_per_s"] / ceiling["ort_json_rows_per_s"],
            2 / 3,
            "fastserve rows/s / in-process ORT+JSON rows/s",
        )
    for proto in ("binary", "grpc"):
        for p in points:
            if p["server"] == FASTSERVE and p["protocol"] == proto and p["concurrency"] == 64:
                if p.get("vs_ceiling") is not None:
                    mb = (p.get("stats") or {}).get("mean_batch")
                    add(
                        f"{proto} @64 batched, {p['rows']} row(s)/request: x ORT batched",
                        p["vs_ceiling"],
                        0.5,
                        f"ORT at the mean batch, {fmt(mb, '.1f')} rows",
                    )
    for proto in PROTOCOLS:
        on, off = find(points, FASTSERVE, proto, 64), find(points, NO_BATCH, proto, 64)
        if on and off and off["rows_per_s"]:
            add(f"{proto} @64: batching on/off", on["rows_per_s"] / off["rows_per_s"], 3.0, "rows/s ratio")
    for proto in PROTOCOLS:
        p, transport = find(points, FASTSERVE, proto, 64), find(points, TRANSPORT, proto, 64)
        if p and p["p99_over_p50"] is not None:
            # Lower is better: expressed as goal/actual so that >= 1 means met.
            detail = f"p99/p50 = {p['p99_over_p50']:.2f}"
            if transport and transport["p99_over_p50"] is not None:
                detail += f"; transport floor {transport['p99_over_p50']:.2f}"
            add(f"{proto} @64: p99 <= 2x p50", 2.0 / p["p99_over_p50"], 1.0, detail)
    for server in (DEFAULTS, FASTSERVE):
        p, floor = find(points, server, "http", 1), find(points, FLOOR, "http", 1)
        if p and floor and floor["latency_us"]["p50"]:
            over = p["latency_us"]["p50"] / floor["latency_us"]["p50"]
            add(f"{server} JSON @1: p50 <= 1.5x the floor's", 1.5 / over, 1.0, f"p50 / floor p50 = {over:.2f}")
    if external:
        add(
            f"gRPC @{external['concurrency']} >= 90% of HTTP JSON req/s, same external client",
            external["grpc_over_http"],
            0.9,
            "h2load, fastserve mlp; the transports alone: hyper "
            + fmt(external.get("transport_grpc_over_http"))
            + ", tonic "
            + fmt(external.get("tonic_grpc_over_http")),
        )
    return out


def ceilings_markdown(ceilings: dict[int, dict]) -> str:
    lines = [
        "In-process ceiling, measured after each concurrency round (ORT, "
        f"{next(iter(ceilings.values()))['ort_intra_op_threads'] if ceilings else '?'} intra-op threads):",
        "",
        "| round | ORT 1 row runs/s | ORT+JSON rows/s | " + " | ".join(f"b={b} rows/s" for b in CEILING_BATCHES) + " |",
        "|" + "---|" * (3 + len(CEILING_BATCHES)),
    ]
    for c, ce in ceilings.items():
        batched = ce["ort_batched_rows_per_s"]
        lines.append(
            f"| c={c} | {ce['ort_single_row_runs_per_s']:.0f} | {ce['ort_json_rows_per_s']:.0f} | "
            + " | ".join(f"{batched.get(b, 0):.0f}" for b in CEILING_BATCHES)
            + " |"
        )
    return "\n".join(lines)


def targets_markdown(targets: list[dict]) -> str:
    lines = ["| target | value | goal | met |", "|---|---|---|---|"]
    for t in targets:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} ({t['detail']}) | {fmt(t['value'])} | {t['goal']:.2f} | {met} |")
    return "\n".join(lines)


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = sorted({(p["server"], p["protocol"]) for p in points})
    for server, proto in series:
        pts = sorted(
            (p for p in points if p["server"] == server and p["protocol"] == proto), key=lambda p: p["concurrency"]
        )
        xs = [p["concurrency"] for p in pts]
        style = "--" if server == FASTAPI else (":" if server == NO_BATCH else "-")
        ax1.plot(xs, [p["rows_per_s"] for p in pts], style, marker="o", label=f"{server} {proto}")
        ax2.plot(xs, [p["latency_us"]["p99"] / 1000 for p in pts], style, marker="o", label=f"{server} {proto}")
    for ax, title, ylabel in ((ax1, "throughput", "rows/s"), (ax2, "p99 latency", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent connections")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict:
    cpu = ""
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for mod in ("onnxruntime", "numpy", "fastapi", "uvicorn"):
        with suppress(Exception):
            versions[mod] = __import__(mod).__version__
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None,
        "versions": versions,
    }


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 s points, concurrency 1 and 16, no idle test")
    p.add_argument("--duration-s", type=float, help="measured seconds per point (5; quick: 1)")
    p.add_argument("--warmup-s", type=float, help="warmup seconds per point (1; quick: 0.3)")
    p.add_argument("--concurrency", help="comma-separated levels (1,4,16,64; quick: 1,16)")
    p.add_argument("--protocols", default=",".join(PROTOCOLS), help="comma-separated: http,binary,grpc")
    p.add_argument("--servers", default=",".join(SERVERS), help="comma-separated: " + ",".join(SERVERS))
    p.add_argument("--ceiling-s", type=float, help="seconds per in-process ceiling measurement (0.5; quick: 0.1)")
    p.add_argument(
        "--idle-connections", type=int, help="idle keep-alive connections for the RSS test (10000; quick: 0)"
    )
    p.add_argument(
        "--rows",
        type=int,
        default=16,
        help="extra binary/gRPC points at the top concurrency with this many rows/request",
    )
    p.add_argument("--skip-build", action="store_true", help="use the already built loadgen")
    p.add_argument(
        "--no-h2load",
        dest="h2load",
        action="store_false",
        help="skip the HTTP-vs-gRPC comparison driven by h2load (Debian: nghttp2-client)",
    )
    p.add_argument(
        "--h2load-rounds",
        type=int,
        help="alternating HTTP/gRPC h2load rounds per server, the median one reported (3; quick: 1)",
    )
    p.add_argument("--loadgen", type=Path, help="path of the fastserve-loadgen binary")
    p.add_argument(
        "--before-python",
        help="the Python of another fastserve install (e.g. the previous commit in its own virtualenv): "
        f"{', '.join(COMPARED)} also run from it, named NAME{BEFORE}, and a before/after table is printed",
    )
    p.add_argument("--out", type=Path, default=ROOT / "benches" / "results", help="output directory")
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    a.duration_s = a.duration_s if a.duration_s is not None else (1.0 if a.quick else 5.0)
    a.warmup_s = a.warmup_s if a.warmup_s is not None else (0.3 if a.quick else 1.0)
    a.ceiling_s = a.ceiling_s if a.ceiling_s is not None else (0.1 if a.quick else 0.5)
    a.idle_connections = a.idle_connections if a.idle_connections is not None else (0 if a.quick else 10_000)
    a.h2load_rounds = max(1, a.h2load_rounds if a.h2load_rounds is not None else (1 if a.quick else 3))
    a.concurrency = [int(c) for c in (a.concurrency or ("1,16" if a.quick else "1,4,16,64")).split(",")]
    a.protocols = [x for x in a.protocols.split(",") if x]
    a.servers = [x for x in a.servers.split(",") if x]
    for x in a.protocols:
        if x not in PROTOCOLS:
            p.error(f"unknown protocol {x}")
    for x in a.servers:
        if x not in SERVERS:
            p.error(f"unknown server {x}")
    if any(c < 1 or c > 1024 for c in a.concurrency) or not (0 < a.duration_s <= 120):
        p.error("concurrency must be 1..1024 and --duration-s 0..120")
    return a


def protocols_of(server: str, protocols: list[str]) -> list[str]:
    """The baseline speaks JSON only; the transport floor answers JSON and gRPC (not binary), and its
    tonic twin differs from it in gRPC only."""
    if server == FASTAPI:
        return ["http"]
    if server in TRANSPORTS:
        return [p for p in protocols if p == "grpc" or (p == "http" and server == TRANSPORT)]
    return protocols


def measure_point(args: argparse.Namespace, loadgen: Path, server: Server, proto: str, c: int, rows: int = 1) -> dict:
    url = server.grpc_url if proto == "grpc" else server.url
    before = model_stats(server.url) if base_name(server.name) not in (FASTAPI, *TRANSPORTS) else None
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else None
    cpu_before = cpu_seconds(server.proc.pid)
    r = run_loadgen(loadgen, url, proto, c, rows=rows, duration_s=args.duration_s, warmup_s=args.warmup_s)
    cpu_after = cpu_seconds(server.proc.pid)
    r["server"] = server.name
    r["loadavg_1m_before"] = float(load) if load else None
    if before is not None:
        r["stats"] = stats_delta(before, model_stats(server.url))
        # The statistics count warmup and measured requests alike, as the CPU figures do.
        served = r["stats"]["rows"] / rows
    else:
        served = served_at_rate(args, r["requests_per_s"])
    r["server_cpu_us_per_request"] = cpu_us_per_request(cpu_before, cpu_after, served)
    lat = r["latency_us"]
    log(
        f"{server.name:18} {proto:6} c={c:<3} rows={rows:<3} {r['rows_per_s']:9.0f} rows/s"
        f"  p50 {lat['p50'] / 1000:6.2f} ms  p99 {lat['p99'] / 1000:6.2f} ms"
        f"  cpu {fmt(r['server_cpu_us_per_request'], '.0f')} us/req  errors {r['errors']}  load {load}"
    )
    return r


def _interrupted(*_: object) -> None:
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """SIGTERM ends a run like Ctrl-C, so the `finally` blocks stop every server it started."""
    signal.signal(signal.SIGTERM, _interrupted)


def resolve_timing(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """The harnesses' shared --quick, --duration-s, --warmup-s and --concurrency (a list) handling."""
    a.duration_s = a.duration_s if a.duration_s is not None else (1.0 if a.quick else 5.0)
    a.warmup_s = a.warmup_s if a.warmup_s is not None else (0.3 if a.quick else 1.0)
    a.concurrency = [int(c) for c in a.concurrency.split(",") if c]
    if any(c < 1 or c > 1024 for c in a.concurrency) or not (0 < a.duration_s <= 120) or a.warmup_s < 0:
        p.error("concurrency must be 1..1024, --duration-s 0..120 and --warmup-s at least 0")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    stop_on_sigterm()
    conditions = {"start": machine()}
    loadgen = args.loadgen or (loadgen_path() if args.skip_build else build_loadgen())
    if not loadgen.exists():
        raise SystemExit(f"no loadgen at {loadgen}: run `cargo build --release -p fastserve-loadgen`")
    if not transport_floor_path(loadgen).exists():
        log(f"no {transport_floor_path(loadgen)} (built with the loadgen): skipping the transport floors")
        args.servers = [s for s in args.servers if s not in TRANSPORTS]
    if FASTAPI in args.servers:
        try:
            import fastapi  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError:
            log("fastapi/uvicorn not installed (pip install '.[benches]'): skipping the baseline")
            args.servers.remove(FASTAPI)
    points: list[dict] = []
    ceilings: dict[int, dict] = {}
    idle = None
    external: dict | None = None
    with tempfile.TemporaryDirectory(prefix="fastserve-bench-") as tmp, ExitStack() as stack:
        # All servers stay up and the levels are interleaved (every server, then the in-process
        # ceiling, at one concurrency before the next), so the ratios at a level come from
        # measurements taken within a minute of each other on a machine whose load varies.
        servers: dict[str, Server] = {}
        launches = [(name, repository_of(name, Path(tmp), loadgen), sys.executable) for name in args.servers]
        if args.before_python:
            launches += [(name + BEFORE, repo, args.before_python) for name, repo, _ in launches if name in COMPARED]
        for name, repo, python in launches:
            servers[name] = server = stack.enter_context(started(name, repo, python))
            log(f"{name} up at {server.url}" + (f" (gRPC {server.grpc_url})" if server.grpc_port else ""))
        for c in args.concurrency:
            for name, server in servers.items():
                for proto in protocols_of(name, args.protocols):
                    points.append(measure_point(args, loadgen, server, proto, c))
            for name in (FASTSERVE, FASTSERVE + BEFORE):
                if name in servers and args.rows > 1 and c == max(args.concurrency):
                    for proto in (p for p in args.protocols if p != "http"):
                        points.append(measure_point(args, loadgen, servers[name], proto, c, rows=args.rows))
            log(f"in-process ceiling (c={c} round) at batch sizes {CEILING_BATCHES}")
            ceilings[c] = measure_ceiling(args.ceiling_s, CEILING_BATCHES)
        if FASTSERVE in servers and args.h2load:
            external = external_client(args, servers, max(args.concurrency))
        if FASTSERVE in servers and args.idle_connections:
            log(f"opening {args.idle_connections} idle keep-alive connections")
            idle = idle_connections_rss(loadgen, servers[FASTSERVE], args.idle_connections)
            log(f"idle connections: {idle}")
    annotate(points, ceilings)
    targets = evaluate_targets(points, ceilings, external)
    conditions["end"] = machine()
    elapsed = time.monotonic() - t0
    table = markdown_table(points)
    ceiling_md = ceilings_markdown(ceilings)
    report = f"{table}\n\n{ceiling_md}\n\n{targets_markdown(targets)}\n"
    if compared := before_after_markdown(points):
        report += "\n" + compared + "\n"
    if external:
        report += "\n" + external_markdown(external) + "\n"
    if idle:
        report += (
            f"\nIdle keep-alive connections: {idle['held']} held, RSS {idle['rss_kib_before']} KiB before, "
            f"{idle['rss_kib_during']} KiB with them open ({fmt(idle['kib_per_connection'], '.1f')} KiB each), "
            f"{idle['rss_kib_after_close']} KiB after closing\n"
        )
    report += f"\nHarness wall time: {elapsed:.0f} s\n"
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "conditions": conditions,
        "ceilings": ceilings,
        "points": points,
        "targets": targets,
        "idle_connections": idle,
        "external_client": external,
        "elapsed_s": elapsed,
    }
    (args.out / "latest.json").write_text(json.dumps(result, indent=1, default=str))
    (args.out / "latest.md").write_text(report)
    if not args.no_plot:
        try:
            plot(points, args.out / "latest.png")
        except ImportError:
            log("matplotlib not installed: no plot")
    log(f"wrote {args.out / 'latest.json'} in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
