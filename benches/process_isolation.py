"""Process isolation benchmark: a pure-Python model at ``count = 1`` and ``count = 2``, thread
against process isolation, and the per-batch cost of process isolation for a 1 MiB tensor, all
measured in the same run (one server) so the ratios hold on a noisy machine.

    python benches/process_isolation.py            # 5 s per point
    python benches/process_isolation.py --quick    # smoke run, 1 s per point

One fastserve server (port 0, its ports read from its log; ``fastserve-loadgen`` from run.py's
harness, closed loop, binary protocol) serves:

- ``spin_{thread,process}_{1,2}``: ``execute`` runs a fixed Python loop calibrated to
  ``--spin-ms`` (1 ms) on this machine, as pre/post-processing often is, then returns its
  input; ``max_batch_size = 0``, so each request is one ``execute``. Measured at
  ``--concurrency`` (8) connections. With threads the GIL serializes the instances; with
  processes each has its own interpreter.
- ``echo_{thread,process}``: returns its FP32 input of 262,144 values (1 MiB) unchanged, measured
  at concurrency 1: the latency difference is what process isolation adds per batch (the copy into
  shared memory each way plus the control message round trip).

Prints a markdown table (requests/s, p50/p99, the count-2/count-1 ratio per isolation, the echo
overhead) with the load average before each point, and writes ``results/process_isolation.json``
and ``.md``. The server is stopped on exit, errors included.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

BENCHES = Path(__file__).resolve().parent
ROOT = BENCHES.parent
if str(BENCHES) not in sys.path:
    sys.path.insert(0, str(BENCHES))
from run import (  # noqa: E402
    Server,
    build_loadgen,
    fastserve_cmd,
    fmt,
    loadgen_path,
    log,
    machine,
    run_loadgen,
    stop_on_sigterm,
)

ISOLATIONS = ("thread", "process")
SPIN_FEATURES = 16
ECHO_FEATURES = 262_144  # FP32: 1 MiB per request

SPIN = """class Model:
    def execute(self, inputs):
        # A fixed amount of Python bytecode (about SPIN_MS on this machine, calibrated by the
        # harness): it holds the GIL the whole time, as pure-Python work does.
        n = 0
        for _ in range(ITERATIONS):
            n += 1
        return {"Y": inputs["X"]}
"""


def calibrate(spin_ms: float) -> int:
    """Loop iterations that take ``spin_ms`` in this interpreter: a fixed amount of work, so
    instances that wait for the GIL do not finish early (a wall-clock deadline would)."""
    iterations = 100_000
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        n = 0
        for _ in range(iterations):
            n += 1
        best = min(best, time.perf_counter() - start)
    return max(1, int(iterations * spin_ms / 1000 / best))


ECHO = """class Model:
    def execute(self, inputs):
        return {"Y": inputs["X"]}
