"""Echoes BYTES input back with a configurable prefix, and each element's length."""

import numpy as np


class Model:
    def initialize(self, args: dict) -> None:
        self.prefix = args["parameters"].get("prefix", "").encode()

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        text = inputs["TEXT"]
        echoed = np.array([self.prefix + t for t in text.ravel()], dtype=object).reshape(text.shape)
        lengths = np.array([len(t) for t in text.ravel()], dtype=np.int64).reshape(text.shape)
        return {"TEXT": echoed, "LENGTH": lengths}
