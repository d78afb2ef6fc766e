"""A decoupled (streaming) example model: a character-level Markov text generator that streams one
token (one character) per response, the shape of an LLM's token stream without any weights.

Nothing is downloaded: ``initialize`` builds an order-3 Markov chain from the short corpus below. The
README uses the model for ``curl -N .../v2/models/textgen/generate_stream`` and for
``tritonclient.grpc`` streams (``ModelStreamInfer``). ``benches/streaming.py`` and
``benches/baseline_fastapi_stream.py`` load this file with importlib and call ``MarkovText`` directly,
so that fastserve and the FastAPI baseline stream the same tokens.

Inputs: ``PROMPT`` (BYTES [1], UTF-8) and ``MAX_TOKENS`` (INT32 [1], clamped to 0..4096). ``execute``
is a generator that yields ``TEXT`` (BYTES [1]) once per token. The text is deterministic: the same
prompt always continues the same way.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np

MAX_TOKENS_LIMIT = 4096

CORPUS = (
    "the river ran past the old mill and the miller sat by the door to watch the water turn the wheel. "
    "in the morning the fog lay on the fields and the birds sang in the hedges along the lane. "
    "the children ran down to the bank to throw stones into the stream and to look for fish in the shallows. "
    "when the sun was high the farmer came in from the hay and sat in the shade of the great oak tree. "
    "there he ate his bread and cheese and told the boy a story of the winter when the river froze "
    "and the whole village walked across the ice to the market on the other side. "
    "in the evening the lamps were lit in the windows, the cows came home along the road, "
    "and the mill wheel turned slowly in the dark until the stars came out over the hill. "
)


class MarkovText:
    """A character-level Markov chain of the given order, built from ``corpus``.

    The corpus is read as a ring (its end runs on into its start), so every state of the chain has
    at least one successor and generation never stops early.
    """

    def __init__(self, corpus: str, order: int = 3) -> None:
        if order < 1:
            raise ValueError("order must be at least 1")
        if len(corpus) <= order:
            raise ValueError("the corpus must be longer than the order")
        self.order = order
        ring = corpus + corpus[:order]
        self.successors: dict[str, list[str]] = {}
        for i in range(len(corpus)):
            self.successors.setdefault(ring[i : i + order], []).append(ring[i + order])
        # An unknown state (a prompt whose tail never occurs in the corpus) starts from here.
        self.fallback = corpus[:order]

    def tokens(self, prompt: str, max_tokens: int) -> Iterator[str]:
        """Yields exactly ``max_tokens`` (clamped to 0..4096) single characters continuing ``prompt``.
        The choice among successors is seeded from the prompt, so the output is deterministic."""
        count = max(0, min(int(max_tokens), MAX_TOKENS_LIMIT))
        rng = random.Random(prompt)
        state = prompt[-self.order :] if len(prompt) >= self.order else ""
        for _ in range(count):
            choices = self.successors.get(state)
            if choices is None:
                state = self.fallback
                choices = self.successors[state]
            token = choices[0] if len(choices) == 1 else rng.choice(choices)
            state = (state + token)[-self.order :]
            yield token


class Model:
    def initialize(self, args: dict) -> None:
        order = int((args.get("parameters") or {}).get("order", 3))
        self.chain = MarkovText(CORPUS, order=order)

    def execute(self, inputs: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        raw = inputs["PROMPT"].ravel()[0]
        prompt = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
        max_tokens = int(inputs["MAX_TOKENS"].ravel()[0])
        for token in self.chain.tokens(prompt, max_tokens):
            yield {"TEXT": np.array([token.encode()], dtype=object)}
