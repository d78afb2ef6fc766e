"""Unloading, replacing or failing to load a Python model gives its memory back: the server's RSS
stays flat over repeated cycles of a model holding 100 MB at module level (issue #14)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import requests

from conftest import ServerProcess, write_model, xy_config

MB = 2**20

# 100 MB at module level, touched (np.ones), so it is resident rather than lazily zero-mapped.
HEAVY = """
    import numpy as np

    DATA = np.ones(100 * 2**20 // 8)

    class Model:
        def execute(self, inputs):
            return {"Y": inputs["X"] * 2}
"""

# Imports (allocating its 100 MB), then fails in initialize: the aborted module must go too.
HEAVY_BROKEN = HEAVY.replace(
    "def execute", "def initialize(self, args):\n            raise RuntimeError('no')\n\n        def execute"
)


def rss(server: ServerProcess) -> int:
    """The server's resident set size in bytes, from /proc/<pid>/status."""
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/<pid>/status")


def control(server: ServerProcess, action: str) -> requests.Response:
    return requests.post(f"{server.url}/v2/repository/models/heavy/{action}", timeout=120)


def infer(server: ServerProcess) -> int:
    body = {"inputs": [{"name": "X", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
    return requests.post(f"{server.url}/v2/models/heavy/infer", json=body, timeout=60).status_code


def assert_flat(samples: list[int], what: str) -> None:
    """Memory after the last cycle vs after the first: a leak of the model's 100 MB per cycle
    would show as ~900 MB; allocator noise stays far below 50 MB."""
    growth = samples[-1] - samples[0]
    assert growth < 50 * MB, f"{what}: RSS grew {growth / MB:.0f} MB over {len(samples)} cycles: " + ", ".join(
        f"{s / MB:.0f}" for s in samples
    )


def test_load_unload_cycles_give_the_memory_back(start_server, tmp_path: Path) -> None:
    write_model(tmp_path, "heavy", xy_config(), HEAVY)
    server = start_server(tmp_path, "--model-control-mode", "explicit")
    samples = []
    for _ in range(10):
        assert control(server, "load").status_code == 200
        assert infer(server) == 200
        assert control(server, "unload").status_code == 200
        samples.append(rss(server))
    assert_flat(samples, "load/unload")


def test_replaced_and_failed_reloads_give_the_memory_back(start_server, tmp_path: Path) -> None:
    model = write_model(tmp_path, "heavy", xy_config(), HEAVY) / "1" / "model.py"
    server = start_server(tmp_path, "--model-control-mode", "explicit", "--load-model", "heavy")
    samples = []
    for cycle in range(10):
        # A changed model.py: the version is rebuilt and the old copy replaced.
        model.write_text(textwrap.dedent(HEAVY) + f"# edit {cycle}\n")
        assert control(server, "load").status_code == 200
        # A broken edit: imported (100 MB) and aborted; the serving copy stays.
        model.write_text(textwrap.dedent(HEAVY_BROKEN) + f"# edit {cycle}\n")
        r = control(server, "load")
        assert r.status_code == 400 and "RuntimeError: no" in r.json()["error"]
        assert infer(server) == 200
        samples.append(rss(server))
    assert_flat(samples, "replace/fail")
