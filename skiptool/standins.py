"""Stand-ins: what a skipped FFN adds to the residual stream instead of its own output.

A stand-in reads the FFN's own normalised input ``x`` and estimates ``FFN(x)`` at a fraction of its weight bytes.
Kinds (one class each, registered in :data:`STANDIN_KINDS`; the closed-form fits live in
:mod:`skiptool.calibration.standin_fit`):

- ``linear`` (size = rank r): ``up(down(x))`` with ``down: hidden -> r``, ``up: r -> hidden`` (+ bias);
  ``2 * hidden * r + hidden`` weights.
- ``core`` (size = k neurons): the FFN's own k most important neurons, ``down_k(silu(gate_k x) * up_k x)`` (+ bias),
  with the down projection refitted against the full FFN's output; ``3 * hidden * k + hidden`` weights.

What skipping saves is counted in FFN weight bytes: a skipped FFN whose stand-in holds a share ``f`` of the FFN's
weights saves ``1 - f`` of them (:func:`saved_per_skip`), so stand-ins of different sizes compare fairly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import DEFAULT_STANDIN
from .errors import ConfigError
from .fileio import read_safetensors, save_safetensors_atomic
from .registry import Registry

RANK_KIND = "linear"  # the kind a bare size names ("16" is linear:16), and the kind of files written before kinds
AUTO_SIZE = "auto"  # KIND:auto is the kind's default size for the model (StandIn.default_size)


class StandIn(nn.Module):
    """One layer's stand-in: ``forward(x) -> estimate of FFN(x)``; subclasses define the shape."""

    kind: ClassVar[str]
    size_name: ClassVar[str] = "size"  # what the size counts

    def __init__(self, hidden_size: int, size: int, intermediate_size: int | None = None) -> None:
        super().__init__()
        self.hidden_size, self.size = hidden_size, size
        self.intermediate_size = intermediate_size if intermediate_size is not None else hidden_size

    @classmethod
    def max_size(cls, hidden_size: int, intermediate_size: int) -> int:
        """The largest meaningful size (a larger one costs as much as the FFN)."""
        raise NotImplementedError

    @classmethod
    def weights_for(cls, hidden_size: int, size: int) -> int:
        """How many weights a stand-in of this kind and size holds."""
        raise NotImplementedError

    @classmethod
    def default_size(cls, hidden_size: int, intermediate_size: int) -> int:
        """The size ``KIND:auto`` means for a model of these sizes."""
        raise NotImplementedError

    def weight_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


STANDIN_KINDS: Registry[type[StandIn]] = Registry("stand-in kind")


@STANDIN_KINDS.add("linear")
class LowRankStandIn(StandIn):
    """``x -> up(down(x))``: a rank-`size` linear estimate of one layer's FFN output."""

    kind = "linear"
    size_name = "rank"

    def __init__(self, hidden_size: int, size: int, intermediate_size: int | None = None) -> None:
        super().__init__(hidden_size, size, intermediate_size)
        self.down = nn.Linear(hidden_size, size, bias=False)
        self.up = nn.Linear(size, hidden_size, bias=True)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @classmethod
    def max_size(cls, hidden_size: int, intermediate_size: int) -> int:
        return hidden_size

    @classmethod
    def weights_for(cls, hidden_size: int, size: int) -> int:
        return 2 * hidden_size * size + hidden_size

    @classmethod
    def default_size(cls, hidden_size: int, intermediate_size: int) -> int:
        return min(16, hidden_size)

    @property
    def rank(self) -> int:
        return self.size

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype))).to(x.dtype)


