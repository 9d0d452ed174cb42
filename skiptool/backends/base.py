"""The protocol every decode backend implements (torch, onnxruntime, onnxruntime-genai, tensorrt, llama.cpp).

A backend holds one sequence's state (KV cache). ``prefill`` consumes the prompt and returns the logits of
its last position; ``step`` consumes one token and returns the next logits. The one decode loop over this
protocol is :func:`skiptool.generate.decode`, shared by ``generate``, ``eval`` and ``bench``.
"""

from __future__ import annotations

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
        """FFN skip ratio over the decode steps since the last reset, as measured by the backend's own
        per-layer decisions (None if the backend cannot see them)."""

    def per_layer_skip(self) -> list[float] | None:
        """Per layer, the share of decode-step tokens whose FFN was skipped (None if unknown)."""

    # Optional: ``block_logits(token_ids [n, seq]) -> logits [n, seq, vocab]`` from an empty cache in one pass,
    # with every position deciding as it would when decoding (evaluation and ``bench --quality`` use it).


def parse_skip_mask(skip_mask: Sequence[int], num_layers: int) -> np.ndarray:
    """A per-layer override (1 force skip, -1 force compute, 0 policy) as the graphs' int64 vector, or one
    clear error when its length is not the number of layers or a value is not -1, 0 or 1."""
    mask = np.asarray(skip_mask, dtype=np.int64).reshape(-1)
    if mask.shape[0] != num_layers:
        raise SkipToolError(f"skip_mask needs {num_layers} entries (one per layer), got {mask.shape[0]}")
    if not np.isin(mask, (-1, 0, 1)).all():
        raise SkipToolError("skip_mask values must be 1 (force skip), -1 (force compute) or 0 (policy)")
    return mask


class DecisionCounter:
    """Skipped (layer, token) FFN blocks, counted from a graph's ``skip_decisions`` output."""

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
