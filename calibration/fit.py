"""From layer statistics to a cosine (FFN-SkipLLM) skip config that meets a target skip ratio.

**Cold regions.** Layer 0 and the last layer are always cold (never skipped). A cold region then grows
inward while the next layer's mean saturation ``cos(h, h + FFN(h))`` is a low outlier among all
layers: robust z-score ``(mean - median) / (1.4826 * MAD) < -3``. Each region is capped at a quarter
of the layers. (On SmolLM2-135M this gives one layer at each end: layer 0's FFN rewrites the stream,
``cos ~ 0.05``; layer 29's ``cos ~ 0.77``; every other layer sits at 0.95-0.98.)

**Thresholds.** One parameter ``p`` in [0, 1] sets every skippable layer's threshold: in ``per-layer``
mode the ``(1 - p)`` quantile of that layer's saturation on the calibration tokens (each layer sees
the same share of saturated tokens in the dense stream); in ``global`` mode the same quantile of all
skippable layers pooled. The realised skip ratio — skipped FFN blocks over all layers and all
positions, cold layers and warm-up included, as :class:`skiptool.runtime.SkipStats` counts it — is
measured by running :class:`CosineGreedy` through the runtime on the calibration blocks (skipping
changes the stream and so the later similarities, so it must be run for real). ``p`` is found by a
corrected secant search: the policy replayed on the recorded dense similarities predicts the ratio
cheaply, each real run corrects that prediction's bias, and a bracket of real runs guards the search.

**Greedy-k.** ``greedy_k`` (default 1) FFNs are skipped after each saturated one. With ``k = 1`` at most
about half of the skippable FFNs can be skipped; when the target needs more, ``k`` grows to the
smallest value that can reach it (recorded in the config).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..adapters import ArchAdapter
from ..config import CONFIG_FILENAME, ArtifactRef, SkipConfig, check_warmup_fits, dense_config
from ..data import DataSpec, check_blocks, check_data, token_blocks
from ..errors import ConfigError, SkipToolError
from ..fileio import atomic_directory, check_output_dir, write_json_atomic
from ..policies import CosineGreedy, LayerSignals, RandomSkip
from ..runtime import SkipStats, skipping
from ..standins import StandIns, StandInSpec, sized_standin, skip_target
from .collect import LayerStats, collect_layer_stats, run_blocks
from .budget import BudgetRule, LayerCurve, choose_warmup, layer_costs, warmup_costs
from .standin_fit import fit_standins

STATS_FILENAME = "layer_stats.json"
PLOT_FILENAME = "layer_stats.png"
STANDIN_FILENAME = "standin.safetensors"
THRESHOLD_MODES = ("per-layer", "global", "budget")
COLD_RULE = "layer 0 and the last layer, growing inward while mean saturation has robust z < -3 (max 1/4 each end)"
PhaseProgress = Callable[[str, int, int], Any]


# -- cold regions ---------------------------------------------------------------------------------
def choose_cold_regions(mean_saturation: list[float], z: float = 3.0, max_fraction: float = 0.25) -> tuple[int, int]:
    """(cold_start, cold_end): at least one layer each end, more while the next layer is a low outlier."""
    values = torch.tensor(mean_saturation, dtype=torch.float64)
    n = len(values)
    median = values.median()
    spread = max(1.4826 * float((values - median).abs().median()), 1e-6)
    cold = [(float(v) - float(median)) / spread < -z for v in values]
    limit = max(1, int(n * max_fraction))

    def run_length(indices: range) -> int:
        length = 1
        for i in list(indices)[1:]:
            if length >= limit or not cold[i]:
                break
            length += 1
        return length

    start, end = run_length(range(n)), run_length(range(n - 1, -1, -1))
    while start + end >= n:  # keep at least one skippable layer
        if start >= end:
            start -= 1
        else:
            end -= 1
    return start, end


# -- thresholds -----------------------------------------------------------------------------------
def thresholds_for(saturation: Tensor, skippable: list[int], p: float, mode: str = "per-layer") -> list[float | None]:
    """Per-layer thresholds at which a share `p` of the calibration tokens counts as saturated (``global``: of all
    skippable layers' tokens pooled)."""
    if mode not in ("per-layer", "global"):
        raise SkipToolError(f"unknown threshold mode {mode!r} (expected per-layer or global)")
    if mode == "global":
        pooled = saturation[skippable].reshape(-1)
        return [quantile_threshold(pooled, p) if i in skippable else None for i in range(saturation.shape[0])]
    return layer_thresholds(saturation, {i: p for i in skippable})


def layer_thresholds(saturation: Tensor, shares: dict[int, float]) -> list[float | None]:
    """Thresholds for the layers in `shares` (each counting that share of its tokens as saturated); None elsewhere."""
    return [quantile_threshold(saturation[i], shares[i]) if i in shares else None for i in range(saturation.shape[0])]


def quantile_threshold(values: Tensor, p: float) -> float | None:
    """The saturation above which a share `p` of `values` lies (every token at p = 1, none at p = 0)."""
    if p >= 1.0:
        return -1.0 - 1e-6  # below any cosine: every token is saturated
    if p <= 0.0:
        return None
    return float(torch.quantile(values.double(), 1.0 - p))


def replay_decisions(policy: CosineGreedy, saturation: Tensor, positions: Tensor | None = None) -> Tensor:
    """The decisions ``[layers, tokens]`` `policy` makes if the similarities `saturation` ``[layers, tokens]`` hold.

    Each cosine c becomes a 2-d residual stream h = (1, 0) and FFN delta (c - 1, sqrt(1 - c^2)), whose
    cos(h, h + delta) is c, and the policy's own ``decide``/``update`` run layer by layer (a skipped
    layer's value is never read). `positions` ``[tokens]`` defaults to all past warm-up.
    """
    num_layers, tokens = saturation.shape
    c = saturation.double().clamp(-1.0, 1.0)
    h = torch.zeros(1, tokens, 2, dtype=torch.float64)
    h[..., 0] = 1.0
    pos = torch.full((1, tokens), policy.warmup) if positions is None else positions.view(1, tokens)
    state = policy.init_state(h)
    out = torch.zeros(num_layers, tokens, dtype=torch.bool)
    for layer in range(num_layers):
        delta = torch.stack([c[layer] - 1.0, (1.0 - c[layer] ** 2).sqrt()], dim=-1).unsqueeze(0)
        skip = torch.zeros(1, tokens, dtype=torch.bool)
        if policy.is_skippable(layer):
            skip = policy.decide(LayerSignals(layer, h, torch.zeros_like(h), h, h, pos), pos, state, None)
        out[layer] = skip[0]
        state = policy.update(layer, h, delta, skip, state)
    return out


def replay_ratio(policy: CosineGreedy, saturation: Tensor, seq_len: int) -> float:
    """The skip ratio `policy` would give on blocks of `seq_len` if the recorded dense similarities held.

    `saturation` holds the tokens after warm-up; the ratio counts all layers and all positions.
    """
    num_layers, tokens = saturation.shape
    blocks = tokens / max(seq_len - policy.warmup, 1)
    return int(replay_decisions(policy, saturation).sum()) / (num_layers * blocks * seq_len)


@torch.no_grad()
def measure_ratio(model: nn.Module, adapter: ArchAdapter, policy: CosineGreedy, blocks: Tensor,
                  batch_size: int = 4, progress: Callable[[int, int], Any] | None = None,
                  substitutes: dict[int, nn.Module] | None = None) -> SkipStats:
    """The runtime's counters after running `blocks` with `policy` (``.skip_ratio`` is the realised ratio)."""
    with skipping(model, adapter, policy, substitutes) as runtime:
        run_blocks(model, blocks, batch_size, progress)
        return runtime.stats


@dataclass
class CosineFit:
    """Thresholds found for a target, with the real runs that found them."""

    thresholds: list[float | None]
    greedy_k: int
    p: float
    skip_ratio: float
    per_layer: list[float]
    runs: list[dict[str, float]] = field(default_factory=list)


def fit_cosine(model: nn.Module, adapter: ArchAdapter, blocks: Tensor, stats: LayerStats, target: float,
               skippable: list[int], greedy_k: int = 1, mode: str = "per-layer", tolerance: float = 0.005,
               max_runs: int = 8, batch_size: int = 4, progress: PhaseProgress | None = None,
               substitutes: dict[int, nn.Module] | None = None,
               rule: Callable[[float], list[float | None]] | None = None) -> CosineFit:
    """Thresholds (and greedy-k, if `greedy_k` cannot reach `target`) whose realised ratio on `blocks` hits `target`
    (measured with `substitutes`, e.g. stand-ins, in place of the skipped FFNs: they change later saturations).

    One parameter p in [0, 1] sets every threshold: by `mode`'s quantiles, or by `rule` (e.g. a
    :class:`~skiptool.calibration.budget.BudgetRule`'s ``thresholds``) when given."""
    num_layers, warmup, seq_len = stats.num_layers, stats.warmup, int(blocks.shape[1])
    thresholds_at = rule or (lambda p: thresholds_for(stats.saturation, skippable, p, mode))

    def policy_at(p: float, k: int) -> CosineGreedy:
        return CosineGreedy(num_layers, skippable, warmup, thresholds_at(p), k)

    def predicted(p: float, k: int) -> float:
        return replay_ratio(policy_at(p, k), stats.saturation, seq_len)

    k = smallest_greedy_k(lambda kk: predicted(1.0, kk), target, greedy_k, len(skippable))
    lo, hi = (0.0, 0.0), (1.0, predicted(1.0, k))  # (p, real ratio) brackets; p = 1 is exact by construction
    p, bias, best, runs = _solve(lambda q: predicted(q, k), target, 0.0, 1.0), 0.0, None, []
    for run in range(max_runs):
        counts = measure_ratio(model, adapter, policy_at(p, k), blocks, batch_size,
                               None if progress is None else (lambda d, n, r=run: progress(f"fit run {r + 1}", d, n)),
                               substitutes)
        ratio = counts.skip_ratio
        runs.append({"p": p, "skip_ratio": ratio})
        if best is None or abs(ratio - target) < abs(best[1].skip_ratio - target):
            best = (p, counts)
        if abs(ratio - target) <= tolerance:
            break
        lo, hi = ((p, ratio), hi) if ratio < target else (lo, (p, ratio))
        bias = predicted(p, k) - ratio
        p = _solve(lambda q: predicted(q, k) - bias, target, lo[0], hi[0])
        if not lo[0] < p < hi[0]:
            p = (lo[0] + hi[0]) / 2
    assert best is not None
    p, counts = best
    return CosineFit(thresholds_at(p), k, p, counts.skip_ratio, counts.per_layer(), runs)


def smallest_greedy_k(max_ratio: Callable[[int], float], target: float, start: int, limit: int) -> int:
    """The smallest k >= `start` whose largest reachable ratio exceeds `target` (a clear error if none)."""
    k = max(1, start)
    while max_ratio(k) < target + 0.002:
        if k >= limit:
            raise SkipToolError(f"target skip ratio {target:.2f} is out of reach: skipping every possible FFN "
                                f"after warm-up gives {max_ratio(k):.3f} (shorten --warmup or the cold regions)")
        k += 1
    return k


def _solve(f: Callable[[float], float], target: float, lo: float, hi: float, steps: int = 30) -> float:
    """Bisection for f(p) = target on [lo, hi], f increasing."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return (lo + hi) / 2


# -- the calibrate step ---------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationSettings:
    """Options of :func:`calibrate`; cold regions ``None`` = chosen from the statistics."""

    target_skip: float = 0.25
    samples: int = 16
    seq_len: int = 256
    warmup: int | None = 32  # None: chosen from the calibration data (what skipping each leading range costs)
    greedy_k: int = 1
    cold_start: int | None = None
    cold_end: int | None = None
    threshold_mode: str = "per-layer"
    tolerance: float = 0.005
    batch_size: int = 4
    standin: StandInSpec | None = StandInSpec()  # closed-form stand-ins for skipped FFNs (None: zeros)
    target_saved: float | None = None  # instead of target_skip: the share of FFN weight bytes to save
    cost_blocks: int = 4  # calibration blocks the layer and warm-up costs are measured on

    def skip_target(self, hidden_size: int, ffn_weights: int) -> float:
        """The skip ratio to fit: `target_skip`, or the one that saves `target_saved` of the FFN bytes with the
        stand-ins in place."""
        if self.target_saved is None:
            return self.target_skip
        return skip_target(self.target_saved, self.standin, hidden_size, ffn_weights)


@dataclass
class CalibrationResult:
    """The fitted config, the statistics behind it and where they were written."""

    config: SkipConfig
    stats: LayerStats
    fit: CosineFit
    paths: list[Path] = field(default_factory=list)
    standins: StandIns | None = None
    warmup_costs: list[dict[str, float]] | None = None  # when the warm-up was chosen from the data
    layer_costs: list[LayerCurve] | None = None  # with the budget threshold mode

    def layer_stats_json(self) -> dict[str, Any]:
        """``layer_stats.json``: per-layer statistics, cold regions, thresholds and realised skip ratios."""
        data = self.stats.to_dict()
        th = self.fit.thresholds
        for row in data["layers"]:
            i = row["layer"]
            row["threshold"], row["skip_ratio"] = th[i], self.fit.per_layer[i]
            row["cold"] = i not in self.config.skippable_layers
        costs = {c.layer: c for c in self.layer_costs or []}
        for row in data["layers"]:
            if row["layer"] in costs:
                row["layer_cost"] = costs[row["layer"]].to_dict()["points"]
        return {**data, "cold_start": self.config.cold_start, "cold_end": self.config.cold_end,
                "cold_rule": COLD_RULE, "target_skip": self.config.target_skip, "skip_ratio": self.fit.skip_ratio,
                "greedy_k": self.fit.greedy_k, "warmup_costs": self.warmup_costs}


def calibrate(model: nn.Module, adapter: ArchAdapter, tokenizer: Any, data: DataSpec, settings: CalibrationSettings,
              out_dir: str | Path | None = None, source: str = "",
              plot: Callable[[dict[str, Any], Path], Any] | None = None,
              progress: PhaseProgress | None = None) -> CalibrationResult:
    """Collect statistics on `data`, choose cold regions and fit thresholds; write `out_dir` atomically.

    Writes ``skip_config.json``, ``layer_stats.json`` and (with `plot`) ``layer_stats.png``; nothing is
    written unless everything succeeded.
    """
    _check_settings(settings)
    settings = replace(settings, standin=sized_standin(settings.standin, model))
    if out_dir is not None:
        check_output_dir(out_dir)
    blocks = token_blocks(tokenizer, data, settings.seq_len, settings.samples)
    warmup, warmup_rows = _warmup(model, adapter, blocks, settings, progress)
    stats = collect_layer_stats(model, adapter, blocks, warmup, settings.batch_size,
                                None if progress is None else (lambda d, n: progress("statistics", d, n)))
    auto = choose_cold_regions(stats.mean_saturation())
    cold_start = auto[0] if settings.cold_start is None else settings.cold_start
    cold_end = auto[1] if settings.cold_end is None else settings.cold_end
    base = dense_config(model, source, cold_start, cold_end, warmup)
    target = settings.skip_target(int(model.config.hidden_size), ffn_weight_count(model, adapter))
    standins = None
    if settings.standin is not None:  # fitted first: the thresholds are fitted with them in place
        standins = fit_standins(model, adapter, blocks, base.skippable_layers, settings.standin.known_size, warmup,
                                settings.standin.kind,
                                None if progress is None else (lambda d, n: progress("fit stand-ins", d, n)))
    substitutes = None if standins is None else standins.by_layer()
    costs = _layer_costs(model, adapter, blocks, stats, base, settings, substitutes, progress)
    rule = BudgetRule(costs, lambda knobs: layer_thresholds(stats.saturation, knobs)).thresholds if costs else None
    fit = fit_cosine(model, adapter, blocks, stats, target, base.skippable_layers, settings.greedy_k,
                     settings.threshold_mode, settings.tolerance, batch_size=settings.batch_size, progress=progress,
                     substitutes=substitutes, rule=rule)
    config = base.evolve(target_skip=target, metadata=_metadata(settings, data, fit, blocks)).with_policy(
        "cosine", thresholds=fit.thresholds, greedy_k=fit.greedy_k)
    if standins is not None:
        config = config.evolve(standin=ArtifactRef(STANDIN_FILENAME, standins.rank_, standins.kind))
    result = CalibrationResult(config, stats, fit, standins=standins, warmup_costs=warmup_rows, layer_costs=costs)
    if out_dir is not None:
        result.paths = write_calibration(result, out_dir, plot)
    return result


def parse_warmup(text: str) -> int | None:
    """``--warmup``: a number of positions, or ``auto`` (None: chosen from the data)."""
    if text.strip() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise SkipToolError(f"--warmup must be a number of positions or auto (got {text!r})") from None
    if value < 0:
        raise SkipToolError(f"--warmup must be >= 0 (got {value})")
    return value


def _warmup(model: nn.Module, adapter: ArchAdapter, blocks: Tensor, settings: CalibrationSettings,
            progress: PhaseProgress | None) -> tuple[int, list[dict[str, float]] | None]:
    """The warm-up: the given one, or (``warmup`` None) the leading positions that cost most to skip, measured with
    a random quarter of every FFN but the first and last layer's skipped (:func:`budget.warmup_costs`)."""
    if settings.warmup is not None:
        return settings.warmup, None
    layers = adapter.num_layers(model)
    probe = RandomSkip(layers, list(range(1, layers - 1)), 0, rate=0.25, seed=0)
    rows = warmup_costs(model, adapter, blocks[: settings.cost_blocks], probe, progress=progress)
    return min(choose_warmup(rows), settings.seq_len // 2), rows


def _layer_costs(model: nn.Module, adapter: ArchAdapter, blocks: Tensor, stats: LayerStats, base: SkipConfig,
                 settings: CalibrationSettings, substitutes: dict[int, nn.Module] | None,
                 progress: PhaseProgress | None) -> list[LayerCurve] | None:
    """With the budget mode: what skipping each layer alone costs (KL) and saves, per share of saturated tokens."""
    if settings.threshold_mode != "budget":
        return None
    num_layers, skippable = base.model.num_layers, base.skippable_layers

    def policy_for(knobs: dict[int, float]) -> CosineGreedy:
        return CosineGreedy(num_layers, skippable, base.warmup, layer_thresholds(stats.saturation, knobs),
                            settings.greedy_k)

    return layer_costs(model, adapter, blocks[: settings.cost_blocks], skippable, policy_for, substitutes,
                       progress=progress)


def run_calibrate(source: str, data: DataSpec, settings: CalibrationSettings, out_dir: str | Path,
                  device: str = "cpu", plot: Callable[[dict[str, Any], Path], Any] | None = None,
                  progress: PhaseProgress | None = None) -> CalibrationResult:
    """``skiptool calibrate``: load `source` and :func:`calibrate` it on `data` into `out_dir`."""
    from ..accelerators import check_device
    from ..models import load_model

    check_device(device)
    _check_settings(settings)
    check_output_dir(out_dir)
    check_data(data)
    lm = load_model(source, device=device)
    return calibrate(lm.model, lm.adapter, lm.tokenizer, data, settings, out_dir, source, plot, progress)


def write_calibration(result: CalibrationResult, out_dir: str | Path,
                      plot: Callable[[dict[str, Any], Path], Any] | None = None) -> list[Path]:
    """Write the config, the statistics JSON and (optionally) the plot, all or nothing."""
    out = Path(out_dir)
    stats_json = result.layer_stats_json()
    with atomic_directory(out) as tmp:
        result.config.save(tmp / CONFIG_FILENAME)
        write_json_atomic(tmp / STATS_FILENAME, stats_json)
        if result.standins is not None:
            result.standins.save(tmp / STANDIN_FILENAME)
        if plot is not None:
            plot(stats_json, tmp / PLOT_FILENAME)
    names = [CONFIG_FILENAME, STATS_FILENAME] + ([PLOT_FILENAME] if plot is not None else [])
    names += [STANDIN_FILENAME] if result.standins is not None else []
    return [out / n for n in names]


def _check_settings(s: CalibrationSettings) -> None:
    if not 0 < s.target_skip < 1:
        raise SkipToolError(f"--target-skip must be in (0, 1), got {s.target_skip}")
    if s.target_saved is not None and not 0 < s.target_saved < 1:
        raise SkipToolError(f"--target-saved must be in (0, 1), got {s.target_saved}")
    check_blocks(s.samples, s.seq_len)
    if s.warmup is not None:
        check_warmup_fits(s.warmup, s.seq_len)
    if s.cost_blocks < 1:
        raise SkipToolError("the cost measurements need at least 1 block")
    if s.greedy_k < 1:
        raise SkipToolError("--greedy-k must be at least 1")
    if s.threshold_mode not in THRESHOLD_MODES:
        raise SkipToolError(f"unknown threshold mode {s.threshold_mode!r} (use {' or '.join(THRESHOLD_MODES)})")


def _metadata(s: CalibrationSettings, data: DataSpec, fit: CosineFit, blocks: Tensor) -> dict[str, Any]:
    return {
        "created_by": "skiptool calibrate",
        "skip_ratio": fit.skip_ratio,
        "skip_ratio_note": "realised on the calibration blocks: skipped FFN blocks / (all layers x all positions)",
        "threshold_mode": s.threshold_mode,
        "quantile_p": fit.p,
        "fit_runs": fit.runs,
        "cold_rule": COLD_RULE if s.cold_start is None or s.cold_end is None else "given",
        "warmup_rule": "given" if s.warmup is not None else "auto: the leading position ranges whose skips cost over 2x "
                                                            "the median of the later ranges' (KL per skip)",
        "calibration_data": {"source": _absolute_if_file(data.source), "field": data.field, "split": data.split,
                             "part": list(data.part), "samples": int(blocks.shape[0]),
                             "seq_len": int(blocks.shape[1])},
    }


def _absolute_if_file(source: str) -> str:
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def data_spec_from_config(config: SkipConfig) -> tuple[DataSpec, int, int]:
    """The calibration data a config was fitted on: (spec, samples, seq_len), from its metadata (one clear
    error line when the record is missing or malformed)."""
    rec = config.metadata.get("calibration_data")
    if rec is None:
        raise ConfigError("the skip config does not record its calibration data (re-run `skiptool calibrate`)")
    if not isinstance(rec, dict) or not isinstance(rec.get("source"), str):
        raise ConfigError("metadata.calibration_data must be an object with a 'source' string")
    part, samples, seq_len = rec.get("part", [0.0, 1.0]), rec.get("samples", 16), rec.get("seq_len", 256)
    ok_part = isinstance(part, list) and len(part) == 2 and all(isinstance(x, (int, float)) and not
                                                                 isinstance(x, bool) for x in part)
    if not ok_part or not 0 <= part[0] < part[1] <= 1:
        raise ConfigError(f"metadata.calibration_data.part must be [start, end] with 0 <= start < end <= 1 "
                          f"(got {part!r})")
    for name, value in (("samples", samples), ("seq_len", seq_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"metadata.calibration_data.{name} must be a positive integer (got {value!r})")
    spec = DataSpec(rec["source"], str(rec.get("field", "text")), str(rec.get("split", "test")),
                    (float(part[0]), float(part[1])))
    return spec, samples, seq_len


def ffn_weight_count(model: nn.Module, adapter: ArchAdapter) -> int:
    """Weights of one layer's FFN (every layer's FFN has the same shape)."""
    return adapter.mlp_parameter_count(adapter.decoder_layers(model)[0])


def eligible_fraction(num_layers: int, skippable: int, seq_len: int, warmup: int) -> float:
    """The share of (layer, position) pairs that may skip at all."""
    return skippable / num_layers * max(seq_len - warmup, 0) / seq_len

