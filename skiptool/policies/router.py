"""``router``: DiffSkip — a tiny per-layer router reads the attention delta and decides whether the FFN runs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import SkipConfig
from ..errors import ConfigError
from ..fileio import read_safetensors, save_safetensors_atomic
from .base import LayerSignals, PolicyParams, SkipPolicy, is_number, shape_of
from .registry import register_policy

ESTIMATORS = ("ste", "gumbel")


def router_features(attn_delta: Tensor) -> Tensor:
    """A router's input: the attention delta, RMS-normalised per token (float32)."""
    a = attn_delta.float()
    return a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6)


class Routers(nn.Module):
    """DiffSkip routers: one ``Linear(hidden, 1)`` per skippable layer on :func:`router_features`.

    A router's logit is the evidence that its layer's FFN can be skipped for that token.
    """

    def __init__(self, hidden_size: int, layers: list[int]) -> None:
        super().__init__()
        self.layers = list(layers)
        self.hidden_size = hidden_size
        self.linears = nn.ModuleDict({str(i): nn.Linear(hidden_size, 1) for i in self.layers})
        for lin in self.linears.values():
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    features = staticmethod(router_features)

    def logit(self, layer: int, attn_delta: Tensor) -> Tensor:
        """Skip logit per token, ``[batch, seq]``."""
        return self.linears[str(layer)](router_features(attn_delta)).squeeze(-1)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, path: str | Path) -> Path:
        """Write the weights atomically as safetensors."""
        tensors = {f"layers.{i}.{n}": p.detach().cpu().contiguous()
                   for i, lin in self.linears.items() for n, p in lin.named_parameters()}
        return save_safetensors_atomic(path, tensors, {"hidden_size": str(self.hidden_size),
                                                       "layers": ",".join(map(str, self.layers))})

    @classmethod
    def load(cls, path: str | Path, hidden_size: int, layers: list[int]) -> "Routers":
        """Read router weights, refusing files that do not match the model's hidden size and layers."""
        tensors, meta = read_safetensors(path, "router weights")
        try:
            file_hidden = int(meta.get("hidden_size", -1))
            file_layers = [int(i) for i in meta.get("layers", "").split(",") if i]
        except ValueError:
            raise ConfigError(f"router weights {path} have malformed metadata") from None
        if file_hidden != hidden_size or file_layers != list(layers):
            raise ConfigError(f"router weights {path} do not match the model: hidden size {file_hidden} "
                              f"vs {hidden_size}, layers {file_layers} vs {list(layers)}")
        routers = cls(hidden_size, layers)
        try:
            routers.load_state_dict({f"linears.{k.split('.', 1)[1]}": v for k, v in tensors.items()})
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
        routers = Routers.load(config.resolve(config.router.path), config.model.hidden_size, config.skippable_layers)
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

    def rule(self, s: LayerSignals, state: Tensor | None) -> Tensor:
        if self.estimator is None:
            return self.routers.logit(s.layer, s.attn_delta) > self.logit_threshold
        z = self.routers.logit(s.layer, s.attn_delta) - self.logit_threshold
        if self.estimator == "gumbel":
            u = torch.rand_like(z).clamp(1e-6, 1 - 1e-6)
            z = z + torch.log(u) - torch.log1p(-u)
        soft = torch.sigmoid(z / self.temperature)
        decision = (z > 0).to(soft.dtype) + soft - soft.detach()
        self.soft_decisions[s.layer] = decision
        return decision
