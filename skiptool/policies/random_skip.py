"""``random``: a baseline that skips tokens' FFNs at random (not exportable)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..config import SkipConfig
from ..errors import ConfigError
from .base import LayerSignals, PolicyParams, SkipPolicy, is_int, is_number, shape_of
from .registry import register_policy


@dataclass(frozen=True)
class RandomParams(PolicyParams):
    rate: float
    seed: int = 0

    def check(self, config: SkipConfig) -> None:
        if not is_number(self.rate) or not 0 <= self.rate <= 1:
            raise ConfigError("random policy needs rate in [0, 1]")
        if not is_int(self.seed):
            raise ConfigError("random policy seed must be an integer")


@register_policy
class RandomSkip(SkipPolicy):
    """Baseline: each token's FFN in a skippable layer is skipped with probability `rate`."""

    kind = "random"
    Params = RandomParams
    exportable = False  # its decisions are random draws, not a function of the graph's tensors

    def __init__(self, num_layers: int, skippable_layers: list[int], warmup: int, rate: float, seed: int = 0) -> None:
        super().__init__(num_layers, skippable_layers, warmup)
        self.rate = float(rate)
        self.generator = torch.Generator().manual_seed(int(seed))

    @classmethod
    def from_config(cls, config: SkipConfig, params: Any) -> "RandomSkip":
        return cls(**shape_of(config), rate=params.rate, seed=params.seed)

    def score(self, s: LayerSignals, state: Tensor | None) -> Tensor:
        draw = torch.rand(s.x.shape[:2], generator=self.generator)
        return torch.where(draw < self.rate, 1.0, -1.0).to(s.x.device)
