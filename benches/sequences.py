"""Sequence batcher benchmark: stateful sequences through Triton's direct and oldest strategies, against a
plain dynamically batched model doing the same per-request work, all served by one fastserve server and
measured in the same run so the ratios hold on a noisy machine.

    python benches/sequences.py            # concurrency 1 and 64, 5 s per point, about a minute and a half
    python benches/sequences.py --quick    # smoke run, 1 s per point

The model repository is written to a temporary directory; all three models are Python models with
``max_batch_size = 8`` and ``[instance_group] count = 2``:

- ``seq_direct``: ``[sequence_batching] strategy = "direct"`` with implicit state (the server feeds the
  model's ``TOTAL_OUT`` back as ``TOTAL_IN``); the model returns ``SUM = TOTAL_IN + X``, the running sum of
  the sequence. Each sequence owns one of the 2 x 8 = 16 batch slots from its start to its end; more
  sequences wait for a free slot.
- ``seq_oldest``: the same model with ``strategy = "oldest"`` (``max_candidate_sequences = 64``,
  ``preferred_batch_size = [8]``, ``max_queue_delay_microseconds = 0``): batches are formed from the oldest
  ready requests of any candidate sequences.
- ``plain``: the baseline, ``SUM = X`` with ``[dynamic_batching]`` (``max_queue_delay_us = 0``): the same
  request and response, without sequence bookkeeping or state.

fastserve runs on 127.0.0.1 (port 0, its bound ports read from its log) and is stopped on exit, errors
included. At each point ``--concurrency`` clients, all on one asyncio loop in this process, each run
sequences in a closed loop: a sequence is ``--steps`` requests with one INT32 ``X`` (``sequence_start`` on
the first, ``sequence_end`` on the last, a fresh ``sequence_id`` each time), each sent when the previous
answer has arrived; every ``SUM`` is checked against the running sum the client keeps (against ``X`` for
``plain``, which gets the same requests without the sequence parameters), and a wrong or failed answer is
an error. When the point's time is up each client ends its sequence early (its next request carries
``sequence_end``), so no sequence outlives its point. Protocols (``--protocols``):

- gRPC: unary ``ModelInfer`` (grpc.aio with the tritonclient stubs, raw INT32 contents, one channel and
  connection per client), ``sequence_id`` as ``uint64_param``;
- HTTP: ``POST /v2/models/{model}/infer`` with a V2 JSON body (aiohttp, one keep-alive connection per
  client).

The levels are interleaved: at each concurrency every model is measured over each protocol before the
next level, each point ``--warmup-s`` and then the measured ``--duration-s``. Reported per point:
requests answered per second in the measured window, request latency p50 and p99 (requests sent in the
window) and the p50 of sequences' first requests alone (in direct mode it includes the wait for a slot),
the mean batch size the server formed (``/v2/models/{model}/stats``: ``inference_count /
execution_count`` over the window; requests only, not direct mode's padding rows), requests/s relative to
``plain`` at the same protocol and concurrency, errors, and the CPU the client and the server used
(cores, and the server's per answered request), since one Python loop can itself be the limit. Prints a
markdown table and writes ``results/sequences.json`` and ``results/sequences.md``. Benchmark a release
build of fastserve; the harness needs the ``benches`` extra (aiohttp) and tritonclient[grpc].
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCHES = Path(__file__).resolve().parent
# The server harness (start, ready wait on the tests' listening-line patterns, stop, statistics) is
# run.py's, the CPU and percentile helpers streaming.py's; each exists once.
if str(BENCHES) not in sys.path:
    sys.path.insert(0, str(BENCHES))
from run import Server, fastserve_cmd, fmt, http_json, log, machine, resolve_timing, stats_delta, stop_on_sigterm  # noqa: E402
from streaming import cpu_s, percentile_ms  # noqa: E402

DIRECT = "direct"
OLDEST = "oldest"
PLAIN = "plain"
MODELS = (DIRECT, OLDEST, PLAIN)
MODEL_NAMES = {DIRECT: "seq_direct", OLDEST: "seq_oldest", PLAIN: "plain"}
PROTOCOLS = ("grpc", "http")
MAX_BATCH_SIZE = 8
INSTANCES = 2
# A request that takes longer than this is a hang, counted as an error.
REQUEST_TIMEOUT_S = 60.0


# ---------------------------------------------------------------------------------------------
# The model repository

IO = """
[[input]]
name = "X"
datatype = "INT32"
dims = [1]

