"""The skippable FFN's inputs in the form every implementation takes: the FFN's and the stand-in's weights, and
the decisions (one per row, or one flag for every row)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..adapters import ArchAdapter
from ..errors import ConfigError
from ..standins import CoreStandIn, LowRankStandIn

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


class SubstituteWeights(NamedTuple):
    """A stand-in in the kernels' form: an inner step to width S, then ``t @ out.T + bias``. A rank-r stand-in
    (``linear``): ``t = x @ inner.T``; the FFN's own core neurons (``core``, a gated SwiGLU of S neurons):
    ``t = silu(x @ gate.T) * (x @ inner.T)``. Shapes: inner and gate ``[S, hidden]``, out ``[hidden, S]``, bias
    ``[hidden]``."""

    inner: Tensor
    out: Tensor
    bias: Tensor
    gate: Tensor | None = None

    @classmethod
    def of(cls, substitute: nn.Module | None, dtype: torch.dtype, device: torch.device) -> "SubstituteWeights | None":
        """The kernels' form of a layer's substitute: ``None`` (zeros) stays None, a stand-in gives its weights in
        `dtype` on `device`."""
        if substitute is None:
            return None
        if isinstance(substitute, LowRankStandIn):
            weights = (substitute.down.weight, substitute.up.weight, substitute.up.bias, None)
        elif isinstance(substitute, CoreStandIn):
            weights = (substitute.up.weight, substitute.down.weight, substitute.down.bias, substitute.gate.weight)
        else:
            raise ConfigError(f"the GPU decode path supports zero, linear and core stand-in substitutes, "
                              f"not {type(substitute).__name__}")
        return cls(*(w if w is None else w.detach().to(device=device, dtype=dtype).contiguous() for w in weights))

    @property
    def width(self) -> int:
        """S: the rank, or the number of core neurons."""
        return self.inner.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self if w is not None)


def flat_decisions(decisions: Tensor, rows: int) -> Tensor:
    """The decisions as one flat tensor of `rows` values, or of one value (the all-rows flag)."""
    flat = decisions.reshape(-1)
    if flat.numel() not in (1, rows):
        raise ValueError(f"decisions must hold 1 or {rows} values (one per row), not {flat.numel()}")
    return flat
