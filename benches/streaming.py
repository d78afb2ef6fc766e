"""Streaming benchmark: token streams from a decoupled model, fastserve against a FastAPI + uvicorn
server-sent-events wrapper, both measured in the same run so the ratios hold on a noisy machine.

    python benches/streaming.py            # concurrency 1 and 64, 5 s per point, about a minute
    python benches/streaming.py --quick    # smoke run, 1 s per point

The model is ``examples/models/textgen`` (a character-level Markov text generator, one token per
response); the baseline, ``benches/baseline_fastapi_stream.py``, streams the same generator's tokens.
Both servers run on 127.0.0.1 (fastserve on port 0, its bound ports read from its log; the baseline on a
free port picked here) and stay up while the concurrency levels are interleaved: at each level every
server is measured over each protocol before the next level. At each point ``--concurrency`` clients,
all on one asyncio loop in this process, each open a stream with ``{"PROMPT": "the ", "MAX_TOKENS":
--tokens}``, read it to its end and open the next one (closed loop), for ``--warmup-s`` and then the
measured ``--duration-s``. Measured:

- fastserve HTTP: ``POST /v2/models/textgen/generate_stream``, a ``text/event-stream`` of
  ``data: {json}`` events (aiohttp);
- fastserve gRPC: one ``ModelStreamInfer`` call per stream (grpc.aio with the tritonclient stubs, one
  channel and connection per client) carrying one ModelInferRequest with
  ``triton_enable_empty_final_response``; the stream is read until a response carries
  ``triton_final_response``, then half-closed;
- the FastAPI baseline: the same SSE request as fastserve HTTP.

Reported per point: responses (tokens) received per second in the measured window, completed streams
per second, time to first response (from sending the request to the first token; streams started in the
window) p50 and p99, responses/s relative to the baseline at the same concurrency, and the CPU the
client and the server used (cores), since one Python loop can itself be the limit. Before measuring,
one stream per server and protocol is checked against the text ``MarkovText`` gives for the prompt.
Prints a markdown table and writes ``results/streaming.json`` and ``results/streaming.md``. Every server
started here is stopped on exit, errors included. Benchmark a release build of fastserve; the harness
needs the ``benches`` extra (FastAPI, uvicorn, aiohttp) and tritonclient[grpc].
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import struct
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BENCHES = Path(__file__).resolve().parent
ROOT = BENCHES.parent
# The server harness (start, ready wait on the tests' listening-line patterns, stop) is run.py's, and
# the baseline's loader of the example model; each exists once.
if str(BENCHES) not in sys.path:
    sys.path.insert(0, str(BENCHES))
from baseline_fastapi_stream import load_textgen  # noqa: E402
from run import Server, fastserve_cmd, fmt, free_port, log, machine, resolve_timing, stop_on_sigterm  # noqa: E402

EXAMPLES = ROOT / "examples" / "models"
MODEL = "textgen"
STREAM_PATH = f"/v2/models/{MODEL}/generate_stream"

FASTSERVE = "fastserve"
FASTAPI = "fastapi"
SERVERS = (FASTSERVE, FASTAPI)
PROTOCOLS = ("http", "grpc")
# A stream that takes longer than this is a hang, counted as an error.
STREAM_TIMEOUT_S = 60.0


# ---------------------------------------------------------------------------------------------
# Servers


def start(name: str) -> Server:
    if name == FASTAPI:
        port = free_port()
        cmd = [sys.executable, str(BENCHES / "baseline_fastapi_stream.py"), "--port", str(port)]
        server = Server(name, cmd, port=port)
        server.wait_ready(from_log=False)
    else:
        server = Server(name, fastserve_cmd(EXAMPLES))
        server.wait_ready()
    return server


@contextmanager
def started(name: str) -> Iterator[Server]:
    server = start(name)
    try:
        yield server
    finally:
        server.stop()


def cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process, all its threads."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# Clients: each opens one stream, reports every token through `on_token` and returns the token count.
# A failed stream raises.


class StreamError(Exception):
    pass


OnToken = Callable[[str], None]


def sse_token(line: bytes) -> str | None:
    """The token of one SSE line (`data: {json}`), None for other lines; raises on an error event."""
    if not line.startswith(b"data:"):
        return None
    event = json.loads(line[5:])
    if "error" in event:
        raise StreamError(f"error event: {event['error']}")
    text = event["TEXT"]
    return text[0] if isinstance(text, list) else text


class SseClient:
    def __init__(self, url: str, body: dict, connections: int) -> None:
        import aiohttp

        self.url = url + STREAM_PATH
        self.body = json.dumps(body).encode()
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections),
            timeout=aiohttp.ClientTimeout(total=STREAM_TIMEOUT_S),
        )

    async def stream(self, on_token: OnToken) -> int:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        n = 0
        async with self.session.post(self.url, data=self.body, headers=headers) as resp:
            if resp.status != 200:
                raise StreamError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
            async for line in resp.content:
                token = sse_token(line)
                if token is not None:
                    on_token(token)
                    n += 1
        return n

    async def close(self) -> None:
        await self.session.close()


def grpc_request(prompt: str, max_tokens: int) -> Any:
    from tritonclient.grpc import service_pb2 as pb

    encoded = prompt.encode()
    return pb.ModelInferRequest(
        model_name=MODEL,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="PROMPT", datatype="BYTES", shape=[1]),
            pb.ModelInferRequest.InferInputTensor(name="MAX_TOKENS", datatype="INT32", shape=[1]),
        ],
        raw_input_contents=[struct.pack("<I", len(encoded)) + encoded, struct.pack("<i", max_tokens)],
        parameters={"triton_enable_empty_final_response": pb.InferParameter(bool_param=True)},
    )


def grpc_token(response: Any) -> str | None:
    """The TEXT token of a ModelInferResponse (raw BYTES: 4-byte length, then the bytes), if any."""
    if not response.outputs:
        return None
    if response.raw_output_contents:
        raw = response.raw_output_contents[0]
        (length,) = struct.unpack_from("<I", raw)
        return raw[4 : 4 + length].decode()
    return response.outputs[0].contents.bytes_contents[0].decode()


class GrpcClient:
    """One channel per client, on its own connection (a local subchannel pool: grpc would otherwise
    share one connection among channels to the same address)."""

    def __init__(self, target: str, body: dict) -> None:
        import grpc
        from tritonclient.grpc import service_pb2_grpc

        self.grpc = grpc
        self.channel = grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.request = grpc_request(body["PROMPT"], body["MAX_TOKENS"])

    async def stream(self, on_token: OnToken) -> int:
        call = self.stub.ModelStreamInfer(timeout=STREAM_TIMEOUT_S)
        n = 0
        try:
            await call.write(self.request)
            while True:
                message = await call.read()
                if message is self.grpc.aio.EOF:
                    raise StreamError(f"stream ended after {n} responses without triton_final_response")
                if message.error_message:
                    raise StreamError(f"error_message: {message.error_message}")
                response = message.infer_response
                token = grpc_token(response)
                if token is not None:
                    on_token(token)
                    n += 1
                final = response.parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    break
            await call.done_writing()
            while (await call.read()) is not self.grpc.aio.EOF:
                raise StreamError("a response after the final one")
        except self.grpc.aio.AioRpcError as e:
            raise StreamError(f"gRPC {e.code().name}: {e.details()}") from None
        finally:
            call.cancel()  # a no-op once the call has ended
        return n

    async def close(self) -> None:
        await self.channel.close()


# ---------------------------------------------------------------------------------------------
# Measurement


@dataclass
class Tally:
    window_start: float = 0.0
    window_end: float = 0.0
    responses: int = 0
    streams: int = 0
    ttfr_s: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None
    short_streams: int = 0


async def client_loop(client: SseClient | GrpcClient, tally: Tally, expect: int, stop_at: float) -> None:
    while time.perf_counter() < stop_at:
        sent = time.perf_counter()
        first: list[float] = []

        def on_token(_: str, first: list[float] = first) -> None:
            now = time.perf_counter()
            if not first:
                first.append(now)
            if tally.window_start <= now < tally.window_end:
                tally.responses += 1

        try:
            n = await client.stream(on_token)
        except Exception as e:  # counted, and the client goes on with a fresh stream
            tally.errors += 1
            if tally.first_error is None:
                tally.first_error = f"{type(e).__name__}: {e}"
            await asyncio.sleep(0.01)  # no busy loop against a server that refuses
            continue
        done = time.perf_counter()
        if tally.window_start <= sent and done < tally.window_end:
            tally.streams += 1
        if first and tally.window_start <= sent < tally.window_end:
            tally.ttfr_s.append(first[0] - sent)
        if n != expect:
            tally.short_streams += 1


def percentile_ms(samples: list[float], q: float) -> float | None:
    return float(np.percentile(samples, q)) * 1000 if samples else None


async def measure(
    server: Server, protocol: str, concurrency: int, args: argparse.Namespace, body: dict
) -> dict[str, Any]:
    clients: list[SseClient | GrpcClient]
    if protocol == "grpc":
        clients = [GrpcClient(server.grpc_url, body) for _ in range(concurrency)]
    else:
        clients = [SseClient(server.url, body, connections=concurrency)]
    try:
        now = time.perf_counter()
        tally = Tally(window_start=now + args.warmup_s, window_end=now + args.warmup_s + args.duration_s)
        load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else None
        gathered = asyncio.gather(
            *(client_loop(clients[i % len(clients)], tally, args.tokens, tally.window_end) for i in range(concurrency))
        )
        # CPU over the measured window only: the clients run the warmup meanwhile.
        await asyncio.sleep(max(0.0, tally.window_start - time.perf_counter()))
        client_cpu0, server_cpu0, wall0 = time.process_time(), cpu_s(server.proc.pid), time.perf_counter()
        await asyncio.sleep(max(0.0, tally.window_end - time.perf_counter()))
        client_cpu1, server_cpu1, wall1 = time.process_time(), cpu_s(server.proc.pid), time.perf_counter()
        await asyncio.wait_for(gathered, timeout=STREAM_TIMEOUT_S + 10)
    finally:
        for c in clients:
            await c.close()
    elapsed = wall1 - wall0
    point = {
        "server": server.name,
        "protocol": protocol,
        "concurrency": concurrency,
        "tokens_per_stream": args.tokens,
        "duration_s": args.duration_s,
        "responses": tally.responses,
        "responses_per_s": tally.responses / args.duration_s,
        "streams": tally.streams,
        "streams_per_s": tally.streams / args.duration_s,
        "ttfr_ms": {
            "p50": percentile_ms(tally.ttfr_s, 50),
            "p90": percentile_ms(tally.ttfr_s, 90),
            "p99": percentile_ms(tally.ttfr_s, 99),
            "max": max(tally.ttfr_s) * 1000 if tally.ttfr_s else None,
            "samples": len(tally.ttfr_s),
        },
        "errors": tally.errors,
        "first_error": tally.first_error,
        "short_streams": tally.short_streams,
        "client_cpu_cores": (client_cpu1 - client_cpu0) / elapsed if elapsed > 0 else None,
        "server_cpu_cores": (server_cpu1 - server_cpu0) / elapsed
        if elapsed > 0 and server_cpu0 is not None and server_cpu1 is not None
        else None,
        "loadavg_1m_before": float(load) if load else None,
    }
    ttfr = point["ttfr_ms"]
    log(
        f"{server.name:10} {protocol:5} c={concurrency:<3} {point['responses_per_s']:9.0f} responses/s "
        f"{point['streams_per_s']:7.0f} streams/s  TTFR p50 {fmt(ttfr['p50'])} ms  p99 {fmt(ttfr['p99'])} ms  "
        f"client {fmt(point['client_cpu_cores'])} cores  server {fmt(point['server_cpu_cores'])} cores  "
        f"errors {tally.errors}" + (f" ({tally.first_error})" if tally.first_error else "") + f"  load {load}"
    )
    return point


async def check(server: Server, protocol: str, body: dict, expected: str) -> dict[str, Any]:
    """One stream, compared with the text MarkovText gives for the prompt."""
    client: SseClient | GrpcClient = (
        GrpcClient(server.grpc_url, body) if protocol == "grpc" else SseClient(server.url, body, connections=1)
    )
    tokens: list[str] = []
    try:
        await client.stream(tokens.append)
        error = None
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    finally:
        await client.close()
    text = "".join(tokens)
    ok = error is None and text == expected and len(tokens) == body["MAX_TOKENS"]
    result = {"server": server.name, "protocol": protocol, "ok": ok, "text": text, "error": error}
    if not ok:
        log(f"check failed: {server.name} {protocol}: got {text!r} ({len(tokens)} responses), error {error}")
    return result


async def run_points(servers: dict[str, Server], args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    body = {"PROMPT": args.prompt, "MAX_TOKENS": args.tokens}
    textgen = load_textgen()
    expected = "".join(textgen.MarkovText(textgen.CORPUS).tokens(args.prompt, args.tokens))
    combos = [(s, p) for s in servers for p in (["http"] if s == FASTAPI else args.protocols)]
    checks = [await check(servers[s], p, body, expected) for s, p in combos]
    points = []
    for c in args.concurrency:
        for s, p in combos:
            points.append(await measure(servers[s], p, c, args, body))
    return points, checks


# ---------------------------------------------------------------------------------------------
# Report


def annotate(points: list[dict]) -> None:
    for p in points:
        base = next(
            (b for b in points if b["server"] == FASTAPI and b["concurrency"] == p["concurrency"]),
            None,
        )
        p["vs_fastapi"] = p["responses_per_s"] / base["responses_per_s"] if base and base["responses_per_s"] else None


def markdown_table(points: list[dict]) -> str:
    head = (
        "| server | protocol | conns | responses/s | streams/s | TTFR p50 ms | TTFR p99 ms | x FastAPI "
        "| client cores | server cores | errors |"
    )
    rows = [head, "|" + "---|" * 11]
    for p in points:
        ttfr = p["ttfr_ms"]
        rows.append(
            f"| {p['server']} | {p['protocol']} | {p['concurrency']} | {p['responses_per_s']:.0f} "
            f"| {p['streams_per_s']:.0f} | {fmt(ttfr['p50'])} | {fmt(ttfr['p99'])} | {fmt(p['vs_fastapi'])} "
            f"| {fmt(p['client_cpu_cores'])} | {fmt(p['server_cpu_cores'])} | {p['errors']} |"
        )
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 s points")
    p.add_argument("--duration-s", type=float, help="measured seconds per point (5; quick: 1)")
    p.add_argument("--warmup-s", type=float, help="warmup seconds per point (1; quick: 0.3)")
    p.add_argument("--concurrency", default="1,64", help="comma-separated levels (1,64)")
    p.add_argument("--tokens", type=int, default=50, help="MAX_TOKENS of each stream (50)")
    p.add_argument("--prompt", default="the ", help="PROMPT of each stream ('the ')")
    p.add_argument("--protocols", default=",".join(PROTOCOLS), help="fastserve's: comma-separated http,grpc")
    p.add_argument("--servers", default=",".join(SERVERS), help="comma-separated: " + ",".join(SERVERS))
    p.add_argument("--out", type=Path, default=BENCHES / "results", help="output directory")
    a = p.parse_args(argv)
    resolve_timing(p, a)
    a.protocols = [x for x in a.protocols.split(",") if x]
    a.servers = [x for x in a.servers.split(",") if x]
    for x in a.protocols:
        if x not in PROTOCOLS:
            p.error(f"unknown protocol {x}")
    for x in a.servers:
        if x not in SERVERS:
            p.error(f"unknown server {x}")
    if not (1 <= a.tokens <= 4096):
        p.error("--tokens must be 1..4096")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    stop_on_sigterm()
    conditions = {"start": machine()}
    with ExitStack() as stack:
        servers: dict[str, Server] = {}
        for name in args.servers:
            servers[name] = server = stack.enter_context(started(name))
            log(f"{name} up at {server.url}" + (f" (gRPC {server.grpc_url})" if server.grpc_port else ""))
        points, checks = asyncio.run(run_points(servers, args))
    annotate(points)
    conditions["end"] = machine()
    elapsed = time.monotonic() - t0
    report = markdown_table(points) + "\n"
    failed = [c for c in checks if not c["ok"]]
    for c in failed:
        report += f"\nCheck failed: {c['server']} {c['protocol']} streamed {c['text']!r} (error: {c['error']})\n"
    report += (
        f"\n{args.tokens} tokens per stream, prompt {args.prompt!r}, {args.duration_s:g} s per point after "
        f"{args.warmup_s:g} s warmup; harness wall time: {elapsed:.0f} s\n"
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
    (args.out / "streaming.json").write_text(json.dumps(result, indent=1, default=str))
    (args.out / "streaming.md").write_text(report)
    log(f"wrote {args.out / 'streaming.json'} in {elapsed:.0f} s")
    return 1 if failed or any(p["errors"] for p in points) else 0


if __name__ == "__main__":
    sys.exit(main())