[[output]]
name = "SUM"
datatype = "INT32"
dims = [1]
"""

HEAD = f"""backend = "python"
max_batch_size = {MAX_BATCH_SIZE}

[instance_group]
count = {INSTANCES}
kind = "cpu"
"""

STATE = """
[[sequence_batching.state]]
input_name = "TOTAL_IN"
output_name = "TOTAL_OUT"
data_type = "TYPE_INT32"
dims = [1]
"""

CONFIGS = {
    DIRECT: HEAD
    + """
[sequence_batching]
strategy = "direct"
max_sequence_idle_microseconds = 5000000
"""
    + STATE
    + IO,
    OLDEST: HEAD
    + """
[sequence_batching]
strategy = "oldest"
max_sequence_idle_microseconds = 5000000

[sequence_batching.oldest]
max_candidate_sequences = 64
preferred_batch_size = [8]
max_queue_delay_microseconds = 0
"""
    + STATE
    + IO,
    PLAIN: HEAD
    + """
[dynamic_batching]
max_queue_delay_us = 0
"""
    + IO,
}

SEQUENCE_MODEL = """class Model:
    def execute(self, inputs):
        # The server feeds TOTAL_OUT back as TOTAL_IN; shapes [batch, 1].
        total = inputs["TOTAL_IN"] + inputs["X"]
        return {"SUM": total.copy(), "TOTAL_OUT": total}
"""

PLAIN_MODEL = """class Model:
    def execute(self, inputs):
        return {"SUM": inputs["X"].copy()}
"""


def write_repository(dest: Path) -> Path:
    repo = dest / "models"
    for model, config in CONFIGS.items():
        model_dir = repo / MODEL_NAMES[model]
        (model_dir / "1").mkdir(parents=True)
        (model_dir / "config.toml").write_text(config)
        (model_dir / "1" / "model.py").write_text(PLAIN_MODEL if model == PLAIN else SEQUENCE_MODEL)
    return repo


def model_stats(url: str, model: str) -> dict:
    """The statistics API's counters that run.stats_delta needs."""
    entry = http_json(f"{url}/v2/models/{MODEL_NAMES[model]}/stats")["model_stats"][0]
    stats = entry["inference_stats"]
    out = {"inference_count": entry["inference_count"], "execution_count": entry["execution_count"]}
    for key in ("queue", "compute_infer", "compute_input", "compute_output"):
        out[f"{key}_ns"] = stats[key]["ns"]
    return out


# ---------------------------------------------------------------------------------------------
# Clients: `infer` sends one request with X = `x` and returns SUM; a failed request raises.


class RequestError(Exception):
    pass


@dataclass
class Step:
    sequence_id: int
    start: bool
    end: bool


