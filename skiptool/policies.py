"""Skip policies: the one place that decides whether a layer's FFN is skipped for a token.

Every consumer — calibration, evaluation, the PyTorch runtime and the ONNX exporter (which traces the
runtime) — asks a :class:`SkipPolicy`. A policy is an ``nn.Module`` whose decision is a small, pure
function of tensors the graph has, so the same code runs eagerly and exports to ONNX.

The gating shared by all policies lives in :meth:`SkipPolicy.decide`:
cold layers never skip (the runtime does not even ask), warm-up positions never skip, and an optional
per-layer override (``1`` force skip, ``-1`` force compute, ``0`` policy) replaces the policy's rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import SkipConfig
from .errors import ConfigError
from .fileio import read_safetensors, save_safetensors_atomic

FORCE_SKIP = 1
FORCE_COMPUTE = -1


@dataclass
class LayerSignals:
    """What a layer exposes before its FFN runs (all ``[batch, seq, hidden]``)."""

    layer: int
    h_in: Tensor  # residual stream entering the layer
    attn_delta: Tensor  # what attention adds to the residual stream
    h_mid: Tensor  # residual stream entering the FFN block (h_in + attn_delta)
    x: Tensor  # the FFN's normalised input


class SkipPolicy(nn.Module):
    """Base class: gating shared by every policy; subclasses implement :meth:`rule`."""

    kind = "none"

    def __init__(self, num_layers: int, skippable_layers: list[int], warmup: int) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.skippable_layers = list(skippable_layers)
        self.warmup = int(warmup)

    def is_skippable(self, layer: int) -> bool:
        return layer in self.skippable_layers

    def init_state(self, h: Tensor) -> Tensor | None:
        """State carried from layer to layer within one forward pass (``None`` if stateless)."""
        return None

    def rule(self, s: LayerSignals, state: Tensor | None) -> Tensor:
        """The policy's own decision, ``[batch, seq]`` bool (or float in [0, 1] while training)."""
        return torch.zeros(s.x.shape[:2], dtype=torch.bool, device=s.x.device)

    def update(self, layer: int, h_mid: Tensor, delta: Tensor, skip: Tensor, state: Tensor | None) -> Tensor | None:
        """New state after layer `layer`'s FFN block added `delta` (the FFN's or its substitute's)."""
        return state

    def rule_all(self, positions: Tensor) -> Tensor | None:
        """Every layer's rule at once, ``[num_layers, batch, seq]`` bool, for a policy whose rule reads no layer
        signal and no state (``None`` otherwise). Exporters use it to decide all layers in a few nodes."""
        return None

    def decide(self, s: LayerSignals, positions: Tensor, state: Tensor | None, override: Tensor | None) -> Tensor:
        """Final per-token decision for a skippable layer: rule, then override, then warm-up."""
        return self.gate(self.rule(s, state), positions, None if override is None else override[s.layer])

    def decide_all(self, positions: Tensor, override: Tensor | None) -> Tensor | None:
        """:meth:`decide` for every layer at once (``[num_layers, batch, seq]``; rows of cold layers are
        meaningless), or ``None`` when the rule needs layer signals (see :meth:`rule_all`)."""
        rules = self.rule_all(positions)
        if rules is None:
            return None
        return self.gate(rules, positions, None if override is None else override.view(-1, 1, 1))

    def gate(self, skip: Tensor, positions: Tensor, forced: Tensor | None) -> Tensor:
        """The gating every policy shares: the override `forced` (1 skip, -1 compute, 0 rule), then warm-up.
        `skip` is ``[batch, seq]`` (or ``[layers, batch, seq]`` with `forced` ``[layers, 1, 1]``)."""
        if forced is not None:
            if skip.dtype == torch.bool:
                skip = (skip | (forced == FORCE_SKIP)) & (forced != FORCE_COMPUTE)  # no bool Where: ORT lacks it
            else:
                skip = torch.where(forced == FORCE_SKIP, 1.0, torch.where(forced == FORCE_COMPUTE, 0.0, skip))
        warm = (positions >= self.warmup).expand(skip.shape)
        return skip & warm if skip.dtype == torch.bool else skip * warm.to(skip.dtype)


class NeverSkip(SkipPolicy):
    """Dense: the FFN always runs (useful with a forced override)."""

    kind = "none"

    def rule_all(self, positions: Tensor) -> Tensor | None:
        if type(self).rule is not NeverSkip.rule:  # a subclass with its own rule (e.g. a recorder) reads signals
            return None
        return torch.zeros((self.num_layers, *positions.shape), dtype=torch.bool, device=positions.device)


class StaticMask(SkipPolicy):
    """Always skip the FFNs of a fixed set of layers (after warm-up)."""

    kind = "static"

    def __init__(self, num_layers: int, skippable_layers: list[int], warmup: int, skip_layers: list[int]) -> None:
        super().__init__(num_layers, skippable_layers, warmup)
        mask = torch.zeros(num_layers, dtype=torch.bool)
        mask[[i for i in skip_layers if i in self.skippable_layers]] = True
        self.register_buffer("mask", mask, persistent=False)

    def rule(self, s: LayerSignals, state: Tensor | None) -> Tensor:
        return self.mask[s.layer].expand(s.x.shape[:2])

    def rule_all(self, positions: Tensor) -> Tensor | None:
        if type(self).rule is not StaticMask.rule:
            return None
        return self.mask.view(-1, 1, 1).expand(self.num_layers, *positions.shape)


