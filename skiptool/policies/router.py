"""``router``: DiffSkip — a tiny per-layer router reads the attention delta and decides whether the FFN runs.

Router kinds (:data:`ROUTER_KINDS`, one small module each, registered by name): every kind ends in one
``Linear(*, 1)``, its ``head``, over a ``basis(features)``, so the closed-form initial fit
(:mod:`skiptool.calibration.router_init`) is one ridge regression for every kind; a kind's ``forward`` returns
the logit per token through :func:`head_logit`.

- ``linear``: ``Linear(hidden, 1)`` on :func:`router_features` (the basis is the features themselves).
- ``bottleneck``: ``hidden -> hidden/16 -> 1`` with a SiLU (the basis is ``silu(down(features))``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import SkipConfig
from ..errors import ConfigError
from ..fileio import read_safetensors, save_safetensors_atomic
from ..registry import Registry
from .base import LayerSignals, PolicyParams, SkipPolicy, is_number, shape_of
from .registry import register_policy

ESTIMATORS = ("ste", "gumbel")
DEFAULT_ROUTER_KIND = "linear"
BOTTLENECK_RATIO = 16  # a bottleneck router's width is hidden_size / 16
ROUTER_KINDS: Registry[type[nn.Module]] = Registry("router kind")


def router_features(attn_delta: Tensor) -> Tensor:
    """A router's input: the attention delta, RMS-normalised per token (float32).

    Written as ``a / sqrt(mean(a²) + eps)`` on purpose: followed by :func:`head_logit`'s multiplication by the
    head's weight, ONNX Runtime fuses the exported chain into one ``SimplifiedLayerNormalization`` (an ``rsqrt``
    form is left as six nodes per layer)."""
    a = attn_delta.float()
    return a / torch.sqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6)


def head_logit(head: nn.Linear, basis: Tensor) -> Tensor:
    """A router's ``Linear(*, 1)`` head on its basis, ``[..., width] -> [...]``: the same sum as ``head(basis)``,
    written as a weighted sum so the exported graph is ``Mul, ReduceSum, Add`` with no ``Squeeze`` and the
    multiplication is the scale ONNX Runtime folds into the normalisation before it."""
    return (basis * head.weight[0]).sum(-1) + head.bias[0]


@ROUTER_KINDS.add("linear")
class LinearRouter(nn.Linear):
    """``Linear(hidden, 1)`` on the features, starting at zero (saved as ``weight`` and ``bias``)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__(hidden_size, 1)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    @property
    def head(self) -> nn.Linear:
        """The final ``Linear(*, 1)``: here the router itself."""
        return self

    def basis(self, features: Tensor) -> Tensor:
        """What :attr:`head` reads: the features."""
        return features

    def forward(self, features: Tensor) -> Tensor:
        """The skip logit per token, ``[...]`` (``Linear.forward`` would keep a last axis of 1)."""
        return head_logit(self, features)


