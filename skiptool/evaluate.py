"""Quality of skipping: perplexity of the dense and the skipping model on the same tokens, and sweeps.

The perplexity loop only needs a function from token ids to logits (:data:`LogitsFn`), so any backend
(PyTorch here, onnxruntime elsewhere) plugs into :func:`token_nll`. Skipping itself always happens in
the runtime, through a :class:`~skiptool.policies.SkipPolicy`; nothing here decides what to skip.

A sweep compares policies at equal *realised* skip ratios (skipped FFN blocks over all layers and all
positions, measured on the evaluation tokens). Each curve is a :data:`CurveFactory` — given the sweep's
context and a target ratio it returns the policy to run (and optional FFN substitutes), or ``None`` when
the target is out of its reach. Built-in curves: ``cosine`` (FFN-SkipLLM, thresholds refitted on the
config's calibration data for each target), ``random`` (random tokens' FFNs in the skippable layers)
and ``static`` (the FFNs of the most redundant layers — highest mean saturation on the calibration
data); ``cosine+standin`` and ``static+standin`` run the same policies with closed-form low-rank
stand-ins in place of the skipped FFNs; ``router`` and ``router+standin`` (in
:mod:`skiptool.calibration.router_train`) run a router config's routers without and with its stand-ins.
Other modules add curves with :func:`register_curve` or pass ``(name, factory)`` pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import torch
from torch import Tensor, nn

from .adapters import ArchAdapter
from .config import SkipConfig, check_warmup_fits
from .data import DataSpec, check_blocks, check_data, token_blocks
from .errors import SkipToolError
from .fileio import atomic_directory, write_json_atomic
from .policies import RandomSkip, SkipPolicy, StaticMask
from .backends.torch_backend import TorchBackend
from .runtime import SkipRuntime, SkipStats, apply_skip, open_runtime

LogitsFn = Callable[[Tensor], Tensor]
Progress = Callable[[str, int, int], Any]
Candidate = Union[SkipPolicy, "tuple[SkipPolicy, dict[int, nn.Module] | None]", None]
CurveFactory = Callable[["SweepContext", float], Candidate]
DEFAULT_TARGETS = (0.05, 0.10, 0.15, 0.25, 0.40)
DEFAULT_CURVES = ("cosine", "cosine+standin", "random", "static")
EVAL_FILENAME, SWEEP_FILENAME, SWEEP_PLOT_FILENAME = "eval.json", "sweep.json", "sweep.png"


# -- perplexity -----------------------------------------------------------------------------------
@torch.no_grad()
def token_nll(logits_fn: LogitsFn, blocks: Tensor, batch_size: int = 1,
              progress: Callable[[int, int], Any] | None = None) -> Tensor:
    """Negative log-likelihood of every next token, ``[n, seq - 1]`` float64, from any ids -> logits function."""
    out = []
    n = blocks.shape[0]
    for start in range(0, n, batch_size):
        ids = blocks[start:start + batch_size]
        logits = logits_fn(ids)[:, :-1].float()
        targets = ids[:, 1:].to(logits.device)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        out.append(-logp.double().cpu())
        if progress is not None:
            progress(min(start + batch_size, n), n)
    return torch.cat(out)


def perplexity(nll: Tensor) -> float:
    return math.exp(float(nll.mean()))


def torch_logits_fn(model: nn.Module) -> LogitsFn:
    """Logits of a Hugging Face causal LM (wrapped by the skip runtime or not)."""
    device = next(model.parameters()).device
    return lambda ids: model(input_ids=ids.to(device)).logits


def skip_nll(model: nn.Module, runtime: SkipRuntime, blocks: Tensor, batch_size: int = 1,
             progress: Callable[[int, int], Any] | None = None) -> tuple[Tensor, SkipStats]:
    """Token NLLs with `runtime` applied (it is removed afterwards) and its skip counters."""
    try:
        runtime.stats.reset()
        nll = token_nll(torch_logits_fn(model), blocks, batch_size, progress)
        return nll, runtime.stats
    finally:
        runtime.remove()


# -- evaluation of one config ---------------------------------------------------------------------
@dataclass
class EvalResult:
    """Dense vs skipping perplexity on the same tokens and the realised skip ratio."""

    ppl_dense: float
    ppl_skip: float
    skip_ratio: float
    per_layer: list[float]
    policy: str
    blocks: int
    seq_len: int
    data: dict[str, Any] = field(default_factory=dict)
    ffn_saved: float | None = None  # share of FFN weight bytes not read (stand-ins' own bytes counted)
    ideal_speedup: float | None = None  # decode speedup from reading fewer weight bytes at that saving
    greedy_agreement: float | None = None  # share of decode steps whose greedy token equals the dense model's
    sweep: dict[str, Any] | None = None
    paths: list[Path] = field(default_factory=list)

    @property
    def ppl_increase(self) -> float:
        return self.ppl_skip / self.ppl_dense - 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"ppl_dense": self.ppl_dense, "ppl_skip": self.ppl_skip, "ppl_increase": self.ppl_increase,
                "skip_ratio": self.skip_ratio, "ffn_saved": self.ffn_saved, "ideal_speedup": self.ideal_speedup,
                "greedy_agreement": self.greedy_agreement,
                "per_layer_skip_ratio": self.per_layer, "policy": self.policy,
                "blocks": self.blocks, "seq_len": self.seq_len, "tokens": self.blocks * (self.seq_len - 1),
                "data": self.data, **({"sweep": self.sweep} if self.sweep is not None else {})}


def run_eval(source: str, config_path: str | Path, data: DataSpec, samples: int = 16, seq_len: int = 512,
             sweep_targets: Sequence[float] | None = None, curves: Sequence[str] | None = None,
             out_dir: str | Path | None = None, plot: Callable[[dict[str, Any], Path], Any] | None = None,
             router_threshold: float | None = None, calibration_samples: int | None = None, device: str = "cpu",
             progress: Progress | None = None, allow_overlap: bool = False) -> EvalResult:
    """``skiptool eval --config``: load the config and `source`, check both before the work, then :func:`evaluate`.

    `curves` None: the default sweep curves for the config (:func:`default_curves`). `out_dir` None with a sweep:
    the config's folder."""
    from .accelerators import check_device
    from .config import load_config
    from .fileio import check_output_dir
    from .models import load_model
    from .policies import check_policy

    check_device(device)
    check_blocks(samples, seq_len)
    config = load_config(config_path)
    check_policy(config, threshold=router_threshold)
    check_held_out(config, data, allow_overlap)
    check_warmup_fits(config.warmup, seq_len)
    if sweep_targets:
        check_sweep(config, curves if curves is not None else default_curves(config))
    elif curves is not None or calibration_samples is not None:
        raise SkipToolError("--curves and --calib-samples shape a sweep; add --sweep")
    out = out_dir if out_dir is not None or not sweep_targets else (config.base_dir or Path("."))
    if out is not None:
        check_output_dir(out)
    check_data(data)
    lm = load_model(source, device=device)
    return evaluate(lm.model, lm.adapter, lm.tokenizer, config, data, samples, seq_len,
                    sweep_targets=sweep_targets, curves=curves if curves is not None else default_curves(config),
                    out_dir=out, plot=plot, router_threshold=router_threshold,
                    calibration_samples=calibration_samples, progress=progress, allow_overlap=allow_overlap)


