"""Closed-form stand-ins, fitted on dense forward passes over calibration blocks (no training).

Hooks that are always removed record, per skippable layer and for the tokens past the warm-up, what each kind
needs (:data:`FITTERS`, one function per stand-in kind):

- ``linear``: first and second moments of the FFN's input ``x`` and output ``y``; the map is the reduced-rank
  least-squares fit of ``y`` on ``x``.
- ``core``: two passes. The first scores each neuron by mean ``|a_i|`` times the norm of its down-projection
  column (``a`` = the FFN's intermediate activation, the down projection's input) and keeps the top k; the
  second accumulates the moments of those k activations against ``y``, and the down projection (with a bias)
  is refitted by least squares so the k neurons alone best reproduce the full FFN's output.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from ..adapters import ArchAdapter
from ..errors import ConfigError
from ..policies import block_positions, is_warm
from ..registry import Registry
from ..standins import StandIns, StandInSpec, reduced_rank_fit

Recorder = Callable[[int, Tensor, Tensor, Tensor], None]  # (layer, x, a, y) of the warm tokens


class MomentAccumulator:
    """Running sums for E[x], E[y], E[x x^T], E[x y^T] (float64)."""

    def __init__(self, dim: int, out_dim: int | None = None) -> None:
        out = out_dim or dim
        self.n = 0
        self.sx = torch.zeros(dim, dtype=torch.float64)
        self.sy = torch.zeros(out, dtype=torch.float64)
        self.sxx = torch.zeros(dim, dim, dtype=torch.float64)
        self.sxy = torch.zeros(dim, out, dtype=torch.float64)

    def add(self, x: Tensor, y: Tensor) -> None:
        """Add a batch of rows (products in float32 per batch, sums kept in float64)."""
        x, y = x.reshape(-1, x.shape[-1]).float(), y.reshape(-1, y.shape[-1]).float()
        self.n += x.shape[0]
        self.sx += x.sum(0).double().cpu()
        self.sy += y.sum(0).double().cpu()
        self.sxx += (x.T @ x).double().cpu()
        self.sxy += (x.T @ y).double().cpu()

    def means(self) -> tuple[Tensor, Tensor]:
        """(mean_x, mean_y)."""
        return self.sx / self.n, self.sy / self.n

    def centred(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(mean_x, mean_y, cov_xx, cov_xy)."""
        mx, my = self.means()
        return mx, my, self.sxx / self.n - torch.outer(mx, mx), self.sxy / self.n - torch.outer(mx, my)


