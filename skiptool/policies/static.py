"""``static``: always skip the FFNs of a fixed set of layers (after warm-up)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..config import SkipConfig
from ..errors import ConfigError
from .base import LayerSignals, PolicyParams, SkipPolicy, is_int, shape_of
from .registry import register_policy


@dataclass(frozen=True)
class StaticParams(PolicyParams):
    skip_layers: list[int]

    def check(self, config: SkipConfig) -> None:
        n = config.model.num_layers
        if not isinstance(self.skip_layers, list) or not all(is_int(i) and 0 <= i < n for i in self.skip_layers):
            raise ConfigError(f"static policy needs skip_layers: a list of layer indices below {n}")
        cold = sorted(set(self.skip_layers) - set(config.skippable_layers))
        if cold:
            raise ConfigError(f"static policy: layers {cold} are cold (never skipped); skippable layers are "
                              f"{config.skippable_layers[0]}-{config.skippable_layers[-1]}")


@register_policy
class StaticMask(SkipPolicy):
    """Always skip the FFNs of a fixed set of layers (after warm-up)."""

    kind = "static"
    Params = StaticParams

    def __init__(self, num_layers: int, skippable_layers: list[int], warmup: int, skip_layers: list[int]) -> None:
        super().__init__(num_layers, skippable_layers, warmup)
        mask = torch.zeros(num_layers, dtype=torch.bool)
        mask[[i for i in skip_layers if i in self.skippable_layers]] = True
        self.register_buffer("mask", mask, persistent=False)

    @classmethod
    def from_config(cls, config: SkipConfig, params: Any) -> "StaticMask":
        return cls(**shape_of(config), skip_layers=params.skip_layers)

    def score(self, s: LayerSignals, state: Tensor | None) -> Tensor:
        return torch.where(self.mask[s.layer], 1.0, -1.0).expand(s.x.shape[:2])

    def rule_all(self, positions: Tensor) -> Tensor | None:
        if not self.keeps_rule_of(StaticMask):
            return None
        return self.mask.view(-1, 1, 1).expand(self.num_layers, *positions.shape)
