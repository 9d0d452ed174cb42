"""PyTorch decode backend: the one PyTorch decode loop (prefill, then one token per step through a KV cache).

The model runs as it is (dense, or wrapped by a runtime the caller opened), or with a skip config's policy.
Several backends may share one loaded model (dense, the config's policy, forced ratios): each installs its own
skip wrapper in :meth:`TorchBackend.reset` and takes any other backend's off, so one copy of the weights serves
every PyTorch run of a benchmark.
"""

from __future__ import annotations

import weakref
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..adapters import ArchAdapter, adapter_for, cache_kwargs
from ..config import SkipConfig
from ..models import precision_of
from ..runtime import SkipRuntime, SkipStats, active_runtime, apply_skip, policy_and_substitutes

# model id -> the backend whose skip wrapper is installed on it now
_ACTIVE: "weakref.WeakValueDictionary[int, TorchBackend]" = weakref.WeakValueDictionary()


class TorchBackend:
    """:class:`~skiptool.backends.base.DecodeBackend` over a Hugging Face causal LM (batch 1).

    `config` None: the model as it is now (dense, or under a runtime the caller opened with
    :func:`skiptool.runtime.open_runtime`, whose counters are then read). Otherwise the config's policy (and
    stand-ins) through the skip runtime; `override` forces layers (1 skip, -1 compute, 0 policy).
    Skip counters cover the decode steps only (the prefill is not counted), as in every other backend.
    """

    name = "torch"

    def __init__(self, model: nn.Module, adapter: ArchAdapter | None = None, config: SkipConfig | None = None,
                 override: list[int] | None = None, device: str | None = None,
                 policy_overrides: dict[str, Any] | None = None) -> None:
        self.model, self.adapter = model, adapter or adapter_for(model)
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.precision = precision_of(model)
        self.override = override
        self.policy, self.substitutes = (policy_and_substitutes(model, config, **(policy_overrides or {}))
                                         if config is not None else (None, None))
        self.runtime: SkipRuntime | None = None
        self.mode = "dense" if config is None and active_runtime(model) is None else "skip"
        self._cache: Any = None
        self._position = self._steps = 0

    # -- skip wrapper ------------------------------------------------------------------------
    def _activate(self) -> None:
        """Install this backend's skip wrapper on the shared model (and take off any other backend's)."""
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

    def set_skip_mask(self, skip_mask: list[int] | None) -> None:
        """Force layers from now on (1 skip, -1 compute, 0 policy; None: the policy alone), as the graphs'
        ``skip_mask``. Needs a config (a policy to override)."""
        if self.policy is None:
            raise ValueError("a skip_mask needs a skip config")
        self.override = None if skip_mask is None else list(skip_mask)
        if self.runtime is not None:
            self.runtime.set_override(self.override)

    # -- DecodeBackend -----------------------------------------------------------------------
    def reset(self) -> None:
        from transformers import DynamicCache

        self._activate()
        self._cache = DynamicCache(config=self.model.config)
        self._position = self._steps = 0
        if self.stats is not None:
            self.stats.reset()

    @torch.inference_mode()
    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        logits = self.forward(list(token_ids))[-1]
        if self.stats is not None:  # count decode steps only
            self.stats.reset()
        return logits

    @torch.inference_mode()
    def step(self, token_id: int) -> np.ndarray:
        self._steps += 1
        return self.forward([int(token_id)])[-1]

    def forward(self, token_ids: Sequence[int]) -> np.ndarray:
        """Append tokens to the cached sequence; their logits ``[len(token_ids), vocab]`` (float32)."""
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)
        positions = torch.arange(self._position, self._position + ids.shape[1], device=self.device)[None]
        out = self.model(input_ids=ids, position_ids=positions, use_cache=True,
                         **cache_kwargs(self.model, self._cache))
        self._position += ids.shape[1]
        return out.logits[0].float().cpu().numpy()

    @torch.inference_mode()
    def block_logits(self, token_ids: np.ndarray) -> np.ndarray:
        """Logits ``[n, seq, vocab]`` of token blocks ``[n, seq]``, each from an empty cache in one pass (every
        position decides for itself, as when decoding); the sequence cache is reset."""
        rows = []
        for row in np.asarray(token_ids).tolist():
            self.reset()
            rows.append(self.forward(row))
        self.reset()
        return np.stack(rows)

    def skip_ratio(self) -> float | None:
        return self.stats.skip_ratio if self.stats is not None else 0.0

    def per_layer_skip(self) -> list[float] | None:
        return self.stats.per_layer() if self.stats is not None else None

    # -- extras ------------------------------------------------------------------------------
    @property
    def stats(self) -> SkipStats | None:
        """The skip runtime's counters for the current sequence (None when dense)."""
        runtime = self.runtime if self.policy is not None else active_runtime(self.model)
        return runtime.stats if runtime is not None else None

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