def default_curves(config: SkipConfig) -> list[str]:
    """The sweep's default curves: cosine (with and without stand-ins), random and static, plus ``router`` and,
    when the config has stand-ins, ``router+standin`` for a router config."""
    routers = ["router"] + (["router+standin"] if config.standin is not None else [])
    return list(DEFAULT_CURVES) + (routers if config.policy.kind == "router" else [])


def check_sweep(config: SkipConfig, curves: Sequence[str | tuple[str, CurveFactory]]) -> None:
    """One clear error line, before any work, unless `curves` name at least one curve and each can run on `config`."""
    if not curves:
        raise SkipToolError("--curves names no curve; e.g. --curves cosine,random")
    names = [c[0] if isinstance(c, tuple) else c for c in curves]
    for name in names:
        curve_named(name)
    routers = [n for n in names if n in ("router", "router+standin")]
    if routers and config.policy.kind != "router":
        raise SkipToolError(f"the {routers[0]} curve runs a router config's routers; this config's policy is "
                            f"{config.policy.kind} (train routers with `skiptool train-router`)")
    if "router+standin" in names and config.standin is None:
        raise SkipToolError("the router+standin curve needs a router config with stand-ins; this one has none")


def check_held_out(config: SkipConfig, data: DataSpec, allow_overlap: bool = False) -> None:
    """Refuse to evaluate on text the config was calibrated or trained on (unless `allow_overlap`)."""
    from .calibration.fit import data_spec_from_config

    if allow_overlap or config.metadata.get("calibration_data") is None:
        return
    calib, _, _ = data_spec_from_config(config)
    if calib.overlaps(data):
        start, end = calib.part
        free = f"--part {end:g}:1" if end < 1 else f"--part 0:{start:g}" if start > 0 else "other text (--data)"
        raise SkipToolError(f"the evaluation text (part {data.part[0]:g}:{data.part[1]:g}) overlaps the text the config "
                            f"was calibrated on (part {start:g}:{end:g} of {calib.source}): evaluate on {free}, or "
                            "pass --allow-overlap to do it on purpose")


