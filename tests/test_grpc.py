"""The KServe V2 gRPC endpoint, checked with the official tritonclient.grpc (sync, asyncio and
streaming) and, for requests that client refuses to build, its generated stub."""

from __future__ import annotations

import asyncio
import queue
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
from fastserve import Server, Tensor
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from conftest import DTYPES, EXAMPLES, Recorder, ServerProcess, infer_json, sample


def mlp_session() -> ort.InferenceSession:
    return ort.InferenceSession(str(EXAMPLES / "mlp" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])


def mlp_input(x: np.ndarray) -> grpcclient.InferInput:
    inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def stub(address: str) -> service_pb2_grpc.GRPCInferenceServiceStub:
    return service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))


def assert_mlp_still_serves(client: grpcclient.InferenceServerClient) -> None:
    x = np.ones((1, 64), dtype=np.float32)
    out = client.infer("mlp", [mlp_input(x)]).as_numpy("OUTPUT0")
    np.testing.assert_allclose(out, mlp_session().run(None, {"INPUT0": x})[0], rtol=1e-5, atol=1e-6)


def test_health_and_metadata_match_http(example_server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(example_server.grpc_address)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("mlp")
    assert client.is_model_ready("mlp", "1")
    assert not client.is_model_ready("mlp", "2")
    assert not client.is_model_ready("no_such_model")
    http_meta = requests.get(f"{example_server.url}/v2", timeout=10).json()
    assert client.get_server_metadata(as_json=True) == http_meta
    assert "binary_tensor_data" in http_meta["extensions"]
    for model in ("mlp", "echo"):
        meta = client.get_model_metadata(model, as_json=True)
        for t in meta["inputs"] + meta["outputs"]:  # protobuf's JSON writes int64 as strings
            t["shape"] = [int(d) for d in t["shape"]]
        assert meta == requests.get(f"{example_server.url}/v2/models/{model}", timeout=10).json()
    meta = client.get_model_metadata("mlp")
    assert (meta.platform, list(meta.versions), list(meta.inputs[0].shape)) == ("onnxruntime_onnx", ["1"], [-1, 64])


def test_model_config_is_triton_shaped(example_server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(example_server.grpc_address)
    config = client.get_model_config("mlp").config
    assert (config.name, config.platform, config.backend, config.max_batch_size) == (
        "mlp",
        "onnxruntime_onnx",
        "onnxruntime",
        64,
    )
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("INPUT0", 11, [64])]  # TYPE_FP32
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [("OUTPUT0", 11, [10])]
    assert config.HasField("dynamic_batching")
    echo = client.get_model_config("echo", as_json=True)["config"]
    assert echo["backend"] == "python"
    assert {i["name"]: i["data_type"] for i in echo["input"]} == {"TEXT": "TYPE_STRING"}
    with pytest.raises(InferenceServerException) as e:
        client.get_model_config("no_such_model")
    assert e.value.status() == "StatusCode.NOT_FOUND"


def test_http_model_config_matches_grpc(example_server: ServerProcess) -> None:
    http = httpclient.InferenceServerClient(example_server.address)
    grpc_client = grpcclient.InferenceServerClient(example_server.grpc_address)

    def tensors(config: dict, key: str) -> list[tuple]:
        return [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in config[key]]

    for model in ("mlp", "echo"):
        over_http = http.get_model_config(model)
        over_grpc = grpc_client.get_model_config(model, as_json=True)["config"]
        for key in ("name", "platform", "backend"):
            assert over_http[key] == over_grpc[key]
        assert over_http["max_batch_size"] == over_grpc.get("max_batch_size", 0)
        assert tensors(over_http, "input") == tensors(over_grpc, "input")
        assert tensors(over_http, "output") == tensors(over_grpc, "output")
    mlp = http.get_model_config("mlp", model_version="1")
    assert tensors(mlp, "input") == [("INPUT0", "TYPE_FP32", [64])]
    queue = mlp["dynamic_batching"]["default_queue_policy"]
    assert (queue["max_queue_size"], queue["timeout_action"]) == (4096, "REJECT")
    r = requests.get(f"{example_server.url}/v2/models/no_such_model/config", timeout=10)
    assert r.status_code == 404 and "no_such_model" in r.json()["error"]
    assert requests.get(f"{example_server.url}/v2/models/mlp/versions/9/config", timeout=10).status_code == 404
    r = requests.post(f"{example_server.url}/v2/models/mlp/config", timeout=10)
    assert r.status_code == 404 and "POST is not supported" in r.json()["error"]


@pytest.mark.parametrize("compression", [None, "gzip", "deflate"])
def test_mlp_matches_onnxruntime_and_the_json_path(example_server: ServerProcess, compression: str | None) -> None:
    client = grpcclient.InferenceServerClient(example_server.grpc_address)
    x = np.random.default_rng(3).standard_normal((5, 64)).astype(np.float32)
    result = client.infer("mlp", [mlp_input(x)], request_id="r-1", compression_algorithm=compression)
    out = result.as_numpy("OUTPUT0")
    assert result.get_response().id == "r-1"
    assert (result.get_response().model_name, result.get_response().model_version) == ("mlp", "1")
    np.testing.assert_allclose(out, mlp_session().run(None, {"INPUT0": x})[0], rtol=1e-5, atol=1e-6)
    r = infer_json(
        example_server.url, "mlp", [{"name": "INPUT0", "shape": [5, 64], "datatype": "FP32", "data": x.tolist()}]
    )
    np.testing.assert_allclose(out, np.array(r.json()["outputs"][0]["data"], np.float32).reshape(5, 10), rtol=1e-6)


def test_asyncio_client(example_server: ServerProcess) -> None:
    xs = [np.full((i + 1, 64), i, dtype=np.float32) for i in range(6)]

    async def run() -> list[np.ndarray]:
        async with grpcaio.InferenceServerClient(example_server.grpc_address) as client:
            assert await client.is_server_ready()
            results = await asyncio.gather(
                *(client.infer("mlp", [mlp_input(x)], request_id=str(i)) for i, x in enumerate(xs))
            )
            assert [r.get_response().id for r in results] == [str(i) for i in range(len(xs))]
            return [r.as_numpy("OUTPUT0") for r in results]

    session = mlp_session()
    for x, out in zip(xs, asyncio.run(run()), strict=True):
        np.testing.assert_allclose(out, session.run(None, {"INPUT0": x})[0], rtol=1e-5, atol=1e-6)


def test_stream_answers_every_request_and_survives_errors(example_server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(example_server.grpc_address)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    xs = {str(i): np.full((1 + i % 3, 64), i, dtype=np.float32) for i in range(8)}
    try:
        for rid, x in list(xs.items())[:4]:
            client.async_stream_infer("mlp", [mlp_input(x)], request_id=rid)
        bad = grpcclient.InferInput("INPUT0", [1, 63], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 63), dtype=np.float32))
        client.async_stream_infer("mlp", [bad], request_id="bad")
        client.async_stream_infer("no_such_model", [mlp_input(xs["0"])], request_id="unknown")
        for rid, x in list(xs.items())[4:]:
            client.async_stream_infer("mlp", [mlp_input(x)], request_id=rid)
        got = [answers.get(timeout=60) for _ in range(len(xs) + 2)]
    finally:
        client.stop_stream()
    errors = sorted(str(error) for result, error in got if error is not None)
    assert len(errors) == 2
    assert "Request for unknown model: 'no_such_model' is not found" in errors[0]
    assert "unexpected shape for input 'INPUT0' for model 'mlp'. Expected [-1,64], got [1,63]" in errors[1]
    results = {r.get_response().id: r.as_numpy("OUTPUT0") for r, error in got if error is None}
    assert results.keys() == xs.keys()
    session = mlp_session()
    for rid, x in xs.items():
        np.testing.assert_allclose(results[rid], session.run(None, {"INPUT0": x})[0], rtol=1e-5, atol=1e-6)


