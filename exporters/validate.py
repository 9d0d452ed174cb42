"""Parity of an exported graph with the PyTorch skip runtime — logits, present KV, per-layer decisions — and
its enforcement: every export runs :func:`check_parity` on what it wrote and :func:`enforce_parity` refuses a
graph outside the documented tolerance of its target and precision (:data:`TOLERANCES`), so a bad graph is
never left behind.

Both sides decode the same tokens (PyTorch picks them greedily, ONNX Runtime is fed the same ones, so one
divergent step cannot derail the rest): a prompt long enough to pass the policy's warm-up, then `steps`
single-token steps through the KV cache, with the same ``skip_mask`` override.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from skiptool.adapters import cache_kwargs
from skiptool.contract import ExportManifest
from skiptool.errors import SkipToolError
from skiptool.runtime import SkipRuntime


@dataclass(frozen=True)
class Tolerance:
    """How close an export must stay to the PyTorch skip runtime (fp32) on the parity sequence.

    `logits` / `present`: the largest absolute difference allowed, ``atol + rtol * max |reference|``;
    `decisions`: the share of (layer, token) skip decisions that must be equal; `top1`: the share of positions
    whose most likely next token must be equal. ``None`` leaves a quantity unchecked (it is still reported).
    """

    logits_atol: float | None
    logits_rtol: float = 0.0
    decisions: float = 1.0
    top1: float | None = None

    def bound(self, reference_max: float) -> float | None:
        return None if self.logits_atol is None else self.logits_atol + self.logits_rtol * reference_max


# (target, precision) -> tolerance; measured on tiny random models and the demo model (see README, "Export
# precision"); a quantized graph is compared with the fp32 PyTorch runtime, so decisions near a threshold
# may legitimately flip there.
TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("onnx", "fp32"): Tolerance(1e-4, 1e-5, decisions=1.0, top1=1.0),
    ("onnx", "fp16"): Tolerance(5e-2, 1e-2, decisions=0.97, top1=0.9),
    ("onnx", "int8"): Tolerance(None, decisions=0.9, top1=0.8),
    ("onnx", "int4"): Tolerance(None, decisions=0.75, top1=0.5),
    ("ort", "fp32"): Tolerance(1e-3, 1e-4, decisions=1.0, top1=1.0),  # fused kernels (GQA, fused norms)
    ("ort", "int8"): Tolerance(None, decisions=0.9, top1=0.8),
    ("ort", "int4"): Tolerance(None, decisions=0.75, top1=0.5),
}
TOLERANCES[("tensorrt", "fp32")] = TOLERANCES[("onnx", "fp32")]  # the engine's graph is the onnx target's
TOLERANCES[("tensorrt", "fp16")] = TOLERANCES[("onnx", "fp16")]


def tolerance_for(target: str, precision: str) -> Tolerance:
    try:
        return TOLERANCES[(target, precision)]
    except KeyError:
        raise SkipToolError(f"no documented parity tolerance for a {precision} {target} export") from None


@dataclass
class ParityReport:
    """Differences between ONNX Runtime and PyTorch over a prefill and `steps` decode steps."""

    prompt_tokens: int
    steps: int
    max_abs_logits: float
    max_abs_present: float
    max_abs_reference_logits: float
    decision_agreement: float
    decision_mismatches: int
    top1_agreement: float
    skip_ratio_torch: float
    skip_ratio_ort: float
    verdict: dict[str, Any] = field(default_factory=dict)

    @property
    def decisions_match(self) -> bool:
        return self.decision_mismatches == 0

    def problems(self, tol: Tolerance) -> list[str]:
        """What is outside `tol` (empty when the export passes)."""
        out = []
        bound = tol.bound(self.max_abs_reference_logits)
        if bound is not None and self.max_abs_logits > bound:
            out.append(f"logits differ by up to {self.max_abs_logits:.2e} (tolerance {bound:.2e})")
        if bound is not None and self.max_abs_present > bound:
            out.append(f"present KV differs by up to {self.max_abs_present:.2e} (tolerance {bound:.2e})")
        if self.decision_agreement < tol.decisions:
            out.append(f"{self.decision_mismatches} skip decisions differ ({self.decision_agreement:.1%} agree, "
                       f"tolerance {tol.decisions:.0%})")
        if tol.top1 is not None and self.top1_agreement < tol.top1:
            out.append(f"the top token agrees at {self.top1_agreement:.1%} of positions (tolerance {tol.top1:.0%})")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "decisions_match": self.decisions_match}


@dataclass
class Trace:
    logits: list[np.ndarray] = field(default_factory=list)  # per forward pass, [tokens, vocab]
    decisions: list[np.ndarray] = field(default_factory=list)  # per forward pass, [num_layers, tokens] bool
    presents: list[np.ndarray] = field(default_factory=list)  # last K, V of every layer
    tokens: list[int] = field(default_factory=list)


def parity_prompt(tokenizer: Any, warmup: int, vocab_size: int, seed: int = 0) -> list[int]:
    """A fixed prompt past the warm-up (so the decode steps can skip): the start of the built-in WikiText-2
    excerpt, or pseudo-random ids when the tokenizer reads too few distinct tokens from it (toy vocabularies)."""
    from skiptool.data import BUILTIN_SAMPLE, DataSpec, load_text

    length = max(8, warmup + 4)
    ids = tokenizer(load_text(DataSpec(BUILTIN_SAMPLE, part=(0.0, 0.05))), add_special_tokens=False)["input_ids"]
    if len(ids) >= length and len(set(ids[:length])) >= length // 2 and max(ids[:length]) < vocab_size:
        return list(ids[:length])
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (length,), generator=g).tolist()


@torch.inference_mode()
def torch_trace(model: nn.Module, runtime: SkipRuntime, prompt: Sequence[int], steps: int,
                skip_mask: Sequence[int] | None = None) -> Trace:
    """Greedy decode through the PyTorch runtime, recording logits, decisions and the final KV cache."""
    from transformers import DynamicCache

    runtime.set_override(None if skip_mask is None else list(skip_mask))
    cache, trace = DynamicCache(config=model.config), Trace()
    chunk, position = list(prompt), 0
    device = next(model.parameters()).device
    try:
        for _ in range(steps + 1):
            ids = torch.tensor([chunk], device=device)
            pos = torch.arange(position, position + len(chunk), device=device)[None]
            with runtime.recording() as rec:
                logits = model(input_ids=ids, position_ids=pos, use_cache=True, **cache_kwargs(model, cache)).logits[0]
                trace.decisions.append(np.stack([rec[j][0].cpu().numpy() for j in range(len(rec))]))
            trace.logits.append(logits.float().cpu().numpy())
            position += len(chunk)
            trace.tokens.append(int(logits[-1].argmax()))
            chunk = [trace.tokens[-1]]
    finally:
        runtime.set_override(None)
    trace.presents = [t.float().cpu().numpy() for layer in cache.layers for t in (layer.keys, layer.values)]
    return trace


def ort_trace(graph: Path, manifest: ExportManifest, prompt: Sequence[int], tokens: Sequence[int],
              skip_mask: Sequence[int] | None = None) -> Trace:
    """The same sequence through ONNX Runtime (CPU), fed `tokens` one at a time after the prompt."""
    from skiptool.ort import GraphSession, KvCursor

    cursor = KvCursor(GraphSession(graph, manifest.io, manifest.num_key_value_heads, manifest.head_dim,
                                   providers=["CPUExecutionProvider"]))
    mask = None if skip_mask is None else np.asarray(skip_mask, dtype=np.int64)
    trace, chunk = Trace(tokens=list(tokens)), list(prompt)
    for token in tokens:
        out = cursor(np.asarray([chunk], dtype=np.int64), mask)
        if out.decisions is None:
            raise SkipToolError(f"{graph} has no skip_decisions output: it cannot be checked")
        trace.logits.append(out.logits[0].astype(np.float32))
        trace.decisions.append(out.decisions[:, 0, :].astype(bool))
        chunk = [int(token)]
    trace.presents = [p.numpy().astype(np.float32) for p in cursor.past]
    return trace


def compare(reference: Trace, got: Trace, prompt_tokens: int) -> ParityReport:
    """Differences between two traces of the same token sequence."""
    logits = max(float(np.abs(a - b).max()) for a, b in zip(reference.logits, got.logits))
    present = max(float(np.abs(a - b).max()) for a, b in zip(reference.presents, got.presents))
    ref_max = max(float(np.abs(a).max()) for a in reference.logits)
    mismatches = sum(int((a != b).sum()) for a, b in zip(reference.decisions, got.decisions))
    total = sum(a.size for a in reference.decisions)
    top1 = np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(reference.logits, got.logits)])
    return ParityReport(prompt_tokens, len(reference.logits) - 1, logits, present, ref_max,
                        1.0 - mismatches / max(total, 1), mismatches, float(top1.mean()),
                        _decode_ratio(reference.decisions), _decode_ratio(got.decisions))


def _decode_ratio(decisions: list[np.ndarray]) -> float:
    steps = decisions[1:]
    total = sum(d.size for d in steps)
    return float(sum(d.sum() for d in steps) / total) if total else 0.0


def check_parity(graph: str | Path, manifest: ExportManifest, model: nn.Module, runtime: SkipRuntime,
                 prompt: Sequence[int], steps: int = 32, skip_mask: Sequence[int] | None = None) -> ParityReport:
    """ORT vs the PyTorch skip runtime (same policy, same override) on `prompt` plus `steps` decode steps."""
    reference = torch_trace(model, runtime, prompt, steps, skip_mask)
    got = ort_trace(Path(graph), manifest, prompt, reference.tokens, skip_mask)
    return compare(reference, got, len(prompt))


def enforce_parity(report: ParityReport, target: str, precision: str, graph: str | Path) -> dict[str, Any]:
    """The report as the manifest records it, or one error line naming what is outside the tolerance."""
    tol = tolerance_for(target, precision)
    problems = report.problems(tol)
    if problems:
        raise SkipToolError(f"the {precision} {target} export does not match the PyTorch skip runtime: "
                            f"{'; '.join(problems)} — nothing was written ({Path(graph).name} discarded)")
    report.verdict = {"tolerance": asdict(tol), "ok": True}
    return report.to_dict()