class GrpcClient:
    """One channel per client, on its own connection (a local subchannel pool: grpc would otherwise
    share one connection among channels to the same address)."""

    def __init__(self, target: str, model: str) -> None:
        import grpc
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        self.grpc = grpc
        self.pb = service_pb2
        self.model = model
        self.channel = grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.x = service_pb2.ModelInferRequest.InferInputTensor(name="X", datatype="INT32", shape=[1, 1])

    async def infer(self, x: int, step: Step | None) -> int:
        pb = self.pb
        request = pb.ModelInferRequest(
            model_name=MODEL_NAMES[self.model], inputs=[self.x], raw_input_contents=[struct.pack("<i", x)]
        )
        if step is not None:
            request.parameters["sequence_id"].uint64_param = step.sequence_id
            request.parameters["sequence_start"].bool_param = step.start
            request.parameters["sequence_end"].bool_param = step.end
        try:
            response = await self.stub.ModelInfer(request, timeout=REQUEST_TIMEOUT_S)
        except self.grpc.aio.AioRpcError as e:
            raise RequestError(f"gRPC {e.code().name}: {e.details()}") from None
        for i, out in enumerate(response.outputs):
            if out.name == "SUM":
                if response.raw_output_contents:
                    return struct.unpack_from("<i", response.raw_output_contents[i])[0]
                return out.contents.int_contents[0]
        raise RequestError(f"no SUM in the response (outputs {[o.name for o in response.outputs]})")

    async def close(self) -> None:
        await self.channel.close()


class HttpClient:
    """V2 JSON over one aiohttp session; its connector keeps one connection per client."""

    def __init__(self, session: Any, url: str, model: str) -> None:
        self.session = session
        self.url = f"{url}/v2/models/{MODEL_NAMES[model]}/infer"

    async def infer(self, x: int, step: Step | None) -> int:
        body: dict[str, Any] = {"inputs": [{"name": "X", "shape": [1, 1], "datatype": "INT32", "data": [x]}]}
        if step is not None:
            body["parameters"] = {
                "sequence_id": step.sequence_id,
                "sequence_start": step.start,
                "sequence_end": step.end,
            }
        headers = {"Content-Type": "application/json"}
        async with self.session.post(self.url, data=json.dumps(body), headers=headers) as r:
            text = await r.text()
            if r.status != 200:
                raise RequestError(f"HTTP {r.status}: {text[:200]}")
        for out in json.loads(text)["outputs"]:
            if out["name"] == "SUM":
                return int(out["data"][0])
        raise RequestError(f"no SUM in the response: {text[:200]}")

    async def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Measurement


@dataclass
class Tally:
    window_start: float = 0.0
    window_end: float = 0.0
    requests: int = 0
    sequences: int = 0
    latency_s: list[float] = field(default_factory=list)
    first_latency_s: list[float] = field(default_factory=list)
    errors: int = 0
    wrong_sums: int = 0
    first_error: str | None = None

    def error(self, message: str) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = message


# Sequence ids are unique over the whole run (0 means "no sequence").
SEQUENCE_IDS = itertools.count(1)


async def client_loop(client: GrpcClient | HttpClient, model: str, tally: Tally, steps: int, stop_at: float) -> None:
    while time.perf_counter() < stop_at:
        sequence_id = next(SEQUENCE_IDS)
        total = 0
        for i in range(steps):
            x = sequence_id % 7 + i + 1
            total += x
            # Past the point's end the sequence ends at once, so none is left holding a slot.
            end = i == steps - 1 or time.perf_counter() >= stop_at
            step = None if model == PLAIN else Step(sequence_id, start=i == 0, end=end)
            expect = x if model == PLAIN else total
            sent = time.perf_counter()
            try:
                got = await client.infer(x, step)
            except Exception as e:  # counted, and the client goes on with a fresh sequence (the server
                # releases the abandoned one after max_sequence_idle_microseconds)
                tally.error(f"{type(e).__name__}: {e}")
                await asyncio.sleep(0.01)  # no busy loop against a server that refuses
                break
            done = time.perf_counter()
            if got != expect:
                tally.wrong_sums += 1
                tally.error(f"sequence {sequence_id} step {i}: SUM {got}, expected {expect}")
            if tally.window_start <= done < tally.window_end:
                tally.requests += 1
                if end:
                    tally.sequences += 1
            if tally.window_start <= sent < tally.window_end:
                tally.latency_s.append(done - sent)
                if i == 0:
                    tally.first_latency_s.append(done - sent)
            if end:
                break


