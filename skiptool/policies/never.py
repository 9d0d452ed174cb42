"""``none``: the FFN always runs (dense; with an override, forced layers skip)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import PolicyParams, SkipPolicy
from .registry import register_policy


@register_policy
class NeverSkip(SkipPolicy):
    """Dense: the FFN always runs (useful with a forced override)."""

    kind = "none"
    Params = PolicyParams

    def rule_all(self, positions: Tensor) -> Tensor | None:
        if not self.keeps_rule_of(NeverSkip):
            return None
        return torch.zeros((self.num_layers, *positions.shape), dtype=torch.bool, device=positions.device)
