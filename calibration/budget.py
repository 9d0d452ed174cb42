"""One budget across layers: spread the skips where they cost least, measured as KL to the dense model per unit of
FFN bytes saved.

Each skippable layer has a knob — here the share ``p`` of its calibration tokens that count as saturated for the
cosine policy (its threshold is the ``1 - p`` quantile of its saturation). :func:`layer_costs` turns one layer's
knob at a time (all others off) and measures, on calibration blocks, what that layer alone saves (``ffn_saved``)
and costs (mean KL(dense || skipping) per token past the warm-up). :func:`allocate` then spends a budget of
bytes saved greedily on the cheapest marginal KL per byte (over each layer's lower convex hull, so the greedy
choice is optimal for the additive model). Layers interact, so the real ratio is refitted afterwards with real
runs (:func:`skiptool.calibration.fit.fit_cosine` with a :class:`BudgetRule`).

Also here: what the warm-up costs (:func:`warmup_costs`) — the KL per skipped token by position, which shows how
many leading positions (the attention sink) are worth keeping dense.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters import ArchAdapter
from ..policies import SkipPolicy, block_positions, is_warm
from ..runtime import skipping

GRID = (0.1, 0.25, 0.5, 0.75, 1.0)  # knob values measured per layer
Progress = Callable[[str, int, int], Any]


@dataclass
class LayerCurve:
    """One layer's measured (knob, ffn_saved, kl) points, knob 0 = nothing skipped."""

    layer: int
    points: list[tuple[float, float, float]] = field(default_factory=list)

    def hull(self) -> list[tuple[float, float, float]]:
        """The lower convex hull of KL over saved bytes, from (0, 0, 0): the points worth stopping at."""
        pts = sorted([(0.0, 0.0, 0.0), *self.points], key=lambda p: p[1])
        hull: list[tuple[float, float, float]] = []
        for p in pts:
            while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) <= 0:
                hull.pop()
            if not hull or p[1] > hull[-1][1]:
                hull.append(p)
        return hull

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "points": [{"knob": k, "ffn_saved": s, "kl": c} for k, s, c in self.points]}


def _cross(a: tuple[float, float, float], b: tuple[float, float, float], c: tuple[float, float, float]) -> float:
    """> 0 when b lies below the segment a-c (convex), in the (saved, kl) plane."""
    return (b[1] - a[1]) * (c[2] - a[2]) - (b[2] - a[2]) * (c[1] - a[1])


@torch.no_grad()
def dense_logprobs(model: nn.Module, blocks: Tensor) -> Tensor:
    """The dense model's next-token log-probabilities on `blocks` (``[n, seq, vocab]``, float32)."""
    device = next(model.parameters()).device
    return torch.cat([F.log_softmax(model(b[None].to(device), position_ids=block_positions(b[None].to(device)))
                                    .logits.float(), -1).cpu() for b in blocks])


@torch.no_grad()
def kl_and_saved(model: nn.Module, adapter: ArchAdapter, policy: SkipPolicy, blocks: Tensor, dense: Tensor,
                 substitutes: dict[int, nn.Module] | None = None) -> tuple[float, float, Tensor]:
    """Mean KL(dense || skipping) over the tokens past the warm-up, the ffn_saved, and the per-token KL ``[n, seq]``."""
    device = next(model.parameters()).device
    per_token = []
    with skipping(model, adapter, policy, substitutes) as runtime:
        for b, teacher in zip(blocks, dense):
            ids = b[None].to(device)
            student = F.log_softmax(model(ids, position_ids=block_positions(ids)).logits.float(), -1).cpu()[0]
            per_token.append((teacher.exp() * (teacher - student)).sum(-1))
        saved = runtime.stats.ffn_saved
    kl = torch.stack(per_token)
    warm = is_warm(block_positions(blocks), policy.warmup)
    return float(kl[warm].mean()), saved, kl


def layer_costs(model: nn.Module, adapter: ArchAdapter, blocks: Tensor, layers: Sequence[int],
                policy_for: Callable[[dict[int, float]], SkipPolicy], substitutes: dict[int, nn.Module] | None = None,
                grid: Sequence[float] = GRID, progress: Progress | None = None) -> list[LayerCurve]:
    """Each layer's (knob, ffn_saved, KL) with only that layer's knob turned (`policy_for({layer: knob})`)."""
    dense = dense_logprobs(model, blocks)
    curves, total, done = [], len(layers) * len(grid), 0
    for layer in layers:
        curve = LayerCurve(layer)
        for knob in grid:
            kl, saved, _ = kl_and_saved(model, adapter, policy_for({layer: knob}), blocks, dense, substitutes)
            curve.points.append((knob, saved, kl))
            done += 1
            if progress is not None:
                progress("cost of skipping, layer by layer", done, total)
        curves.append(curve)
    return curves


