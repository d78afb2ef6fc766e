"""Shared-memory benchmark: a 4 MiB FP32 tensor in and out through Triton's system shared-memory
extension against the same tensor sent as binary data, with tritonclient, in the same run so the
ratios hold on a noisy machine.

    python benches/shared_memory.py            # concurrency 1 and 16, 5 s per point, about a minute
    python benches/shared_memory.py --quick    # smoke run, 1 s per point

One fastserve server (release build; port 0, its ports read from its log) serves ``identity``, a
Python model returning its FP32 input ``X`` of ``--elements`` values (1,048,576: 4 MiB) as ``Y``
(``max_batch_size = 0``, two instances). At each point ``--concurrency`` client processes (not
threads: tritonclient clients are not thread-safe and one interpreter's GIL would be the limit) each
run a closed loop for ``--warmup-s`` and then the measured ``--duration-s``, in each mode:

- ``http-binary``: tritonclient.http, input and output as binary data (``set_data_from_numpy``,
  ``InferRequestedOutput(binary_data=True)``, ``as_numpy``);
- ``http-shm``: tritonclient.http, each client with its own input and output region (4 MiB each,
  ``tritonclient.utils.shared_memory``, registered once); per request the input is written into its
  region (``set_shared_memory_region``), and the output is read with ``get_contents_as_numpy``;
- ``grpc`` and ``grpc-shm``: the same with tritonclient.grpc (``--modes`` picks).

Before measuring, one request per mode checks that the output equals the input. Reported per point:
requests/s in the measured window, input MiB/s, latency p50 and p99, and requests/s relative to the
same protocol without shared memory at the same concurrency. Prints a markdown table and writes
``results/shared_memory.json`` and ``results/shared_memory.md``. The server is stopped on exit,
errors included. Needs tritonclient[http,grpc].
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCHES = Path(__file__).resolve().parent
ROOT = BENCHES.parent
# The server harness (start, ready wait on the tests' listening-line patterns, stop) is run.py's;
# the percentile helper streaming.py's; each exists once.
if str(BENCHES) not in sys.path:
    sys.path.insert(0, str(BENCHES))
from run import Server, fastserve_cmd, fmt, log, machine, resolve_timing, stop_on_sigterm  # noqa: E402
from streaming import percentile_ms  # noqa: E402

MODES = ("http-binary", "http-shm", "grpc", "grpc-shm")
MODEL = "identity"
# A request that takes longer than this is a hang, counted as an error.
REQUEST_TIMEOUT_S = 60.0


IDENTITY = """class Model:
    def execute(self, inputs):
        return {"Y": inputs["X"]}
"""


def repository(dest: Path, elements: int) -> Path:
    model = dest / MODEL
    (model / "1").mkdir(parents=True)
    (model / "config.toml").write_text(
        textwrap.dedent(f"""
        backend = "python"
        max_batch_size = 0

        [instance_group]
        count = 2

        [[input]]
        name = "X"
        datatype = "FP32"
        dims = [{elements}]

        [[output]]
        name = "Y"
        datatype = "FP32"
        dims = [{elements}]
        """)
    )
    (model / "1" / "model.py").write_text(IDENTITY)
    return dest


class Client:
    """One client process's connection in one mode; with shared memory, its own two regions."""

    def __init__(self, mode: str, server: dict[str, str], elements: int, tag: str) -> None:
        import tritonclient.grpc as grpcclient
        import tritonclient.http as httpclient
        import tritonclient.utils.shared_memory as shm

        self.mode, self.elements, self.shm = mode, elements, shm
        self.lib: Any = grpcclient if mode.startswith("grpc") else httpclient
        if self.lib is httpclient:
            self.client = httpclient.InferenceServerClient(server["http"], network_timeout=REQUEST_TIMEOUT_S)
        else:
            self.client = grpcclient.InferenceServerClient(server["grpc"])
        # HTTP bounds a call with the client's network_timeout, gRPC per call.
        self.timeout = {} if self.lib is httpclient else {"client_timeout": REQUEST_TIMEOUT_S}
        self.nbytes = elements * 4
        self.regions: list[Any] = []
        if mode.endswith("shm"):
            self.names = (f"in_{tag}", f"out_{tag}")
            for name in self.names:
                key = f"/fastserve_bench_{name}"
                self.regions.append(shm.create_shared_memory_region(name, key, self.nbytes))
                self.client.register_system_shared_memory(name, key, self.nbytes)

    def infer(self, x: np.ndarray) -> np.ndarray:
        i = self.lib.InferInput("X", [self.elements], "FP32")
        if self.regions:
            self.shm.set_shared_memory_region(self.regions[0], [x])
            i.set_shared_memory(self.names[0], self.nbytes)
            o = self.lib.InferRequestedOutput("Y")
            o.set_shared_memory(self.names[1], self.nbytes)
            self.client.infer(MODEL, [i], outputs=[o], **self.timeout)
            return self.shm.get_contents_as_numpy(self.regions[1], np.float32, [self.elements])
        i.set_data_from_numpy(x)
        o = self.lib.InferRequestedOutput("Y", binary_data=True) if self.lib.__name__.endswith("http") else None
        outputs = None if o is None else [o]
        return self.client.infer(MODEL, [i], outputs=outputs, **self.timeout).as_numpy("Y")

    def close(self) -> None:
        if self.regions:
            for name in self.names:
                self.client.unregister_system_shared_memory(name)
            for r in self.regions:
                self.shm.destroy_shared_memory_region(r)
        self.client.close()