@contextmanager
def _recording(model: nn.Module, adapter: ArchAdapter, layers: list[int], warm: list[Tensor],
               record: Recorder) -> Iterator[None]:
    """Call ``record(layer, x, a, y)`` for each listed layer's MLP on the tokens `warm[0]` marks (set before each
    forward): its input, its intermediate activation (the down projection's input) and its output."""
    handles, seen = [], {}
    down_name = adapter.mlp_linears[-1]
    decoder = adapter.decoder_layers(model)

    def keep_activation(index: int) -> Callable[..., None]:
        return lambda module, inputs: seen.__setitem__(index, inputs[0])

    def finish(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            mask = warm[0]
            record(index, inputs[0][mask], seen.pop(index)[mask], output[mask])
        return hook

    try:
        for i in layers:
            mlp = adapter.mlp_of(decoder[i])
            handles.append(getattr(mlp, down_name).register_forward_pre_hook(keep_activation(i)))
            handles.append(mlp.register_forward_hook(finish(i)))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _dense_pass(model: nn.Module, adapter: ArchAdapter, blocks: Tensor, layers: list[int], warmup: int,
                record: Recorder, progress: Callable[[int], Any] | None = None) -> None:
    """Run `blocks` one by one through the decoder stack (no LM head), recording the listed layers' MLPs; calls
    ``progress(blocks done)``."""
    device = next(model.parameters()).device
    body = getattr(model, "model", model)
    warm: list[Tensor] = [torch.zeros(0, dtype=torch.bool)]
    with _recording(model, adapter, layers, warm, record):
        for b in range(blocks.shape[0]):
            ids = blocks[b:b + 1].to(device)
            positions = block_positions(ids)
            warm[0] = is_warm(positions, warmup)
            body(input_ids=ids, position_ids=positions)
            if progress is not None:
                progress(b + 1)


BlockProgress = Callable[[int, int], Any]  # (blocks done, blocks in all) over every pass of a fit
Fitter = Callable[[nn.Module, ArchAdapter, Tensor, list[int], int, int, BlockProgress | None], StandIns]


def _pass_progress(progress: BlockProgress | None, blocks: Tensor, index: int, passes: int) -> Callable[[int], Any] | None:
    """Pass `index` of `passes` over `blocks`, reported as blocks done over all passes."""
    n = int(blocks.shape[0])
    return None if progress is None else (lambda done: progress(index * n + done, passes * n))
FITTERS: Registry[Fitter] = Registry("stand-in kind")


@FITTERS.add("linear")
def fit_linear(model: nn.Module, adapter: ArchAdapter, blocks: Tensor, layers: list[int], rank: int,
               warmup: int, progress: BlockProgress | None = None) -> StandIns:
    """Reduced-rank least squares of each FFN's output on its input."""
    hidden = int(model.config.hidden_size)
    acc = {i: MomentAccumulator(hidden) for i in layers}
    _dense_pass(model, adapter, blocks, layers, warmup, lambda i, x, a, y: acc[i].add(x, y),
                _pass_progress(progress, blocks, 0, 1))
    standins = StandIns(hidden, rank, layers, "linear", int(model.config.intermediate_size))
    for i in layers:
        mx, my, cxx, cxy = acc[i].centred()
        down, up, bias = reduced_rank_fit(cxx, cxy, mx, my, rank)
        m = standins.maps[str(i)]
        m.down.weight.data.copy_(down)
        m.up.weight.data.copy_(up)
        m.up.bias.data.copy_(bias)
    return standins


@FITTERS.add("core")
def fit_core(model: nn.Module, adapter: ArchAdapter, blocks: Tensor, layers: list[int], k: int,
             warmup: int, progress: BlockProgress | None = None) -> StandIns:
    """Each FFN's top-k neurons (mean |activation| x down-column norm), down projection refitted to the FFN."""
    decoder, (gate_name, up_name, down_name) = adapter.decoder_layers(model), adapter.mlp_linears
    mlps = {i: adapter.mlp_of(decoder[i]) for i in layers}
    magnitude = {i: torch.zeros(getattr(mlps[i], down_name).in_features, dtype=torch.float64) for i in layers}

    def score(i: int, x: Tensor, a: Tensor, y: Tensor) -> None:
        magnitude[i] += a.float().abs().sum(0).double().cpu()

    _dense_pass(model, adapter, blocks, layers, warmup, score, _pass_progress(progress, blocks, 0, 2))
    chosen = {i: (magnitude[i] * getattr(mlps[i], down_name).weight.detach().double().cpu().norm(dim=0)).topk(k).indices
              for i in layers}
    acc = {i: MomentAccumulator(k, int(model.config.hidden_size)) for i in layers}
    _dense_pass(model, adapter, blocks, layers, warmup, lambda i, x, a, y: acc[i].add(a[:, chosen[i].to(a.device)], y),
                _pass_progress(progress, blocks, 1, 2))
    standins = StandIns(int(model.config.hidden_size), k, layers, "core", int(model.config.intermediate_size))
    for i in layers:
        idx = chosen[i]
        own = getattr(mlps[i], down_name).weight.detach()[:, idx].T.double().cpu()  # the kept neurons' own columns
        down = refit_down(acc[i], own).float()  # [k, hidden]: y - my ≈ (a_k - mx) @ down
        mx, my = acc[i].means()
        m = standins.maps[str(i)]
        m.gate.weight.data.copy_(getattr(mlps[i], gate_name).weight.detach()[idx].float().cpu())
        m.up.weight.data.copy_(getattr(mlps[i], up_name).weight.detach()[idx].float().cpu())
        m.down.weight.data.copy_(down.T)
        m.down.bias.data.copy_((my.double() - mx.double() @ down.double()).float())
    return standins


def refit_down(acc: MomentAccumulator, own: Tensor) -> Tensor:
    """The least-squares down projection of the kept neurons, shrunk towards their own columns `own` by a ridge that
    matters only when tokens are few next to the neurons: ``(k / n)^2`` of the activations' mean variance (1 with
    as many tokens as neurons, 0.0007 for 96 neurons on 3,600 tokens). Without it a fit on a few tokens
    interpolates them and the stand-in is worse than none."""
    _, _, caa, cay = acc.centred()
    k = caa.shape[0]
    ridge = caa.diagonal().mean().clamp(min=1e-12) * (1e-4 + (k / max(acc.n, 1)) ** 2)
    return torch.linalg.solve(caa + ridge * torch.eye(k, dtype=caa.dtype), cay + ridge * own)


def fit_standins(model: nn.Module, adapter: ArchAdapter, blocks: Tensor, layers: list[int], rank: int,
                 warmup: int = 0, kind: str = "linear", progress: BlockProgress | None = None) -> StandIns:
    """Closed-form stand-ins of `kind` and size `rank` for each layer in `layers`, from dense passes over `blocks`
    (``progress(blocks done, blocks in all)`` after each block)."""
    if warmup >= blocks.shape[1]:
        raise ConfigError(f"warm-up ({warmup}) covers the whole {blocks.shape[1]}-token block: no tokens to fit "
                          "stand-ins on (use a longer --seq-len)")
    StandInSpec(kind, rank).check(int(model.config.hidden_size), int(model.config.intermediate_size))
    if kind == "core" and getattr(model.config, "hidden_act", "silu") != "silu":
        raise ConfigError(f"core stand-ins copy SwiGLU neurons; this model's FFN uses {model.config.hidden_act}")
    device = next(model.parameters()).device
    return FITTERS.get(kind)(model, adapter, blocks, layers, rank, warmup, progress).to(device)