class CosineGreedy(SkipPolicy):
    """FFN-SkipLLM's greedy rule.

    After an FFN that ran at layer ``l`` leaves the residual stream saturated —
    ``cos(h, h + FFN(h)) > threshold[l]`` — the FFNs of the next ``greedy_k`` layers are skipped;
    the next FFN that runs is evaluated again. The carried state is, per token, how many of the
    following layers are still to be skipped.
    """

    kind = "cosine"

    def __init__(self, num_layers: int, skippable_layers: list[int], warmup: int,
                 thresholds: list[float | None], greedy_k: int = 1) -> None:
        super().__init__(num_layers, skippable_layers, warmup)
        th = torch.tensor([math.inf if t is None else float(t) for t in thresholds], dtype=torch.float32)
        self.register_buffer("thresholds", th, persistent=False)
        self.greedy_k = int(greedy_k)

    def init_state(self, h: Tensor) -> Tensor:
        return torch.zeros(h.shape[:2], dtype=torch.int64, device=h.device)

    def rule(self, s: LayerSignals, state: Tensor | None) -> Tensor:
        return state > 0

    def update(self, layer: int, h_mid: Tensor, delta: Tensor, skip: Tensor, state: Tensor | None) -> Tensor:
        saturated = saturation(h_mid, delta) > self.thresholds[layer]
        fresh = torch.where(saturated, self.greedy_k, 0)
        skipped = skip if skip.dtype == torch.bool else skip > 0.5
        return torch.where(skipped, (state - 1).clamp(min=0), fresh)


def saturation(h: Tensor, delta: Tensor) -> Tensor:
    """FFN-SkipLLM's saturation signal cos(h, h + delta), per token (float32)."""
    h32, d32 = h.float(), delta.float()
    return torch.nn.functional.cosine_similarity(h32, h32 + d32, dim=-1, eps=1e-6)


class RandomSkip(SkipPolicy):
    """Baseline: each token's FFN in a skippable layer is skipped with probability `rate` (not exportable)."""

    kind = "random"

    def __init__(self, num_layers: int, skippable_layers: list[int], warmup: int, rate: float, seed: int = 0) -> None:
        super().__init__(num_layers, skippable_layers, warmup)
        self.rate = float(rate)
        self.generator = torch.Generator().manual_seed(int(seed))

    def rule(self, s: LayerSignals, state: Tensor | None) -> Tensor:
        draw = torch.rand(s.x.shape[:2], generator=self.generator)
        return (draw < self.rate).to(s.x.device)


class Routers(nn.Module):
    """DiffSkip routers: one ``Linear(hidden, 1)`` per skippable layer, reading the RMS-normalised attention delta.

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

    @staticmethod
    def features(attn_delta: Tensor) -> Tensor:
        """A router's input: the attention delta, RMS-normalised per token (float32)."""
        a = attn_delta.float()
        return a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6)

    def logit(self, layer: int, attn_delta: Tensor) -> Tensor:
        """Skip logit per token, ``[batch, seq]``."""
        return self.linears[str(layer)](self.features(attn_delta)).squeeze(-1)

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
        file_layers = [int(i) for i in meta.get("layers", "").split(",") if i]
        if int(meta.get("hidden_size", -1)) != hidden_size or file_layers != list(layers):
            raise ConfigError(f"router weights {path} do not match the model: hidden size {meta.get('hidden_size')} "
                              f"vs {hidden_size}, layers {file_layers} vs {list(layers)}")
        routers = cls(hidden_size, layers)
        try:
            routers.load_state_dict({f"linears.{k.split('.', 1)[1]}": v for k, v in tensors.items()})
        except RuntimeError as exc:
            raise ConfigError(f"router weights {path} have the wrong shapes: {str(exc).splitlines()[0]}") from None
        return routers


ESTIMATORS = ("ste", "gumbel")


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

    def __init__(self, num_layers: int, skippable_layers: list[int], warmup: int, routers: Routers,
                 threshold: float = 0.5) -> None:
        super().__init__(num_layers, skippable_layers, warmup)
        self.routers = routers
        self.threshold = float(threshold)
        self.estimator: str | None = None
        self.temperature = 1.0
        self.soft_decisions: dict[int, Tensor] = {}

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


def build_policy(config: SkipConfig, threshold: float | None = None) -> SkipPolicy:
    """The policy a skip config describes (router weights are read from beside the config)."""
    common = dict(num_layers=config.model.num_layers, skippable_layers=config.skippable_layers,
                  warmup=config.warmup)
    kind, p = config.policy.kind, config.policy.params
    if kind == "none":
        return NeverSkip(**common)
    if kind == "static":
        return StaticMask(**common, skip_layers=p["skip_layers"])
    if kind == "cosine":
        return CosineGreedy(**common, thresholds=p["thresholds"], greedy_k=p.get("greedy_k", 1))
    if kind == "random":
        return RandomSkip(**common, rate=p["rate"], seed=p.get("seed", 0))
    if kind == "router":
        assert config.router is not None  # validated
        routers = Routers.load(config.resolve(config.router.path), config.model.hidden_size, config.skippable_layers)
        return RouterPolicy(**common, routers=routers, threshold=threshold or p.get("threshold", 0.5))
    raise ConfigError(f"unknown policy kind {kind!r}")
