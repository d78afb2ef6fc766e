"""The streaming baseline: the hand-written token-streaming wrapper many teams deploy. FastAPI + uvicorn
(one worker) serving the same Markov text generator as ``examples/models/textgen`` (its ``MarkovText``,
loaded from ``examples/models/textgen/1/model.py``) as server-sent events on
``POST /v2/models/textgen/generate_stream``.

    python benches/baseline_fastapi_stream.py --port 8100

Request body ``{"PROMPT": "the ", "MAX_TOKENS": 50}`` (parsed by pydantic); the answer is a
``text/event-stream`` with one ``data: {"TEXT": "<token>"}`` event per token. The generator is a plain
(blocking) iterator handed to ``StreamingResponse``, which Starlette steps in its thread pool: the usual way
to stream from a blocking model without stalling the event loop. Listens on 127.0.0.1 only;
``GET /v2/health/ready`` answers once it accepts requests.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent
TEXTGEN = ROOT / "examples" / "models" / "textgen" / "1" / "model.py"


def load_textgen(path: Path = TEXTGEN) -> ModuleType:
    """The example model's module, imported from its file (it is not a package)."""
    spec = importlib.util.spec_from_file_location("textgen_model", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class GenerateRequest(BaseModel):
    PROMPT: str
    MAX_TOKENS: int


def make_app() -> FastAPI:
    textgen = load_textgen()
    chain = textgen.MarkovText(textgen.CORPUS)
    app = FastAPI()

    @app.get("/v2/health/ready")
    def ready() -> dict:
        return {"ready": True}

    @app.post("/v2/models/textgen/generate_stream")
    def generate_stream(request: GenerateRequest) -> StreamingResponse:
        def events() -> Iterator[str]:
            for token in chain.tokens(request.PROMPT, request.MAX_TOKENS):
                yield f"data: {json.dumps({'TEXT': token})}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = make_app()

    uvicorn.run(app, host="127.0.0.1", port=args.port, workers=1, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
