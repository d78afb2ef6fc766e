"""A Triton model repository (config.pbtxt) serves unchanged: each model answers through tritonclient
exactly as its config.toml twin does, fields fastserve does not honor are load errors naming them,
performance-only ones are logged, and `fastserve convert-config` prints the config.toml equivalent."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tomllib
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import EXAMPLES, ServerProcess

MLP = EXAMPLES / "mlp" / "1" / "model.onnx"

ONNX_PBTXT = """
name: "mlp_triton"
platform: "onnxruntime_onnx"
max_batch_size: 16
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ 64 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 10 ] } ]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
  default_queue_policy { default_timeout_microseconds: 5000000 max_queue_size: 128 }
}
instance_group [ { count: 2, kind: KIND_CPU } ]
version_policy: { latest: { num_versions: 1 } }
parameters { key: "intra_op_num_threads" value: { string_value: "1" } }
model_warmup [ {
  name: "zeros"
  batch_size: 2
  inputs { key: "INPUT0" value: { data_type: TYPE_FP32, dims: [ 64 ], zero_data: true } }
} ]
"""

ONNX_TOML = """
backend = "onnxruntime"
max_batch_size = 16
[[input]]
name = "INPUT0"
datatype = "FP32"
dims = [64]
[[output]]
name = "OUTPUT0"
datatype = "FP32"
dims = [10]
[dynamic_batching]
preferred_batch_sizes = [4, 8]
max_queue_delay_us = 100
default_queue_timeout_us = 5000000
max_queue_size = 128
[instance_group]
count = 2
kind = "cpu"
[version_policy]
latest = 1
[parameters]
intra_op_num_threads = "1"
[[warmup]]
batch_size = 2
data = "zero"
[warmup.dims]
INPUT0 = [64]
"""

ENSEMBLE_PBTXT = """
name: "mlp_chain"
platform: "ensemble"
max_batch_size: 16
input [ { name: "X", data_type: TYPE_FP32, dims: [ 64 ] } ]
output [ { name: "Y", data_type: TYPE_FP32, dims: [ 10 ] } ]
ensemble_scheduling {
  step [
    {
      model_name: "mlp_triton"
      model_version: -1
      input_map { key: "INPUT0" value: "X" }
      output_map { key: "OUTPUT0" value: "Y" }
    }
  ]
}
"""

OPENVINO_PBTXT = """
backend: "openvino"
default_model_filename: "mlp.xml"
max_batch_size: 8
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ 64 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 10 ] } ]
instance_group [ { kind: KIND_CPU } ]
"""

# Triton's python_backend example, as its users have it.
ADD_SUB_PBTXT = """
name: "add_sub"
backend: "python"
input [
  { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "INPUT1" data_type: TYPE_FP32 dims: [ 4 ] }
]
output [
  { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 4 ] }
]
instance_group [ { kind: KIND_CPU } ]
"""

ADD_SUB_TOML = """
backend = "python"
[[input]]
name = "INPUT0"
datatype = "FP32"
dims = [4]
[[input]]
name = "INPUT1"
datatype = "FP32"
dims = [4]
[[output]]
name = "OUTPUT0"
datatype = "FP32"
dims = [4]
[[output]]
name = "OUTPUT1"
datatype = "FP32"
dims = [4]
"""

ADD_SUB_MODEL = """
import json

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.model_config = model_config = json.loads(args["model_config"])
        output0_config = pb_utils.get_output_config_by_name(model_config, "OUTPUT0")
        output1_config = pb_utils.get_output_config_by_name(model_config, "OUTPUT1")
        self.output0_dtype = pb_utils.triton_string_to_numpy(output0_config["data_type"])
        self.output1_dtype = pb_utils.triton_string_to_numpy(output1_config["data_type"])

    def execute(self, requests):
        responses = []
        for request in requests:
            in_0 = pb_utils.get_input_tensor_by_name(request, "INPUT0")
            in_1 = pb_utils.get_input_tensor_by_name(request, "INPUT1")
            out_0, out_1 = (in_0.as_numpy() + in_1.as_numpy(), in_0.as_numpy() - in_1.as_numpy())
            out_tensor_0 = pb_utils.Tensor("OUTPUT0", out_0.astype(self.output0_dtype))
            out_tensor_1 = pb_utils.Tensor("OUTPUT1", out_1.astype(self.output1_dtype))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out_tensor_0, out_tensor_1]))
        return responses