@ROUTER_KINDS.add("bottleneck")
class BottleneckRouter(nn.Module):
    """``up(silu(down(features)))`` with ``down: hidden -> hidden/16`` and ``up: hidden/16 -> 1`` (``up`` starts at
    zero; ``down`` at a seeded random orthogonal map, which the closed-form fit may replace)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        width = max(1, hidden_size // BOTTLENECK_RATIO)
        self.down = nn.Linear(hidden_size, width)
        self.up = nn.Linear(width, 1)
        nn.init.orthogonal_(self.down.weight, generator=torch.Generator().manual_seed(0))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @property
    def head(self) -> nn.Linear:
        """The final ``Linear(width, 1)``."""
        return self.up

    def basis(self, features: Tensor) -> Tensor:
        """What :attr:`head` reads: ``silu(down(features))``."""
        return F.silu(self.down(features))

    def forward(self, features: Tensor) -> Tensor:
        """The skip logit per token, ``[...]``."""
        return head_logit(self.up, self.basis(features))


class Routers(nn.Module):
    """DiffSkip routers: one router of `kind` (:data:`ROUTER_KINDS`) per skippable layer on :func:`router_features`.

    A router's logit is the evidence that its layer's FFN can be skipped for that token.
    """

    def __init__(self, hidden_size: int, layers: list[int], kind: str = DEFAULT_ROUTER_KIND) -> None:
        super().__init__()
        net = ROUTER_KINDS.get(kind)
        self.layers = list(layers)
        self.hidden_size = hidden_size
        self.kind = kind
        self.nets = nn.ModuleDict({str(i): net(hidden_size) for i in self.layers})

    features = staticmethod(router_features)

    def logit(self, layer: int, attn_delta: Tensor) -> Tensor:
        """Skip logit per token, ``[batch, seq]``."""
        return self.nets[str(layer)](router_features(attn_delta))

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, path: str | Path) -> Path:
        """Write the weights atomically as safetensors, with the kind, hidden size and layers as metadata."""
        tensors = {f"layers.{i}.{n}": p.detach().cpu().contiguous()
                   for i, net in self.nets.items() for n, p in net.named_parameters()}
        return save_safetensors_atomic(path, tensors, {"kind": self.kind, "hidden_size": str(self.hidden_size),
                                                       "layers": ",".join(map(str, self.layers))})

    @classmethod
    def load(cls, path: str | Path, hidden_size: int, layers: list[int], kind: str | None = None) -> "Routers":
        """Read router weights, refusing files that do not match the model's hidden size and layers or, when `kind`
        is given (a config names it), the router kind. Files without a kind (older ones) hold linear routers."""
        tensors, meta = read_safetensors(path, "router weights")
        try:
            file_hidden = int(meta.get("hidden_size", -1))
            file_layers = [int(i) for i in meta.get("layers", "").split(",") if i]
        except ValueError:
            raise ConfigError(f"router weights {path} have malformed metadata") from None
        file_kind = meta.get("kind", DEFAULT_ROUTER_KIND)
        if kind is not None and file_kind != kind:
            raise ConfigError(f"router weights {path} hold {file_kind} routers, but the skip config names {kind} "
                              "routers")
        if file_hidden != hidden_size or file_layers != list(layers):
            raise ConfigError(f"router weights {path} do not match the model: hidden size {file_hidden} "
                              f"vs {hidden_size}, layers {file_layers} vs {list(layers)}")
        if file_kind not in ROUTER_KINDS:
            raise ConfigError(f"router weights {path} hold routers of an unknown kind {file_kind!r} (known: "
                              f"{', '.join(ROUTER_KINDS.names())})")
        routers = cls(hidden_size, layers, file_kind)
        try:
            routers.load_state_dict({f"nets.{k.split('.', 1)[1]}": v for k, v in tensors.items()})
        except (RuntimeError, IndexError) as exc:
            raise ConfigError(f"router weights {path} have the wrong shapes: {str(exc).splitlines()[0]}") from None
        return routers


@dataclass(frozen=True)
class RouterParams(PolicyParams):
    threshold: float = 0.5

    def check(self, config: SkipConfig) -> None:
        if config.router is None:
            raise ConfigError("router policy needs a 'router' entry with the weights path")
        if not is_number(self.threshold) or not 0 < self.threshold < 1:
            raise ConfigError(f"router threshold must be a probability strictly between 0 and 1 (got {self.threshold})")


@register_policy
class RouterPolicy(SkipPolicy):
    """DiffSkip: skip the FFN when the router's probability exceeds `threshold`.

    Inference is the hard rule ``logit > logit(threshold)`` (what the exported graph computes).
    :meth:`train_decisions` switches the rule to training decisions: still exactly 0 or 1 in the
    forward pass (training sees the skipping inference will do) but float, with the gradient of
    ``sigmoid((logit - logit(threshold) [+ logistic noise]) / temperature)`` (straight-through;
    ``"gumbel"`` adds the noise, so the hard decisions are Bernoulli samples). The straight-through
    decisions of the latest forward pass are kept in :attr:`soft_decisions` for a skip-rate penalty.
    """

    kind = "router"
    Params = RouterParams

    def __init__(self, num_layers: int, skippable_layers: list[int], warmup: int, routers: Routers,
                 threshold: float = 0.5) -> None:
        super().__init__(num_layers, skippable_layers, warmup)
        self.routers = routers
        self.threshold = float(threshold)
        self.estimator: str | None = None
        self.temperature = 1.0
        self.soft_decisions: dict[int, Tensor] = {}

    @classmethod
    def from_config(cls, config: SkipConfig, params: Any) -> "RouterPolicy":
        assert config.router is not None  # RouterParams.check
        routers = Routers.load(config.resolve(config.router.path), config.model.hidden_size, config.skippable_layers,
                               config.router.kind)
        return cls(**shape_of(config), routers=routers, threshold=params.threshold)

    @property
    def logit_threshold(self) -> float:
        return math.log(self.threshold / (1.0 - self.threshold))

    def train_decisions(self, estimator: str | None, temperature: float = 1.0) -> None:
        """Use straight-through (``"ste"``/``"gumbel"``) training decisions, or hard ones again (``None``)."""
        if estimator is not None and estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r} (expected one of {', '.join(ESTIMATORS)})")
        self.estimator, self.temperature = estimator, float(temperature)
        self.soft_decisions = {}

    def init_state(self, h: Tensor) -> Tensor | None:
        self.soft_decisions = {}
        return None

    def score(self, s: LayerSignals, state: Tensor | None) -> Tensor:
        """The router's logit above the threshold's: inference skips where it is positive."""
        return self.routers.logit(s.layer, s.attn_delta) - self.logit_threshold

    def rule(self, s: LayerSignals, state: Tensor | None) -> Tensor:
        z = self.score(s, state)
        if self.estimator is None:
            return z > 0
        if self.estimator == "gumbel":
            u = torch.rand_like(z).clamp(1e-6, 1 - 1e-6)
            z = z + torch.log(u) - torch.log1p(-u)
        soft = torch.sigmoid(z / self.temperature)
        decision = (z > 0).to(soft.dtype) + soft - soft.detach()
        self.soft_decisions[s.layer] = decision
        return decision
