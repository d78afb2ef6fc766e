"""``[instance_group] isolation = "process"``: each instance in a worker process of its own.

Real ``fastserve serve`` subprocesses (and an embedded ``Server``) with real clients. A model that
crashes fails only its own request, its worker is restarted, the other requests and models keep
being served; hung workers are killed; no worker outlives the server, even one killed with SIGKILL.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from fastserve import Server, Tensor
from tritonclient.utils import InferenceServerException

from conftest import EXAMPLES, write_model
from helpers import HANG_GUARD_S, wait_until

# X < 0 picks a failure: -1 segfaults, -3 calls os._exit(3), -9 hangs. Every instance writes its
# worker's pid into pid_dir when it starts, and answers it in PID.
MODEL = """
import ctypes
import os
import resource
import threading
from pathlib import Path

import numpy as np


class Model:
    def initialize(self, args):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the segfaults below leave no core file
        self.pid_dir = Path(args["parameters"]["pid_dir"])
        self.pid_dir.mkdir(exist_ok=True)
        (self.pid_dir / str(os.getpid())).write_text(str(args["instance_index"]))

    def execute(self, inputs):
        x = inputs["X"]
        if (x == -1).any():
            ctypes.string_at(0)
        if (x == -3).any():
            os._exit(3)
        if (x == -9).any():
            (self.pid_dir.parent / f"hung-{os.getpid()}").touch()
            threading.Event().wait()
        if (x == -5).any():
            raise ValueError("negative five")
        return {"Y": x * 2, "PID": np.full((x.shape[0], 1), os.getpid(), dtype=np.int64)}
"""


def config(pid_dir: Path, count: int = 1, extra: str = "") -> str:
    # No batching: a crash fails exactly one request, never others batched with it.
    return f"""
backend = "python"
{extra}
[instance_group]
count = {count}
isolation = "process"

[parameters]
pid_dir = "{pid_dir}"

[[input]]
name = "X"
datatype = "FP32"
dims = [-1, 2]

[[output]]
name = "Y"
datatype = "FP32"
dims = [-1, 2]

[[output]]
name = "PID"
datatype = "INT64"
dims = [-1, 1]
"""


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting to be reaped has stopped running)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def pids(pid_dir: Path) -> set[int]:
    return {int(p.name) for p in pid_dir.iterdir()} if pid_dir.exists() else set()


def post(url: str, model: str, value: float) -> requests.Response:
    body = {"inputs": [{"name": "X", "shape": [1, 2], "datatype": "FP32", "data": [value, value]}]}
    return requests.post(f"{url}/v2/models/{model}/infer", json=body, timeout=HANG_GUARD_S)


def answer(r: requests.Response) -> tuple[list[float], int]:
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o["data"] for o in r.json()["outputs"]}
    return outputs["Y"], outputs["PID"][0]


def load_failure(url: str, model: str) -> str:
    """Why a model failed to load, as its metadata answer tells it."""
    r = requests.get(f"{url}/v2/models/{model}", timeout=HANG_GUARD_S)
    assert r.status_code == 503, r.text
    return str(r.json()["error"])


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return tmp_path / "models"


def test_a_segfault_fails_only_its_request_and_a_restarted_worker_serves_the_next(repo, tmp_path, start_server):
    write_model(repo, "crashy", config(tmp_path / "pids"), MODEL)
    write_model(repo, "steady", config(tmp_path / "steady"), MODEL)
    server = start_server(repo)
    y, first = answer(post(server.url, "crashy", 1.0))
    assert y == [2.0, 2.0] and first != server.proc.pid and alive(first)

    r = post(server.url, "crashy", -1.0)
    assert r.status_code == 500, r.text
    assert "model instance process exited with signal 11" in r.json()["error"]
    assert not alive(first)

    y, second = answer(post(server.url, "crashy", 3.0))
    assert y == [6.0, 6.0] and second != first, "served by a restarted worker"
    assert answer(post(server.url, "steady", 2.0))[0] == [4.0, 4.0]
    # A model that raises keeps its worker: that is the model's error, in the in-process wording.
    r = post(server.url, "crashy", -5.0)
    assert r.status_code == 500 and "ValueError: negative five" in r.json()["error"], r.text
    assert answer(post(server.url, "crashy", 1.0))[1] == second
    metrics = requests.get(server.metrics_url, timeout=HANG_GUARD_S).text
    assert 'fastserve_instance_restarts_total{model="crashy",version="1"} 1' in metrics
    assert 'fastserve_instance_restarts_total{model="steady",version="1"} 0' in metrics
    assert 'fastserve_instance_process_resident_bytes{model="crashy",version="1",instance="0"}' in metrics
    assert requests.get(f"{server.url}/v2/health/ready", timeout=HANG_GUARD_S).status_code == 200


def test_os_exit_fails_only_its_request_over_grpc(repo, tmp_path, start_server):
    write_model(repo, "exits", config(tmp_path / "pids"), MODEL)
    server = start_server(repo)
    client = grpcclient.InferenceServerClient(server.grpc_address)

    def infer(value: float) -> grpcclient.InferResult:
        x = grpcclient.InferInput("X", [1, 2], "FP32")
        x.set_data_from_numpy(np.full((1, 2), value, dtype=np.float32))
        return client.infer("exits", [x])

    first = int(infer(1.0).as_numpy("PID")[0, 0])
    with pytest.raises(InferenceServerException) as e:
        infer(-3.0)
    assert e.value.status() == "StatusCode.INTERNAL"
    assert "model instance process exited with status 3" in e.value.message()
    result = infer(4.0)
    np.testing.assert_array_equal(result.as_numpy("Y"), [[8.0, 8.0]])
    assert int(result.as_numpy("PID")[0, 0]) not in (first, server.proc.pid)


def listening_sockets() -> set[str]:
    """Inodes of the machine's listening TCP sockets."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if Path(table).exists():
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # LISTEN
                    inodes.add(fields[9])
    return inodes


