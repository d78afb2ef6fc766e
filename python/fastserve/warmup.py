"""``[[warmup]]``: sample batches run on every new instance before its version reports ready, so
the first real request does not pay for lazy initialization (allocations, kernel selection)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .backends import LoadedModel, LoadError
from .config import WARMUP_MAX_ELEMENTS, Warmup
from .tensor import NUMPY_DTYPES


def _sample(datatype: str, shape: list[int], data: str, rng: np.random.Generator) -> np.ndarray:
    n = int(np.prod(shape)) if shape else 1
    if datatype == "BYTES":
        items = [rng.bytes(8) if data == "random" else b"" for _ in range(n)]
        return np.array(items, dtype=object).reshape(shape)
    dtype = np.dtype(NUMPY_DTYPES[datatype])
    if data == "zero":
        return np.zeros(shape, dtype=dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, 100, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def _shape(loaded: LoadedModel, w: Warmup, i: int, name: str, dims: list[int]) -> list[int]:
    """The sample's shape, refused before anything is allocated when it is too large: a model's
    fixed dims times the batch size could otherwise ask this process for terabytes."""
    shape = ([w.batch_size] if loaded.max_batch_size > 0 else []) + list(dims)
    elements = math.prod(shape)
    if elements > WARMUP_MAX_ELEMENTS:
        raise LoadError(
            f"warmup {i}: input '{name}' of shape {shape} has {elements} elements, "
            f"more than the {WARMUP_MAX_ELEMENTS} a warmup sample may have"
        )
    return shape


def _execute(instance: Any, batch: dict[str, Any], i: int) -> Any:
    try:
        return instance.execute(dict(batch))
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # sys.exit() in execute fails this load, not the server
        raise LoadError(f"warmup {i} failed: {type(e).__name__}: {e}") from None


def run_warmup(loaded: LoadedModel, warmups: list[Warmup]) -> None:
    """Runs each warmup sample ``count`` times on every instance; a failure fails the load."""
    rng = np.random.default_rng(0)
    for i, w in enumerate(warmups):
        batch: dict[str, Any] = {}
        for t in loaded.inputs:
            dims = w.dims.get(t.name) or [1 if d < 0 else d for d in t.dims]
            sample = _sample(t.datatype, _shape(loaded, w, i, t.name, dims), w.data, rng)
            if t.reshape is not None:  # the model takes its own shape (the core reshapes requests the same way)
                sample = sample.reshape(([w.batch_size] if loaded.max_batch_size > 0 else []) + t.reshape)
            batch[t.name] = sample
        for instance in loaded.instances:
            for _ in range(w.count):
                outputs = _execute(instance, batch, i)
                if not isinstance(outputs, dict):
                    raise LoadError(f"warmup {i} failed: execute returned {type(outputs).__name__}, not a dict")
                missing = [t.name for t in loaded.outputs if t.name not in outputs]
                if missing:
                    raise LoadError(f"warmup {i} failed: the model did not return {missing}")
