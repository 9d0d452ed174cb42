"""The timing loop: what one run is (:class:`RunSpec`), what it measured (:class:`RunResult`), and
:func:`measure`, which builds every backend and decodes the same prompts with each, round-robin over the
repetitions, warm-up dropped. Also the process memory readings, perplexity through any backend, and the
backend wrappers the plans share (:class:`MaskedView`, :func:`shared`).
"""

from __future__ import annotations

import math
import os
import platform
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..backends.base import DecodeBackend
from ..backends.decode import decode
from ..ideal import IdealBasis

DEFAULT_NEW_TOKENS = 128


@dataclass
class RunSpec:
    """One benchmark run: what it is and how to build its backend (None with `skipped` set: not runnable)."""

    backend: str
    mode: str  # "dense" or "skip"
    precision: str
    make: Callable[[], DecodeBackend] | None
    label: str = ""
    policy: str = "dense"  # "dense", a policy kind, or "forced"
    forced_ratio: float | None = None
    ideal: IdealBasis | Callable[[DecodeBackend], IdealBasis] | None = None
    skipped: str | None = None
    optional: bool = False  # a peer: a failure is reported, not raised
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.label:
            what = self.mode if self.forced_ratio is None else f"skip {self.forced_ratio:.0%} forced"
            if self.mode == "skip" and self.forced_ratio is None and self.policy not in ("dense", "skip"):
                what = f"skip ({self.policy})"
            self.label = f"{self.backend} {self.precision} {what}"


@dataclass
class RunResult:
    """Raw measurements of one run over the kept repetitions."""

    spec: RunSpec
    tokens_per_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    prefill_s: list[float] = field(default_factory=list)
    skip_ratios: list[float] = field(default_factory=list)
    ffn_calls: int | None = None
    ffn_calls_avoided: int | None = None
    per_layer_skip: list[float] | None = None
    rss_load_mib: float | None = None
    rss_after_mib: float | None = None
    cpu_ms_per_token: list[float] = field(default_factory=list)
    perplexity: float | None = None
    error: str | None = None
    ideal_basis: IdealBasis | None = None
    tokens: list[int] | None = None


def rss_mib() -> float:
    """Current resident set size of this process in MiB."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return math.nan


def peak_rss_mib() -> float:
    """High-water RSS of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 1024


def backend_logits_fn(backend: DecodeBackend) -> Callable[[Any], Any]:
    """``ids [n, seq] -> logits [n, seq, vocab]`` for :func:`skiptool.evaluate.token_nll`: one block pass where
    the backend has ``block_logits`` (every position decides for itself, as in decoding: PyTorch, ONNX Runtime),
    else through the decode protocol, one token per step (peers, engines)."""
    import torch

    block = getattr(backend, "block_logits", None)

    def logits(ids: Any) -> Any:
        rows = []
        for row in ids.tolist():
            backend.reset()
            if block is not None:
                rows.append(block(np.asarray([row], dtype=np.int64))[0])
            else:
                rows.append(np.stack([backend.prefill(row[:1])] + [backend.step(int(t)) for t in row[1:]]))
        return torch.from_numpy(np.stack(rows).astype(np.float32))

    return logits


def backend_perplexity(backend: DecodeBackend, blocks: Sequence[Sequence[int]]) -> float:
    """Perplexity of `blocks` through any backend (the evaluation's own NLL and perplexity)."""
    import torch

    from ..evaluate import perplexity, token_nll

    return perplexity(token_nll(backend_logits_fn(backend), torch.as_tensor(blocks, dtype=torch.long)))


@dataclass
class Measurement:
    """How to measure: prompts, lengths, repetitions."""

    prompts: list[list[int]]
    new_tokens: int = DEFAULT_NEW_TOKENS
    repeats: int = 3
    warmup: int = 1
    quality_blocks: list[list[int]] | None = None


def _build(spec: RunSpec) -> tuple[DecodeBackend | None, RunResult]:
    result = RunResult(spec)
    if spec.make is None:
        return None, result
    before = rss_mib()
    try:
        backend = spec.make()
    except Exception as exc:  # noqa: BLE001 - a peer that fails to load is reported, not fatal
        if not spec.optional:
            raise
        result.error = f"failed to load: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        return None, result
    result.rss_load_mib = rss_mib() - before
    return backend, result


