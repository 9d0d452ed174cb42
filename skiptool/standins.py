"""Stand-ins: a tiny low-rank map that replaces a skipped FFN's output instead of adding nothing.

For a skippable layer, ``standin(x) = up(down(x))`` with ``down: hidden -> rank`` and
``up: rank -> hidden`` (with bias) estimates ``FFN(x)`` from the FFN's own normalised input ``x``.
When the runtime skips that FFN for a token it adds the stand-in's output to the residual stream.
Its cost is ``2 * hidden * rank`` multiply-adds per token, against ``3 * hidden * intermediate`` for the FFN.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .fileio import read_safetensors, save_safetensors_atomic

DEFAULT_RANK = 16  # the default of calibrate --stand-in, train-router --stand-in and eval's stand-in curves


def check_rank(rank: int, hidden_size: int) -> None:
    """A stand-in's rank must be in [1, hidden size] (a clear error otherwise)."""
    if not 1 <= rank <= hidden_size:
        raise ConfigError(f"stand-in rank must be between 1 and the hidden size {hidden_size} (got {rank})")


class LowRankStandIn(nn.Module):
    """``x -> up(down(x))``: a rank-`rank` linear estimate of one layer's FFN output."""

    def __init__(self, hidden_size: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, hidden_size, bias=True)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @property
    def rank(self) -> int:
        return self.down.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype))).to(x.dtype)


class StandIns(nn.Module):
    """One :class:`LowRankStandIn` per skippable layer, saved and loaded as one safetensors file."""

    def __init__(self, hidden_size: int, rank: int, layers: list[int]) -> None:
        super().__init__()
        check_rank(rank, hidden_size)
        self.hidden_size, self.rank_, self.layers = hidden_size, rank, list(layers)
        self.maps = nn.ModuleDict({str(i): LowRankStandIn(hidden_size, rank) for i in self.layers})

    def by_layer(self) -> dict[int, nn.Module]:
        """The substitutes to hand to :func:`skiptool.runtime.apply_skip`."""
        return {i: self.maps[str(i)] for i in self.layers}

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def cost(self, intermediate_size: int) -> dict[str, float]:
        """Per-layer, per-token cost of a stand-in next to the FFN it replaces (fp32 bytes)."""
        standin = 2 * self.hidden_size * self.rank_ + self.hidden_size
        ffn = 3 * self.hidden_size * intermediate_size
        return {"standin_params": standin, "ffn_params": ffn, "standin_flops": 2 * standin, "ffn_flops": 2 * ffn,
                "standin_bytes": 4 * standin, "ffn_bytes": 4 * ffn, "fraction_of_ffn": standin / ffn}

    def save(self, path: str | Path) -> Path:
        """Write atomically as safetensors with the shape metadata that :meth:`load` checks."""
        tensors = {f"layers.{k}": v.detach().cpu().contiguous() for k, v in self.maps.state_dict().items()}
        meta = {"hidden_size": str(self.hidden_size), "rank": str(self.rank_), "layers": ",".join(map(str, self.layers))}
        return save_safetensors_atomic(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path, hidden_size: int, layers: list[int], rank: int | None = None) -> "StandIns":
        """Read stand-ins, refusing a file made for another hidden size, rank or set of layers."""
        raw, meta = read_safetensors(path, "stand-in weights")
        tensors = {k.split(".", 1)[1]: v for k, v in raw.items()}
        try:
            file_rank = int(meta["rank"])
            file_hidden = int(meta["hidden_size"])
            file_layers = [int(i) for i in meta["layers"].split(",") if i]
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"cannot read stand-in weights {path}: {str(exc).splitlines()[0]}") from None
        if file_hidden != hidden_size or file_layers != list(layers) or (rank is not None and rank != file_rank):
            raise ConfigError(f"stand-in weights {path} do not match: hidden size {file_hidden} vs {hidden_size}, "
                              f"rank {file_rank} vs {rank}, layers {file_layers} vs {list(layers)}")
        standins = cls(hidden_size, file_rank, layers)
        try:
            standins.maps.load_state_dict(tensors)
        except RuntimeError as exc:
            raise ConfigError(f"stand-in weights {path} have the wrong shapes: {str(exc).splitlines()[0]}") from None
        return standins


def reduced_rank_fit(sxx: Tensor, sxy: Tensor, mean_x: Tensor, mean_y: Tensor, rank: int,
                     ridge: float = 1e-4) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form reduced-rank regression of y on x from centred second moments.

    ``sxx = E[(x-mx)(x-mx)^T]`` and ``sxy = E[(x-mx)(y-my)^T]``. The full least-squares map is
    ``W = (sxx + ridge*I)^-1 sxy``; the best rank-r map keeps W's projection on the top-r
    eigenvectors ``V`` of the fitted outputs' covariance ``W^T sxx W``. Returns ``(down, up, bias)``
    with ``y ≈ up @ (down @ x) + bias``: ``down = (W V)^T``, ``up = V``, ``bias = my - up @ down @ mx``.
    """
    sxx, sxy = sxx.double(), sxy.double()
    eye = torch.eye(sxx.shape[0], dtype=sxx.dtype)
    scale = sxx.diagonal().mean().clamp(min=1e-12)
    w = torch.linalg.solve(sxx + ridge * scale * eye, sxy)
    fitted_cov = w.T @ sxx @ w
    fitted_cov = (fitted_cov + fitted_cov.T) / 2
    _, vecs = torch.linalg.eigh(fitted_cov)
    v = vecs[:, -rank:].flip(-1)
    down, up = (w @ v).T, v
    bias = mean_y.double() - up @ (down @ mean_x.double())
    return down.float(), up.float(), bias.float()
