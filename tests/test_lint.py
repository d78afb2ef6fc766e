"""Style gates that run with the suite: ruff for Python, rustfmt for Rust."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import ROOT


def test_ruff_is_clean() -> None:
    r = subprocess.run(
        ["ruff", "check", "python", "tests", "examples", "benches"], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(
        ["ruff", "format", "--check", "python", "tests", "examples", "benches"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("cargo") is None, reason="no Rust toolchain")
def test_rustfmt_is_clean() -> None:
    r = subprocess.run(["cargo", "fmt", "--all", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
