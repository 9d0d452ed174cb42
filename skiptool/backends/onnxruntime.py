"""ONNX Runtime decode backend for skiptool's export folders (every target: ``onnx``, ``ort``, ``tensorrt``'s graph).

One sequence at a time through :class:`skiptool.ort.GraphSession` (an ``IOBinding``: the ``present.*`` outputs
stay in ONNX Runtime's buffers and are bound as the next step's ``past_key_values.*``; ``logits`` and
``skip_decisions`` are read on the host once per step), so :meth:`OrtBackend.skip_ratio` is the ratio the graph
itself realised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..contract import ExportManifest, read_manifest
from ..ort import GraphSession, KvCursor, plan_placement
from .registry import RUNTIMES, RunOptions, Runtime
from .base import DecisionCounter, parse_skip_mask


class OrtBackend:
    """A :class:`~skiptool.backends.base.DecodeBackend` over an exported skiptool graph."""

    name = "onnxruntime"

    def __init__(self, model_dir: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 spin: bool | None = None, skip_mask: Sequence[int] | None = None,
                 manifest: ExportManifest | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.manifest = manifest or read_manifest(model_dir)
        self.precision, self.mode = self.manifest.precision, self.manifest.mode
        self.io = self.manifest.io
        self.graph = GraphSession(self.model_dir / self.manifest.file, self.io, self.manifest.num_key_value_heads,
                                  self.manifest.head_dim, providers, threads, spin)
        self.placement = self.graph.placement
        self.set_skip_mask(skip_mask)
        self.reset()

    @classmethod
    def from_export(cls, folder: Path, manifest: ExportManifest, options: RunOptions) -> "OrtBackend":
        providers = list(options.providers) if options.providers is not None else None
        return cls(folder, providers, options.threads, options.spin, options.skip_mask, manifest)

    # -- configuration ---------------------------------------------------------------------------
    def set_skip_mask(self, skip_mask: Sequence[int] | None) -> None:
        """Per-layer override fed to the graph: 1 force skip, -1 force compute, 0 policy (None: the default)."""
        self.skip_mask = None if skip_mask is None else parse_skip_mask(skip_mask, self.io.num_layers)

    # -- DecodeBackend ---------------------------------------------------------------------------
    def reset(self) -> None:
        self.cursor = KvCursor(self.graph)
        self.last_decisions: np.ndarray | None = None
        self.counter = DecisionCounter(self.io.num_layers)

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        return self.forward(token_ids, count=False)[-1]

    def step(self, token_id: int) -> np.ndarray:
        return self.forward([int(token_id)])[-1]

    def skip_ratio(self) -> float | None:
        """Skipped (layer, token) FFN blocks over all of them since :meth:`reset` (decode steps and
        :meth:`block_logits` passes; not the prefill)."""
        return self.counter.ratio

    def per_layer_skip(self) -> list[float]:
        """Per layer, the share of counted tokens whose FFN was skipped (cold layers 0)."""
        return self.counter.per_layer()

    @property
    def length(self) -> int:
        """Tokens in the cached sequence."""
        return self.cursor.length

    # -- the decode loop -------------------------------------------------------------------------
    def forward(self, token_ids: Sequence[int], count: bool = True) -> np.ndarray:
        """Append tokens to the cached sequence; return their logits ``[len(token_ids), vocab]`` (float32)."""
        out = self.cursor(np.asarray(token_ids, dtype=np.int64).reshape(1, -1), self.skip_mask)
        if out.decisions is not None:
            self.last_decisions = out.decisions[:, 0, :]  # [num_layers, n]
            if count:
                self.counter.add(self.last_decisions)
        return out.logits[0].astype(np.float32, copy=False)

    def present(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """The cached key and value of `layer` (``[1, kv_heads, length, head_dim]``)."""
        past = self.cursor.past
        return past[2 * layer].numpy(), past[2 * layer + 1].numpy()

    # -- whole blocks (evaluation) ---------------------------------------------------------------
    def block_logits(self, token_ids: np.ndarray) -> np.ndarray:
        """Logits ``[n, seq, vocab]`` for a batch of token blocks ``[n, seq]`` from an empty cache (float32).

        The sequence cache is left alone; the decisions count towards :meth:`skip_ratio`.
        """
        ids = np.asarray(token_ids, dtype=np.int64)
        batch, seq = ids.shape
        positions = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
        out = self.graph.run(ids, np.ones_like(ids), positions, self.graph.empty_past(batch), self.skip_mask)
        if out.decisions is not None:
            self.last_decisions = out.decisions
            self.counter.add(out.decisions)
        return out.logits.astype(np.float32, copy=False)


def default_providers() -> list[str]:
    """CUDA (then CPU) when onnxruntime-gpu sees a GPU, else CPU."""
    return list(plan_placement().providers)


RUNTIMES.register("onnxruntime", Runtime("onnxruntime", OrtBackend.from_export))