def sockets_of(pid: int) -> set[str]:
    """Inodes of the sockets process ``pid`` holds open."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:[") : -1])
    return inodes


def test_a_worker_killed_from_outside_fails_only_its_request(repo, tmp_path, start_server):
    """SIGKILL from outside (what the OOM killer sends) while a batch runs: that request fails, the
    worker is restarted, and no worker ever held the server's listening sockets."""
    write_model(repo, "victim", config(tmp_path / "pids"), MODEL)
    server = start_server(repo)
    first = answer(post(server.url, "victim", 1.0))[1]
    listening = listening_sockets()
    assert sockets_of(server.proc.pid) & listening, "the server's listeners are seen"
    assert not sockets_of(first) & listening, "a worker inherits no listening socket"

    running: list[requests.Response] = []
    hung = threading.Thread(target=lambda: running.append(post(server.url, "victim", -9.0)))
    hung.start()
    wait_until(lambda: (tmp_path / f"hung-{first}").exists(), what="the worker to run the batch")
    os.kill(first, signal.SIGKILL)
    hung.join(HANG_GUARD_S)
    assert running[0].status_code == 500, running[0].text
    assert "model instance process exited with signal 9" in running[0].json()["error"]
    y, second = answer(post(server.url, "victim", 2.0))
    assert y == [4.0, 4.0] and second not in (first, server.proc.pid)
    assert not sockets_of(second) & listening_sockets()


def test_a_hung_worker_is_killed_at_execution_timeout_and_replaced(repo, tmp_path, start_server):
    # Far above any normal execute() here, so only the hung call reaches it.
    write_model(repo, "hangs", config(tmp_path / "pids", extra="execution_timeout_ms = 1000"), MODEL)
    server = start_server(repo)
    hung = answer(post(server.url, "hangs", 1.0))[1]

    r = post(server.url, "hangs", -9.0)
    assert r.status_code == 503, r.text
    assert r.json()["error"] == "model 'hangs' execution timed out after 1000 ms; instance process killed and replaced"
    wait_until(lambda: not alive(hung), what="the hung worker to be killed")
    y, replacement = answer(post(server.url, "hangs", 2.0))
    assert y == [4.0, 4.0] and replacement != hung
    metrics = requests.get(server.metrics_url, timeout=HANG_GUARD_S).text
    assert 'fastserve_instance_replaced_total{model="hangs",version="1"} 1' in metrics
    assert server.terminate() == 0
    assert not alive(replacement)


