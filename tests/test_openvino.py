"""OpenVINO models: the example ONNX model and an OpenVINO IR export served over HTTP give the same
results as ONNX Runtime in-process; OpenVINO parameters are checked."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import requests
import tritonclient.http as httpclient

from conftest import EXAMPLES, write_model

ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install 'fastserve-engine[openvino]')")

MLP = EXAMPLES / "mlp" / "1" / "model.onnx"


def reference(x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(MLP), providers=["CPUExecutionProvider"])
    return session.run(None, {"INPUT0": x})[0]


def infer(address: str, model: str, x: np.ndarray) -> np.ndarray:
    client = httpclient.InferenceServerClient(address)
    inp = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp]).as_numpy("OUTPUT0")


def onnx_model(repo: Path, name: str, config: str) -> None:
    write_model(repo, name, config)
    shutil.copy(MLP, repo / name / "1" / "model.onnx")


def ir_model(repo: Path, name: str, config: str, batch: int | None) -> None:
    """An OpenVINO IR export of the example MLP, with a static first dimension when ``batch`` is set."""
    write_model(repo, name, config)
    model = ov.convert_model(str(MLP), input=[("INPUT0", [batch, 64])] if batch else None)
    # Full precision, so results match ONNX Runtime's FP32 ones.
    ov.save_model(model, str(repo / name / "1" / "model.xml"), compress_to_fp16=False)


def test_onnx_file_on_openvino_equals_onnxruntime(start_server, tmp_path: Path) -> None:
    onnx_model(tmp_path, "mlp_ov", 'backend = "openvino"\n')
    server = start_server(tmp_path)
    meta = requests.get(f"{server.url}/v2/models/mlp_ov", timeout=10).json()
    assert meta["platform"] == "openvino"
    assert meta["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 64]}]
    assert meta["outputs"] == [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 10]}]
    rng = np.random.default_rng(11)
    for rows in (1, 5, 64):
        x = rng.standard_normal((rows, 64)).astype(np.float32)
        np.testing.assert_allclose(infer(server.address, "mlp_ov", x), reference(x), rtol=1e-4, atol=1e-5)


def test_ir_export_is_detected_and_gets_a_batch_dimension(start_server, tmp_path: Path) -> None:
    # No backend key: model.xml implies openvino. The export has a static batch of 4; asking for
    # max_batch_size makes it dynamic, so any number of rows is served.
    ir_model(tmp_path, "ir_batched", "max_batch_size = 8\n", batch=4)
    ir_model(tmp_path, "ir_static", "", batch=4)
    server = start_server(tmp_path)
    meta = requests.get(f"{server.url}/v2/models/ir_batched", timeout=10).json()
    assert meta["platform"] == "openvino"
    assert meta["inputs"][0]["shape"] == [-1, 64]
    rng = np.random.default_rng(12)
    for rows in (1, 3, 8):
        x = rng.standard_normal((rows, 64)).astype(np.float32)
        np.testing.assert_allclose(infer(server.address, "ir_batched", x), reference(x), rtol=1e-4, atol=1e-5)
    # Without max_batch_size a static model is served as it is: no batching, its own shape.
    meta = requests.get(f"{server.url}/v2/models/ir_static", timeout=10).json()
    assert meta["inputs"][0]["shape"] == [4, 64]
    x = rng.standard_normal((4, 64)).astype(np.float32)
    np.testing.assert_allclose(infer(server.address, "ir_static", x), reference(x), rtol=1e-4, atol=1e-5)


def test_parameters_and_instances(start_server, tmp_path: Path) -> None:
    config = """
        backend = "openvino"
        [instance_group]
        count = 2
        [parameters]
        performance_hint = "THROUGHPUT"
        num_streams = 2
        inference_num_threads = 1
    """
    onnx_model(tmp_path, "tuned", config)
    server = start_server(tmp_path)
    x = np.random.default_rng(13).standard_normal((6, 64)).astype(np.float32)
    np.testing.assert_allclose(infer(server.address, "tuned", x), reference(x), rtol=1e-4, atol=1e-5)
    assert "loaded model 'tuned' version 1 (openvino, max_batch_size 64, 2 instance(s))" in server.log()


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ('[parameters]\nperformance_hint = "FAST"', "performance_hint must be one of LATENCY, THROUGHPUT"),
        ("[parameters]\nnum_streams = 0", "num_streams must be >= 1 and <= 1024"),
        (
            '[parameters]\ninference_precision = "i8"',
            "inference_precision must be one of 'f32', 'bf16', 'f16', got 'i8'",
        ),
        ("[parameters]\ninference_precision = 32", "inference_precision must be one of 'f32', 'bf16', 'f16', got 32"),
        ('[parameters]\ndevice = "NPU9"', "OpenVINO cannot compile the model for device NPU9"),
        ('[instance_group]\nkind = "gpu"', "not [instance_group] kind"),
        ('[[input]]\nname = "INPUT0"\ndatatype = "FP16"\ndims = [64]', "as FP16, the model has FP32"),
    ],
)
def test_bad_openvino_config_fails_only_that_model(start_server, tmp_path: Path, config: str, reason: str) -> None:
    onnx_model(tmp_path, "bad", 'backend = "openvino"\n' + config)
    onnx_model(tmp_path, "good", 'backend = "openvino"\n')
    server = start_server(tmp_path)
    r = requests.get(f"{server.url}/v2/models/bad/ready", timeout=10)
    assert r.status_code == 400
    assert reason in r.json()["error"]
    assert requests.get(f"{server.url}/v2/models/good/ready", timeout=10).status_code == 200


def test_ir_without_weights_is_a_load_error(start_server, tmp_path: Path) -> None:
    ir_model(tmp_path, "noweights", "", batch=None)
    (tmp_path / "noweights" / "1" / "model.bin").unlink()
    server = start_server(tmp_path)
    r = requests.get(f"{server.url}/v2/models/noweights/ready", timeout=10)
    assert r.status_code == 400
    assert "model.xml found without its weights file model.bin" in r.json()["error"]


def test_fp32_models_run_in_fp32_unless_a_lower_precision_is_asked_for(start_server, tmp_path: Path) -> None:
    # OpenVINO's CPU plugin runs FP32 models in bf16 wherever the CPU has bf16 units (AVX512-BF16,
    # AMX) unless told otherwise; fastserve asks for the model's precision by default.
    onnx_model(tmp_path, "default", 'backend = "openvino"\n')
    onnx_model(tmp_path, "f32", 'backend = "openvino"\n[parameters]\ninference_precision = "f32"\n')
    onnx_model(tmp_path, "bf16", 'backend = "openvino"\n[parameters]\ninference_precision = "bf16"\n')
    server = start_server(tmp_path)
    x = np.random.default_rng(14).standard_normal((16, 64)).astype(np.float32)
    for model in ("default", "f32"):
        np.testing.assert_allclose(infer(server.address, model, x), reference(x), rtol=1e-4, atol=1e-5)
    # bf16 keeps ~3 significant digits (or is ignored by CPUs without bf16 units): close, not equal.
    np.testing.assert_allclose(infer(server.address, "bf16", x), reference(x), rtol=5e-2, atol=5e-2)