def evaluate(model: nn.Module, adapter: ArchAdapter, tokenizer: Any, config: SkipConfig, data: DataSpec,
             samples: int = 16, seq_len: int = 512, batch_size: int = 1,
             sweep_targets: Sequence[float] | None = None,
             curves: Sequence[str | tuple[str, CurveFactory]] = DEFAULT_CURVES,
             out_dir: str | Path | None = None, plot: Callable[[dict[str, Any], Path], Any] | None = None,
             router_threshold: float | None = None, calibration_samples: int | None = None,
             progress: Progress | None = None, allow_overlap: bool = False) -> EvalResult:
    """Perplexity dense vs `config` on `data` (and, with `sweep_targets`, a sweep); optionally write `out_dir`."""
    config.check_matches(model)
    check_held_out(config, data, allow_overlap)
    if sweep_targets:
        check_sweep(config, curves)
    blocks = token_blocks(tokenizer, data, seq_len, samples)
    check_warmup_fits(config.warmup, int(blocks.shape[1]))
    from .info import decode_weight_bytes

    dense = token_nll(torch_logits_fn(model), blocks, batch_size, _phase(progress, "dense"))
    weight_bytes = decode_weight_bytes(model, adapter)
    backend = TorchBackend(model, adapter, config, policy_overrides={"threshold": router_threshold})
    try:
        agreement = greedy_agreement(backend, config.model.num_layers, blocks, _phase(progress, "greedy agreement"))
    finally:
        backend.close()
    runtime = open_runtime(model, adapter, config, threshold=router_threshold)
    ideal = ideal_of(weight_bytes, runtime.policy)
    nll, stats = skip_nll(model, runtime, blocks, batch_size, _phase(progress, f"skip ({config.policy.kind})"))
    result = EvalResult(perplexity(dense), perplexity(nll), stats.skip_ratio, stats.per_layer(), config.policy.kind,
                        int(blocks.shape[0]), int(blocks.shape[1]), _data_record(data), stats.ffn_saved,
                        ideal(stats.ffn_saved), agreement)
    if sweep_targets:
        ctx = SweepContext(model, adapter, tokenizer, config, blocks, dense, batch_size, progress, calibration_samples)
        result.sweep = {**run_sweep(ctx, sweep_targets, curves), "data": result.data}
    if out_dir is not None:
        result.paths = write_eval(result, out_dir, plot)
    return result