def wrong_dtype() -> list[grpcclient.InferInput]:
    inp = grpcclient.InferInput("INPUT0", [1, 64], "FP64")
    inp.set_data_from_numpy(np.zeros((1, 64), dtype=np.float64))
    return [inp]


def wrong_shape() -> list[grpcclient.InferInput]:
    inp = grpcclient.InferInput("INPUT0", [2, 63], "FP32")
    inp.set_data_from_numpy(np.zeros((2, 63), dtype=np.float32))
    return [inp]


def extra_input() -> list[grpcclient.InferInput]:
    extra = grpcclient.InferInput("EXTRA", [1], "INT32")
    extra.set_data_from_numpy(np.zeros(1, dtype=np.int32))
    return [mlp_input(np.zeros((1, 64), dtype=np.float32)), extra]


@pytest.mark.parametrize(
    ("model", "version", "inputs", "code", "message"),
    [
        (
            "mlp",
            "",
            wrong_dtype,
            "INVALID_ARGUMENT",
            "inference input 'INPUT0' data-type is 'FP64', but model 'mlp' expects 'FP32'",
        ),
        (
            "mlp",
            "",
            wrong_shape,
            "INVALID_ARGUMENT",
            "unexpected shape for input 'INPUT0' for model 'mlp'. Expected [-1,64], got [2,63]",
        ),
        ("mlp", "", list, "INVALID_ARGUMENT", "missing required input(s) ['INPUT0']"),
        ("mlp", "", extra_input, "INVALID_ARGUMENT", "unexpected inference input 'EXTRA'"),
        ("no_such_model", "", wrong_shape, "NOT_FOUND", "Request for unknown model: 'no_such_model' is not found"),
        ("mlp", "9", wrong_shape, "NOT_FOUND", "Request for unknown model: 'mlp' version 9 is not found"),
    ],
)
def test_bad_requests_get_the_mapped_status(
    example_server: ServerProcess, model: str, version: str, inputs, code: str, message: str
) -> None:
    client = grpcclient.InferenceServerClient(example_server.grpc_address)
    with pytest.raises(InferenceServerException) as e:
        client.infer(model, inputs(), model_version=version)
    assert e.value.status() == f"StatusCode.{code}"
    assert message in e.value.message()
    assert_mlp_still_serves(client)


