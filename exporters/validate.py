"""Parity of an exported graph with the PyTorch skip runtime: logits, present KV and per-layer decisions.

Both sides decode the same tokens (PyTorch picks them greedily, ONNX Runtime is fed the same ones):
a prefill long enough to pass the policy's warm-up, then `steps` single-token steps through the KV
cache, with the same ``skip_mask`` override. Run by ``export`` itself and by the tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from skiptool.runtime import SkipRuntime

FP32_TOLERANCE = 1e-4


@dataclass
class ParityReport:
    """Largest differences between ONNX Runtime and PyTorch over a prefill and `steps` decode steps."""

    prompt_tokens: int
    steps: int
    max_abs_logits: float
    max_abs_present: float
    decisions_match: bool
    decision_mismatches: int
    skip_ratio_torch: float
    skip_ratio_ort: float

    def ok(self, tolerance: float = FP32_TOLERANCE) -> bool:
        return self.decisions_match and max(self.max_abs_logits, self.max_abs_present) <= tolerance

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok_fp32_tolerance": self.ok()}


@dataclass
class _Trace:
    logits: list[np.ndarray]  # per forward pass, [tokens, vocab]
    decisions: list[np.ndarray]  # per forward pass, [num_layers, tokens] bool
    presents: list[np.ndarray]  # last K, V of every layer
    tokens: list[int]


def parity_prompt(model: nn.Module, warmup: int, seed: int = 0) -> list[int]:
    """A fixed pseudo-random prompt past the warm-up, so the decode steps can skip."""
    length = max(8, warmup + 4)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, int(model.config.vocab_size), (length,), generator=g).tolist()


@torch.inference_mode()
def torch_trace(model: nn.Module, runtime: SkipRuntime, prompt: Sequence[int], steps: int,
                skip_mask: Sequence[int] | None = None, tokens: Sequence[int] | None = None) -> _Trace:
    """Greedy decode (or teacher-forced `tokens`) through the PyTorch runtime, recording decisions."""
    from transformers import DynamicCache

    runtime.set_override(None if skip_mask is None else list(skip_mask))
    cache = DynamicCache(config=model.config)
    trace = _Trace([], [], [], [])
    chunk, position = list(prompt), 0
    try:
        for i in range(steps + 1):
            ids = torch.tensor([chunk])
            pos = torch.arange(position, position + len(chunk))[None]
            with runtime.recording() as rec:
                logits = model(input_ids=ids, past_key_values=cache, use_cache=True, position_ids=pos).logits[0]
                trace.decisions.append(np.stack([rec[j][0].numpy() for j in range(len(rec))]))
            trace.logits.append(logits.float().numpy())
            position += len(chunk)
            nxt = int(logits[-1].argmax()) if tokens is None or i >= len(tokens) else int(tokens[i])
            trace.tokens.append(nxt)
            chunk = [nxt]
    finally:
        runtime.set_override(None)
    trace.presents = [t.float().numpy() for layer in cache.layers for t in (layer.keys, layer.values)]
    return trace


def ort_trace(backend: Any, prompt: Sequence[int], tokens: Sequence[int]) -> _Trace:
    """The same sequence through an :class:`~skiptool.backends.onnxruntime.OrtBackend`."""
    backend.reset()
    trace = _Trace([], [], [], list(tokens))
    chunk = list(prompt)
    for token in tokens:
        trace.logits.append(backend.forward(chunk))
        trace.decisions.append(backend.last_decisions.astype(bool))
        chunk = [int(token)]
    num_layers = backend.io.num_layers
    trace.presents = [t.astype(np.float32) for i in range(num_layers) for t in backend.present(i)]
    return trace


def compare(reference: _Trace, got: _Trace, prompt_tokens: int) -> ParityReport:
    """Differences between two traces of the same token sequence."""
    logits = max(float(np.abs(a - b).max()) for a, b in zip(reference.logits, got.logits))
    present = max(float(np.abs(a - b).max()) for a, b in zip(reference.presents, got.presents))
    mismatches = sum(int((a != b).sum()) for a, b in zip(reference.decisions, got.decisions))
    return ParityReport(prompt_tokens, len(reference.logits) - 1, logits, present, mismatches == 0, mismatches,
                        _decode_ratio(reference.decisions), _decode_ratio(got.decisions))


def _decode_ratio(decisions: list[np.ndarray]) -> float:
    steps = decisions[1:]
    total = sum(d.size for d in steps)
    return float(sum(d.sum() for d in steps) / total) if total else 0.0


def check_parity(model_dir: str | Path, model: nn.Module, runtime: SkipRuntime, steps: int = 32,
                 skip_mask: Sequence[int] | None = None, prompt: Sequence[int] | None = None,
                 backend: Any = None) -> ParityReport:
    """ORT vs the PyTorch skip runtime (same policy, same override) on a prefill plus `steps` decode steps."""
    from skiptool.backends.onnxruntime import OrtBackend

    prompt = list(prompt) if prompt is not None else parity_prompt(model, runtime.policy.warmup)
    reference = torch_trace(model, runtime, prompt, steps, skip_mask)
    backend = backend or OrtBackend(model_dir, providers=["CPUExecutionProvider"])
    backend.set_skip_mask(skip_mask)
    got = ort_trace(backend, prompt, reference.tokens)
    return compare(reference, got, len(prompt))