def evaluate_export(folder: str | Path, data: DataSpec, samples: int = 16, seq_len: int = 512,
                    progress: Progress | None = None, allow_overlap: bool = False,
                    out_dir: str | Path | None = None) -> EvalResult:
    """``skiptool eval --onnx DIR``: perplexity of an exported graph with its policy against the same graph forced
    dense (``skip_mask`` all -1, which equals the dense model), on the same token blocks (ONNX Runtime); with
    `out_dir`, ``eval.json`` is written there (a bad `out_dir` fails before the work)."""
    from .backends.onnxruntime import OrtBackend
    from .config import CONFIG_FILENAME, load_config
    from .fileio import check_output_dir
    from .models import load_tokenizer

    check_blocks(samples, seq_len)
    if (Path(folder) / CONFIG_FILENAME).is_file():
        check_held_out(load_config(Path(folder) / CONFIG_FILENAME), data, allow_overlap)
    if out_dir is not None:
        check_output_dir(out_dir)
    check_data(data)
    backend = OrtBackend(folder)
    blocks = token_blocks(load_tokenizer(folder), data, seq_len, samples)

    def nll(mask: Sequence[int] | None, label: str) -> Tensor:
        backend.set_skip_mask(mask)
        backend.reset()
        return token_nll(lambda ids: torch.from_numpy(backend.block_logits(ids.numpy())), blocks, 1,
                         _phase(progress, label))

    dense = nll([-1] * backend.io.num_layers, "dense (skip_mask -1)")
    skip = nll(None, f"skip ({backend.manifest.policy})")
    ratio, per_layer = backend.skip_ratio() or 0.0, backend.per_layer_skip()
    agreement = greedy_agreement(backend, backend.io.num_layers, blocks, _phase(progress, "greedy agreement"))
    result = EvalResult(perplexity(dense), perplexity(skip), ratio, per_layer,
                        backend.manifest.policy, int(blocks.shape[0]), int(blocks.shape[1]),
                        {**_data_record(data), "onnx": str(folder)}, greedy_agreement=agreement)
    if out_dir is not None:
        result.paths = write_eval(result, out_dir)
    return result


AGREEMENT_STEPS = 32