def test_eight_clients_get_every_answer_while_one_instance_keeps_crashing(repo, tmp_path, start_server):
    write_model(repo, "pair", config(tmp_path / "pids", count=2, extra="max_instance_failures = 1000"), MODEL)
    server = start_server(repo)
    errors: list[str] = []
    stop = threading.Event()

    def client(seed: int) -> None:
        http = httpclient.InferenceServerClient(server.address)  # one client per thread
        rng = np.random.default_rng(seed)
        for _ in range(40):
            x = rng.uniform(0, 100, size=(1, 2)).astype(np.float32)
            inp = httpclient.InferInput("X", [1, 2], "FP32")
            inp.set_data_from_numpy(x)
            try:
                y = http.infer("pair", [inp]).as_numpy("Y")
            except InferenceServerException as e:
                errors.append(str(e))
                continue
            if not np.array_equal(y, x * 2):
                errors.append(f"{x} -> {y}")

    def crasher() -> None:
        crashes = 0
        while not stop.is_set() or crashes < 5:
            r = post(server.url, "pair", -1.0)
            if r.status_code != 500 or "exited with signal 11" not in r.text:
                errors.append(f"crash request: {r.status_code} {r.text}")
            crashes += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    crashing = threading.Thread(target=crasher)
    crashing.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    crashing.join()
    assert errors == []
    restarts = requests.get(server.metrics_url, timeout=HANG_GUARD_S).text
    assert 'fastserve_instance_restarts_total{model="pair",version="1"} 0' not in restarts


def test_shutdown_stops_every_worker(repo, tmp_path, start_server):
    write_model(repo, "two", config(tmp_path / "pids", count=2), MODEL)
    server = start_server(repo)
    workers = wait_until(lambda: pids(tmp_path / "pids") if len(pids(tmp_path / "pids")) == 2 else None)
    assert all(alive(p) for p in workers)
    assert answer(post(server.url, "two", 1.0))[1] in workers
    assert server.terminate() == 0
    assert [p for p in workers if alive(p)] == []


def test_workers_exit_by_themselves_when_the_server_is_killed(repo, tmp_path, start_server):
    write_model(repo, "two", config(tmp_path / "pids", count=2), MODEL)
    server = start_server(repo)
    workers = wait_until(lambda: pids(tmp_path / "pids") if len(pids(tmp_path / "pids")) == 2 else None)

    def hang() -> None:
        try:
            post(server.url, "two", -9.0)
        except requests.ConnectionError:
            pass  # the server is killed meanwhile

    # One worker is busy in execute() when the server dies, the other waits for work.
    busy = threading.Thread(target=hang)
    busy.start()
    wait_until(lambda: list(tmp_path.glob("hung-*")), what="a worker to hang")
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    wait_until(lambda: not any(alive(p) for p in workers), what=lambda: f"workers {workers} to exit")
    busy.join()


def test_repeated_failures_mark_the_version_unavailable_with_the_reason(repo, tmp_path, start_server):
    write_model(repo, "fragile", config(tmp_path / "pids", extra="max_instance_failures = 2"), MODEL)
    write_model(repo, "steady", config(tmp_path / "steady"), MODEL)
    server = start_server(repo)
    for _ in range(2):
        r = post(server.url, "fragile", -3.0)
        assert r.status_code == 500 and "exited with status 3" in r.text, r.text
    ready = lambda: requests.get(f"{server.url}/v2/models/fragile/ready", timeout=HANG_GUARD_S)  # noqa: E731
    wait_until(lambda: ready().status_code != 200, what="the version to be marked unavailable")
    r = post(server.url, "fragile", 1.0)
    assert r.status_code == 503, r.text
    assert "failed 2 times in a row" in r.json()["error"] and "exited with status 3" in r.json()["error"]
    assert answer(post(server.url, "steady", 1.0))[0] == [2.0, 2.0]


def test_combinations_a_worker_cannot_serve_are_refused_at_load(repo, tmp_path, start_server):
    write_model(repo, "stream", config(tmp_path / "a", extra="[model_transaction_policy]\ndecoupled = true"), MODEL)
    triton = "class TritonPythonModel:\n    def execute(self, requests):\n        return []\n"
    write_model(repo, "triton", config(tmp_path / "b"), triton)
    write_model(repo, "typo", config(tmp_path / "c").replace('"process"', '"processes"'), MODEL)
    server = start_server(repo)
    names = ("stream", "triton", "typo")
    index = {name: load_failure(server.url, name) for name in names}
    assert 'isolation = "process" does not run decoupled models' in index["stream"]
    assert "TritonPythonModel" in index["triton"] and 'isolation = "thread"' in index["triton"]
    assert "[instance_group] isolation must be one of thread, process" in index["typo"]


