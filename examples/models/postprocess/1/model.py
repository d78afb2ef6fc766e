"""Softmax over the logits and the most likely class: the step after `mlp` in the `classify`
ensemble."""

import numpy as np


class Model:
    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        logits = inputs["LOGITS"]
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
        return {"PROBS": probs, "CLASS": probs.argmax(axis=1).astype(np.int64)[:, None]}