def greedy_agreement(backend: Any, num_layers: int, blocks: Tensor, progress: Callable[[int, int], Any] | None = None,
                     steps: int = AGREEMENT_STEPS) -> float:
    """Share of decode steps whose greedy next token with skipping equals the dense model's, along the dense model's
    own greedy continuation (teacher-forced) of held-out prompts: the first half of each evaluation block.

    One skipping `backend` serves both: the reference decodes with every layer forced to compute (``skip_mask`` all
    -1, which is the dense model), the comparison with the policy deciding."""
    from .backends.decode import Follow, decode

    prompts = [b[: max(1, blocks.shape[1] // 2)].tolist() for b in blocks]
    backend.set_skip_mask([-1] * num_layers)
    references = [decode(backend, p, steps).token_ids for p in prompts]
    backend.set_skip_mask(None)
    same = total = 0
    for i, (prompt, reference) in enumerate(zip(prompts, references)):
        follow = Follow(reference)
        decode(backend, prompt, len(reference), follow)
        hits, n = follow.agreement()
        same, total = same + hits, total + n
        if progress is not None:
            progress(i + 1, len(prompts))
    return same / total if total else 1.0


def ideal_of(weight_bytes: tuple[int, int], policy: SkipPolicy) -> Callable[[float], float]:
    """``ffn_saved -> ideal decode speedup`` for a model whose decode reads `weight_bytes` (FFN, all) per token
    (:func:`skiptool.info.decode_weight_bytes`), under `policy` (its own weights, e.g. routers, read on top)."""
    from .ideal import speedup_from_saved

    ffn_bytes, total_bytes = weight_bytes
    policy_bytes = sum(p.numel() * p.element_size() for p in policy.parameters())
    return lambda saved: speedup_from_saved(total_bytes, ffn_bytes, saved, policy_bytes)


def _data_record(data: DataSpec) -> dict[str, Any]:
    return {"source": data.source, "part": list(data.part), "field": data.field, "split": data.split}


def write_eval(result: EvalResult, out_dir: str | Path,
               plot: Callable[[dict[str, Any], Path], Any] | None = None) -> list[Path]:
    """``eval.json`` and, after a sweep, ``sweep.json`` (+ ``sweep.png`` with `plot`), all or nothing."""
    out = Path(out_dir)
    names = [EVAL_FILENAME]
    with atomic_directory(out) as tmp:
        write_json_atomic(tmp / EVAL_FILENAME, result.to_dict())
        if result.sweep is not None:
            write_json_atomic(tmp / SWEEP_FILENAME, result.sweep)
            names.append(SWEEP_FILENAME)
            if plot is not None:
                plot(result.sweep, tmp / SWEEP_PLOT_FILENAME)
                names.append(SWEEP_PLOT_FILENAME)
    return [out / n for n in names]


def _phase(progress: Progress | None, label: str) -> Callable[[int, int], Any] | None:
    return None if progress is None else (lambda done, total: progress(label, done, total))


# -- sweeps ---------------------------------------------------------------------------------------
@dataclass
class SweepContext:
    """What a curve factory may use: the model, the config, the evaluation blocks and calibration data."""

    model: nn.Module
    adapter: ArchAdapter
    tokenizer: Any
    config: SkipConfig
    eval_blocks: Tensor
    dense_nll: Tensor
    batch_size: int = 1
    progress: Progress | None = None
    calibration_samples: int | None = None  # None: as many blocks as the config was calibrated on

    @property
    def num_layers(self) -> int:
        return self.config.model.num_layers

    @cached_property
    def weight_bytes(self) -> tuple[int, int]:
        """(FFN, all) weight bytes the dense model reads per decoded token."""
        from .info import decode_weight_bytes

        return decode_weight_bytes(self.model, self.adapter)

    @property
    def eval_seq_len(self) -> int:
        return int(self.eval_blocks.shape[1])

    def eligible_fraction(self, seq_len: int | None = None) -> float:
        """Share of (layer, position) pairs that may skip: skippable layers x positions after warm-up."""
        from .calibration.fit import eligible_fraction

        return eligible_fraction(self.num_layers, len(self.config.skippable_layers),
                                 seq_len or self.eval_seq_len, self.config.warmup)

    @cached_property
    def calibration_blocks(self) -> Tensor:
        """The blocks the config was calibrated on (from its ``metadata.calibration_data``)."""
        from .calibration.fit import data_spec_from_config

        spec, samples, seq_len = data_spec_from_config(self.config)
        return token_blocks(self.tokenizer, spec, seq_len, self.calibration_samples or samples)

    @cached_property
    def calibration_stats(self) -> Any:
        """Per-layer statistics (:class:`skiptool.calibration.collect.LayerStats`) on the calibration blocks."""
        from .calibration.collect import collect_layer_stats

        return collect_layer_stats(self.model, self.adapter, self.calibration_blocks, self.config.warmup,
                                   progress=_phase(self.progress, "calibration statistics"))

    @cached_property
    def closed_form_standins(self) -> dict[int, nn.Module]:
        """Closed-form stand-ins: a cosine/static config's own, else fitted on the calibration blocks (of the
        config's stand-in kind and size, or the default)."""
        from .runtime import load_standins
        from .standins import StandInSpec

        cfg = self.config
        if cfg.standin is not None and cfg.policy.kind != "router":  # a router config's stand-ins are trained
            return load_standins(cfg).by_layer()
        own = StandInSpec(cfg.standin.kind or "linear", cfg.standin.rank) if cfg.standin and cfg.standin.rank else None
        return self.standins_for(own or StandInSpec())

    def standins_for(self, spec: Any) -> dict[int, nn.Module]:
        """Closed-form stand-ins of a :class:`~skiptool.standins.StandInSpec`, fitted once on the calibration blocks."""
        from .calibration.standin_fit import fit_standins
        from .standins import sized_standin

        spec = sized_standin(spec, self.model)
        cache = self.__dict__.setdefault("_standins", {})
        if spec not in cache:
            cache[spec] = fit_standins(self.model, self.adapter, self.calibration_blocks, self.config.skippable_layers,
                                       spec.known_size, self.config.warmup, spec.kind).by_layer()
        return cache[spec]


SWEEP_CURVES: dict[str, CurveFactory] = {}


def register_curve(name: str) -> Callable[[CurveFactory], CurveFactory]:
    """Decorator: make a curve factory available to sweeps by name."""

    def decorate(factory: CurveFactory) -> CurveFactory:
        SWEEP_CURVES[name] = factory
        return factory

    return decorate


def run_sweep(ctx: SweepContext, targets: Sequence[float],
              curves: Sequence[str | tuple[str, CurveFactory]] = DEFAULT_CURVES) -> dict[str, Any]:
    """Perplexity vs realised skip ratio for each curve at each target (JSON-ready)."""
    ppl_dense = perplexity(ctx.dense_nll)
    out: dict[str, Any] = {"ppl_dense": ppl_dense, "targets": list(targets), "blocks": int(ctx.eval_blocks.shape[0]),
                           "seq_len": ctx.eval_seq_len, "warmup": ctx.config.warmup,
                           "cold_start": ctx.config.cold_start, "cold_end": ctx.config.cold_end, "curves": {}}
    for name, factory in _resolve_curves(curves):
        points = []
        for target in targets:
            candidate = factory(ctx, float(target))
            if candidate is None:
                points.append({"target": target, "skip_ratio": None, "ppl": None, "note": "out of reach"})
                continue
            policy, substitutes = candidate if isinstance(candidate, tuple) else (candidate, None)
            ideal = ideal_of(ctx.weight_bytes, policy)
            runtime = apply_skip(ctx.model, ctx.adapter, policy, substitutes)
            nll, stats = skip_nll(ctx.model, runtime, ctx.eval_blocks, ctx.batch_size,
                                  _phase(ctx.progress, f"sweep {name} @ {target:.2f}"))
            ppl = perplexity(nll)
            points.append({"target": target, "skip_ratio": stats.skip_ratio, "ffn_saved": stats.ffn_saved,
                           "ideal_speedup": ideal(stats.ffn_saved), "ppl": ppl, "ppl_increase": ppl / ppl_dense - 1.0,
                           "per_layer": stats.per_layer()})
        out["curves"][name] = points
    return out


def _resolve_curves(curves: Sequence[str | tuple[str, CurveFactory]]) -> list[tuple[str, CurveFactory]]:
    return [curve if isinstance(curve, tuple) else (curve, curve_named(curve)) for curve in curves]


def curve_named(name: str) -> CurveFactory:
    """A registered curve, or ``BASE+KIND:SIZE`` (e.g. ``cosine+core:96``): a signal-free or cosine base curve with
    closed-form stand-ins of that kind and size in place of the skipped FFNs."""
    if name in SWEEP_CURVES:
        return SWEEP_CURVES[name]
    base, _, spec_text = name.partition("+")
    if base not in STANDIN_BASES or not spec_text:
        known = ", ".join(sorted(SWEEP_CURVES))
        raise SkipToolError(f"unknown sweep curve {name!r} (known: {known}; or BASE+KIND:SIZE with BASE one of "
                            f"{', '.join(STANDIN_BASES)}, e.g. cosine+core:96)")
    from .standins import StandInSpec

    spec = StandInSpec.parse(spec_text)
    if spec is None:
        return SWEEP_CURVES[base]
    return lambda ctx, target: _standin_candidate(ctx, base, target, ctx.standins_for(spec))


STANDIN_BASES = ("cosine", "static", "random")


def _standin_candidate(ctx: SweepContext, base: str, target: float, standins: dict[int, nn.Module]) -> Candidate:
    """`base`'s policy at `target` with `standins` in place; cosine thresholds are fitted with them in place (they
    change later layers' saturation), as ``calibrate`` does."""
    if base == "cosine":
        policy = _fit_cosine_policy(ctx, target, standins)
        return None if policy is None else (policy, standins)
    candidate = SWEEP_CURVES[base](ctx, target)
    policy = candidate[0] if isinstance(candidate, tuple) else candidate
    return None if policy is None else (policy, standins)


def parse_targets(text: str) -> list[float]:
    """``"0.05,0.1"`` -> ``[0.05, 0.1]``, each in (0, 1)."""
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SkipToolError(f"targets must be comma-separated numbers, got {text!r}") from None
    if not values or not all(0 < v < 1 for v in values):
        raise SkipToolError(f"targets must be skip ratios in (0, 1), got {text!r}")
    return values


@register_curve("cosine")
def cosine_curve(ctx: SweepContext, target: float) -> Candidate:
    """FFN-SkipLLM with thresholds refitted on the calibration data so the evaluation ratio is `target`."""
    return _fit_cosine_policy(ctx, target)


@register_curve("cosine+standin")
def cosine_standin_curve(ctx: SweepContext, target: float) -> Candidate:
    """FFN-SkipLLM with the config's closed-form stand-ins (or the default ones) in place of the skipped FFNs."""
    return _standin_candidate(ctx, "cosine", target, ctx.closed_form_standins)


@register_curve("static+standin")
def static_standin_curve(ctx: SweepContext, target: float) -> Candidate:
    """The ``static`` curve's layers with closed-form stand-ins in place of their FFNs."""
    return _standin_candidate(ctx, "static", target, ctx.closed_form_standins)


def _fit_cosine_policy(ctx: SweepContext, target: float,
                       substitutes: dict[int, nn.Module] | None = None) -> SkipPolicy | None:
    from .calibration.fit import fit_cosine
    from .policies import CosineGreedy

    blocks, stats, cfg = ctx.calibration_blocks, ctx.calibration_stats, ctx.config
    # the same share of the eligible pairs on the calibration blocks (their length may differ)
    calib_target = target * ctx.eligible_fraction(int(blocks.shape[1])) / ctx.eligible_fraction()
    greedy_k = int(cfg.policy.params.get("greedy_k", 1)) if cfg.policy.kind == "cosine" else 1
    progress = ctx.progress
    try:  # the x-axis is the ratio realised on the evaluation tokens, so a looser fit (fewer runs) will do
        fit = fit_cosine(ctx.model, ctx.adapter, blocks, stats, calib_target, cfg.skippable_layers, greedy_k,
                         cfg.metadata.get("threshold_mode", "per-layer"), tolerance=0.01, max_runs=3,
                         progress=None if progress is None else
                         (lambda label, d, n: progress(f"cosine @ {target:.2f}: {label}", d, n)),
                         substitutes=substitutes)
    except SkipToolError:
        return None
    return CosineGreedy(ctx.num_layers, cfg.skippable_layers, cfg.warmup, fit.thresholds, fit.greedy_k)


@register_curve("random")
def random_curve(ctx: SweepContext, target: float) -> Candidate:
    """Each eligible token's FFN skipped independently at the rate that gives `target` overall."""
    rate = target / ctx.eligible_fraction()
    if rate > 1.0:
        return None
    return RandomSkip(ctx.num_layers, ctx.config.skippable_layers, ctx.config.warmup, rate, seed=0)


@register_curve("static")
def static_curve(ctx: SweepContext, target: float) -> Candidate:
    """The FFNs of the n most redundant skippable layers (n giving the ratio nearest `target`)."""
    skippable = ctx.config.skippable_layers
    per_layer = ctx.eligible_fraction() / len(skippable)
    n = min(len(skippable), max(1, round(target / per_layer)))
    saturation = ctx.calibration_stats.mean_saturation()
    ranked = sorted(skippable, key=lambda i: saturation[i], reverse=True)
    return StaticMask(ctx.num_layers, skippable, ctx.config.warmup, sorted(ranked[:n]))


@register_curve("router")
def router_curve(ctx: SweepContext, target: float) -> Candidate:
    """DiffSkip routers of a router config (without stand-ins), the threshold refitted on the calibration data."""
    from .calibration.router_train import router_sweep_candidate

    return router_sweep_candidate(ctx, target, with_standins=False)


@register_curve("router+standin")
def router_standin_curve(ctx: SweepContext, target: float) -> Candidate:
    """A router config's routers with its (jointly trained) stand-ins; ``None`` when it has none."""
    from .calibration.router_train import router_sweep_candidate

    return router_sweep_candidate(ctx, target, with_standins=True)