"""

SCALE_PBTXT = """
backend: "python"
max_batch_size: 16
input [ { name: "X" data_type: TYPE_FP32 dims: [ 64 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 64 ] } ]
dynamic_batching { }
"""

SCALE_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy() * 2)])
            for r in requests
        ]
"""

# A Python step feeding the ONNX model, all in Triton's format.
PIPELINE_PBTXT = """
platform: "ensemble"
max_batch_size: 16
input [ { name: "X", data_type: TYPE_FP32, dims: [ 64 ] } ]
output [ { name: "Y", data_type: TYPE_FP32, dims: [ 10 ] } ]
ensemble_scheduling {
  step [
    { model_name: "scale" model_version: -1 input_map { key: "X" value: "X" } output_map { key: "Y" value: "SCALED" } },
    {
      model_name: "mlp_triton"
      model_version: -1
      input_map { key: "INPUT0" value: "SCALED" }
      output_map { key: "OUTPUT0" value: "Y" }
    }
  ]
}
"""

# Clients send 8x8 images; the ONNX model takes rows of 64 (Triton's reshape).
SQUARE_PBTXT = """
platform: "onnxruntime_onnx"
max_batch_size: 16
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ 8, 8 ], reshape: { shape: [ 64 ] } } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 2, 5 ], reshape: { shape: [ 10 ] } } ]
model_warmup [ {
  batch_size: 2
  inputs { key: "INPUT0" value: { data_type: TYPE_FP32, dims: [ 8, 8 ], zero_data: true } }
} ]
"""

# B may be left out; the model sees a scalar per row for A (reshape to []).
OPTIONAL_PBTXT = """
backend: "python"
max_batch_size: 8
input [
  { name: "A", data_type: TYPE_FP32, dims: [ 1 ], reshape: { shape: [ ] } },
  { name: "B", data_type: TYPE_FP32, dims: [ 1 ], optional: true }
]
output [ { name: "Y", data_type: TYPE_FP32, dims: [ 1 ] } ]
"""

OPTIONAL_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            a = pb_utils.get_input_tensor_by_name(request, "A").as_numpy()
            assert a.ndim == 1, a.shape  # rows only: A reaches the model reshaped to []
            b = pb_utils.get_input_tensor_by_name(request, "B")
            y = a[:, None] + (b.as_numpy() if b is not None else 100)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", y.astype(np.float32))]))
        return responses
