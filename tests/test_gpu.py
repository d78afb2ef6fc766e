"""GPU configuration: mistakes are clear load errors that leave the other models serving (these run
everywhere), and GPU execution (ONNX Runtime CUDA/TensorRT, CuPy Python models, instances per GPU),
which runs only where a CUDA device and the GPU packages are present and is skipped elsewhere."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import requests
import tritonclient.http as httpclient
from fastserve.backends import cuda_device_count
from fastserve.backends.onnxruntime import BoundOnnxInstance
from test_instances import BARRIER_MODEL, call_concurrently

from conftest import DOUBLE_MODEL, EXAMPLES, infer_json, write_model, xy_config

MLP = EXAMPLES / "mlp" / "1" / "model.onnx"
PROVIDERS = ort.get_available_providers()
CUDA_DEVICES = cuda_device_count() or 0


def _cupy_devices() -> int:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


CUPY_DEVICES = _cupy_devices()
ORT_CUDA = "CUDAExecutionProvider" in PROVIDERS and CUDA_DEVICES > 0

needs_ort_cuda = pytest.mark.skipif(
    not ORT_CUDA, reason="needs onnxruntime-gpu with the CUDA execution provider and a visible CUDA device"
)
needs_tensorrt = pytest.mark.skipif(
    not ORT_CUDA or "TensorrtExecutionProvider" not in PROVIDERS,
    reason="needs onnxruntime-gpu with the TensorRT execution provider and a visible CUDA device",
)
needs_cupy = pytest.mark.skipif(CUPY_DEVICES < 1, reason="needs CuPy and a visible CUDA device")
needs_two_gpus = pytest.mark.skipif(CUPY_DEVICES < 2, reason="needs CuPy and two visible CUDA devices")


def mlp_repo(repo: Path, name: str, config: str) -> Path:
    model_dir = write_model(repo, name, config)
    shutil.copy(MLP, model_dir / "1" / "model.onnx")
    return model_dir


def assert_fails_alone(server, model: str, reason: str) -> None:
    r = requests.get(f"{server.url}/v2/models/{model}/ready", timeout=10)
    assert r.status_code == 400, r.text
    assert reason in r.json()["error"]
    assert requests.get(f"{server.url}/v2/models/good/ready", timeout=10).status_code == 200


def reference(x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(MLP), providers=["CPUExecutionProvider"]).run(None, {"INPUT0": x})[0]


def infer_mlp(address: str, model: str, x: np.ndarray) -> np.ndarray:
    client = httpclient.InferenceServerClient(address)
    inp = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp]).as_numpy("OUTPUT0")


# --- configuration mistakes: clear reasons, the other models keep serving -------------------------


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ('backend = "tensorflow"', "backend must be one of onnxruntime, openvino, python, ensemble, got 'tensorflow'"),
        ("[instance_group]\ngpus = [0]", '[instance_group] gpus needs kind = "gpu"'),
        ('[instance_group]\nkind = "gpu"\ngpus = [-1]', "[instance_group] gpus must be a list of integers >= 0"),
        ('[instance_group]\nkind = "gpu"\ngpus = []', "gpus must list at least one device id, each once"),
        ('[instance_group]\nkind = "gpu"\ngpus = [1, 1]', "gpus must list at least one device id, each once"),
        ('[instance_group]\nkind = "gpu"\ngpus = "0"', "[instance_group] gpus must be a list"),
        ('device = "tpu"', "device must be one of cpu, gpu, got 'tpu'"),
        ('device = "gpu"', 'device = "gpu" applies to python models'),
        ("[parameters]\ntensorrt = true", 'tensorrt = true needs [instance_group] kind = "gpu"'),
        ("[parameters]\ntensorrt_fp16 = true", "tensorrt_fp16 needs tensorrt = true"),
        (
            '[instance_group]\nkind = "gpu"\n[parameters]\ntensorrt = true\ntensorrt_engine_cache_path = "../../x"',
            "tensorrt_engine_cache_path '../../x' must stay inside the model directory",
        ),
        (
            '[instance_group]\nkind = "gpu"\n[parameters]\ntensorrt = true\ntensorrt_engine_cache_path = "/tmp/trt"',
            "tensorrt_engine_cache_path '/tmp/trt' must stay inside the model directory",
        ),
    ],
)
def test_gpu_config_mistakes_fail_only_that_model(start_server, tmp_path: Path, config: str, reason: str) -> None:
    mlp_repo(tmp_path, "bad", config)
    mlp_repo(tmp_path, "good", "")
    server = start_server(tmp_path)
    assert_fails_alone(server, "bad", reason)
    assert not (tmp_path.parent / "x").exists() and not (tmp_path / "x").exists()


@pytest.mark.skipif(ORT_CUDA, reason="a CUDA-capable onnxruntime and device are present")
def test_onnx_gpu_without_cuda_is_a_load_error(start_server, tmp_path: Path) -> None:
    mlp_repo(tmp_path, "bad", '[instance_group]\nkind = "gpu"\ngpus = [0, 1]\ncount = 2')
    mlp_repo(tmp_path, "good", "")
    server = start_server(tmp_path)
    reason = (
        "needs onnxruntime-gpu with the CUDA execution provider"
        if "CUDAExecutionProvider" not in PROVIDERS
        else "this process sees 0 CUDA device(s)"
    )
    assert_fails_alone(server, "bad", reason)


@pytest.mark.skipif(CUPY_DEVICES > 0, reason="CuPy and a CUDA device are present")
def test_python_gpu_model_without_cupy_is_a_load_error(start_server, tmp_path: Path) -> None:
    write_model(tmp_path, "bad", xy_config('device = "gpu"'), DOUBLE_MODEL)
    mlp_repo(tmp_path, "good", "")
    server = start_server(tmp_path)
    try:
        import cupy  # noqa: F401

        reason = 'device = "gpu" needs a CUDA device'
    except ImportError:
        reason = "device = \"gpu\" needs CuPy (pip install 'fastserve-engine[gpu]')"
    r = requests.get(f"{server.url}/v2/models/bad/ready", timeout=10)
    assert r.status_code == 400
    error = r.json()["error"]
    assert reason in error or "but CuPy sees 0 CUDA device(s)" in error
    assert requests.get(f"{server.url}/v2/models/good/ready", timeout=10).status_code == 200


@pytest.mark.skipif(cuda_device_count() is None, reason="the CUDA driver cannot tell how many devices it sees")
def test_gpu_ids_beyond_the_visible_devices_are_a_load_error(start_server, tmp_path: Path) -> None:
    # A Python model placed on GPUs (kind = "gpu", NumPy in and out) still gets its ids checked.
    config = xy_config('[instance_group]\nkind = "gpu"\ngpus = [0, 4096]')
    write_model(tmp_path, "bad", config, DOUBLE_MODEL)
    mlp_repo(tmp_path, "good", "")
    server = start_server(tmp_path)
    seen = cuda_device_count()
    missing = [g for g in (0, 4096) if g >= seen]
    assert_fails_alone(server, "bad", f"asks for CUDA device(s) {missing}, but this process sees {seen} CUDA device(s)")


def test_io_binding_instance_matches_plain_run() -> None:
    # The GPU path binds inputs/outputs explicitly; its logic is the same for a CPU binding, which
    # is checked here everywhere (the CUDA binding itself runs only in the GPU tests below).
    session = ort.InferenceSession(str(MLP), providers=["CPUExecutionProvider"])
    instance = BoundOnnxInstance(session, ["OUTPUT0"], set(), set(), "cpu", 0)
    x = np.random.default_rng(3).standard_normal((5, 64)).astype(np.float32)
    np.testing.assert_array_equal(instance.execute({"INPUT0": x})["OUTPUT0"], reference(x))


# --- GPU execution (skipped without a CUDA device) ------------------------------------------------


@needs_ort_cuda
def test_onnxruntime_cuda_equals_cpu(start_server, tmp_path: Path) -> None:
    mlp_repo(tmp_path, "mlp_gpu", '[instance_group]\nkind = "gpu"\ncount = 2\ngpus = [0]')
    server = start_server(tmp_path)
    assert "loaded model 'mlp_gpu' version 1 (onnxruntime_onnx, max_batch_size 64, 2 instance(s))" in server.log()
    rng = np.random.default_rng(21)
    for rows in (1, 9, 64):
        x = rng.standard_normal((rows, 64)).astype(np.float32)
        np.testing.assert_allclose(infer_mlp(server.address, "mlp_gpu", x), reference(x), rtol=1e-3, atol=1e-4)


@needs_ort_cuda
def test_onnxruntime_device_ids_are_checked(start_server, tmp_path: Path) -> None:
    mlp_repo(tmp_path, "bad", '[instance_group]\nkind = "gpu"\ngpus = [0, 4096]')
    mlp_repo(tmp_path, "good", "")
    server = start_server(tmp_path)
    assert_fails_alone(server, "bad", "asks for CUDA device(s) [4096]")


@needs_tensorrt
def test_onnxruntime_tensorrt_equals_cpu_and_caches_engines(start_server, tmp_path: Path) -> None:
    config = '[instance_group]\nkind = "gpu"\n[parameters]\ntensorrt = true\ntensorrt_engine_cache_path = "trt"'
    model_dir = mlp_repo(tmp_path, "mlp_trt", config)
    server = start_server(tmp_path)
    x = np.random.default_rng(22).standard_normal((4, 64)).astype(np.float32)
    np.testing.assert_allclose(infer_mlp(server.address, "mlp_trt", x), reference(x), rtol=1e-3, atol=1e-4)
    assert any((model_dir / "trt").iterdir()), "TensorRT wrote no engine into the cache directory"


CUPY_MODEL = """
    import cupy
    import numpy as np

    class Model:
        def initialize(self, args):
            self.device_id = args["device_id"]
            self.scale = cupy.asarray([2.0, 3.0], dtype=cupy.float32)   # a weight on this instance's GPU

        def execute(self, inputs):
            x = inputs["X"]
            assert isinstance(x, cupy.ndarray), type(x)
            assert x.device.id == self.device_id == self.scale.device.id
            assert isinstance(inputs["TAG"], np.ndarray) and inputs["TAG"].dtype == object
            return {"Y": x * self.scale, "TAG_OUT": inputs["TAG"]}
