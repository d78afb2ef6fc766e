"""Standardizes each row of raw features (zero mean, unit variance): the step before `mlp` in the
`classify` ensemble."""

import numpy as np


class Model:
    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raw = inputs["RAW"]
        mean = raw.mean(axis=1, keepdims=True)
        std = raw.std(axis=1, keepdims=True) + 1e-6
        return {"FEATURES": ((raw - mean) / std).astype(np.float32)}
