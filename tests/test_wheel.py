"""The wheel is what users install: built with maturin from this checkout, installed into a fresh
virtualenv, and run with a PATH that has no Rust toolchain, it serves the example repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient

from conftest import EXAMPLES, ROOT, ServerProcess


def test_the_wheel_installs_into_a_fresh_virtualenv_and_serves_without_rust(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    # Reuses the release build `pip install .` left in target/: only the packaging runs again.
    subprocess.run(
        [sys.executable, "-m", "maturin", "build", "--release", "--out", str(dist)],
        cwd=ROOT, check=True, capture_output=True, timeout=1800,
    )  # fmt: skip
    [wheel] = dist.glob("fastserve_engine-*-cp310-abi3-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", str(wheel)],
        check=True, timeout=1200,
    )  # fmt: skip
    # No cargo, rustc or maturin anywhere on PATH: nothing may need them once installed.
    path = os.pathsep.join([str(venv / "bin"), "/usr/bin", "/bin"])
    assert shutil.which("cargo", path=path) is None and shutil.which("rustc", path=path) is None
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    environ["PATH"] = path
    server = ServerProcess(EXAMPLES, python=str(venv / "bin" / "python"), environ=environ)
    try:
        client = httpclient.InferenceServerClient(server.address)
        assert client.is_server_ready()
        x = httpclient.InferInput("INPUT0", [1, 64], "FP32")
        x.set_data_from_numpy(np.ones((1, 64), np.float32))
        assert client.infer("mlp", [x]).as_numpy("OUTPUT0").shape == (1, 10)
        # The server runs from the wheel, not from this checkout.
        location = subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import fastserve; print(fastserve.__file__)"],
            env=environ, check=True, capture_output=True, text=True, timeout=120,
        ).stdout  # fmt: skip
        assert str(venv) in location
    finally:
        server.close()
