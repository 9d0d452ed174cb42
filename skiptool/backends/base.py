"""The protocol every decode backend implements (torch, onnxruntime, tensorrt, peers) and a greedy timing loop.

A backend holds one sequence's state (KV cache). ``prefill`` consumes the prompt and returns the
logits of its last position; ``step`` consumes one token and returns the next logits. The timing loop
below is shared by ``generate --onnx`` and ``bench`` so every backend is measured the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np


class DecodeBackend(Protocol):
    name: str  # e.g. "torch", "onnxruntime"
    precision: str  # "fp32", "fp16", "int8", "int4", ...
    mode: str  # "dense" or "skip"

    def reset(self) -> None:
        """Forget the current sequence (empty KV cache, zeroed skip counters)."""

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        """Run the prompt; return the last position's logits, shape ``[vocab]``."""

    def step(self, token_id: int) -> np.ndarray:
        """Append one token; return its logits, shape ``[vocab]``."""

    def skip_ratio(self) -> float | None:
        """FFN skip ratio over the decode steps since the last reset (None if the backend cannot tell)."""


@dataclass
class DecodeTiming:
    """Greedy decode of one prompt: tokens and per-step wall times (prefill separate)."""

    token_ids: list[int]
    prefill_s: float
    step_s: list[float] = field(default_factory=list)
    skip_ratio: float | None = None

    @property
    def tokens_per_s(self) -> float:
        total = sum(self.step_s)
        return len(self.step_s) / total if total > 0 else 0.0


def greedy_decode(backend: DecodeBackend, prompt_ids: Sequence[int], new_tokens: int,
                  eos_ids: set[int] | None = None) -> DecodeTiming:
    """Prefill, then `new_tokens - 1` timed decode steps (stops early at an EOS id if given)."""
    backend.reset()
    t0 = time.perf_counter()
    token = int(np.argmax(backend.prefill(prompt_ids)))
    prefill_s = time.perf_counter() - t0
    tokens, steps = [token], []
    while len(tokens) < new_tokens and not (eos_ids and token in eos_ids):
        t0 = time.perf_counter()
        token = int(np.argmax(backend.step(token)))
        steps.append(time.perf_counter() - t0)
        tokens.append(token)
    return DecodeTiming(tokens, prefill_s, steps, backend.skip_ratio())
