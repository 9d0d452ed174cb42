"""PyTorch eager decode backend: the HF model, dense or wrapped by the skip runtime.

Several backends may share one loaded model (dense, the config's policy, forced ratios): each one
installs its own skip wrapper in :meth:`TorchBackend.reset` and takes any other one off, so one copy
of the weights serves every PyTorch run of a benchmark.
"""

from __future__ import annotations

import weakref
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..adapters import ArchAdapter
from ..config import SkipConfig
from ..runtime import SkipRuntime, SkipStats, ZeroSubstitute, apply_skip, runtime_from_config

# model id -> the backend whose skip wrapper is installed on it now
_ACTIVE: "weakref.WeakValueDictionary[int, TorchBackend]" = weakref.WeakValueDictionary()


class TorchBackend:
    """:class:`~skiptool.backends.base.DecodeBackend` over a Hugging Face causal LM.

    `config` None: dense (the model as loaded). Otherwise the config's policy (and stand-ins) through
    the skip runtime; `override` forces layers (1 skip, -1 compute, 0 policy) via ``set_override``.
    """

    name = "torch"

    def __init__(self, model: nn.Module, adapter: ArchAdapter, config: SkipConfig | None = None,
                 override: list[int] | None = None, device: str | None = None) -> None:
        self.model, self.adapter = model, adapter
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.precision = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(
            next(model.parameters()).dtype, "fp32")
        self.mode = "dense" if config is None else "skip"
        self.override = override
        self.policy, self.substitutes = _policy_of(model, adapter, config) if config is not None else (None, None)
        self.runtime: SkipRuntime | None = None
        self._cache: Any = None
        self._position = 0
        self._steps = 0

    # -- skip wrapper ------------------------------------------------------------------------
    def _activate(self) -> None:
        """Install this backend's skip wrapper on the shared model (and take off anyone else's)."""
        key = id(self.model)
        current = _ACTIVE.get(key)
        if current is self:
            return
        if current is not None:
            current._deactivate()
        if self.policy is not None:
            self.runtime = apply_skip(self.model, self.adapter, self.policy, self.substitutes)
            self.runtime.set_override(self.override)
        _ACTIVE[key] = self

    def _deactivate(self) -> None:
        if self.runtime is not None:
            self.runtime.remove()
            self.runtime = None
        if _ACTIVE.get(id(self.model)) is self:
            del _ACTIVE[id(self.model)]

    def close(self) -> None:
        """Restore the shared model (no skip wrapper of this backend left on it)."""
        self._deactivate()

    # -- DecodeBackend -----------------------------------------------------------------------
    def reset(self) -> None:
        from transformers import DynamicCache

        self._activate()
        self._cache = DynamicCache(config=self.model.config)
        self._position = self._steps = 0
        if self.runtime is not None:
            self.runtime.stats.reset()

    @torch.inference_mode()
    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)
        logits = self._forward(ids, torch.arange(ids.shape[1], device=self.device).unsqueeze(0))
        if self.runtime is not None:  # count decode steps only
            self.runtime.stats.reset()
        return logits

    @torch.inference_mode()
    def step(self, token_id: int) -> np.ndarray:
        ids = torch.tensor([[int(token_id)]], dtype=torch.long, device=self.device)
        self._steps += 1
        return self._forward(ids, torch.tensor([[self._position]], device=self.device))

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> np.ndarray:
        out = self.model(input_ids=ids, past_key_values=self._cache, use_cache=True, position_ids=positions)
        self._position += ids.shape[1]
        return out.logits[0, -1].float().cpu().numpy()

    def skip_ratio(self) -> float | None:
        return self.stats.skip_ratio if self.stats is not None else 0.0

    # -- extras ------------------------------------------------------------------------------
    @property
    def stats(self) -> SkipStats | None:
        """The skip runtime's counters for the current sequence (None when dense)."""
        return self.runtime.stats if self.runtime is not None else None

    def per_layer_skip(self) -> list[float] | None:
        return self.stats.per_layer() if self.stats is not None else None

    def ffn_counters(self) -> dict[str, int]:
        """FFN calls made and avoided during the decode steps since the last reset."""
        if self.stats is None:
            return {"ffn_calls": len(self.adapter.decoder_layers(self.model)) * self._steps, "ffn_calls_avoided": 0}
        return {"ffn_calls": sum(self.stats.ffn_calls), "ffn_calls_avoided": sum(self.stats.ffn_calls_avoided)}

    def policy_bytes(self) -> int:
        """Weight bytes the policy itself reads per token (e.g. the routers)."""
        return sum(p.numel() * p.element_size() for p in self.policy.parameters()) if self.policy is not None else 0

    def substitute_bytes(self) -> int:
        """Weight bytes of the stand-ins, over all layers (read only where the FFN is skipped)."""
        return sum(p.numel() * p.element_size() for s in (self.substitutes or {}).values() for p in s.parameters())


def _policy_of(model: nn.Module, adapter: ArchAdapter,
               config: SkipConfig) -> tuple[Any, dict[int, nn.Module] | None]:
    """The policy and stand-ins a config gives this model (checked by the runtime itself), unwrapped again."""
    current = _ACTIVE.get(id(model))
    if current is not None:
        current._deactivate()
    runtime = runtime_from_config(model, adapter, config)
    subs = {layer.index: layer.substitute for layer in runtime.layers
            if not isinstance(layer.substitute, ZeroSubstitute)}
    runtime.remove()
    return runtime.policy, subs or None