async def measure(
    server: Server, model: str, protocol: str, concurrency: int, args: argparse.Namespace
) -> dict[str, Any]:
    import aiohttp

    session = None
    clients: list[GrpcClient | HttpClient]
    if protocol == "grpc":
        clients = [GrpcClient(server.grpc_url, model) for _ in range(concurrency)]
    else:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
        )
        clients = [HttpClient(session, server.url, model)]
    try:
        now = time.perf_counter()
        tally = Tally(window_start=now + args.warmup_s, window_end=now + args.warmup_s + args.duration_s)
        load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else None
        gathered = asyncio.gather(
            *(
                client_loop(clients[i % len(clients)], model, tally, args.steps, tally.window_end)
                for i in range(concurrency)
            )
        )
        # CPU and server statistics over the measured window only: the clients run the warmup meanwhile.
        await asyncio.sleep(max(0.0, tally.window_start - time.perf_counter()))
        stats0 = await asyncio.to_thread(model_stats, server.url, model)
        client_cpu0, server_cpu0, wall0 = time.process_time(), cpu_s(server.proc.pid), time.perf_counter()
        await asyncio.sleep(max(0.0, tally.window_end - time.perf_counter()))
        client_cpu1, server_cpu1, wall1 = time.process_time(), cpu_s(server.proc.pid), time.perf_counter()
        stats1 = await asyncio.to_thread(model_stats, server.url, model)
        await asyncio.wait_for(gathered, timeout=REQUEST_TIMEOUT_S * 2)
    finally:
        for c in clients:
            await c.close()
        if session is not None:
            await session.close()
    elapsed = wall1 - wall0
    point = {
        "model": model,
        "model_name": MODEL_NAMES[model],
        "protocol": protocol,
        "concurrency": concurrency,
        "steps": args.steps,
        "duration_s": args.duration_s,
        "requests": tally.requests,
        "requests_per_s": tally.requests / args.duration_s,
        "sequences_per_s": tally.sequences / args.duration_s,
        "latency_ms": {
            "p50": percentile_ms(tally.latency_s, 50),
            "p90": percentile_ms(tally.latency_s, 90),
            "p99": percentile_ms(tally.latency_s, 99),
            "max": max(tally.latency_s) * 1000 if tally.latency_s else None,
            "samples": len(tally.latency_s),
        },
        "first_request_latency_ms": {
            "p50": percentile_ms(tally.first_latency_s, 50),
            "p99": percentile_ms(tally.first_latency_s, 99),
            "samples": len(tally.first_latency_s),
        },
        "stats": stats_delta(stats0, stats1),
        "errors": tally.errors,
        "wrong_sums": tally.wrong_sums,
        "first_error": tally.first_error,
        "client_cpu_cores": (client_cpu1 - client_cpu0) / elapsed if elapsed > 0 else None,
        "server_cpu_cores": (server_cpu1 - server_cpu0) / elapsed
        if elapsed > 0 and server_cpu0 is not None and server_cpu1 is not None
        else None,
        "loadavg_1m_before": float(load) if load else None,
    }
    # The server's CPU per answered request: what each model costs the server even where the client is the limit.
    cores, rps = point["server_cpu_cores"], point["requests_per_s"]
    point["server_cpu_us_per_request"] = cores / rps * 1e6 if cores is not None and rps else None
    lat = point["latency_ms"]
    log(
        f"{model:6} {protocol:4} c={concurrency:<3} {point['requests_per_s']:7.0f} req/s  "
        f"p50 {fmt(lat['p50'])} ms  p99 {fmt(lat['p99'])} ms  first p50 "
        f"{fmt(point['first_request_latency_ms']['p50'])} ms  batch {fmt(point['stats']['mean_batch'])}  "
        f"client {fmt(point['client_cpu_cores'])} cores  server {fmt(point['server_cpu_cores'])} cores  "
        f"errors {tally.errors}" + (f" ({tally.first_error})" if tally.first_error else "") + f"  load {load}"
    )
    return point


async def run_points(server: Server, args: argparse.Namespace) -> list[dict]:
    points = []
    for c in args.concurrency:
        for protocol in args.protocols:
            for model in args.models:
                points.append(await measure(server, model, protocol, c, args))
    return points


