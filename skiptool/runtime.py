"""The skip-aware PyTorch runtime.

:func:`apply_skip` wraps every decoder layer of a loaded model in a :class:`SkipLayer`. Attention
always runs (the KV cache stays exact); before each skippable layer's FFN the policy decides, per
token, whether the FFN runs or is replaced by its substitute (zeros, or a low-rank stand-in).

Work is really saved: an FFN is not called when every token of the batch skips it, and when only
some tokens skip, only the others are gathered through the FFN. Rows that skip get the substitute
either way, so a token's output depends only on its own decision.

In *export mode* the same forward replaces those Python branches by ``torch.cond``, which the ONNX
exporter turns into one ``If`` per skippable layer.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import Tensor, nn

from .adapters import ArchAdapter
from .config import SkipConfig

if TYPE_CHECKING:
    from .standins import StandIns
from .policies import LayerSignals, SkipPolicy
from .standins import saved_per_skip


@dataclass
class SkipStats:
    """Counters of what the runtime skipped since the last :meth:`reset`."""

    num_layers: int
    skipped_tokens: list[float] = field(default_factory=list)
    total_tokens: list[float] = field(default_factory=list)
    ffn_calls: list[int] = field(default_factory=list)
    ffn_calls_avoided: list[int] = field(default_factory=list)
    saved_per_skip: list[float] = field(default_factory=list)  # per layer; set by the runtime from its stand-ins

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        n = self.num_layers
        self.skipped_tokens, self.total_tokens = [0.0] * n, [0.0] * n
        self.ffn_calls, self.ffn_calls_avoided = [0] * n, [0] * n

    def record(self, layer: int, skipped: float, total: float, called: bool) -> None:
        self.skipped_tokens[layer] += skipped
        self.total_tokens[layer] += total
        self.ffn_calls[layer] += int(called)
        self.ffn_calls_avoided[layer] += int(not called)

    @property
    def skip_ratio(self) -> float:
        """Skipped FFN blocks over all (layer, token) pairs, cold layers and warm-up included."""
        total = sum(self.total_tokens)
        return sum(self.skipped_tokens) / total if total else 0.0

    def per_layer(self) -> list[float]:
        return [s / t if t else 0.0 for s, t in zip(self.skipped_tokens, self.total_tokens)]

    @property
    def ffn_saved(self) -> float:
        """The share of FFN weight bytes not read over all (layer, token) pairs: each skip saves its layer's
        `saved_per_skip` (1 with zeros, less with a stand-in whose weights are read instead)."""
        total = sum(self.total_tokens)
        saved = self.saved_per_skip or [1.0] * self.num_layers
        return sum(s * f for s, f in zip(self.skipped_tokens, saved)) / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"skip_ratio": self.skip_ratio, "ffn_saved": self.ffn_saved, "per_layer": self.per_layer(),
                "ffn_calls": list(self.ffn_calls), "ffn_calls_avoided": list(self.ffn_calls_avoided)}


class ZeroSubstitute(nn.Module):
    """What a skipped FFN adds to the residual stream by default: nothing."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)


class SkipController(nn.Module):
    """State shared by the wrapped layers of one model: policy, per-pass state, override and counters."""

    def __init__(self, policy: SkipPolicy, num_layers: int) -> None:
        super().__init__()
        self.policy = policy
        self.stats = SkipStats(num_layers)
        self.override: Tensor | None = None  # [num_layers] int: 1 force skip, -1 force compute, 0 policy
        self.export_mode = False
        self.counting = True
        self.record_decisions = False
        self.decisions: dict[int, Tensor] = {}
        self.positions: Tensor | None = None
        self.state: Tensor | None = None

    def begin(self, h: Tensor, position_ids: Tensor | None) -> None:
        """Start a forward pass (called by layer 0)."""
        if position_ids is None:
            position_ids = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        self.positions = position_ids
        self.state = self.policy.init_state(h)
        self.decisions.clear()


