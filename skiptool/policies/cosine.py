"""``cosine``: FFN-SkipLLM's greedy rule on the saturation cos(h, h + FFN(h))."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..config import SkipConfig
from ..errors import ConfigError
from .base import LayerSignals, PolicyParams, SkipPolicy, is_int, is_number, shape_of
from .registry import register_policy


def saturation(h: Tensor, delta: Tensor) -> Tensor:
    """FFN-SkipLLM's saturation signal cos(h, h + delta), per token (float32)."""
    h32, d32 = h.float(), delta.float()
    return torch.nn.functional.cosine_similarity(h32, h32 + d32, dim=-1, eps=1e-6)


@dataclass(frozen=True)
class CosineParams(PolicyParams):
    thresholds: list[float | None]
    greedy_k: int = 1

    def check(self, config: SkipConfig) -> None:
        n = config.model.num_layers
        if not isinstance(self.thresholds, list) or len(self.thresholds) != n:
            raise ConfigError(f"cosine policy needs {n} thresholds (one per layer, null for cold layers)")
        if not all(t is None or (is_number(t) and -1.01 <= t <= 1.0) for t in self.thresholds):
            raise ConfigError("cosine thresholds must be cosines (numbers in [-1, 1]) or null")
        if not is_int(self.greedy_k) or self.greedy_k < 1:
            raise ConfigError("cosine greedy_k must be a positive integer")


@register_policy
class CosineGreedy(SkipPolicy):
    """FFN-SkipLLM's greedy rule.

    After an FFN that ran at layer ``l`` leaves the residual stream saturated —
    ``cos(h, h + FFN(h)) > threshold[l]`` — the FFNs of the next ``greedy_k`` layers are skipped;
    the next FFN that runs is evaluated again. The carried state is, per token, how many of the
    following layers are still to be skipped.
    """

    kind = "cosine"
    Params = CosineParams

    def __init__(self, num_layers: int, skippable_layers: list[int], warmup: int,
                 thresholds: list[float | None], greedy_k: int = 1) -> None:
        super().__init__(num_layers, skippable_layers, warmup)
        th = torch.tensor([math.inf if t is None else float(t) for t in thresholds], dtype=torch.float32)
        self.register_buffer("thresholds", th, persistent=False)
        self.greedy_k = int(greedy_k)

    @classmethod
    def from_config(cls, config: SkipConfig, params: Any) -> "CosineGreedy":
        return cls(**shape_of(config), thresholds=params.thresholds, greedy_k=params.greedy_k)

    def init_state(self, h: Tensor) -> Tensor:
        return torch.zeros(h.shape[:2], dtype=torch.int64, device=h.device)

    def score(self, s: LayerSignals, state: Tensor | None) -> Tensor:
        return torch.where(state > 0, 1.0, -1.0)

    def update(self, layer: int, h_mid: Tensor, delta: Tensor, skip: Tensor, state: Tensor | None) -> Tensor:
        saturated = saturation(h_mid, delta) > self.thresholds[layer]
        fresh = torch.where(saturated, self.greedy_k, 0)
        skipped = skip if skip.dtype == torch.bool else skip > 0.5
        return torch.where(skipped, (state - 1).clamp(min=0), fresh)