"""

UNSUPPORTED_PBTXT = """
platform: "onnxruntime_onnx"
max_batch_size: 16
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ 64 ], allow_ragged_batch: true } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 10 ], label_filename: "labels.txt" } ]
batch_input [ { kind: BATCH_ELEMENT_COUNT, target_name: "N", data_type: TYPE_FP32, source_input: "INPUT0" } ]
model_repository_agents { agents [ { name: "checksum" } ] }
"""

TUNED_PBTXT = """
platform: "onnxruntime_onnx"
max_batch_size: 16
optimization { graph { level: 1 } }
instance_group [ { count: 1, kind: KIND_CPU, rate_limiter { priority: 2 } } ]
"""


def triton_model(
    repo: Path, name: str, pbtxt: str, model_file: Path | None = MLP, file_name: str = "model.onnx"
) -> Path:
    model_dir = repo / name
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(textwrap.dedent(pbtxt))
    if model_file is not None:
        shutil.copy(model_file, model_dir / "1" / "model.onnx")
    return model_dir


def toml_model(repo: Path, name: str, config: str) -> Path:
    model_dir = repo / name
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.toml").write_text(textwrap.dedent(config))
    shutil.copy(MLP, model_dir / "1" / "model.onnx")
    return model_dir


def python_model(model_dir: Path, model_py: str) -> None:
    (model_dir / "1" / "model.onnx").unlink(missing_ok=True)
    (model_dir / "1" / "model.py").write_text(model_py)


@pytest.fixture(scope="module")
def triton_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("triton_repo")
    triton_model(repo, "mlp_triton", ONNX_PBTXT)
    toml_model(repo, "mlp_toml", ONNX_TOML)
    triton_model(repo, "mlp_chain", ENSEMBLE_PBTXT, model_file=None)
    python_model(triton_model(repo, "add_sub", ADD_SUB_PBTXT, model_file=None), ADD_SUB_MODEL)
    python_model(toml_model(repo, "add_sub_toml", ADD_SUB_TOML), ADD_SUB_MODEL)
    python_model(triton_model(repo, "scale", SCALE_PBTXT, model_file=None), SCALE_MODEL)
    triton_model(repo, "pipeline", PIPELINE_PBTXT, model_file=None)
    triton_model(repo, "square", SQUARE_PBTXT)
    python_model(triton_model(repo, "optional", OPTIONAL_PBTXT, model_file=None), OPTIONAL_MODEL)
    triton_model(repo, "unsupported", UNSUPPORTED_PBTXT)
    triton_model(repo, "onnx_bad_reshape", SQUARE_PBTXT.replace("shape: [ 64 ]", "shape: [ 63 ]"))
    bad_reshape = OPTIONAL_PBTXT.replace("reshape: { shape: [ ] }", "reshape: { shape: [ 2 ] }")
    python_model(triton_model(repo, "bad_reshape", bad_reshape, model_file=None), OPTIONAL_MODEL)
    triton_model(repo, "tuned", TUNED_PBTXT)
    # Both files: config.toml wins (its max_batch_size differs from the pbtxt's).
    both = toml_model(repo, "both", ONNX_TOML.replace("max_batch_size = 16", "max_batch_size = 8"))
    (both / "config.pbtxt").write_text(textwrap.dedent(ONNX_PBTXT).replace('name: "mlp_triton"', 'name: "both"'))
    return repo


@pytest.fixture(scope="module")
def server(triton_repo: Path) -> Iterator[ServerProcess]:
    # Explicit control (every model loaded at start) also serves the repository index with load errors.
    process = ServerProcess(triton_repo, "--model-control-mode", "explicit", "--load-model", "*")
    yield process
    process.close()


def infer_http(address: str, model: str, x: np.ndarray, name: str = "INPUT0", output: str = "OUTPUT0") -> np.ndarray:
    client = httpclient.InferenceServerClient(address)
    inp = httpclient.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp]).as_numpy(output)


def test_onnx_config_pbtxt_answers_as_its_config_toml_twin(server) -> None:
    http = httpclient.InferenceServerClient(server.address)
    grpc = grpcclient.InferenceServerClient(server.grpc_address)
    rng = np.random.default_rng(3)
    for rows in (1, 5, 16):
        x = rng.standard_normal((rows, 64)).astype(np.float32)
        np.testing.assert_array_equal(
            infer_http(server.address, "mlp_triton", x), infer_http(server.address, "mlp_toml", x)
        )
        inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_array_equal(
            grpc.infer("mlp_triton", [inp]).as_numpy("OUTPUT0"), infer_http(server.address, "mlp_toml", x)
        )
    triton, twin = http.get_model_metadata("mlp_triton"), http.get_model_metadata("mlp_toml")
    assert triton["inputs"] == twin["inputs"] and triton["outputs"] == twin["outputs"]
    assert triton["platform"] == twin["platform"] == "onnxruntime_onnx"
    config = grpc.get_model_config("mlp_triton", as_json=True)["config"]
    twin_config = grpc.get_model_config("mlp_toml", as_json=True)["config"]
    config.pop("name"), twin_config.pop("name")
    assert config == twin_config
    assert config["max_batch_size"] == 16
    assert config["dynamic_batching"]["preferred_batch_size"] == [4, 8]
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    # Batch size past max_batch_size is refused as the config says.
    with pytest.raises(InferenceServerException, match="batch-size must be <= 16"):
        infer_http(server.address, "mlp_triton", np.zeros((17, 64), np.float32))


def test_an_ensemble_in_triton_format_runs_its_steps(server) -> None:
    x = np.random.default_rng(4).standard_normal((3, 64)).astype(np.float32)
    y = infer_http(server.address, "mlp_chain", x, name="X", output="Y")
    np.testing.assert_array_equal(y, infer_http(server.address, "mlp_toml", x))
    config = httpclient.InferenceServerClient(server.address).get_model_config("mlp_chain")
    assert config["platform"] == "ensemble"
    assert config["ensemble_scheduling"]["step"][0]["model_name"] == "mlp_triton"


def test_a_python_backend_model_in_triton_format_answers_as_its_twin(server) -> None:
    x0, x1 = np.arange(4, dtype=np.float32), np.full(4, 0.5, np.float32)
    for client, module in ((httpclient.InferenceServerClient(server.address), httpclient),
                           (grpcclient.InferenceServerClient(server.grpc_address), grpcclient)):  # fmt: skip
        answers = []
        for model in ("add_sub", "add_sub_toml"):
            inputs = [module.InferInput("INPUT0", [4], "FP32"), module.InferInput("INPUT1", [4], "FP32")]
            inputs[0].set_data_from_numpy(x0)
            inputs[1].set_data_from_numpy(x1)
            result = client.infer(model, inputs)
            answers.append((result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1")))
        np.testing.assert_array_equal(answers[0][0], x0 + x1)
        np.testing.assert_array_equal(answers[0][1], x0 - x1)
        np.testing.assert_array_equal(answers[0], answers[1])
    http = httpclient.InferenceServerClient(server.address)
    assert http.get_model_metadata("add_sub")["inputs"] == http.get_model_metadata("add_sub_toml")["inputs"]


def test_an_ensemble_of_a_python_step_and_an_onnx_step_in_triton_format(server) -> None:
    x = np.random.default_rng(6).standard_normal((4, 64)).astype(np.float32)
    y = infer_http(server.address, "pipeline", x, name="X", output="Y")
    np.testing.assert_array_equal(y, infer_http(server.address, "mlp_toml", x * 2))


def test_reshape_gives_clients_their_dims_and_the_model_its_own(server) -> None:
    x = np.random.default_rng(7).standard_normal((3, 64)).astype(np.float32)
    y = infer_http(server.address, "square", x.reshape(3, 8, 8))
    assert y.shape == (3, 2, 5)
    np.testing.assert_array_equal(y.reshape(3, 10), infer_http(server.address, "mlp_toml", x))
    meta = httpclient.InferenceServerClient(server.address).get_model_metadata("square")
    assert meta["inputs"][0]["shape"] == [-1, 8, 8] and meta["outputs"][0]["shape"] == [-1, 2, 5]
    with pytest.raises(InferenceServerException, match=r"unexpected shape for input 'INPUT0'.*Expected \[-1,8,8\]"):
        infer_http(server.address, "square", x)


def test_optional_inputs_may_be_left_out(server) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_address)

    def infer(with_b: bool) -> np.ndarray:
        a = grpcclient.InferInput("A", [2, 1], "FP32")
        a.set_data_from_numpy(np.array([[1], [2]], np.float32))
        inputs = [a]
        if with_b:
            b = grpcclient.InferInput("B", [2, 1], "FP32")
            b.set_data_from_numpy(np.array([[10], [20]], np.float32))
            inputs.append(b)
        return client.infer("optional", inputs).as_numpy("Y")

    np.testing.assert_array_equal(infer(True), [[11], [22]])
    np.testing.assert_array_equal(infer(False), [[101], [102]])
    with pytest.raises(InferenceServerException, match=r"expected number of inputs between 1 and 2 but got 0"):
        client.infer("optional", [])


def test_every_field_fastserve_does_not_honor_is_named_in_the_load_error(server) -> None:
    client = httpclient.InferenceServerClient(server.address)
    assert not client.is_model_ready("unsupported")
    index = {m["name"]: m for m in client.get_model_repository_index()}
    reason = index["unsupported"]["reason"]
    for field in ("input[0].allow_ragged_batch", "output[0].label_filename", "batch_input", "model_repository_agents"):
        assert field in reason, reason
    assert "'A': reshape [2] holds a different number of elements than dims [1]" in index["bad_reshape"]["reason"]
    assert "input 'INPUT0' with reshape [63], the model has [64]" in index["onnx_bad_reshape"]["reason"]
    # The other models keep serving.
    assert client.is_model_ready("mlp_triton")


def test_performance_only_fields_load_with_a_warning(server) -> None:
    client = httpclient.InferenceServerClient(server.address)
    assert client.is_model_ready("tuned")
    server.wait_for_log(
        "only tune performance and have no effect in fastserve: instance_group[0].rate_limiter, optimization"
    )


def test_config_toml_wins_over_config_pbtxt(server) -> None:
    config = httpclient.InferenceServerClient(server.address).get_model_config("both")
    assert config["max_batch_size"] == 8
    server.wait_for_log("model 'both': config.toml and config.pbtxt both exist; config.toml is used")


def test_openvino_model_with_default_model_filename(start_server, tmp_path: Path) -> None:
    ov = pytest.importorskip("openvino")
    model_dir = triton_model(tmp_path, "mlp_ov", OPENVINO_PBTXT, model_file=None)
    ov.save_model(ov.convert_model(str(MLP)), str(model_dir / "1" / "mlp.xml"), compress_to_fp16=False)
    toml_model(tmp_path, "mlp_toml", ONNX_TOML)
    server = start_server(tmp_path)
    assert httpclient.InferenceServerClient(server.address).get_model_metadata("mlp_ov")["platform"] == "openvino"
    x = np.random.default_rng(5).standard_normal((8, 64)).astype(np.float32)
    np.testing.assert_allclose(
        infer_http(server.address, "mlp_ov", x), infer_http(server.address, "mlp_toml", x), rtol=1e-4, atol=1e-5
    )


def test_a_default_model_filename_outside_the_version_directory_is_refused(start_server, tmp_path: Path) -> None:
    triton_model(tmp_path, "escape", 'platform: "onnxruntime_onnx"\ndefault_model_filename: "../../mlp.onnx"\n')
    triton_model(tmp_path, "fine", ONNX_PBTXT.replace('name: "mlp_triton"', ""))
    server = start_server(tmp_path, "--model-control-mode", "explicit", "--load-model", "*")
    client = httpclient.InferenceServerClient(server.address)
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert "default_model_filename must be a file name without a directory" in index["escape"]["reason"]
    assert client.is_model_ready("fine")


def test_convert_config_prints_the_equivalent_config_toml(tmp_path: Path, start_server) -> None:
    model_dir = triton_model(tmp_path / "in", "mlp_triton", ONNX_PBTXT)
    out = subprocess.run(
        [sys.executable, "-m", "fastserve", "convert-config", str(model_dir)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert out.stdout.startswith("# config.toml converted from")
    assert tomllib.loads(out.stdout) == tomllib.loads(ONNX_TOML)
    # The printed file serves on its own.
    moved = toml_model(tmp_path / "out", "mlp_triton", out.stdout)
    server = start_server(moved.parent)
    assert httpclient.InferenceServerClient(server.address).get_model_config("mlp_triton")["max_batch_size"] == 16
    # What fastserve cannot honor fails the command, naming the field.
    bad = triton_model(tmp_path / "bad", "bad", UNSUPPORTED_PBTXT)
    failed = subprocess.run(
        [sys.executable, "-m", "fastserve", "convert-config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert failed.returncode == 1 and "batch_input" in failed.stderr
