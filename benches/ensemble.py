"""Ensemble benchmark: the ``classify`` ensemble (preprocess -> mlp -> postprocess, run by fastserve's core)
against the same three calls chained by the client, both measured in the same run against the same server.

    python benches/ensemble.py            # concurrency 1 and 16, 5 s per point, under a minute
    python benches/ensemble.py --quick    # smoke run, 1 s per point

The models are ``examples/models``: ``classify`` (backend ``ensemble``, RAW FP32 [-1,64] -> PROBS FP32
[-1,10], CLASS INT64 [-1,1]) whose steps are ``preprocess`` (Python, RAW -> FEATURES, standardized rows),
``mlp`` (ONNX, INPUT0 -> OUTPUT0 logits) and ``postprocess`` (Python, LOGITS -> PROBS, CLASS), all with
``max_batch_size = 64``. One fastserve server on 127.0.0.1 (port 0, its bound ports read from its log) stays
up for the whole run. At each ``--concurrency`` level, for each protocol, both modes are measured one after
the other, ``--concurrency`` clients each, all on one asyncio loop in this process, closed loop (the next
iteration starts when the previous one has its answer), for ``--warmup-s`` and then the measured
``--duration-s``:

- ensemble: one request to ``classify`` per iteration, RAW one random [1,64] row (a pool of 256 pre-encoded
  rows, cycled);
- chain: the client makes the three calls in sequence, ``preprocess`` (RAW, the same rows), then ``mlp``
  (INPUT0 = FEATURES from the first answer), then ``postprocess`` (LOGITS = OUTPUT0 from the second); one
  iteration is one completed chain.

Protocols: gRPC ``ModelInfer`` (grpc.aio with the tritonclient stubs, tensors as ``raw_input_contents``, the
chain forwarding each answer's raw bytes unchanged; one channel and connection per client) and HTTP JSON
``POST /v2/models/<model>/infer`` (aiohttp, one session with ``--concurrency`` connections; every answer is
parsed, and the chain re-encodes the previous answer's ``data`` as the next request).

Reported per (protocol, mode, concurrency): iterations per second in the measured window, iteration latency
(one request, or the whole chain) p50 and p99 for iterations started and finished in the window, the
ensemble/chain ratios of iterations/s and of p50 at the same protocol and concurrency, the CPU the client
and the server used (cores; one Python loop can itself be the limit), and the mean batch each step model ran
(``/v2/models/<step>/stats``: inferences per execution over the window). Before measuring, a few rows are sent
both ways over each protocol and must give the same CLASS and allclose PROBS. Prints a markdown table and
writes ``results/ensemble.json`` and ``results/ensemble.md``. The server is stopped on exit, errors
included. Benchmark a release build of fastserve; the harness needs the ``benches`` extra (aiohttp) and
tritonclient[grpc].
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BENCHES = Path(__file__).resolve().parent
ROOT = BENCHES.parent
# The server harness (start, ready wait on the tests' listening-line patterns, stop) is run.py's, the CPU and
# percentile helpers streaming.py's; each exists once.
if str(BENCHES) not in sys.path:
    sys.path.insert(0, str(BENCHES))
from run import Server, fastserve_cmd, fmt, http_json, log, machine, resolve_timing, stop_on_sigterm  # noqa: E402
from streaming import cpu_s, percentile_ms  # noqa: E402

EXAMPLES = ROOT / "examples" / "models"
ENSEMBLE = "classify"
STEPS = ("preprocess", "mlp", "postprocess")
FEATURES = 64
CLASSES = 10
ENSEMBLE_MODE = "ensemble"
CHAIN_MODE = "chain"
MODES = (ENSEMBLE_MODE, CHAIN_MODE)
PROTOCOLS = ("grpc", "http")
POOL_ROWS = 256
CHECK_ROWS = 4
# An iteration that takes longer than this is a hang, counted as an error.
REQUEST_TIMEOUT_S = 30.0


class InferError(Exception):
    pass


@contextmanager
def started() -> Iterator[Server]:
    server = Server("fastserve", fastserve_cmd(EXAMPLES))
    server.wait_ready()
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# Clients. `ensemble(i)` and `chain(i)` run one iteration on row i of the pool and return the answer
# (PROBS, CLASS) as arrays; a failed request raises.

Answer = tuple[np.ndarray, np.ndarray]


def grpc_output(response: Any, name: str) -> tuple[bytes, list[int]]:
    """The raw bytes and shape of the named output of a ModelInferResponse."""
    for i, out in enumerate(response.outputs):
        if out.name == name:
            if i >= len(response.raw_output_contents):
                raise InferError(f"output {name} without raw contents")
            return response.raw_output_contents[i], list(out.shape)
    raise InferError(f"no output {name} in {[o.name for o in response.outputs]}")


class GrpcClient:
    """One channel per client, on its own connection (a local subchannel pool: grpc would otherwise share
    one connection among channels to the same address)."""

    def __init__(self, target: str, rows: np.ndarray) -> None:
        import grpc
        from tritonclient.grpc import service_pb2 as pb
        from tritonclient.grpc import service_pb2_grpc

        self.grpc = grpc
        self.pb = pb
        self.channel = grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.ensemble_requests = [self.request(ENSEMBLE, "RAW", r[None, :].tobytes(), [1, FEATURES]) for r in rows]
        self.preprocess_requests = [self.request(STEPS[0], "RAW", r[None, :].tobytes(), [1, FEATURES]) for r in rows]

    def request(self, model: str, name: str, raw: bytes, shape: list[int]) -> Any:
        pb = self.pb
        return pb.ModelInferRequest(
            model_name=model,
            inputs=[pb.ModelInferRequest.InferInputTensor(name=name, datatype="FP32", shape=shape)],
            raw_input_contents=[raw],
        )

    async def infer(self, request: Any) -> Any:
        try:
            return await self.stub.ModelInfer(request, timeout=REQUEST_TIMEOUT_S)
        except self.grpc.aio.AioRpcError as e:
            raise InferError(f"gRPC {e.code().name}: {e.details()}") from None

    @staticmethod
    def answer(response: Any) -> Answer:
        probs, probs_shape = grpc_output(response, "PROBS")
        cls, cls_shape = grpc_output(response, "CLASS")
        return (
            np.frombuffer(probs, dtype=np.float32).reshape(probs_shape),
            np.frombuffer(cls, dtype=np.int64).reshape(cls_shape),
        )

    async def ensemble(self, i: int) -> Answer:
        return self.answer(await self.infer(self.ensemble_requests[i]))

    async def chain(self, i: int) -> Answer:
        first = await self.infer(self.preprocess_requests[i])
        features, shape = grpc_output(first, "FEATURES")
        second = await self.infer(self.request(STEPS[1], "INPUT0", features, shape))
        logits, shape = grpc_output(second, "OUTPUT0")
        return self.answer(await self.infer(self.request(STEPS[2], "LOGITS", logits, shape)))

    async def close(self) -> None:
        await self.channel.close()


def json_body(name: str, data: list, shape: list[int]) -> bytes:
    return json.dumps({"inputs": [{"name": name, "datatype": "FP32", "shape": shape, "data": data}]}).encode()


def json_output(answer: dict, name: str) -> dict:
    for out in answer.get("outputs", []):
        if out["name"] == name:
            return out
    raise InferError(f"no output {name} in {answer}"[:300])


class HttpClient:
    """HTTP JSON over one aiohttp session shared by all the clients of a point (`connections` keep-alive
    connections)."""

    def __init__(self, url: str, rows: np.ndarray, connections: int) -> None:
        import aiohttp

        self.url = url
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
        )
        self.bodies = [json_body("RAW", r.tolist(), [1, FEATURES]) for r in rows]

    async def infer(self, model: str, body: bytes) -> dict:
        headers = {"Content-Type": "application/json"}
        async with self.session.post(f"{self.url}/v2/models/{model}/infer", data=body, headers=headers) as resp:
            text = await resp.read()
            if resp.status != 200:
                raise InferError(f"HTTP {resp.status} from {model}: {text[:200]!r}")
        return json.loads(text)

    @staticmethod
    def answer(answer: dict) -> Answer:
        probs = json_output(answer, "PROBS")
        cls = json_output(answer, "CLASS")
        return (
            np.asarray(probs["data"], dtype=np.float32).reshape(probs["shape"]),
            np.asarray(cls["data"], dtype=np.int64).reshape(cls["shape"]),
        )

    async def ensemble(self, i: int) -> Answer:
        return self.answer(await self.infer(ENSEMBLE, self.bodies[i]))

    async def chain(self, i: int) -> Answer:
        first = json_output(await self.infer(STEPS[0], self.bodies[i]), "FEATURES")
        second = json_output(await self.infer(STEPS[1], json_body("INPUT0", first["data"], first["shape"])), "OUTPUT0")
        return self.answer(await self.infer(STEPS[2], json_body("LOGITS", second["data"], second["shape"])))

    async def close(self) -> None:
        await self.session.close()


Client = GrpcClient | HttpClient


def clients_for(server: Server, protocol: str, rows: np.ndarray, concurrency: int) -> list[Client]:
    if protocol == "grpc":
        return [GrpcClient(server.grpc_url, rows) for _ in range(concurrency)]
    return [HttpClient(server.url, rows, connections=concurrency)]


# ---------------------------------------------------------------------------------------------
# Measurement


@dataclass
class Tally:
    window_start: float = 0.0
    window_end: float = 0.0
    iterations: int = 0
    latency_s: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None


async def client_loop(client: Client, mode: str, tally: Tally, start_row: int, stop_at: float) -> None:
    run = client.ensemble if mode == ENSEMBLE_MODE else client.chain
    i = start_row
    while time.perf_counter() < stop_at:
        i = (i + 1) % POOL_ROWS
        sent = time.perf_counter()
        try:
            await run(i)
        except Exception as e:  # counted, and the client goes on with the next iteration
            tally.errors += 1
            if tally.first_error is None:
                tally.first_error = f"{type(e).__name__}: {e}"
            await asyncio.sleep(0.01)  # no busy loop against a server that refuses
            continue
        done = time.perf_counter()
        if tally.window_start <= sent and done < tally.window_end:
            tally.iterations += 1
            tally.latency_s.append(done - sent)


def step_counts(url: str) -> dict[str, tuple[int, int]]:
    """(inference_count, execution_count) of each step model."""
    out = {}
    for model in STEPS:
        entry = http_json(f"{url}/v2/models/{model}/stats")["model_stats"][0]
        out[model] = (entry["inference_count"], entry["execution_count"])
    return out


def mean_batches(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for model in STEPS:
        inferences = after[model][0] - before[model][0]
        executions = after[model][1] - before[model][1]
        out[model] = inferences / executions if executions else None
    return out


async def measure(
    server: Server, protocol: str, mode: str, concurrency: int, rows: np.ndarray, args: argparse.Namespace
) -> dict[str, Any]:
    clients = clients_for(server, protocol, rows, concurrency)
    try:
        now = time.perf_counter()
        tally = Tally(window_start=now + args.warmup_s, window_end=now + args.warmup_s + args.duration_s)
        load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else None
        gathered = asyncio.gather(
            *(
                client_loop(clients[i % len(clients)], mode, tally, i * POOL_ROWS // concurrency, tally.window_end)
                for i in range(concurrency)
            )
        )
        # CPU and step statistics over the measured window only: the clients run the warmup meanwhile. The
        # statistics are read in a thread so the clients' loop goes on.
        await asyncio.sleep(max(0.0, tally.window_start - time.perf_counter()))
        client_cpu0, server_cpu0, wall0 = time.process_time(), cpu_s(server.proc.pid), time.perf_counter()
        stats0 = await asyncio.to_thread(step_counts, server.url)
        await asyncio.sleep(max(0.0, tally.window_end - time.perf_counter()))
        client_cpu1, server_cpu1, wall1 = time.process_time(), cpu_s(server.proc.pid), time.perf_counter()
        stats1 = await asyncio.to_thread(step_counts, server.url)
        await asyncio.wait_for(gathered, timeout=REQUEST_TIMEOUT_S * 3 + 10)
    finally:
        for c in clients:
            await c.close()
    elapsed = wall1 - wall0
    point = {
        "protocol": protocol,
        "mode": mode,
        "concurrency": concurrency,
        "duration_s": args.duration_s,
        "iterations": tally.iterations,
        "iterations_per_s": tally.iterations / args.duration_s,
        "latency_ms": {
            "p50": percentile_ms(tally.latency_s, 50),
            "p90": percentile_ms(tally.latency_s, 90),
            "p99": percentile_ms(tally.latency_s, 99),
            "max": max(tally.latency_s) * 1000 if tally.latency_s else None,
            "samples": len(tally.latency_s),
        },
        "errors": tally.errors,
        "first_error": tally.first_error,
        "client_cpu_cores": (client_cpu1 - client_cpu0) / elapsed if elapsed > 0 else None,
        "server_cpu_cores": (server_cpu1 - server_cpu0) / elapsed
        if elapsed > 0 and server_cpu0 is not None and server_cpu1 is not None
        else None,
        "step_mean_batch": mean_batches(stats0, stats1),
        "loadavg_1m_before": float(load) if load else None,
    }
    lat = point["latency_ms"]
    batches = " ".join(f"{m}={fmt(b, '.1f')}" for m, b in point["step_mean_batch"].items())
    log(
        f"{protocol:4} {mode:8} c={concurrency:<3} {point['iterations_per_s']:8.0f} it/s  p50 {fmt(lat['p50'])} ms  "
        f"p99 {fmt(lat['p99'])} ms  client {fmt(point['client_cpu_cores'])} cores  "
        f"server {fmt(point['server_cpu_cores'])} cores  batch {batches}  errors {tally.errors}"
        + (f" ({tally.first_error})" if tally.first_error else "")
        + f"  load {load}"
    )
    return point


async def check(server: Server, protocol: str, rows: np.ndarray) -> dict[str, Any]:
    """The first rows of the pool both ways: the same CLASS and allclose PROBS, of the expected shapes."""
    client = clients_for(server, protocol, rows, 1)[0]
    problems: list[str] = []
    answers = []
    try:
        for i in range(CHECK_ROWS):
            (p_e, c_e), (p_c, c_c) = await client.ensemble(i), await client.chain(i)
            answers.append({"probs": p_e.ravel().tolist(), "class": c_e.ravel().tolist()})
            if p_e.shape != (1, CLASSES) or c_e.shape != (1, 1):
                problems.append(f"row {i}: ensemble shapes PROBS {p_e.shape}, CLASS {c_e.shape}")
            if p_e.shape != p_c.shape or c_e.shape != c_c.shape:
                problems.append(
                    f"row {i}: shapes differ: ensemble {p_e.shape} {c_e.shape}, chain {p_c.shape} {c_c.shape}"
                )
                continue
            if not np.array_equal(c_e, c_c):
                problems.append(f"row {i}: CLASS ensemble {c_e.ravel().tolist()} != chain {c_c.ravel().tolist()}")
            if not np.allclose(p_e, p_c, rtol=1e-5, atol=1e-6):
                problems.append(f"row {i}: PROBS differ by up to {float(np.abs(p_e - p_c).max()):.3g}")
            if not np.isclose(float(p_e.sum()), 1.0, atol=1e-4) or int(c_e.ravel()[0]) != int(p_e.argmax()):
                problems.append(f"row {i}: PROBS sum {float(p_e.sum()):.6f}, CLASS {c_e.ravel()[0]} not its argmax")
    except Exception as e:
        problems.append(f"{type(e).__name__}: {e}")
    finally:
        await client.close()
    for p in problems:
        log(f"check failed: {protocol}: {p}")
    return {"protocol": protocol, "ok": not problems, "rows": CHECK_ROWS, "problems": problems, "answers": answers}


async def run_points(server: Server, args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    rows = np.random.default_rng(args.seed).standard_normal((POOL_ROWS, FEATURES)).astype(np.float32)
    checks = [await check(server, p, rows) for p in args.protocols]
    points = []
    for c in args.concurrency:
        for p in args.protocols:
            for mode in MODES:
                points.append(await measure(server, p, mode, c, rows, args))
    return points, checks


# ---------------------------------------------------------------------------------------------
# Report


def annotate(points: list[dict]) -> None:
    """Ensemble over chain, at the same protocol and concurrency, on every row of the pair."""
    for p in points:
        pair = {q["mode"]: q for q in points if q["protocol"] == p["protocol"] and q["concurrency"] == p["concurrency"]}
        e, c = pair.get(ENSEMBLE_MODE), pair.get(CHAIN_MODE)
        p["ensemble_over_chain_iterations"] = (
            e["iterations_per_s"] / c["iterations_per_s"] if e and c and c["iterations_per_s"] else None
        )
        p["ensemble_over_chain_p50"] = (
            e["latency_ms"]["p50"] / c["latency_ms"]["p50"]
            if e and c and e["latency_ms"]["p50"] and c["latency_ms"]["p50"]
            else None
        )


def markdown_table(points: list[dict]) -> str:
    head = (
        "| protocol | mode | conns | it/s | p50 ms | p99 ms | ens/chain it/s | ens/chain p50 | client cores "
        "| server cores | mean batch pre/mlp/post | errors |"
    )
    rows = [head, "|" + "---|" * 12]
    for p in points:
        lat = p["latency_ms"]
        batches = "/".join(fmt(b, ".1f") for b in p["step_mean_batch"].values())
        rows.append(
            f"| {p['protocol']} | {p['mode']} | {p['concurrency']} | {p['iterations_per_s']:.0f} | {fmt(lat['p50'])} "
            f"| {fmt(lat['p99'])} | {fmt(p['ensemble_over_chain_iterations'])} | {fmt(p['ensemble_over_chain_p50'])} "
            f"| {fmt(p['client_cpu_cores'])} | {fmt(p['server_cpu_cores'])} | {batches} | {p['errors']} |"
        )
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 s points")
    p.add_argument("--duration-s", type=float, help="measured seconds per point (5; quick: 1)")
    p.add_argument("--warmup-s", type=float, help="warmup seconds per point (1; quick: 0.3)")
    p.add_argument("--concurrency", default="1,16", help="comma-separated levels (1,16)")
    p.add_argument("--protocols", default=",".join(PROTOCOLS), help="comma-separated grpc,http")
    p.add_argument("--seed", type=int, default=0, help="seed of the random RAW rows (0)")
    p.add_argument("--out", type=Path, default=BENCHES / "results", help="output directory")
    a = p.parse_args(argv)
    resolve_timing(p, a)
    a.protocols = [x for x in a.protocols.split(",") if x]
    for x in a.protocols:
        if x not in PROTOCOLS:
            p.error(f"unknown protocol {x}")
    if not a.protocols or not a.concurrency:
        p.error("at least one protocol and one concurrency level")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    stop_on_sigterm()
    conditions = {"start": machine()}
    with started() as server:
        log(f"fastserve up at {server.url} (gRPC {server.grpc_url})")
        points, checks = asyncio.run(run_points(server, args))
    annotate(points)
    conditions["end"] = machine()
    elapsed = time.monotonic() - t0
    report = markdown_table(points) + "\n"
    failed = [c for c in checks if not c["ok"]]
    for c in failed:
        report += f"\nCheck failed: {c['protocol']}: " + "; ".join(c["problems"]) + "\n"
    report += (
        f"\n{ENSEMBLE} (preprocess -> mlp -> postprocess) vs the same three calls chained by the client, one random "
        f"[1,{FEATURES}] row per iteration; {args.duration_s:g} s per point after {args.warmup_s:g} s warmup; "
        f"ens/chain: ensemble over chain at the same protocol and concurrency; harness wall time: {elapsed:.0f} s\n"
    )
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "conditions": conditions,
        "checks": checks,
        "points": points,
        "elapsed_s": elapsed,
    }
    (args.out / "ensemble.json").write_text(json.dumps(result, indent=1, default=str))
    (args.out / "ensemble.md").write_text(report)
    log(f"wrote {args.out / 'ensemble.json'} in {elapsed:.0f} s")
    return 1 if failed or any(p["errors"] for p in points) else 0


if __name__ == "__main__":
    sys.exit(main())