def allocate(curves: Sequence[LayerCurve], budget: float) -> dict[int, float]:
    """Knob per layer that saves about `budget` (a share of all FFN bytes) at the least summed KL: the steps of
    the layers' convex hulls taken cheapest marginal KL per byte first; the last step is interpolated."""
    steps = []  # (marginal cost per byte, layer, hull point before, hull point after)
    for curve in curves:
        hull = curve.hull()
        steps += [((b[2] - a[2]) / (b[1] - a[1]), curve.layer, a, b) for a, b in zip(hull, hull[1:])]
    knobs, spent = {c.layer: 0.0 for c in curves}, 0.0
    for _, layer, a, b in sorted(steps, key=lambda s: s[0]):
        if spent >= budget:
            break
        share = min(1.0, (budget - spent) / (b[1] - a[1]))
        knobs[layer] = a[0] + share * (b[0] - a[0])
        spent += share * (b[1] - a[1])
    return knobs


def max_budget(curves: Sequence[LayerCurve]) -> float:
    """What every layer's largest knob saves together (the additive model's ceiling)."""
    return sum(max(s for _, s, _ in c.points) for c in curves)


@dataclass
class BudgetRule:
    """Thresholds from a budget: knob ``q`` in [0, 1] spends ``q`` times :func:`max_budget` by :func:`allocate`;
    `thresholds_at(knobs)` turns per-layer knobs into the policy's thresholds."""

    curves: list[LayerCurve]
    thresholds_at: Callable[[dict[int, float]], list[float | None]]

    def thresholds(self, q: float) -> list[float | None]:
        return self.thresholds_at(allocate(self.curves, q * max_budget(self.curves)))


POSITION_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128)


class PositionWindow(SkipPolicy):
    """`base`'s decisions, kept only for positions in ``[start, end)`` (warm-up 0): what skipping there costs."""

    def __init__(self, base: SkipPolicy, start: int, end: int) -> None:
        super().__init__(base.num_layers, base.skippable_layers, warmup=0)
        self.base, self.start, self.end = base, start, end

    def init_state(self, h: Tensor) -> Tensor | None:
        return self.base.init_state(h)

    def rule(self, s: Any, state: Tensor | None) -> Tensor:
        inside = (s.positions >= self.start) & (s.positions < self.end)
        return self.base.rule(s, state) & inside.expand(s.x.shape[:2])

    def update(self, layer: int, h_mid: Tensor, delta: Tensor, skip: Tensor, state: Tensor | None) -> Tensor | None:
        return self.base.update(layer, h_mid, delta, skip, state)


@torch.no_grad()
def warmup_costs(model: nn.Module, adapter: ArchAdapter, blocks: Tensor, policy: SkipPolicy,
                 substitutes: dict[int, nn.Module] | None = None,
                 progress: Progress | None = None) -> list[dict[str, float]]:
    """Per range of positions: the KL to the dense model over ALL tokens that skipping only inside the range
    causes (attention carries the damage forward), per skipped FFN block there. `policy` decides what is skipped;
    its warm-up is ignored. The leading ranges (the attention sink) typically cost far more per skip."""
    dense = dense_logprobs(model, blocks)
    seq = int(blocks.shape[1])
    ranges = [(a, min(b, seq)) for a, b in zip(POSITION_BUCKETS, [*POSITION_BUCKETS[1:], seq]) if a < seq]
    rows = []
    for i, (start, end) in enumerate(ranges):
        window = PositionWindow(policy, start, end)
        with skipping(model, adapter, window, substitutes) as runtime:
            kl = _summed_kl(model, blocks, dense)
            skipped = sum(runtime.stats.skipped_tokens)
        rows.append({"from": start, "to": end, "skipped": skipped, "kl_per_skip": kl / skipped if skipped else 0.0})
        if progress is not None:
            progress("cost of skipping, position by position", i + 1, len(ranges))
    return rows


def _summed_kl(model: nn.Module, blocks: Tensor, dense: Tensor) -> float:
    device = next(model.parameters()).device
    total = 0.0
    for b, teacher in zip(blocks, dense):
        ids = b[None].to(device)
        student = F.log_softmax(model(ids, position_ids=block_positions(ids)).logits.float(), -1).cpu()[0]
        total += float((teacher.exp() * (teacher - student)).sum())
    return total


def choose_warmup(rows: Sequence[dict[str, float]], factor: float = 2.0) -> int:
    """The warm-up: the leading ranges whose cost per skip is above `factor` times the median cost of the ranges
    after them, as long as they run from position 0 (0 when the first range is already cheap)."""
    warmup = 0
    for i, row in enumerate(rows[:-1]):
        later = sorted(r["kl_per_skip"] for r in rows[i + 1:] if r["skipped"])
        if not (later and row["skipped"] and row["kl_per_skip"] > factor * later[len(later) // 2]):
            break
        warmup = int(row["to"])
    return warmup
