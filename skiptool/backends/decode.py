"""The one decode loop over any :class:`~skiptool.backends.base.DecodeBackend`, and its one result type.

:func:`decode` runs a backend — PyTorch eager or graphed, ONNX Runtime, onnxruntime-genai, TensorRT, llama.cpp —
prefill then one token per step, timing each step and streaming text. ``skiptool generate``, ``skiptool bench``
and the evaluation's greedy agreement all use it, so every backend is measured the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..errors import SkipToolError


@dataclass
class DecodeResult:
    """Generated tokens (and text, when a tokenizer was given) with timing. Decode figures exclude the prefill;
    the skip ratio covers the decode steps only (``None`` when the backend cannot see its decisions)."""

    token_ids: list[int]
    prompt_tokens: int
    prefill_s: float
    step_s: list[float] = field(default_factory=list)
    text: str = ""
    skip_ratio: float | None = None
    per_layer_skip: list[float] | None = None

    @property
    def tokens_per_s(self) -> float:
        total = sum(self.step_s)
        return len(self.step_s) / total if total > 0 else 0.0


class Sampler:
    """Greedy (``temperature`` 0) or temperature / top-p sampling from one position's logits."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> None:
        if temperature < 0 or not 0 < top_p <= 1:
            raise SkipToolError(f"temperature must be >= 0 and top-p in (0, 1] (got {temperature}, {top_p})")
        self.temperature, self.top_p = temperature, top_p
        self.generator = torch.Generator().manual_seed(seed) if temperature > 0 else None

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature <= 0:
            return int(np.argmax(logits))
        probs = torch.softmax(torch.from_numpy(np.asarray(logits, dtype=np.float32)) / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, idx = probs.sort(descending=True)
            sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p > self.top_p, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def decode(backend: Any, prompt_ids: Sequence[int], max_new_tokens: int, sampler: Sampler | None = None,
           eos_ids: set[int] | None = None, tokenizer: Any = None,
           on_text: Callable[[str], None] | None = None) -> DecodeResult:
    """Prefill, then up to ``max_new_tokens - 1`` timed decode steps (stopping at an EOS id when given).

    With a `tokenizer`, the text is decoded as it grows and new pieces go to `on_text` (streaming).
    """
    if max_new_tokens < 1:
        raise SkipToolError(f"max new tokens must be at least 1 (got {max_new_tokens})")
    pick = sampler or Sampler()
    backend.reset()
    t0 = time.perf_counter()
    tokens = [pick(backend.prefill(list(prompt_ids)))]
    prefill_s = time.perf_counter() - t0
    stream = _Stream(tokenizer, on_text)
    stream.update(tokens)
    steps: list[float] = []
    while len(tokens) < max_new_tokens and not (eos_ids and tokens[-1] in eos_ids):
        t0 = time.perf_counter()
        tokens.append(pick(backend.step(tokens[-1])))
        steps.append(time.perf_counter() - t0)
        stream.update(tokens)
    per_layer = getattr(backend, "per_layer_skip", None)
    return DecodeResult(tokens, len(prompt_ids), prefill_s, steps, stream.text, backend.skip_ratio(),
                        per_layer() if per_layer is not None else None)


class _Stream:
    """Decodes the growing token list and hands each new piece of text to `on_text`."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None] | None) -> None:
        self.tokenizer, self.on_text, self.text = tokenizer, on_text, ""

    def update(self, tokens: list[int]) -> None:
        if self.tokenizer is None:
            return
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if self.on_text is not None and text.startswith(self.text) and len(text) > len(self.text):
            self.on_text(text[len(self.text):])
        self.text = text


class Follow(Sampler):
    """Feeds a fixed continuation (`tokens`) while recording the backend's own greedy choice at each step: decoding
    with it measures agreement along a reference trajectory (teacher forcing)."""

    def __init__(self, tokens: Sequence[int]) -> None:
        super().__init__()
        self.tokens, self.picked = list(tokens), []

    def __call__(self, logits: np.ndarray) -> int:
        self.picked.append(int(np.argmax(logits)))
        return self.tokens[len(self.picked) - 1]

    def agreement(self) -> tuple[int, int]:
        """(steps whose greedy choice equals the reference token, steps)."""
        return sum(a == b for a, b in zip(self.picked, self.tokens)), len(self.picked)