"""


def model(repo: Path, name: str, source: str, features: int, count: int, isolation: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "1" / "model.py").write_text(source)
    (repo / name / "config.toml").write_text(
        textwrap.dedent(f"""
        backend = "python"
        max_batch_size = 0

        [instance_group]
        count = {count}
        isolation = "{isolation}"

        [[input]]
        name = "X"
        datatype = "FP32"
        dims = [-1, {features}]

        [[output]]
        name = "Y"
        datatype = "FP32"
        dims = [-1, {features}]
        """)
    )


def repository(dest: Path, iterations: int) -> Path:
    spin = SPIN.replace("ITERATIONS", str(iterations))
    for isolation in ISOLATIONS:
        for count in (1, 2):
            model(dest, f"spin_{isolation}_{count}", spin, SPIN_FEATURES, count, isolation)
        model(dest, f"echo_{isolation}", ECHO, ECHO_FEATURES, 1, isolation)
    return dest


def point(loadgen: Path, server: Server, name: str, features: int, concurrency: int, args: Any) -> dict[str, Any]:
    load = Path("/proc/loadavg").read_text().split()[0]
    r = run_loadgen(
        loadgen,
        server.url,
        "binary",
        concurrency,
        model=name,
        input="X",
        features=features,
        duration_s=args.duration_s,
        warmup_s=args.warmup_s,
    )
    lat = r["latency_us"]
    p = {
        "model": name,
        "concurrency": concurrency,
        "requests_per_s": r["requests_per_s"],
        "p50_ms": lat["p50"] / 1000,
        "p99_ms": lat["p99"] / 1000,
        "errors": r["errors"],
        "loadavg_1m_before": float(load),
    }
    log(
        f"{name:18} c={concurrency:<3} {p['requests_per_s']:8.0f} req/s  p50 {fmt(p['p50_ms'])} ms"
        f"  p99 {fmt(p['p99_ms'])} ms  errors {p['errors']}  load {load}"
    )
    return p


def markdown(points: list[dict[str, Any]]) -> str:
    by = {p["model"]: p for p in points}
    rows = ["| model | isolation | instances | conns | req/s | p50 ms | p99 ms | x count=1 | load before |"]
    rows.append("|---|---|---|---|---|---|---|---|---|")
    for isolation in ISOLATIONS:
        one = by[f"spin_{isolation}_1"]["requests_per_s"]
        for count in (1, 2):
            p = by[f"spin_{isolation}_{count}"]
            rows.append(
                f"| spin (1 ms Python) | {isolation} | {count} | {p['concurrency']} | {p['requests_per_s']:.0f} | "
                f"{fmt(p['p50_ms'])} | {fmt(p['p99_ms'])} | {p['requests_per_s'] / one:.2f} | "
                f"{p['loadavg_1m_before']} |"
            )
    for isolation in ISOLATIONS:
        p = by[f"echo_{isolation}"]
        rows.append(
            f"| echo (1 MiB FP32) | {isolation} | 1 | 1 | {p['requests_per_s']:.0f} | {fmt(p['p50_ms'])} | "
            f"{fmt(p['p99_ms'])} | | {p['loadavg_1m_before']} |"
        )
    overhead = (by["echo_process"]["p50_ms"] - by["echo_thread"]["p50_ms"]) * 1000
    rows.append("")
    rows.append(f"Per-batch overhead of process isolation for 1 MiB in and out (p50 difference): {overhead:.0f} us.")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 s points")
    p.add_argument("--duration-s", type=float, help="measured seconds per point (5; quick: 1)")
    p.add_argument("--warmup-s", type=float, help="warmup seconds per point (1; quick: 0.3)")
    p.add_argument("--concurrency", type=int, default=8, help="connections for the spin models (8)")
    p.add_argument("--spin-ms", type=float, default=1.0, help="Python work per execute() (1 ms)")
    p.add_argument("--skip-build", action="store_true", help="use the already built loadgen")
    p.add_argument("--out", type=Path, default=BENCHES / "results", help="output directory")
    args = p.parse_args(argv)
    args.duration_s = args.duration_s if args.duration_s is not None else (1.0 if args.quick else 5.0)
    args.warmup_s = args.warmup_s if args.warmup_s is not None else (0.3 if args.quick else 1.0)
    stop_on_sigterm()
    loadgen = loadgen_path() if args.skip_build else build_loadgen()
    points: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        iterations = calibrate(args.spin_ms)
        log(f"spin: {iterations} loop iterations for {args.spin_ms} ms of Python work")
        server = Server("fastserve", fastserve_cmd(repository(Path(tmp), iterations)))
        try:
            server.wait_ready()
            for isolation in ISOLATIONS:
                for count in (1, 2):
                    name = f"spin_{isolation}_{count}"
                    points.append(point(loadgen, server, name, SPIN_FEATURES, args.concurrency, args))
            for isolation in ISOLATIONS:
                points.append(point(loadgen, server, f"echo_{isolation}", ECHO_FEATURES, 1, args))
        finally:
            server.stop()
    table = markdown(points)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "process_isolation.json").write_text(json.dumps({"machine": machine(), "points": points}, indent=2))
    (args.out / "process_isolation.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
