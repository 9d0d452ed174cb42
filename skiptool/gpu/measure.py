"""Measuring the GPU decode path: time per decode step, the bytes a step reads, and the device's copy bandwidth.

Decode is bound by reading weights, so a step's time is compared with two ceilings: the ideal speedup from bytes
(:class:`~skiptool.ideal.IdealBasis`: dense bytes over the bytes read at the realised skip ratio, routers
and stand-ins counted) and the bandwidth a plain device-to-device copy reaches.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import ArchAdapter
from ..ideal import IdealBasis, percentile
from ..info import decode_weight_bytes
from .decoder import DecodeEngine


@dataclass
class DecodeTiming:
    """Seconds per decode step of `rows` sequences (warm-up excluded)."""

    step_s: list[float]
    rows: int

    @property
    def tokens_per_s(self) -> float:
        return self.rows * len(self.step_s) / sum(self.step_s) if self.step_s else math.nan

    @property
    def steps_per_s(self) -> float:
        return self.tokens_per_s / self.rows

    @property
    def p50_ms(self) -> float:
        return percentile(self.step_s, 50) * 1e3


def time_decode(engine: DecodeEngine, start: int, steps: int, repeats: int) -> DecodeTiming:
    """Greedy-decode `steps` tokens `repeats` times, each time from position `start` (the prompts' end), timing
    every step (CUDA events on a GPU, read once per repeat; the wall clock on a CPU)."""
    times: list[float] = []
    for _ in range(repeats):
        engine.rewind(start)
        times += _timed_steps(engine, steps)
    return DecodeTiming(times, engine.batch_size)


def _timed_steps(engine: DecodeEngine, steps: int) -> list[float]:
    if engine.device.type != "cuda":
        times = []
        for _ in range(steps):
            begin = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - begin)
        return times
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    events[0].record()
    for event in events[1:]:
        engine.step()
        event.record()
    events[-1].synchronize()
    return [a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:])]


def decode_basis(model: nn.Module, adapter: ArchAdapter, engine: DecodeEngine) -> IdealBasis:
    """Bytes one decode step reads: every weight once (the embedding as the tied head only), the whole static KV
    cache (attention reads all its positions), plus the engine's routers; skipping trades the skippable layers'
    FFN weights for their stand-ins."""
    ffn_bytes, weight_bytes = decode_weight_bytes(model, adapter)
    skippable = [part for part in engine.layers if part.skippable]
    policy_bytes = 0 if engine.mode == "dense" else sum(p.numel() * p.element_size()
                                                         for p in engine.policy.parameters())
    dense = float(weight_bytes + engine.cache.nbytes)
    return IdealBasis(dense_bytes=dense, base_bytes=dense + policy_bytes,
                      skippable_bytes=ffn_bytes * len(skippable) / len(engine.layers),
                      num_layers=len(engine.layers), num_skippable=len(skippable),
                      substitute_bytes=float(sum(p.substitute.nbytes for p in skippable if p.substitute is not None)))


def achieved_bandwidth(bytes_per_step: float, timing: DecodeTiming) -> float:
    """Bytes read per second while decoding."""
    return bytes_per_step * timing.steps_per_s


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """A device-to-device copy's rate in bytes/s, counting bytes read plus bytes written (the usual way to quote
    it; about 4.3e12 on an H200). On a CPU the same with the wall clock."""
    source = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # warm-up
    if device.type != "cuda":
        begin = time.perf_counter()
        for _ in range(repeats):
            target.copy_(source)
        return 2 * nbytes * repeats / (time.perf_counter() - begin)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        target.copy_(source)
    end.record()
    end.synchronize()
    return 2 * nbytes * repeats / (start.elapsed_time(end) / 1e3)
