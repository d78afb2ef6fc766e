"""Property-based fuzzing of the REST API against a live server with schemathesis, driven by the
OpenAPI description shipped in docs/openapi.yaml: no 5xx, and every answer conforms to it.

A longer run: see "Security" in README.md."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fastserve import Server

from conftest import EXAMPLES, ROOT

SPEC = ROOT / "docs" / "openapi.yaml"
CHECKS = "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance"


def test_openapi_covers_every_route() -> None:
    spec = yaml.safe_load(SPEC.read_text())
    assert spec["openapi"].startswith("3.")
    paths = set(spec["paths"])
    for route in (
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{model}",
        "/v2/models/{model}/versions/{version}",
        "/v2/models/{model}/ready",
        "/v2/models/{model}/infer",
        "/v2/models/{model}/versions/{version}/infer",
        "/v2/models/stats",
        "/v2/models/{model}/stats",
        "/v2/repository/index",
        "/v2/repository/models/{model}/load",
        "/v2/repository/models/{model}/unload",
        "/v2/systemsharedmemory/status",
        "/v2/systemsharedmemory/region/{region}/status",
        "/v2/systemsharedmemory/region/{region}/register",
        "/v2/systemsharedmemory/unregister",
        "/v2/systemsharedmemory/region/{region}/unregister",
    ):
        assert route in paths, route
    assert spec["components"]["schemas"]["Error"]["properties"] == {"error": {"type": "string"}}


def schemathesis() -> list[str]:
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    if exe is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    return [exe]


def test_rest_api_fuzz(tmp_path: Path) -> None:
    # Explicit mode with every example model: the repository endpoints are live too.
    server = Server(http_port=0)
    server.load_repository(EXAMPLES, control_mode="explicit", load_models=["*"])
    server.start()
    try:
        cmd = [
            *schemathesis(),
            "run",
            str(SPEC),
            "--url",
            f"http://127.0.0.1:{server.http_port}",
            "--checks",
            CHECKS,
            "--max-examples",
            os.environ.get("FASTSERVE_API_FUZZ_EXAMPLES", "20"),
            "--generation-deterministic",
            "--request-timeout",
            "60",
            "--no-color",
        ]
        env = dict(os.environ, HYPOTHESIS_STORAGE_DIRECTORY=str(tmp_path / ".hypothesis"))
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    finally:
        server.stop()
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", out)
    assert generated is not None, out[-3000:]
    assert int(generated.group(1)) == int(generated.group(2)) > 100, generated.group(0)
