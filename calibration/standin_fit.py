"""Closed-form stand-ins: reduced-rank least squares of each FFN's output on its normalised input.

One dense pass over calibration blocks accumulates, per skippable layer, the first and second moments
of the FFN's input ``x`` and output ``y`` (tokens after warm-up only), through forward hooks on the
MLPs that are always removed. No training: each layer's map is solved in closed form.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from ..adapters import ArchAdapter
from ..errors import ConfigError
from ..policies import block_positions, is_warm
from ..standins import StandIns, check_rank, reduced_rank_fit


class MomentAccumulator:
    """Running sums for E[x], E[y], E[x x^T], E[x y^T] (float64)."""

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.sx = torch.zeros(dim, dtype=torch.float64)
        self.sy = torch.zeros(dim, dtype=torch.float64)
        self.sxx = torch.zeros(dim, dim, dtype=torch.float64)
        self.sxy = torch.zeros(dim, dim, dtype=torch.float64)

    def add(self, x: Tensor, y: Tensor) -> None:
        """Add a batch of rows (products in float32 per batch, sums kept in float64)."""
        x, y = x.reshape(-1, x.shape[-1]).float(), y.reshape(-1, y.shape[-1]).float()
        self.n += x.shape[0]
        self.sx += x.sum(0).double().cpu()
        self.sy += y.sum(0).double().cpu()
        self.sxx += (x.T @ x).double().cpu()
        self.sxy += (x.T @ y).double().cpu()

    def centred(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(mean_x, mean_y, cov_xx, cov_xy)."""
        mx, my = self.sx / self.n, self.sy / self.n
        return mx, my, self.sxx / self.n - torch.outer(mx, mx), self.sxy / self.n - torch.outer(mx, my)


@contextmanager
def _mlp_moments(model: nn.Module, adapter: ArchAdapter, layers: list[int], warm: list[Tensor],
                 acc: dict[int, MomentAccumulator]) -> Iterator[None]:
    """Accumulate each MLP's input/output moments over the tokens `warm[0]` marks (set before each forward)."""
    handles = []

    def hook_for(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            acc[index].add(inputs[0][warm[0]], output[warm[0]])
        return hook

    decoder = adapter.decoder_layers(model)
    try:
        for i in layers:
            handles.append(adapter.mlp_of(decoder[i]).register_forward_hook(hook_for(i)))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def fit_standins(model: nn.Module, adapter: ArchAdapter, blocks: Tensor, layers: list[int], rank: int,
                 warmup: int = 0, progress: Callable[[int], Any] | None = None) -> StandIns:
    """Fit a rank-`rank` stand-in for each layer in `layers` from dense forward passes over `blocks`."""
    if warmup >= blocks.shape[1]:
        raise ConfigError(f"warm-up ({warmup}) covers the whole {blocks.shape[1]}-token block: no tokens to fit "
                          "stand-ins on (use a longer --seq-len)")
    hidden = int(model.config.hidden_size)
    check_rank(rank, hidden)
    acc = {i: MomentAccumulator(hidden) for i in layers}
    device = next(model.parameters()).device
    warm: list[Tensor] = [torch.zeros(0, dtype=torch.bool)]
    with _mlp_moments(model, adapter, layers, warm, acc):
        for b in range(blocks.shape[0]):
            ids = blocks[b:b + 1].to(device)
            positions = block_positions(ids)
            warm[0] = is_warm(positions, warmup)
            model(ids, position_ids=positions)
            if progress is not None:
                progress(b + 1)
    standins = StandIns(hidden, rank, layers)
    for i in layers:
        mx, my, cxx, cxy = acc[i].centred()
        down, up, bias = reduced_rank_fit(cxx, cxy, mx, my, rank)
        m = standins.maps[str(i)]
        m.down.weight.data.copy_(down)
        m.up.weight.data.copy_(up)
        m.up.bias.data.copy_(bias)
    return standins.to(device)