def client_loop(
    mode: str, server: dict[str, str], elements: int, tag: str, timing: tuple[float, float], start: Any, out: Any
) -> None:
    """A closed loop from the moment every client is ready: `timing` (warmup, duration) seconds;
    latencies of the requests sent and answered inside the measured window."""
    latencies: list[float] = []
    errors, samples = 0, []
    client = Client(mode, server, elements, tag)
    x = np.random.default_rng(0).random(elements, dtype=np.float32)
    try:
        start.wait()
        begin = time.monotonic() + timing[0]
        window = (begin, begin + timing[1])
        while (start := time.monotonic()) < window[1]:
            try:
                client.infer(x)
            except Exception as e:
                errors += 1
                samples.append(str(e)[:200])
                continue
            done = time.monotonic()
            if start >= window[0] and done <= window[1]:
                latencies.append(done - start)
    finally:
        client.close()
        out.put({"latencies": latencies, "errors": errors, "samples": samples[:3]})


def measure(server: dict[str, str], mode: str, concurrency: int, args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    # Spawned processes take a while to import and connect; the clock starts once all are ready.
    start = ctx.Barrier(concurrency + 1)
    timing = (args.warmup_s, args.duration_s)
    procs = [
        ctx.Process(
            target=client_loop,
            args=(mode, server, args.elements, f"{os.getpid()}_{mode}_{i}", timing, start, out),
        )
        for i in range(concurrency)
    ]
    for p in procs:
        p.start()
    start.wait(timeout=300)
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else None
    results = [out.get(timeout=sum(timing) + 120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    latencies = [v for r in results for v in r["latencies"]]
    point = {
        "mode": mode,
        "concurrency": concurrency,
        "requests": len(latencies),
        "requests_per_s": len(latencies) / args.duration_s,
        "input_mib_per_s": len(latencies) * args.elements * 4 / args.duration_s / 2**20,
        "p50_ms": percentile_ms(latencies, 50),
        "p99_ms": percentile_ms(latencies, 99),
        "errors": sum(r["errors"] for r in results),
        "error_samples": [s for r in results for s in r["samples"]][:3],
        "loadavg_1m_before": float(load) if load else None,
    }
    log(
        f"{mode:12} c={concurrency:<3} {point['requests_per_s']:8.1f} req/s  p50 {fmt(point['p50_ms'])} ms"
        f"  p99 {fmt(point['p99_ms'])} ms  errors {point['errors']}  load {load}"
    )
    return point


def check(server: dict[str, str], mode: str, elements: int) -> None:
    """One request: the output must be the input, bit for bit."""
    client = Client(mode, server, elements, f"{os.getpid()}_{mode}_check")
    try:
        x = np.random.default_rng(1).random(elements, dtype=np.float32)
        y = client.infer(x)
        if not np.array_equal(x, y):
            raise RuntimeError(f"{mode}: the output differs from the input")
    finally:
        client.close()


def markdown(points: list[dict[str, Any]]) -> str:
    base = {("http-shm", c): ("http-binary", c) for c in {p["concurrency"] for p in points}}
    base.update({("grpc-shm", c): ("grpc", c) for c in {p["concurrency"] for p in points}})
    by = {(p["mode"], p["concurrency"]): p for p in points}
    rows = [
        "| mode | conc | req/s | input MiB/s | p50 ms | p99 ms | x without shm | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        ref = by.get(base.get((p["mode"], p["concurrency"]), ("", 0)))
        ratio = p["requests_per_s"] / ref["requests_per_s"] if ref and ref["requests_per_s"] else None
        p["x_without_shm"] = ratio
        rows.append(
            f"| {p['mode']} | {p['concurrency']} | {p['requests_per_s']:.1f} | {p['input_mib_per_s']:.0f} | "
            f"{fmt(p['p50_ms'])} | {fmt(p['p99_ms'])} | {fmt(ratio)} | {p['errors']} |"
        )
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 s points")
    p.add_argument("--duration-s", type=float, help="measured seconds per point (5; quick: 1)")
    p.add_argument("--warmup-s", type=float, help="warmup seconds per point (1; quick: 0.3)")
    p.add_argument("--concurrency", default="1,16", help="comma-separated client processes per point")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ",".join(MODES))
    p.add_argument("--elements", type=int, default=1 << 20, help="FP32 elements per tensor (4 MiB)")
    p.add_argument("--out", type=Path, default=BENCHES / "results", help="output directory")
    a = p.parse_args(argv)
    resolve_timing(p, a)
    a.modes = [m for m in a.modes.split(",") if m]
    if any(m not in MODES for m in a.modes) or a.elements < 1:
        p.error(f"modes are {', '.join(MODES)}; --elements must be positive")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        server = Server("fastserve", fastserve_cmd(repository(Path(tmp), args.elements)))
        try:
            server.wait_ready()
            urls = {"http": f"127.0.0.1:{server.http_port}", "grpc": server.grpc_url}
            for mode in args.modes:
                check(urls, mode, args.elements)
            points = [measure(urls, mode, c, args) for c in args.concurrency for mode in args.modes]
        finally:
            server.stop()
    table = markdown(points)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": machine(),
        "elements": args.elements,
        "duration_s": args.duration_s,
        "warmup_s": args.warmup_s,
        "wall_s": time.monotonic() - t0,
        "points": points,
    }
    (args.out / "shared_memory.json").write_text(json.dumps(result, indent=2))
    (args.out / "shared_memory.md").write_text(table + "\n")
    return 1 if any(p["errors"] for p in points) else 0


if __name__ == "__main__":
    sys.exit(main())