def raw_request(datatype: str, shape: list[int], raw: list[bytes], **contents) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="id_" + datatype.lower())
    tensor = request.inputs.add(name="IN", datatype=datatype, shape=shape)
    for field, values in contents.items():
        getattr(tensor.contents, field).extend(values)
    request.raw_input_contents.extend(raw)
    return request


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (raw_request("FP32", [1, 4], [b"\0" * 15]), "15 bytes of binary data do not hold 4 FP32 elements"),
        (raw_request("FP32", [1, 4], [b"\0" * 16, b"\0" * 16]), "raw_input_contents has 2 entries for 1 inputs"),
        (raw_request("BYTES", [1, 1], [b"\x09\0\0\0abc"]), "BYTES element of 9 bytes runs past the end"),
        (raw_request("BYTES", [1, 2], [b"\x01\0\0\0a"]), "expected 2 BYTES elements, got 1"),
        (raw_request("FP32", [1, 3], [], fp32_contents=[1.0, 2.0]), "shape needs 3 FP32 elements, fp32_contents has 2"),
        (raw_request("INT8", [1, 1], [], int_contents=[300]), "value 300 is out of range for INT8"),
        (raw_request("FP16", [1, 1], []), "FP16 has no typed contents field"),
        (raw_request("FP32", [1, -2], []), "negative dimension"),
        (raw_request("FP32", [1, 1 << 40, 1 << 40], []), "is too large"),
    ],
)
def test_bad_tensor_data_is_invalid_argument(identity_models, request_, message: str) -> None:
    server, _ = identity_models
    with pytest.raises(grpc.RpcError) as e:
        stub(f"127.0.0.1:{server.grpc_port}").ModelInfer(request_, timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in e.value.details()
    ok = stub(f"127.0.0.1:{server.grpc_port}").ModelInfer(
        raw_request("FP32", [1, 2], [], fp32_contents=[1.5, 2.5]), timeout=60
    )
    assert np.frombuffer(ok.raw_output_contents[0], np.float32).tolist() == [1.5, 2.5]


def test_unsupported_rpcs_say_so(example_server: ServerProcess) -> None:
    s = stub(example_server.grpc_address)
    calls = [
        (
            s.RepositoryModelLoad,
            service_pb2.RepositoryModelLoadRequest(model_name="mlp"),
            grpc.StatusCode.PERMISSION_DENIED,
            "--model-control-mode explicit or poll",
        ),
        (
            s.RepositoryModelUnload,
            service_pb2.RepositoryModelUnloadRequest(model_name="mlp"),
            grpc.StatusCode.PERMISSION_DENIED,
            "explicit model load / unload is not allowed",
        ),
        (
            s.CudaSharedMemoryRegister,
            service_pb2.CudaSharedMemoryRegisterRequest(),
            grpc.StatusCode.UNIMPLEMENTED,
            "CUDA shared memory",
        ),
        (s.TraceSetting, service_pb2.TraceSettingRequest(), grpc.StatusCode.UNIMPLEMENTED, "trace settings"),
        (s.LogSettings, service_pb2.LogSettingsRequest(), grpc.StatusCode.UNIMPLEMENTED, "log settings"),
    ]
    for call, request, code, message in calls:
        with pytest.raises(grpc.RpcError) as e:
            call(request, timeout=60)
        assert (e.value.code(), message in e.value.details()) == (code, True), call
    assert s.ServerLive(service_pb2.ServerLiveRequest(), timeout=60).live


def test_oversized_messages_are_resource_exhausted(start_server) -> None:
    server = start_server(EXAMPLES, "--grpc-max-message-bytes", "100000")
    client = grpcclient.InferenceServerClient(server.grpc_address)
    with pytest.raises(InferenceServerException) as e:
        client.infer("mlp", [mlp_input(np.zeros((400, 64), dtype=np.float32))])
    assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "the limit is: 100000 bytes" in e.value.message()
    # On a stream the oversized request ends the stream with the same status.
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer("mlp", [mlp_input(np.zeros((400, 64), dtype=np.float32))])
        _, error = answers.get(timeout=60)
    finally:
        client.stop_stream()
    assert "RESOURCE_EXHAUSTED" in str(error.status())
    assert_mlp_still_serves(client)


def typed_contents(datatype: str, x: np.ndarray) -> dict:
    field = {
        "BOOL": "bool_contents",
        "UINT8": "uint_contents",
        "UINT16": "uint_contents",
        "UINT32": "uint_contents",
        "UINT64": "uint64_contents",
        "INT8": "int_contents",
        "INT16": "int_contents",
        "INT32": "int_contents",
        "INT64": "int64_contents",
        "FP32": "fp32_contents",
        "FP64": "fp64_contents",
        "BYTES": "bytes_contents",
    }[datatype]
    return {field: x.ravel().tolist()}


@pytest.mark.parametrize("datatype", list(DTYPES))
def test_every_datatype_equals_the_json_path(identity_models, datatype: str) -> None:
    server, models = identity_models
    model = f"id_{datatype.lower()}"
    x = sample(datatype, (2, 3))
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    inp = grpcclient.InferInput("IN", [2, 3], datatype)
    inp.set_data_from_numpy(x)
    out = client.infer(model, [inp]).as_numpy("OUT")
    assert models[datatype].seen[-1] == (np.dtype(DTYPES[datatype]).name, (2, 3))
    assert out.shape == (2, 3)
    if datatype == "BYTES":
        assert out.tolist() == x.tolist()
    else:
        assert out.dtype == x.dtype
        np.testing.assert_array_equal(out, x)
    http = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    hin = httpclient.InferInput("IN", [2, 3], datatype)
    hin.set_data_from_numpy(x, binary_data=False)
    json_out = http.infer(model, [hin], outputs=[httpclient.InferRequestedOutput("OUT", binary_data=False)])
    json_out = json_out.as_numpy("OUT")
    if datatype == "BYTES":
        assert [v.encode() for v in json_out.ravel().tolist()] == out.ravel().tolist()
    else:
        np.testing.assert_array_equal(json_out, out)
    if datatype != "FP16":  # FP16 has no typed field; it travels raw only
        typed = stub(f"127.0.0.1:{server.grpc_port}").ModelInfer(
            raw_request(datatype, [2, 3], [], **typed_contents(datatype, x)), timeout=60
        )
        if datatype == "BYTES":
            assert typed.raw_output_contents[0] == b"".join(len(v).to_bytes(4, "little") + v for v in x.ravel())
        else:
            assert typed.raw_output_contents[0] == x.tobytes()


def test_a_batch_mixes_grpc_and_http_callers_and_each_gets_its_rows() -> None:
    model = Recorder()
    server = Server(http_port=0, grpc_port=0)
    # The batch is sent the moment 8 rows are queued; the long delay only bounds a hung test.
    server.add_model(
        "rec",
        model,
        inputs=[Tensor("X", "FP32", [3])],
        outputs=[Tensor("Y", "FP32", [3])],
        max_batch_size=8,
        max_queue_delay_us=60_000_000,
    )

    def via_grpc(rows: np.ndarray) -> np.ndarray:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        inp = grpcclient.InferInput("X", list(rows.shape), "FP32")
        inp.set_data_from_numpy(rows)
        return client.infer("rec", [inp]).as_numpy("Y")

    def via_http(rows: np.ndarray) -> np.ndarray:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
        inp = httpclient.InferInput("X", list(rows.shape), "FP32")
        inp.set_data_from_numpy(rows, binary_data=True)
        return client.infer("rec", [inp]).as_numpy("Y")

    callers = [(via_grpc, 1), (via_http, 2), (via_grpc, 3), (via_http, 1), (via_grpc, 1)]  # 8 rows in all
    payloads = [
        np.full((n, 3), i * 10, dtype=np.float32) + np.arange(3, dtype=np.float32) for i, (_, n) in enumerate(callers)
    ]
    with server, ThreadPoolExecutor(len(callers)) as pool:
        futures = [pool.submit(call, p) for (call, _), p in zip(callers, payloads, strict=True)]
        answers = [f.result(timeout=120) for f in futures]
    assert model.batches == [8]
    for payload, answer in zip(payloads, answers, strict=True):
        np.testing.assert_array_equal(answer, payload + 1)


def test_embedded_server_without_grpc_has_no_grpc_port() -> None:
    server = Server(http_port=0)
    with server:
        assert server.http_port
        assert server.grpc_port is None


def test_response_over_the_limit_is_resource_exhausted() -> None:
    class Grow:
        def execute(self, inputs):
            return {"Y": np.tile(inputs["X"], (1, 10))}

    server = Server(http_port=0, grpc_port=0, grpc_max_message_bytes=20_000)
    server.add_model(
        "grow", Grow(), inputs=[Tensor("X", "FP32", [-1])], outputs=[Tensor("Y", "FP32", [-1])], max_batch_size=4
    )
    with server:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        inp = grpcclient.InferInput("X", [1, 1000], "FP32")
        inp.set_data_from_numpy(np.ones((1, 1000), dtype=np.float32))
        with pytest.raises(InferenceServerException) as e:
            client.infer("grow", [inp])
        assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "exceeds the gRPC message limit of 20000 bytes" in e.value.message()
        small = grpcclient.InferInput("X", [1, 10], "FP32")
        small.set_data_from_numpy(np.ones((1, 10), dtype=np.float32))
        assert client.infer("grow", [small]).as_numpy("Y").shape == (1, 100)
