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

from ..errors import SkipToolError


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


def parse_skip_mask(skip_mask: Sequence[int], num_layers: int) -> np.ndarray:
    """A per-layer override (1 force skip, -1 force compute, 0 policy) as the graphs' int64 vector, or one
    clear error when its length is not the number of layers."""
    mask = np.asarray(skip_mask, dtype=np.int64).reshape(-1)
    if mask.shape[0] != num_layers:
        raise SkipToolError(f"skip_mask needs {num_layers} entries (one per layer), got {mask.shape[0]}")
    return mask


class DecisionCounter:
    """Skipped (layer, token) FFN blocks, counted from an exported graph's ``skip_decisions`` output."""

    def __init__(self, num_layers: int) -> None:
        self.skipped_per_layer = np.zeros(num_layers)
        self.tokens = 0

    def add(self, decisions: np.ndarray) -> None:
        """Add one pass's decisions ``[num_layers, ...tokens]`` (batch and sequence axes flattened)."""
        flat = decisions.reshape(decisions.shape[0], -1)
        self.skipped_per_layer += flat.sum(axis=1)
        self.tokens += flat.shape[1]

    @property
    def ratio(self) -> float:
        total = self.tokens * len(self.skipped_per_layer)
        return float(self.skipped_per_layer.sum()) / total if total else 0.0

    def per_layer(self) -> list[float]:
        return (self.skipped_per_layer / max(self.tokens, 1)).tolist()


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
