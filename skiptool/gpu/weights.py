"""The skippable FFN's inputs in the form every implementation takes: the FFN's and the stand-in's weights, and
the decisions (one per row, or one flag for every row)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..adapters import ArchAdapter
from ..errors import ConfigError
from ..standins import LowRankStandIn

SWIGLU_ACTIVATIONS = ("silu", "swish")


class FFNWeights(NamedTuple):
    """A SwiGLU FFN's weights as ``nn.Linear`` stores them: gate and up ``[intermediate, hidden]``, down
    ``[hidden, intermediate]``."""

    gate: Tensor
    up: Tensor
    down: Tensor

    @classmethod
    def of(cls, mlp: nn.Module, adapter: ArchAdapter, activation: str) -> "FFNWeights":
        """The weights of a model's MLP module (names from the adapter); refuses FFNs these kernels do not compute."""
        linears = [getattr(mlp, name) for name in adapter.mlp_linears]
        has_bias = any(lin.bias is not None for lin in linears)
        if activation not in SWIGLU_ACTIVATIONS or has_bias:
            raise ConfigError(f"the GPU decode path computes bias-free SwiGLU FFNs (silu); this model's FFN uses "
                              f"{activation!r}{' with biases' if has_bias else ''}")
        return cls(*(lin.weight for lin in linears))


class LowRankWeights(NamedTuple):
    """A rank-r stand-in ``x -> up @ (down @ x) + bias``: down ``[r, hidden]``, up ``[hidden, r]``, bias
    ``[hidden]``."""

    down: Tensor
    up: Tensor
    bias: Tensor

    @classmethod
    def of(cls, substitute: nn.Module | None, dtype: torch.dtype, device: torch.device) -> "LowRankWeights | None":
        """The kernels' form of a layer's substitute: ``None`` (zeros) stays None, a low-rank stand-in gives its
        weights in `dtype` on `device`."""
        if substitute is None:
            return None
        if not isinstance(substitute, LowRankStandIn):
            raise ConfigError(f"the GPU decode path supports zero and low-rank stand-in substitutes, "
                              f"not {type(substitute).__name__}")
        weights = (substitute.down.weight, substitute.up.weight, substitute.up.bias)
        return cls(*(w.detach().to(device=device, dtype=dtype).contiguous() for w in weights))

    @property
    def nbytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self)


def flat_decisions(decisions: Tensor, rows: int) -> Tensor:
    """The decisions as one flat tensor of `rows` values, or of one value (the all-rows flag)."""
    flat = decisions.reshape(-1)
    if flat.numel() not in (1, rows):
        raise ValueError(f"decisions must hold 1 or {rows} values (one per row), not {flat.numel()}")
    return flat