def _decode_once(backend: DecodeBackend, result: RunResult, m: Measurement, keep: bool) -> None:
    for prompt in m.prompts:
        cpu = time.process_time()
        timing = decode(backend, prompt, m.new_tokens)
        cpu = time.process_time() - cpu
        if not keep:
            continue
        result.cpu_ms_per_token.append(1000.0 * cpu / max(len(timing.token_ids), 1))
        result.tokens_per_s.append(timing.tokens_per_s)
        result.step_s.extend(timing.step_s)
        result.prefill_s.append(timing.prefill_s)
        result.skip_ratios.append(timing.skip_ratio if timing.skip_ratio is not None else math.nan)
        result.tokens = timing.token_ids
        _add_counters(backend, result)


def _add_counters(backend: DecodeBackend, result: RunResult) -> None:
    counters = getattr(backend, "ffn_counters", None)
    if counters is not None:
        c = counters()
        result.ffn_calls = (result.ffn_calls or 0) + c["ffn_calls"]
        result.ffn_calls_avoided = (result.ffn_calls_avoided or 0) + c["ffn_calls_avoided"]
    per_layer = getattr(backend, "per_layer_skip", None)
    if per_layer is not None:
        result.per_layer_skip = per_layer()


def measure(specs: Sequence[RunSpec], m: Measurement,
            on_progress: Callable[[str], None] | None = None) -> list[RunResult]:
    """Build every backend, then decode round-robin: repetition r runs every backend before r + 1.

    The first `m.warmup` repetitions are dropped. A peer (``optional``) that fails is reported in its
    result's `error`; any other failure propagates.
    """
    built = [_build(spec) for spec in specs]
    _mark_shared(built)
    for rep in range(m.warmup + m.repeats):
        for backend, result in built:
            if backend is not None and result.error is None:
                _guarded(result, lambda: _decode_once(backend, result, m, keep=rep >= m.warmup))
                result.rss_after_mib = max(result.rss_after_mib or 0.0, rss_mib())
            if on_progress is not None:
                on_progress(result.spec.label)
    for backend, result in built:
        if backend is None or result.error is not None:
            continue
        if m.quality_blocks:
            _guarded(result, lambda: setattr(result, "perplexity", backend_perplexity(backend, m.quality_blocks)))
        if result.spec.ideal is not None:
            ideal = result.spec.ideal
            result.ideal_basis = ideal(backend) if callable(ideal) else ideal
        if on_progress is not None and m.quality_blocks:
            on_progress(result.spec.label)
        close = getattr(backend, "close", None)
        if close is not None:
            close()
    return [result for _, result in built]


def _mark_shared(built: list[tuple[DecodeBackend | None, RunResult]]) -> None:
    """Runs that reuse a backend another run loaded (forced ratios over one session) added no memory of their
    own: their load RSS is None, and their settings name the run that loaded it."""
    first: dict[int, str] = {}
    for backend, result in built:
        if backend is None:
            continue
        underlying = getattr(backend, "backend", backend)
        if id(underlying) in first:
            result.rss_load_mib = None
            result.spec.settings["shares_backend_with"] = first[id(underlying)]
        else:
            first[id(underlying)] = result.spec.label


def progress_steps(specs: Sequence[RunSpec], m: Measurement) -> int:
    """How many times :func:`measure` calls `on_progress`."""
    runnable = sum(1 for s in specs if s.make is not None)
    return len(specs) * (m.warmup + m.repeats) + (runnable if m.quality_blocks else 0)


def _guarded(result: RunResult, action: Callable[[], Any]) -> None:
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - peers only; others re-raise
        if not result.spec.optional:
            raise
        result.error = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


class MaskedView:
    """One loaded backend shared by runs that differ only in their ``skip_mask`` (set at each reset)."""

    def __init__(self, backend: Any, mask: Sequence[int] | None) -> None:
        self.backend, self.mask = backend, mask
        self.name, self.precision, self.mode = backend.name, backend.precision, "skip"
        if hasattr(backend, "block_logits"):
            self.block_logits = self._block_logits

    def _block_logits(self, token_ids: np.ndarray) -> np.ndarray:
        self.backend.set_skip_mask(self.mask)
        return self.backend.block_logits(token_ids)

    def reset(self) -> None:
        self.backend.set_skip_mask(self.mask)
        self.backend.reset()

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        return self.backend.prefill(token_ids)

    def step(self, token_id: int) -> np.ndarray:
        return self.backend.step(token_id)

    def skip_ratio(self) -> float | None:
        return self.backend.skip_ratio()

    def per_layer_skip(self) -> list[float] | None:
        return self.backend.per_layer_skip()


def shared(factory: Callable[[], Any]) -> Callable[[], Any]:
    """`factory`, called once: later calls return the same backend."""
    made: list[Any] = []

    def get() -> Any:
        if not made:
            made.append(factory())
        return made[0]

    return get