# ---------------------------------------------------------------------------------------------
# Report


def annotate(points: list[dict]) -> None:
    for p in points:
        base = next(
            (
                b
                for b in points
                if b["model"] == PLAIN and b["protocol"] == p["protocol"] and b["concurrency"] == p["concurrency"]
            ),
            None,
        )
        p["vs_plain"] = p["requests_per_s"] / base["requests_per_s"] if base and base["requests_per_s"] else None


def markdown_table(points: list[dict]) -> str:
    head = (
        "| model | protocol | sequences | req/s | p50 ms | p99 ms | 1st req p50 ms | mean batch | x plain "
        "| client cores | server cores | server µs/req | errors |"
    )
    rows = [head, "|" + "---|" * 13]
    for p in points:
        lat = p["latency_ms"]
        rows.append(
            f"| {p['model']} | {p['protocol']} | {p['concurrency']} | {p['requests_per_s']:.0f} "
            f"| {fmt(lat['p50'])} | {fmt(lat['p99'])} | {fmt(p['first_request_latency_ms']['p50'])} "
            f"| {fmt(p['stats']['mean_batch'], '.1f')} | {fmt(p['vs_plain'])} "
            f"| {fmt(p['client_cpu_cores'])} | {fmt(p['server_cpu_cores'])} "
            f"| {fmt(p['server_cpu_us_per_request'], '.0f')} | {p['errors']} |"
        )
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 s points")
    p.add_argument("--duration-s", type=float, help="measured seconds per point (5; quick: 1)")
    p.add_argument("--warmup-s", type=float, help="warmup seconds per point (1; quick: 0.3)")
    p.add_argument("--concurrency", default="1,64", help="comma-separated levels: concurrent sequences (1,64)")
    p.add_argument("--steps", type=int, default=20, help="requests per sequence (20)")
    p.add_argument("--protocols", default=",".join(PROTOCOLS), help="comma-separated: " + ",".join(PROTOCOLS))
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ",".join(MODELS))
    p.add_argument("--out", type=Path, default=BENCHES / "results", help="output directory")
    a = p.parse_args(argv)
    resolve_timing(p, a)
    a.protocols = [x for x in a.protocols.split(",") if x]
    a.models = [x for x in a.models.split(",") if x]
    for x in a.protocols:
        if x not in PROTOCOLS:
            p.error(f"unknown protocol {x}")
    for x in a.models:
        if x not in MODELS:
            p.error(f"unknown model {x}")
    if not (1 <= a.steps <= 100_000):
        p.error("--steps must be 1..100000")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    stop_on_sigterm()
    conditions = {"start": machine()}
    with tempfile.TemporaryDirectory(prefix="fastserve-seq-bench-") as tmp:
        repo = write_repository(Path(tmp))
        server = Server("fastserve", fastserve_cmd(repo))
        try:
            server.wait_ready()
            log(f"fastserve up at {server.url} (gRPC {server.grpc_url})")
            points = asyncio.run(run_points(server, args))
        finally:
            server.stop()
    annotate(points)
    conditions["end"] = machine()
    elapsed = time.monotonic() - t0
    report = markdown_table(points) + "\n"
    report += (
        f"\n{args.steps} requests per sequence, {args.duration_s:g} s per point after {args.warmup_s:g} s warmup; "
        f"harness wall time: {elapsed:.0f} s\n"
    )
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "conditions": conditions,
        "models": {MODEL_NAMES[m]: CONFIGS[m] for m in MODELS},
        "points": points,
        "elapsed_s": elapsed,
    }
    (args.out / "sequences.json").write_text(json.dumps(result, indent=1, default=str))
    (args.out / "sequences.md").write_text(report)
    log(f"wrote {args.out / 'sequences.json'} in {elapsed:.0f} s")
    return 1 if any(p["errors"] for p in points) else 0


if __name__ == "__main__":
    sys.exit(main())