def test_a_model_that_cannot_initialize_reports_why(repo, tmp_path, start_server):
    broken = "class Model:\n    def initialize(self, args):\n        raise RuntimeError('no weights')\n"
    write_model(repo, "broken", config(tmp_path / "a"), broken + "    def execute(self, inputs):\n        return {}\n")
    crashing = "import os\nclass Model:\n    def initialize(self, args):\n        os._exit(7)\n"
    write_model(repo, "dies", config(tmp_path / "b"), crashing + "    def execute(self, inputs):\n        return {}\n")
    server = start_server(repo)
    names = ("broken", "dies")
    index = {name: load_failure(server.url, name) for name in names}
    assert "RuntimeError: no weights" in index["broken"]
    assert "model instance process exited with status 7 while loading the model" in index["dies"]


class PidModel:
    """An embedding API model: each worker imports this class by name and creates its own."""

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["X"]
        return {"Y": x * 2, "PID": np.full((x.shape[0], 1), os.getpid(), dtype=np.int64)}


def test_add_model_takes_isolation_too() -> None:
    io = {
        "inputs": [Tensor("X", "FP32", [2])],
        "outputs": [Tensor("Y", "FP32", [2]), Tensor("PID", "INT64", [1])],
    }
    with Server(http_port=0, grpc_port=0) as server:
        with pytest.raises(TypeError, match="not an object"):
            server.add_model("obj", PidModel(), isolation="process", **io)
        server.add_model("iso", PidModel, instance_count=2, max_batch_size=4, isolation="process", **io)
        url = f"http://127.0.0.1:{server.http_port}"
        body = {"inputs": [{"name": "X", "shape": [1, 2], "datatype": "FP32", "data": [1.5, 2]}]}
        r = requests.post(f"{url}/v2/models/iso/infer", json=body, timeout=HANG_GUARD_S)
        outputs = {o["name"]: o["data"] for o in r.json()["outputs"]}
        assert outputs["Y"] == [3.0, 4.0] and outputs["PID"][0] != os.getpid()
        worker = outputs["PID"][0]
    wait_until(lambda: not alive(worker), what="the embedded server's worker to stop")


def test_an_onnx_model_answers_from_worker_processes_as_in_process(tmp_path, start_server):
    """Every backend may run isolated: the example ONNX model in 2 workers answers as ONNX Runtime
    does in this process, and the worker that ran it reports its memory."""
    ort = pytest.importorskip("onnxruntime")
    repo = tmp_path / "onnx"
    shutil.copytree(EXAMPLES / "mlp", repo / "mlp")
    cfg = repo / "mlp" / "config.toml"
    text = cfg.read_text()
    assert 'count = 1\nkind = "cpu"' in text
    cfg.write_text(text.replace('count = 1\nkind = "cpu"', 'count = 2\nkind = "cpu"\nisolation = "process"'))
    server = start_server(repo)
    x = np.random.default_rng(7).standard_normal((3, 64)).astype(np.float32)
    expected = ort.InferenceSession(str(repo / "mlp" / "1" / "model.onnx")).run(None, {"INPUT0": x})[0]
    client = httpclient.InferenceServerClient(server.address)
    given = httpclient.InferInput("INPUT0", [3, 64], "FP32")
    given.set_data_from_numpy(x)
    np.testing.assert_allclose(client.infer("mlp", [given]).as_numpy("OUTPUT0"), expected, rtol=1e-5, atol=1e-6)
    metrics = requests.get(server.metrics_url, timeout=HANG_GUARD_S).text
    # A worker reports its memory after each batch it ran: the one that answered is listed.
    assert 'fastserve_instance_process_resident_bytes{model="mlp",version="1",instance=' in metrics


FINALIZING = """
import os
from pathlib import Path

import numpy as np


class Model:
    def initialize(self, args):
        self.mark = Path(args["parameters"]["mark"])

    def execute(self, inputs):
        x = inputs["X"]
        return {"Y": x, "PID": np.full((x.shape[0], 1), os.getpid(), dtype=np.int64)}

    def finalize(self):
        self.mark.write_text(str(os.getpid()))
"""


def test_finalize_runs_in_the_worker_at_shutdown(repo, tmp_path, start_server):
    mark = tmp_path / "finalized"
    cfg = config(tmp_path / "pids").replace(f'pid_dir = "{tmp_path / "pids"}"', f'mark = "{mark}"')
    write_model(repo, "fin", cfg, FINALIZING)
    server = start_server(repo)
    assert post(server.url, "fin", 1.0).status_code == 200
    assert server.terminate() == 0
    assert mark.exists(), "finalize ran before the worker stopped"
    assert int(mark.read_text()) != server.proc.pid, "in the worker, not in the server"
