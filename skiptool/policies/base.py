"""The skip-policy abstraction: what a layer exposes before its FFN, the gating every policy shares, typed
policy parameters, and the one rule for token positions.

The gating shared by all policies lives in :meth:`SkipPolicy.decide`: cold layers never skip (the runtime
does not even ask), warm-up positions never skip, and an optional per-layer override (``1`` force skip,
``-1`` force compute, ``0`` policy) replaces the policy's rule. Positions are position ids: given by the
caller, or derived from the attention mask by :func:`positions_from_mask` (padded batches included), so
warm-up means the same thing in the PyTorch runtime, calibration, training and every exported graph.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Mapping, TypeVar

import torch
from torch import Tensor, nn

from ..config import SkipConfig
from ..errors import ConfigError

FORCE_SKIP = 1
FORCE_COMPUTE = -1
P = TypeVar("P", bound="PolicyParams")


def positions_from_mask(attention_mask: Tensor, seq_len: int) -> Tensor:
    """Position ids ``[batch, seq_len]`` of the last `seq_len` tokens under a ``[batch, total]`` attention mask.

    A token's position is the number of real tokens before it (Hugging Face ``generate``'s rule); padding
    gets position 1, so it is always inside the warm-up of a policy with warm-up > 1.
    """
    mask = attention_mask.long()
    positions = mask.cumsum(-1) - 1
    positions = positions.masked_fill(mask == 0, 1)
    return positions[:, positions.shape[1] - seq_len:]


def block_positions(ids: Tensor) -> Tensor:
    """Position ids of unpadded token blocks ``[batch, seq]`` (calibration, training and evaluation data)."""
    return positions_from_mask(torch.ones_like(ids), ids.shape[1])


def is_warm(positions: Tensor, warmup: int) -> Tensor:
    """Which positions are past a warm-up of `warmup` tokens: the only ones a policy may skip, and the only ones
    calibration, training and statistics learn from."""
    return positions >= warmup


@dataclass
class LayerSignals:
    """What a layer exposes before its FFN runs (tensors ``[batch, seq, hidden]``; `positions` ``[batch, seq]``)."""

    layer: int
    h_in: Tensor  # residual stream entering the layer
    attn_delta: Tensor  # what attention adds to the residual stream
    h_mid: Tensor  # residual stream entering the FFN block (h_in + attn_delta)
    x: Tensor  # the FFN's normalised input
    positions: Tensor | None = None  # the tokens' position ids (None where a caller has none, e.g. an export)


@dataclass(frozen=True)
class PolicyParams:
    """A policy's parameters as the skip config stores them (``policy.params``): typed, and validated by
    :meth:`parse` against the config they belong to. Subclasses add fields and override :meth:`check`."""

    @classmethod
    def parse(cls: type[P], raw: Any, config: SkipConfig, kind: str) -> P:
        """Typed parameters from the config's ``policy.params`` (one clear :class:`ConfigError` otherwise)."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{kind} policy: params must be an object")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ConfigError(f"{kind} policy has no parameter {', '.join(map(repr, unknown))} "
                              f"(its parameters: {', '.join(known) or 'none'})")
        missing = [n for n, f in known.items() if n not in raw and f.default is MISSING
                   and f.default_factory is MISSING]
        if missing:
            raise ConfigError(f"{kind} policy needs {', '.join(missing)}")
        params = cls(**raw)
        params.check(config)
        return params

    def check(self, config: SkipConfig) -> None:
        """Raise :class:`ConfigError` when a value does not fit `config` (e.g. a layer index out of range)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class SkipPolicy(nn.Module):
    """Base class: gating shared by every policy; subclasses implement :meth:`rule`.

    A registered policy class also names its ``kind``, its ``Params`` (a :class:`PolicyParams`), whether it
    can be ``exportable`` (its decisions are a function of the graph's tensors) and builds itself from a
    config with :meth:`from_config`.
    """

    kind = "none"
    Params: type[PolicyParams] = PolicyParams
    exportable = True

    def __init__(self, num_layers: int, skippable_layers: list[int], warmup: int) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.skippable_layers = list(skippable_layers)
        self.warmup = int(warmup)

    @classmethod
    def from_config(cls, config: SkipConfig, params: Any) -> "SkipPolicy":
        """The policy `config` describes, with its parsed `params`."""
        return cls(**shape_of(config))

    def is_skippable(self, layer: int) -> bool:
        return layer in self.skippable_layers

    def is_warm(self, positions: Tensor) -> Tensor:
        """Which positions are past this policy's warm-up (the only ones that may skip)."""
        return is_warm(positions, self.warmup)

    def init_state(self, h: Tensor) -> Tensor | None:
        """State carried from layer to layer within one forward pass (``None`` if stateless)."""
        return None

    def score(self, s: LayerSignals, state: Tensor | None) -> Tensor:
        """The policy's evidence for skipping, per token (``[batch, seq]`` float): above 0 its rule says skip."""
        return torch.full(s.x.shape[:2], -1.0, device=s.x.device)

    def rule(self, s: LayerSignals, state: Tensor | None) -> Tensor:
        """The policy's own decision, ``[batch, seq]`` bool: its score above 0 (float in [0, 1] while training)."""
        return self.score(s, state) > 0

    def update(self, layer: int, h_mid: Tensor, delta: Tensor, skip: Tensor, state: Tensor | None) -> Tensor | None:
        """New state after layer `layer`'s FFN block added `delta` (the FFN's or its substitute's)."""
        return state

    def rule_all(self, positions: Tensor) -> Tensor | None:
        """Every layer's rule at once, ``[num_layers, batch, seq]`` bool, for a policy whose rule reads no layer
        signal and no state (``None`` otherwise). Exporters use it to decide all layers in a few nodes."""
        return None

    def keeps_rule_of(self, cls: type) -> bool:
        """Whether this object decides by `cls`'s own rule (a subclass that overrides ``rule`` or ``score``, e.g. a
        statistics recorder, reads layer signals even when `cls` does not)."""
        return type(self).rule is SkipPolicy.rule and type(self).score is cls.score

    def decide(self, s: LayerSignals, positions: Tensor, state: Tensor | None, override: Tensor | None) -> Tensor:
        """Final per-token decision for a skippable layer: rule, then override, then warm-up."""
        return self.gate(self.rule(s, state), positions, None if override is None else override[s.layer])

    def gated_score(self, s: LayerSignals, state: Tensor | None, bias: Tensor) -> Tensor:
        """The score with a layer's :meth:`gate_bias` added: above 0 exactly where :meth:`decide` says skip. Lets an
        exporter compute the gating once for every layer and add one bias per layer."""
        return self.score(s, state) + bias

    def decide_all(self, positions: Tensor, override: Tensor | None) -> Tensor | None:
        """:meth:`decide` for every layer at once (``[num_layers, batch, seq]``; rows of cold layers are
        meaningless), or ``None`` when the rule needs layer signals (see :meth:`rule_all`)."""
        rules = self.rule_all(positions)
        if rules is None:
            return None
        return self.gate(rules, positions, None if override is None else override.view(-1, 1, 1))

    def gate_bias(self, positions: Tensor, forced: Tensor | None) -> Tensor:
        """The gating every policy shares, as a bias on its score: +inf where the override `forced` is 1 (skip),
        -inf where it is -1 (compute) or the position is in the warm-up, 0 where the policy's own rule decides.
        `forced` is one layer's override value, or every layer's as ``[layers, 1, 1]`` (the result is then
        ``[layers, batch, seq]``)."""
        inf = float("inf")
        warm = self.is_warm(positions)
        if forced is None:
            return torch.where(warm, 0.0, -inf)
        bias = torch.where(forced == FORCE_SKIP, inf, torch.where(forced == FORCE_COMPUTE, -inf, 0.0))
        return torch.where(warm, bias, -inf)

    def gate(self, skip: Tensor, positions: Tensor, forced: Tensor | None) -> Tensor:
        """The rule's decisions `skip` (``[batch, seq]``, or ``[layers, batch, seq]`` with `forced` ``[layers, 1,
        1]``) under the gating of :meth:`gate_bias`: bool decisions stay bool, training's float ones stay float."""
        bias = self.gate_bias(positions, forced).expand(skip.shape)
        if skip.dtype == torch.bool:
            return torch.where(skip, 1.0, -1.0) + bias > 0
        return torch.where(bias > 0, 1.0, torch.where(bias < 0, 0.0, skip))


def shape_of(config: SkipConfig) -> dict[str, Any]:
    """The constructor arguments every policy takes from a config: layers, skippable layers, warm-up."""
    return {"num_layers": config.model.num_layers, "skippable_layers": config.skippable_layers,
            "warmup": config.warmup}