class SkipLayer(nn.Module):
    """A decoder layer whose FFN block may be skipped per token; everything else runs as before."""

    def __init__(self, layer: nn.Module, index: int, adapter: ArchAdapter, controller: SkipController,
                 substitute: nn.Module | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.index = index
        self.adapter = adapter
        self.skippable = controller.policy.is_skippable(index)
        self.substitute = substitute if substitute is not None else ZeroSubstitute()
        self._controller = [controller]  # a list, so the controller is not registered as a child module

    @property
    def controller(self) -> SkipController:
        return self._controller[0]

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        ctrl, a = self.controller, self.adapter
        if self.index == 0:
            ctrl.begin(hidden_states, kwargs.get("position_ids"))
        attn_out = a.attention_of(self.layer)(a.input_norm_of(self.layer)(hidden_states), *args, **kwargs)
        attn_delta = attn_out[0] if isinstance(attn_out, tuple) else attn_out
        h_mid = hidden_states + attn_delta
        x = a.post_attention_norm_of(self.layer)(h_mid)
        mlp = a.mlp_of(self.layer)
        if not self.skippable:
            delta = mlp(x)
            skip = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
            self._count(skip, called=True)
        else:
            signals = LayerSignals(self.index, hidden_states, attn_delta, h_mid, x, ctrl.positions)
            skip = ctrl.policy.decide(signals, ctrl.positions, ctrl.state, ctrl.override)
            delta = self._ffn_block(mlp, x, skip)
        if ctrl.record_decisions:
            ctrl.decisions[self.index] = skip.detach()
        ctrl.state = ctrl.policy.update(self.index, h_mid, delta, skip, ctrl.state)
        return h_mid + delta

    # -- the FFN block -------------------------------------------------------------------------
    def _ffn_block(self, mlp: nn.Module, x: Tensor, skip: Tensor) -> Tensor:
        if skip.dtype != torch.bool:  # soft / straight-through decisions while training routers
            s = skip.unsqueeze(-1).to(x.dtype)
            return mlp(x) * (1 - s) + self.substitute(x) * s
        if self.controller.export_mode:
            return self._ffn_block_traced(mlp, x, skip)
        return self._ffn_block_eager(mlp, x, skip)

    def _ffn_block_eager(self, mlp: nn.Module, x: Tensor, skip: Tensor) -> Tensor:
        n_skip = int(skip.sum())
        if n_skip == skip.numel():
            self._count(skip, called=False, n_skip=n_skip)
            return self.substitute(x)
        self._count(skip, called=True, n_skip=n_skip)
        if n_skip == 0:
            return mlp(x)
        flat_x = x.reshape(-1, x.shape[-1])
        keep = (~skip).reshape(-1).nonzero().squeeze(-1)
        out = self.substitute(flat_x)
        out = out.index_copy(0, keep, mlp(flat_x.index_select(0, keep)).to(out.dtype))
        return out.reshape(x.shape)

    def _ffn_block_traced(self, mlp: nn.Module, x: Tensor, skip: Tensor) -> Tensor:
        substitute = self.substitute

        def skip_branch(x: Tensor, skip: Tensor) -> Tensor:
            return substitute(x)

        def compute_branch(x: Tensor, skip: Tensor) -> Tensor:
            return torch.where(skip.unsqueeze(-1), substitute(x), mlp(x))

        return torch.cond(skip.all(), skip_branch, compute_branch, (x, skip))

    def _count(self, skip: Tensor, called: bool, n_skip: int | None = None) -> None:
        ctrl = self.controller
        if ctrl.counting and not ctrl.export_mode:
            n = int(skip.sum()) if n_skip is None else n_skip
            ctrl.stats.record(self.index, float(n), float(skip.numel()), called)


_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, SkipRuntime]" = weakref.WeakKeyDictionary()


def active_runtime(model: nn.Module) -> "SkipRuntime | None":
    """The runtime wrapping `model` now (None when it runs as loaded)."""
    return _ACTIVE.get(model)


