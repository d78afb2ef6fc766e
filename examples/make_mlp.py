"""Generates examples/models/mlp/1/model.onnx: a small MLP (64 -> 256 -> 256 -> 10, ReLU).

Weights come from a fixed seed, so the file is reproducible; the test suite regenerates it and
checks that it matches what is committed.

    python examples/make_mlp.py [OUTPUT_PATH]
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SIZES = [64, 256, 256, 10]
OPSET = 17


def build(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    current = "INPUT0"
    for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(SIZES)):
        w = (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        b = (rng.standard_normal(fan_out) * 0.01).astype(np.float32)
        initializers += [numpy_helper.from_array(w, f"W{layer}"), numpy_helper.from_array(b, f"B{layer}")]
        last = layer == len(SIZES) - 2
        matmul, out = f"mm{layer}", "OUTPUT0" if last else f"h{layer}"
        nodes.append(helper.make_node("MatMul", [current, f"W{layer}"], [matmul]))
        if last:
            nodes.append(helper.make_node("Add", [matmul, f"B{layer}"], [out]))
        else:
            nodes.append(helper.make_node("Add", [matmul, f"B{layer}"], [f"pre{layer}"]))
            nodes.append(helper.make_node("Relu", [f"pre{layer}"], [out]))
        current = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", SIZES[0]])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", SIZES[-1]])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fastserve")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "models" / "mlp" / "1" / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(build().SerializeToString())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
