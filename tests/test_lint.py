"""Static checks that run with the suite, the same as `make lint`: ruff for Python, rustfmt and
clippy for Rust, mypy on python/fastserve, and stubtest of python/fastserve/_core.pyi against the
built module. Each failure prints the tool's own report."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

PYTHON_SOURCES = ["python", "tests", "examples", "benches"]


def cargo_has(subcommand: str) -> bool:
    """Whether the toolchain has a cargo subcommand (rustfmt and clippy are rustup components)."""
    if shutil.which("cargo") is None:
        return False
    return subprocess.run(["cargo", subcommand, "--version"], cwd=ROOT, capture_output=True).returncode == 0


def check(*cmd: str, timeout: float = 600) -> None:
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"`{' '.join(cmd)}` failed:\n{r.stdout}{r.stderr}"


def test_ruff_is_clean() -> None:
    check("ruff", "check", *PYTHON_SOURCES)
    check("ruff", "format", "--check", *PYTHON_SOURCES)


@pytest.mark.skipif(not cargo_has("fmt"), reason="no cargo fmt (rustup component add rustfmt)")
def test_rustfmt_is_clean() -> None:
    check("cargo", "fmt", "--all", "--check")


@pytest.mark.skipif(not cargo_has("clippy"), reason="no cargo clippy (rustup component add clippy)")
@pytest.mark.slow
def test_clippy_is_clean() -> None:
    # Shares target/ with `cargo test`, so after it this only checks what changed; from a cold
    # target directory it builds every dependency in check mode first.
    check("cargo", "clippy", "--workspace", "--all-targets", "--", "-D", "warnings", timeout=1800)


def test_mypy_is_clean() -> None:
    # The files and settings are [tool.mypy] in pyproject.toml.
    check(sys.executable, "-m", "mypy")


def test_core_stub_matches_the_native_module() -> None:
    """python/fastserve/_core.pyi against the fastserve._core this interpreter imports (rebuild it
    with `make build-dev` after changing rust/fastserve-py). Without --concise, stubtest shows both
    signatures of each mismatch."""
    check(sys.executable, "-m", "mypy.stubtest", "--concise", "fastserve._core")
