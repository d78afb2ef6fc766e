"""ONNX Runtime models: the example is reproducible, results equal ORT in-process, and config.toml
is checked against the model file."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import requests
import tritonclient.http as httpclient

from conftest import EXAMPLES, ROOT, write_model


def test_example_model_regenerates_identically(tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_mlp.py"), str(out)], check=True, timeout=120)
    assert out.read_bytes() == (EXAMPLES / "mlp" / "1" / "model.onnx").read_bytes()


def test_batched_results_equal_onnxruntime(example_server) -> None:
    session = ort.InferenceSession(str(EXAMPLES / "mlp" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    client = httpclient.InferenceServerClient(example_server.address)
    rng = np.random.default_rng(7)
    for rows in (1, 7, 64):
        x = rng.standard_normal((rows, 64)).astype(np.float32)
        inp = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=False)
        out = client.infer("mlp", [inp]).as_numpy("OUTPUT0")
        np.testing.assert_allclose(out, session.run(None, {"INPUT0": x})[0], rtol=1e-5, atol=1e-6)


def mlp_repo(tmp_path: Path, name: str, config: str) -> None:
    write_model(tmp_path, name, config)
    shutil.copy(EXAMPLES / "mlp" / "1" / "model.onnx", tmp_path / name / "1" / "model.onnx")


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (
            '[[input]]\nname = "INPUT0"\ndatatype = "FP64"\ndims = [64]',
            "declares input 'INPUT0' as FP64, the model has FP32",
        ),
        (
            '[[input]]\nname = "INPUT0"\ndatatype = "FP32"\ndims = [32]',
            "declares input 'INPUT0' with dims [32], the model has [64]",
        ),
        (
            '[[input]]\nname = "X"\ndatatype = "FP32"\ndims = [64]',
            "declares input 'X', but the model's inputs are ['INPUT0']",
        ),
        ('[instance_group]\nkind = "gpu"', "needs onnxruntime-gpu with the CUDA execution provider"),
        ('[parameters]\nintra_op_allow_spinning = "yes"', "intra_op_allow_spinning must be true or false"),
    ],
)
def test_config_contradicting_the_model_fails_to_load(start_server, tmp_path: Path, config: str, reason: str) -> None:
    if "gpu" in config and "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a CUDA-capable onnxruntime is installed")
    mlp_repo(tmp_path, "bad", config)
    mlp_repo(tmp_path, "good", "")
    server = start_server(tmp_path)
    r = requests.get(f"{server.url}/v2/models/bad/ready", timeout=10)
    assert r.status_code == 400
    assert reason in r.json()["error"]
    assert requests.get(f"{server.url}/v2/models/good/ready", timeout=10).status_code == 200


def test_config_can_disable_batching_and_narrow_dims(start_server, tmp_path: Path) -> None:
    mlp_repo(tmp_path, "nobatch", "max_batch_size = 0\n")
    server = start_server(tmp_path)
    meta = requests.get(f"{server.url}/v2/models/nobatch", timeout=10).json()
    assert meta["inputs"][0]["shape"] == [-1, 64], "without batching the model's own first dim is served"
    x = np.zeros((2, 64), dtype=np.float32)
    body = {"inputs": [{"name": "INPUT0", "shape": [2, 64], "datatype": "FP32", "data": x.ravel().tolist()}]}
    r = requests.post(f"{server.url}/v2/models/nobatch/infer", json=body, timeout=10)
    assert r.status_code == 200
    assert r.json()["outputs"][0]["shape"] == [2, 10]