"""

CUPY_CONFIG = """
    backend = "python"
    device = "gpu"
    max_batch_size = 8
    [[input]]
    name = "X"
    datatype = "FP32"
    dims = [2]
    [[input]]
    name = "TAG"
    datatype = "BYTES"
    dims = [1]
    [[output]]
    name = "Y"
    datatype = "FP32"
    dims = [2]
    [[output]]
    name = "TAG_OUT"
    datatype = "BYTES"
    dims = [1]
"""


@needs_cupy
def test_cupy_model_round_trip(start_server, tmp_path: Path) -> None:
    write_model(tmp_path, "cupy_scale", CUPY_CONFIG, CUPY_MODEL)
    server = start_server(tmp_path)
    inputs = [
        {"name": "X", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]},
        {"name": "TAG", "shape": [2, 1], "datatype": "BYTES", "data": ["a", "b"]},
    ]
    r = infer_json(server.url, "cupy_scale", inputs)
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o["data"] for o in r.json()["outputs"]}
    assert outputs == {"Y": [2, 6, 6, 12], "TAG_OUT": ["a", "b"]}


@needs_cupy
def test_cupy_decoupled_model_streams_host_arrays(start_server, tmp_path: Path) -> None:
    model = """
        import cupy as cp

        class Model:
            def execute(self, inputs):
                for i in range(3):
                    yield {"Y": inputs["X"] * cp.float32(i)}
    """
    config = """
        backend = "python"
        device = "gpu"
        [model_transaction_policy]
        decoupled = true
        [[input]]
        name = "X"
        datatype = "FP32"
        dims = [2]
        [[output]]
        name = "Y"
        datatype = "FP32"
        dims = [2]
    """
    write_model(tmp_path, "cupy_stream", config, model)
    server = start_server(tmp_path)
    r = requests.post(f"{server.url}/v2/models/cupy_stream/generate_stream", json={"X": [1, 2]})
    assert r.status_code == 200, r.text
    events = [json.loads(line[len("data: ") :]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert [e["Y"] for e in events] == [[0, 0], [1, 2], [2, 4]]


@needs_two_gpus
def test_instances_per_gpu(start_server, tmp_path: Path) -> None:
    # One instance on each of two GPUs; the shared barrier proves both execute at once, and each
    # answers with the device its CuPy arrays live on.
    model = BARRIER_MODEL.replace('inputs["X"] * 0 + self.index', 'inputs["X"] * 0 + inputs["X"].device.id')
    config = """
        backend = "python"
        device = "gpu"
        max_batch_size = 0
        [instance_group]
        gpus = [0, 1]
        [[input]]
        name = "X"
        datatype = "INT32"
        dims = [1]
        [[output]]
        name = "Y"
        datatype = "INT32"
        dims = [1]
    """
    write_model(tmp_path, "per_gpu", config, model)
    server = start_server(tmp_path)
    responses = call_concurrently(server.url, "per_gpu", 2)
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
    assert sorted(r.json()["outputs"][0]["data"][0] for r in responses) == [0, 1]
