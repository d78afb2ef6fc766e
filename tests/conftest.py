"""Shared fixtures: real servers on 127.0.0.1 with ephemeral ports, started as the `fastserve`
command (subprocess) or embedded in this process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from fastserve import Server, Tensor

from helpers import GRPC_LISTENING, HTTP_LISTENING, METRICS_LISTENING

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "models"
# Logged once the startup loads are done (the listeners come up before the models load).
LOADED = re.compile(r"model version\(s\) ready, \d+ failed")


class ServerProcess:
    """A `fastserve serve` subprocess on ephemeral HTTP and gRPC ports; its stderr is collected line
    by line. Returns once the startup loads are done (``wait_loaded=False``: once it listens)."""

    def __init__(
        self,
        repo: Path,
        *extra: str,
        wait_loaded: bool = True,
        python: str = sys.executable,
        environ: dict[str, str] | None = None,
    ) -> None:
        cmd = [python, "-m", "fastserve", "serve", "--model-repository", str(repo)]
        cmd += ["--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", *extra]
        env = dict(os.environ if environ is None else environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.lines: list[str] = []
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.grpc_port: int | None = None
        self._new_line = threading.Condition()
        ready = threading.Event()

        def pump() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                with self._new_line:
                    self.lines.append(line)
                    self._new_line.notify_all()
                metrics = METRICS_LISTENING.search(line)
                if metrics:
                    self.metrics_port = int(metrics.group(2))
                # The gRPC line comes first, so both ports are known once HTTP is listening.
                g = GRPC_LISTENING.search(line)
                if g and self.grpc_port is None:
                    self.grpc_port = int(g.group(2))
                m = HTTP_LISTENING.search(line)
                if m and self.port is None:
                    self.port = int(m.group(2))
                    if not wait_loaded:
                        ready.set()
                if LOADED.search(line):
                    ready.set()
            ready.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        # Bounded only as a guard against a hung start; normal starts take well under a second.
        ready.wait(timeout=120)
        if self.port is None:
            self.proc.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.lines))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return "".join(self.lines)

    def wait_for_log(self, text: str, timeout: float = 60) -> None:
        """Blocks until a log line contains ``text`` (woken by each new line, no polling)."""
        with self._new_line:
            if not self._new_line.wait_for(lambda: text in self.log(), timeout=timeout):
                raise AssertionError(f"log never showed {text!r}:\n{self.log()}")

    def terminate(self, timeout: float = 120) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("server did not exit after SIGTERM:\n" + self.log()) from None
        self._pump.join(timeout=10)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def start_server() -> Iterator:
    started: list[ServerProcess] = []

    def start(repo: Path, *extra: str, wait_loaded: bool = True) -> ServerProcess:
        server = ServerProcess(repo, *extra, wait_loaded=wait_loaded)
        started.append(server)
        return server

    yield start
    for s in started:
        s.close()


@pytest.fixture(scope="session")
def example_server() -> Iterator[ServerProcess]:
    server = ServerProcess(EXAMPLES)
    yield server
    server.close()


def write_model(repo: Path, name: str, config: str, model_py: str | None = None, version: int = 1) -> Path:
    """Writes a model directory: config.toml and, for Python models, <version>/model.py."""
    model_dir = repo / name
    (model_dir / str(version)).mkdir(parents=True, exist_ok=True)
    (model_dir / "config.toml").write_text(textwrap.dedent(config))
    if model_py is not None:
        (model_dir / str(version) / "model.py").write_text(textwrap.dedent(model_py))
    return model_dir


def xy_config(extra: str = "") -> str:
    """The config most Python test models share: FP32 X -> Y, 2 values per row, batches of up to 8
    rows; ``extra`` goes after the top-level keys (more keys, or tables)."""
    io = '[[input]]\nname = "X"\ndatatype = "FP32"\ndims = [2]\n[[output]]\nname = "Y"\ndatatype = "FP32"\ndims = [2]\n'
    return f'backend = "python"\nmax_batch_size = 8\n{extra}\n{io}'


DOUBLE_MODEL = """
    class Model:
        def execute(self, inputs):
            return {"Y": inputs["X"] * 2}
"""


def infer_json(url: str, model: str, inputs: list[dict], **extra: object) -> requests.Response:
    return requests.post(f"{url}/v2/models/{model}/infer", json={"inputs": inputs, **extra}, timeout=60)


# Every V2 datatype and the NumPy dtype clients use for it.
DTYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}


class Identity:
    """Returns its input and records the dtype and shape it saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, tuple[int, ...]]] = []

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["IN"]
        self.seen.append((x.dtype.name, x.shape))
        return {"OUT": x}


@pytest.fixture(scope="module")
def identity_models() -> Iterator[tuple[Server, dict[str, Identity]]]:
    """An embedded server (HTTP and gRPC) with one identity model per V2 datatype, `id_<dtype>`."""
    server = Server(http_port=0, grpc_port=0)
    models = {}
    for dt in DTYPES:
        models[dt] = Identity()
        server.add_model(
            f"id_{dt.lower()}",
            models[dt],
            inputs=[Tensor("IN", dt, [-1])],
            outputs=[Tensor("OUT", dt, [-1])],
            max_batch_size=8,
        )
    with server:
        yield server, models


def sample(datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape))
    if datatype == "BYTES":
        return np.array([f"s{i}-é".encode() for i in range(n)], dtype=object).reshape(shape)
    if datatype == "BOOL":
        return (np.arange(n) % 2 == 0).reshape(shape)
    info = np.iinfo(DTYPES[datatype]) if np.issubdtype(DTYPES[datatype], np.integer) else None
    if info is not None:  # include the extremes of the type
        values = np.linspace(0, 1, n)
        return np.array(
            [info.min if i == 0 else info.max if i == n - 1 else int(v * 100) for i, v in enumerate(values)],
            dtype=DTYPES[datatype],
        ).reshape(shape)
    return (np.arange(n, dtype=np.float64) * 0.25 - 1.5).astype(DTYPES[datatype]).reshape(shape)


class Recorder:
    """Adds 1 to each row and records the batch sizes it executes."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.lock = threading.Lock()

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["X"]
        assert x.flags.writeable
        with self.lock:
            self.batches.append(x.shape[0])
        return {"Y": x + 1}


# A model whose every answer names the version that ran it (output V), and its config.
VERSIONED_MODEL = """
    import numpy as np

    class Model:
        def initialize(self, args):
            self.version = args["model_version"]

        def execute(self, inputs):
            x = inputs["X"]
            return {"Y": x, "V": np.full(x.shape, self.version, dtype=np.int32)}
"""

VERSIONED_CONFIG = textwrap.dedent("""
    backend = "python"
    max_batch_size = 8
    [[input]]
    name = "X"
    datatype = "FP32"
    dims = [1]
    [[output]]
    name = "Y"
    datatype = "FP32"
    dims = [1]
    [[output]]
    name = "V"
    datatype = "INT32"
    dims = [1]
""")
