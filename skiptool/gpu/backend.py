"""The GPU decode path as a decode backend: :class:`EngineBackend` runs a :class:`~.decoder.DecodeEngine` behind the
:class:`~skiptool.backends.base.DecodeBackend` protocol (batch 1), so ``generate --device cuda``, ``bench --device
cuda`` and the tests drive it through the one decode loop (:func:`skiptool.generate.decode`) like any backend.

On CUDA the decode step is captured after the first prefill — one CUDA graph per step in ``dense`` and ``device``
mode, graphed pieces between the host reads in ``host`` mode — and replayed for every later sequence (the static
cache and input buffers keep their addresses). On a CPU the same code runs eagerly.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..adapters import ArchAdapter
from ..config import SkipConfig, dense_config
from ..ideal import IdealBasis
from ..models import precision_of
from ..runtime import policy_and_substitutes
from .decoder import DecodeEngine
from .measure import decode_basis


class EngineBackend:
    """:class:`~skiptool.backends.base.DecodeBackend` over the static-KV-cache engine, one sequence at a time.

    `config` None: the model's dense default config (it never skips; `override` may still force layers:
    1 skip, -1 compute, 0 policy). `ffn_mode`: ``dense`` (the graphed baseline), ``device`` (the decisions stay on
    the device) or ``host`` (each layer's decision read on the host, as ONNX Runtime's and TensorRT's ``If`` do).
    `max_len` bounds prompt plus generated tokens; attention reads the whole static cache every step, so keep it
    tight. `policy_overrides` replace policy parameters (``threshold`` of a router). Skip counters cover the
    decode steps only, as in every other backend.
    """

    name = "torch-cuda-graph"

    def __init__(self, model: nn.Module, adapter: ArchAdapter, config: SkipConfig | None = None, *,
                 ffn_mode: str = "device", override: Sequence[int] | None = None, max_len: int = 2048,
                 policy_overrides: Mapping[str, Any] | None = None) -> None:
        policy, substitutes = policy_and_substitutes(model, config if config is not None else dense_config(model),
                                                     **(policy_overrides or {}))
        self.model, self.adapter = model, adapter
        self.engine = DecodeEngine(model, adapter, policy, batch_size=1, max_len=max_len, mode=ffn_mode,
                                   substitutes=substitutes, override=override)
        self.precision = precision_of(model)
        self.mode = "dense" if ffn_mode == "dense" else "skip"
        self._captured = False

    # -- DecodeBackend -----------------------------------------------------------------------
    def reset(self) -> None:
        self.engine.rewind(0)
        self.engine.reset_counters()

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        """Run the prompt (eager); the first prefill also captures the decode step on CUDA."""
        logits = self.engine.prefill(torch.tensor([list(token_ids)], dtype=torch.int64))
        if not self._captured:
            self.engine.capture()
            self._captured = True
        self.engine.reset_counters()  # count decode steps only
        return _host(logits[0, -1])

    def step(self, token_id: int) -> np.ndarray:
        return _host(self.engine.step(torch.tensor([int(token_id)]))[0])

    def skip_ratio(self) -> float | None:
        return self.engine.skip_summary()["skip_ratio"]

    def per_layer_skip(self) -> list[float] | None:
        return self.engine.skip_summary()["per_layer"] if self.mode == "skip" else None

    # -- extras ------------------------------------------------------------------------------
    @property
    def graphed(self) -> str | None:
        """How the decode step runs: "whole" (one CUDA graph), "pieces" (host mode), or None (eager)."""
        return self.engine.graphed

    def ffn_counters(self) -> dict[str, int]:
        """FFN calls made and avoided during the decode steps since the last reset."""
        summary = self.engine.skip_summary()
        return {"ffn_calls": summary["ffn_calls"], "ffn_calls_avoided": summary["ffn_calls_avoided"]}

    def ideal_basis(self) -> IdealBasis:
        """Bytes one decode step reads (weights, the whole static cache, routers; stand-ins when skipping)."""
        return decode_basis(self.model, self.adapter, self.engine)


def _host(logits: Tensor) -> np.ndarray:
    return logits.float().cpu().numpy()