class SkipRuntime:
    """Handle on a model wrapped by :func:`apply_skip`: counters, override, decisions, removal."""

    def __init__(self, model: nn.Module, adapter: ArchAdapter, controller: SkipController,
                 originals: list[nn.Module]) -> None:
        self.model = model
        self.adapter = adapter
        self.controller = controller
        self._originals = originals

    @property
    def policy(self) -> SkipPolicy:
        return self.controller.policy

    @property
    def stats(self) -> SkipStats:
        return self.controller.stats

    @property
    def layers(self) -> list[SkipLayer]:
        return list(self.adapter.decoder_layers(self.model))  # type: ignore[arg-type]

    def set_override(self, mask: Tensor | list[int] | None) -> None:
        """Force layers: 1 skip, -1 compute, 0 follow the policy (``None`` clears it)."""
        if mask is not None and not isinstance(mask, Tensor):
            mask = torch.tensor(mask, dtype=torch.int64)
        self.controller.override = mask

    def saved_per_skip(self) -> list[float]:
        """Per layer, the share of its FFN's weights one skip saves (its stand-in's weights are read instead)."""
        return [saved_per_skip(layer.substitute, self.adapter.mlp_parameter_count(layer.layer)) for layer in self.layers]

    def substitutes(self) -> dict[int, nn.Module]:
        """What skipped FFNs add, per layer, where it is not zeros (e.g. stand-ins)."""
        return {layer.index: layer.substitute for layer in self.layers if not isinstance(layer.substitute,
                                                                                         ZeroSubstitute)}

    def set_substitutes(self, substitutes: dict[int, nn.Module] | None) -> None:
        """Replace what skipped FFNs add (stand-ins per layer); ``None`` restores zeros."""
        for layer in self.layers:
            sub = (substitutes or {}).get(layer.index)
            layer.substitute = sub if sub is not None else ZeroSubstitute()
        self.stats.saved_per_skip = self.saved_per_skip()

    @contextmanager
    def recording(self) -> Iterator[dict[int, Tensor]]:
        """Record each layer's per-token decisions (of the latest forward pass run inside the block)."""
        ctrl = self.controller
        ctrl.record_decisions = True
        try:
            yield ctrl.decisions
        finally:
            ctrl.record_decisions = False

    def remove(self) -> nn.Module:
        """Restore the original decoder layers and return the unwrapped model."""
        layers = self.adapter.decoder_layers(self.model)
        for i, original in enumerate(self._originals):
            layers[i] = original
        if _ACTIVE.get(self.model) is self:
            del _ACTIVE[self.model]
        return self.model


def apply_skip(model: nn.Module, adapter: ArchAdapter, policy: SkipPolicy,
               substitutes: dict[int, nn.Module] | None = None) -> SkipRuntime:
    """Wrap each decoder layer of `model` (in place) so its FFN follows `policy`; the policy and the substitutes
    move to the model's device (stand-ins load on the CPU)."""
    layers = adapter.decoder_layers(model)
    if any(isinstance(layer, SkipLayer) for layer in layers):
        raise ValueError("model is already wrapped by apply_skip; call .remove() first")
    if policy.num_layers != len(layers):
        raise ValueError(f"policy is for {policy.num_layers} layers, model has {len(layers)}")
    controller = SkipController(policy, len(layers))
    originals = list(layers)
    device = next(model.parameters()).device
    policy.to(device)
    for i, layer in enumerate(originals):
        sub = (substitutes or {}).get(i)
        layers[i] = SkipLayer(layer, i, adapter, controller, sub.to(device) if sub is not None else None)
    runtime = SkipRuntime(model, adapter, controller, originals)
    controller.stats.saved_per_skip = runtime.saved_per_skip()
    _ACTIVE[model] = runtime
    return runtime


@contextmanager
def skipping(model: nn.Module, adapter: ArchAdapter, policy: SkipPolicy,
             substitutes: dict[int, nn.Module] | None = None) -> Iterator[SkipRuntime]:
    """Context manager form of :func:`apply_skip` that always restores the model."""
    runtime = apply_skip(model, adapter, policy, substitutes)
    try:
        yield runtime
    finally:
        runtime.remove()


def open_runtime(model: nn.Module, adapter: ArchAdapter, config: SkipConfig, **policy_overrides: Any) -> SkipRuntime:
    """The runtime every command uses for a skip config: the config's policy and stand-ins
    (:func:`policy_and_substitutes`) wrapped around the model. ``runtime.remove()`` restores it."""
    return apply_skip(model, adapter, *policy_and_substitutes(model, config, **policy_overrides))


def policy_and_substitutes(model: nn.Module, config: SkipConfig,
                           **policy_overrides: Any) -> tuple[SkipPolicy, dict[int, nn.Module] | None]:
    """What a skip config gives `model`, without wrapping it: check `config` against the model, build its policy
    (with `policy_overrides` such as ``threshold=0.3``; None keeps the config's value) and load its stand-ins per
    layer (None when it has none). Every decode path (the eager runtime, the GPU engine) starts here."""
    from .policies import build_policy

    config.check_matches(model)
    policy = build_policy(config, **policy_overrides)
    substitutes = load_standins(config).by_layer() if config.standin is not None else None
    return policy, substitutes


def load_standins(config: SkipConfig) -> "StandIns":
    """The stand-in weights a config names, checked against its model shape and skippable layers."""
    from .standins import StandIns

    assert config.standin is not None
    return StandIns.load(config.resolve(config.standin.path), config.model.hidden_size, config.skippable_layers,
                         rank=config.standin.rank, kind=config.standin.kind or "linear",
                         intermediate_size=config.model.intermediate_size)
