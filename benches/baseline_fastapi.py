"""The baseline: the hand-written wrapper many teams deploy. FastAPI + uvicorn (one worker), the same
ONNX model in onnxruntime, V2 JSON on ``POST /v2/models/mlp/infer``, no batching: every request is
parsed by pydantic, turned into a NumPy array, run alone and answered with ``tolist()``.

    python benches/baseline_fastapi.py --port 8100 [--model examples/models/mlp/1/model.onnx]

Listens on 127.0.0.1 only; ``GET /v2/health/ready`` answers once it accepts requests.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "examples" / "models" / "mlp" / "1" / "model.onnx"


class InputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class InferRequest(BaseModel):
    id: str | None = None
    inputs: list[InputTensor]


def make_app(model_path: Path, threads: int) -> FastAPI:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])
    input_names = {i.name for i in session.get_inputs()}
    app = FastAPI()

    @app.get("/v2/health/ready")
    def ready() -> dict:
        return {"ready": True}

    # A plain `def` endpoint: FastAPI runs it in its thread pool, the usual way to call a blocking model.
    @app.post("/v2/models/mlp/infer")
    def infer(request: InferRequest) -> dict:
        feeds = {}
        for t in request.inputs:
            if t.name not in input_names or t.datatype != "FP32":
                raise HTTPException(status_code=400, detail=f"unexpected input {t.name} {t.datatype}")
            feeds[t.name] = np.asarray(t.data, dtype=np.float32).reshape(t.shape)
        outputs = session.run(None, feeds)
        return {
            "model_name": "mlp",
            "model_version": "1",
            "id": request.id,
            "outputs": [
                {"name": meta.name, "datatype": "FP32", "shape": list(value.shape), "data": value.ravel().tolist()}
                for meta, value in zip(session.get_outputs(), outputs, strict=True)
            ],
        }

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="ORT intra-op threads")
    args = parser.parse_args()
    app = make_app(args.model, args.threads)

    uvicorn.run(app, host="127.0.0.1", port=args.port, workers=1, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
