"""The top class of `mlp` and its logit, computed by calling `mlp` in-process with
`fastserve.infer` (no network, same queue and batching as any `mlp` request)."""

import fastserve
import numpy as np


class Model:
    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        logits = fastserve.infer("mlp", {"INPUT0": inputs["INPUT0"]})["OUTPUT0"]
        top = logits.argmax(axis=1)
        score = logits[np.arange(len(top)), top]
        return {"TOP": top.astype(np.int64)[:, None], "SCORE": score.astype(np.float32)[:, None]}
