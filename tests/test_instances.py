"""Instances: `[instance_group] count = N` executes N batches at the same time."""

from __future__ import annotations

import threading
from pathlib import Path

from conftest import infer_json, write_model

# Both instances of the model share this module. Each execute waits until two executes are inside
# at once; with a single instance the first one would wait alone, the barrier would time out and
# break, and both requests would fail with 500.
BARRIER_MODEL = """
    import threading

    BARRIER = threading.Barrier(2, timeout=60)

    class Model:
        def initialize(self, args):
            self.index = args["instance_index"]

        def execute(self, inputs):
            BARRIER.wait()
            return {"Y": inputs["X"] * 0 + self.index}
"""

BARRIER_CONFIG = """
    backend = "python"
    max_batch_size = 0
    [instance_group]
    count = {count}
    [[input]]
    name = "X"
    datatype = "INT32"
    dims = [1]
    [[output]]
    name = "Y"
    datatype = "INT32"
    dims = [1]
"""


def call_concurrently(url: str, model: str, n: int) -> list:
    responses: list = [None] * n

    def call(i: int) -> None:
        responses[i] = infer_json(url, model, [{"name": "X", "shape": [1], "datatype": "INT32", "data": [i]}])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return responses


def test_two_cpu_instances_execute_simultaneously(start_server, tmp_path: Path) -> None:
    write_model(tmp_path, "pair", BARRIER_CONFIG.format(count=2), BARRIER_MODEL)
    server = start_server(tmp_path)
    responses = call_concurrently(server.url, "pair", 2)
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
    # Each request was executed by a different instance.
    assert sorted(r.json()["outputs"][0]["data"][0] for r in responses) == [0, 1]