@STANDIN_KINDS.add("core")
class CoreStandIn(StandIn):
    """The FFN's own `size` most important neurons (SwiGLU), with a bias: ``down(silu(gate(x)) * up(x))``."""

    kind = "core"
    size_name = "neuron count"

    def __init__(self, hidden_size: int, size: int, intermediate_size: int | None = None) -> None:
        super().__init__(hidden_size, size, intermediate_size)
        self.gate = nn.Linear(hidden_size, size, bias=False)
        self.up = nn.Linear(hidden_size, size, bias=False)
        self.down = nn.Linear(size, hidden_size, bias=True)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    @classmethod
    def max_size(cls, hidden_size: int, intermediate_size: int) -> int:
        return intermediate_size

    @classmethod
    def weights_for(cls, hidden_size: int, size: int) -> int:
        return 3 * hidden_size * size + hidden_size

    @classmethod
    def default_size(cls, hidden_size: int, intermediate_size: int) -> int:
        return max(1, intermediate_size // 16)  # 96 of SmolLM2-135M's 1536 neurons: ~6 % of the FFN's weights

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.to(self.gate.weight.dtype)
        return self.down(F.silu(self.gate(x32)) * self.up(x32)).to(x.dtype)


@dataclass(frozen=True)
class StandInSpec:
    """A stand-in kind and size, as ``--stand-in`` takes it: ``KIND:SIZE``, ``KIND:auto`` (size None until
    :meth:`sized` for a model), or a bare rank for ``linear``."""

    kind: str = DEFAULT_STANDIN.partition(":")[0]
    size: int | None = None

    @classmethod
    def parse(cls, text: str) -> "StandInSpec | None":
        """``"core:96"``, ``"core:auto"``, ``"linear:16"``, ``"16"`` (linear), ``"0"`` or ``"none"`` (None)."""
        text = text.strip()
        if text in ("0", "none"):
            return None
        kind, _, size = text.rpartition(":") if ":" in text else (RANK_KIND, "", text)
        STANDIN_KINDS.get(kind)
        if size == AUTO_SIZE:
            return cls(kind, None)
        try:
            value = int(size)
        except ValueError:
            raise ConfigError(f"--stand-in must be KIND:SIZE (e.g. core:96, linear:16), KIND:auto, a rank, or none "
                              f"(got {text!r})") from None
        if value < 1:
            raise ConfigError(f"stand-in size must be at least 1 (got {value}); use none for no stand-in")
        return cls(kind, value)

    def __str__(self) -> str:
        return f"{self.kind}:{AUTO_SIZE if self.size is None else self.size}"

    def sized(self, hidden_size: int, intermediate_size: int) -> "StandInSpec":
        """This spec with its size settled for a model of these sizes (``auto`` resolved), checked to fit."""
        spec = self if self.size is not None else StandInSpec(
            self.kind, STANDIN_KINDS.get(self.kind).default_size(hidden_size, intermediate_size))
        spec.check(hidden_size, intermediate_size)
        return spec

    def check(self, hidden_size: int, intermediate_size: int) -> None:
        """One clear error unless the size fits the model."""
        cls = STANDIN_KINDS.get(self.kind)
        limit = cls.max_size(hidden_size, intermediate_size)
        if self.size is None or not 1 <= self.size <= limit:
            raise ConfigError(f"a {self.kind} stand-in's {cls.size_name} must be between 1 and {limit} for this model "
                              f"(got {self.size})")

    @property
    def known_size(self) -> int:
        """The size; a spec still at ``auto`` is a programming error here (call :meth:`sized` first)."""
        if self.size is None:
            raise ValueError(f"stand-in {self} used before sized() for a model")
        return self.size


def sized_standin(spec: StandInSpec | None, model: nn.Module) -> StandInSpec | None:
    """`spec` with its size settled for `model` (``auto`` resolved) and checked to fit; None stays None."""
    if spec is None:
        return None
    return spec.sized(int(model.config.hidden_size), int(model.config.intermediate_size))


def skip_target(target_saved: float, spec: StandInSpec | None, hidden_size: int, ffn_weights: int) -> float:
    """The share of (layer, position) pairs to skip so that a share `target_saved` of FFN weight bytes is saved
    when every skipped FFN is replaced by a stand-in of `spec` (None: zeros)."""
    used = STANDIN_KINDS.get(spec.kind).weights_for(hidden_size, spec.known_size) if spec is not None else 0
    return target_saved / (1.0 - used / ffn_weights)


def check_rank(rank: int, hidden_size: int) -> None:
    """A linear stand-in's rank must be in [1, hidden size] (a clear error otherwise)."""
    StandInSpec(RANK_KIND, rank).check(hidden_size, hidden_size)


def saved_per_skip(standin: nn.Module | None, ffn_weights: int) -> float:
    """The share of an FFN's weights a skip saves when `standin` (None: zeros) replaces it."""
    used = sum(p.numel() for p in standin.parameters()) if standin is not None else 0
    return 1.0 - used / ffn_weights


class StandIns(nn.Module):
    """One stand-in of one kind and size per skippable layer, saved and loaded as one safetensors file."""

    def __init__(self, hidden_size: int, rank: int, layers: list[int], kind: str = RANK_KIND,
                 intermediate_size: int | None = None) -> None:
        super().__init__()
        intermediate = intermediate_size if intermediate_size is not None else hidden_size
        StandInSpec(kind, rank).check(hidden_size, intermediate)
        self.hidden_size, self.intermediate_size, self.rank_, self.layers = hidden_size, intermediate, rank, list(layers)
        self.kind = kind
        cls = STANDIN_KINDS.get(kind)
        self.maps = nn.ModuleDict({str(i): cls(hidden_size, rank, intermediate) for i in self.layers})

    @property
    def spec(self) -> StandInSpec:
        return StandInSpec(self.kind, self.rank_)

    def by_layer(self) -> dict[int, nn.Module]:
        """The substitutes to hand to :func:`skiptool.runtime.apply_skip`."""
        return {i: self.maps[str(i)] for i in self.layers}

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def cost(self, intermediate_size: int) -> dict[str, float]:
        """Per-layer, per-token cost of a stand-in next to the SwiGLU FFN it replaces (fp32 bytes)."""
        standin = self.maps[str(self.layers[0])].weight_count() if self.layers else 0
        ffn = 3 * self.hidden_size * intermediate_size
        return {"standin_params": standin, "ffn_params": ffn, "standin_flops": 2 * standin, "ffn_flops": 2 * ffn,
                "standin_bytes": 4 * standin, "ffn_bytes": 4 * ffn, "fraction_of_ffn": standin / ffn}

    def save(self, path: str | Path) -> Path:
        """Write atomically as safetensors with the metadata that :meth:`load` checks."""
        tensors = {f"layers.{k}": v.detach().cpu().contiguous() for k, v in self.maps.state_dict().items()}
        meta = {"kind": self.kind, "hidden_size": str(self.hidden_size), "intermediate_size": str(self.intermediate_size),
                "rank": str(self.rank_), "layers": ",".join(map(str, self.layers))}
        return save_safetensors_atomic(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path, hidden_size: int, layers: list[int], rank: int | None = None,
             kind: str | None = None, intermediate_size: int | None = None) -> "StandIns":
        """Read stand-ins, refusing a file made for another kind, hidden size, size or set of layers."""
        raw, meta = read_safetensors(path, "stand-in weights")
        tensors = {k.split(".", 1)[1]: v for k, v in raw.items()}
        try:
            file_kind = meta.get("kind", RANK_KIND)  # files written before kinds existed are linear
            file_rank, file_hidden = int(meta["rank"]), int(meta["hidden_size"])
            file_layers = [int(i) for i in meta["layers"].split(",") if i]
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"cannot read stand-in weights {path}: {str(exc).splitlines()[0]}") from None
        if (file_hidden != hidden_size or file_layers != list(layers) or rank not in (None, file_rank)
                or kind not in (None, file_kind)):
            raise ConfigError(f"stand-in weights {path} do not match: {file_kind} vs {kind or file_kind}, hidden size "
                              f"{file_hidden} vs {hidden_size}, rank {file_rank} vs {rank}, layers {file_layers} vs "
                              f"{list(layers)}")
        intermediate = intermediate_size or int(meta.get("intermediate_size", hidden_size))
        standins = cls(hidden_size, file_rank, layers, file_kind, intermediate)
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
    w = ridge_solve(sxx, sxy, ridge)
    sxx = sxx.double()
    fitted_cov = w.T @ sxx @ w
    fitted_cov = (fitted_cov + fitted_cov.T) / 2
    _, vecs = torch.linalg.eigh(fitted_cov)
    v = vecs[:, -rank:].flip(-1)
    down, up = (w @ v).T, v
    bias = mean_y.double() - up @ (down @ mean_x.double())
    return down.float(), up.float(), bias.float()


def ridge_solve(sxx: Tensor, sxy: Tensor, ridge: float = 1e-4) -> Tensor:
    """``(sxx + ridge * mean(diag(sxx)) * I)^-1 sxy`` in float64: the least-squares map from centred moments."""
    sxx, sxy = sxx.double(), sxy.double()
    scale = sxx.diagonal().mean().clamp(min=1e-12)
    return torch.linalg.solve(sxx + ridge * scale * torch.eye(sxx.shape[0], dtype=sxx.dtype), sxy)
