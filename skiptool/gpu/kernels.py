"""One skippable SwiGLU FFN, ``down(silu(gate(x)) * up(x))``, with its decisions read from device memory.

Semantics (shared by every implementation here): ``x`` is ``[..., hidden]`` (its rows are the batch's tokens);
``decisions`` holds one value per row (non-zero: that row skips) or a single value for every row (the layer's
*all-skip* flag). Rows that skip get the substitute — zeros, or a stand-in (:class:`SubstituteWeights`: rank-r
``out @ (inner @ x) + bias``, or the FFN's own core neurons ``out @ (silu(gate @ x) * (inner @ x)) + bias``) — and
the other rows the FFN's output.

- :func:`skippable_ffn` picks the implementation: the Triton kernels on CUDA (:mod:`.triton_ffn`: a fixed grid
  whose blocks return at once when all their rows skip, so no decision is read on the host and a whole decode
  step can be one CUDA graph), the PyTorch reference elsewhere.
- :func:`reference_skippable_ffn` is that reference: branch-free (``torch.where``), so it is the CPU fallback, the
  tests' oracle, and still graph-capturable on a GPU without Triton (it saves nothing there).
- :func:`gathered_skippable_ffn` saves work eagerly (prefill, large batches): it counts the skipping rows on the
  host and sends only the others through the FFN.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from .weights import FFNWeights, SubstituteWeights, flat_decisions


def row_decisions(decisions: Tensor, rows: int) -> Tensor:
    """``[rows]`` bool from per-row decisions or one all-rows flag (any dtype; non-zero means skip)."""
    return flat_decisions(decisions, rows).ne(0).expand(rows)


def swiglu(x: Tensor, ffn: FFNWeights) -> Tensor:
    """The FFN itself, as Hugging Face's Llama MLP computes it."""
    return F.linear(F.silu(F.linear(x, ffn.gate)) * F.linear(x, ffn.up), ffn.down)


def substitute_output(x: Tensor, substitute: SubstituteWeights | None) -> Tensor:
    """What a skipped FFN adds instead: zeros, or the stand-in's estimate (low-rank or core)."""
    if substitute is None:
        return torch.zeros_like(x)
    inner = F.linear(x, substitute.inner)
    if substitute.gate is not None:
        inner = F.silu(F.linear(x, substitute.gate)) * inner
    return F.linear(inner, substitute.out, substitute.bias)


def reference_skippable_ffn(x: Tensor, ffn: FFNWeights, decisions: Tensor,
                            substitute: SubstituteWeights | None = None) -> Tensor:
    """The semantics in plain PyTorch, branch-free: every row's FFN and substitute, merged by its decision."""
    skip = row_decisions(decisions, x[..., 0].numel()).view(*x.shape[:-1], 1)
    return torch.where(skip, substitute_output(x, substitute), swiglu(x, ffn))


def gathered_skippable_ffn(x: Tensor, ffn: FFNWeights, decisions: Tensor,
                           substitute: SubstituteWeights | None = None) -> Tensor:
    """The same semantics, eager: only the rows that compute go through the FFN (reads them on the host)."""
    flat = x.reshape(-1, x.shape[-1])
    keep = (~row_decisions(decisions, flat.shape[0])).nonzero().squeeze(-1)
    out = substitute_output(flat, substitute)
    if keep.numel():
        out = out.index_copy(0, keep, swiglu(flat.index_select(0, keep), ffn))
    return out.view_as(x)


def skippable_ffn(x: Tensor, ffn: FFNWeights, decisions: Tensor, substitute: SubstituteWeights | None = None) -> Tensor:
    """The skippable FFN on `x`'s device: Triton kernels on CUDA (when Triton imports), the reference elsewhere."""
    if kernel_backend(x.device) == "triton":
        from .triton_ffn import triton_skippable_ffn

        return triton_skippable_ffn(x, ffn, decisions, substitute)
    return reference_skippable_ffn(x, ffn, decisions, substitute)


def kernel_backend(device: torch.device | str) -> str:
    """``"triton"`` where :func:`skippable_ffn` runs the kernels, ``"torch"`` where it runs the reference."""
    return "triton" if torch.device(device).type == "cuda" and triton_available() else "torch"


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports (it is optional: only the CUDA kernels need it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
