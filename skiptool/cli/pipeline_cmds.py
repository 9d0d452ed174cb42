"""``calibrate``, ``train-router`` and ``eval``: fit a policy on data, and measure its quality on other data."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..config import DEFAULT_STANDIN
from ..errors import SkipToolError
from .app import (OUTPUT, DataOpt, DeviceOpt, FieldOpt, JsonOpt, ModelArg, SplitOpt, app, console, data_spec,
                  phase_progress, print_json, wrote)
from .tables import eval_table, layer_stats_table, router_table, sweep_table


@app.command()
def calibrate(
    model: str = ModelArg,
    output: Path = typer.Option(..., "--output", "-o", **OUTPUT,
                                help="Directory for skip_config.json, layer_stats.json/png."),
    target_skip: Optional[float] = typer.Option(None, "--target-skip", min=0.0, max=1.0, help="Realised share of all "
                                                "FFN blocks to skip (all layers, all positions) on the calibration "
                                                "data, in (0, 1) (default: 0.25)."),
    data: str = DataOpt,
    field: str = FieldOpt,
    split: str = SplitOpt,
    part: str = typer.Option("0:1", "--part", help="Fractions START:END of the text to use, e.g. 0:0.5."),
    samples: int = typer.Option(16, "--samples", min=1, help="Number of calibration blocks."),
    seq_len: int = typer.Option(256, "--seq-len", min=2, help="Tokens per block."),
    warmup: str = typer.Option("32", "--warmup", help="Leading positions of a sequence that never skip, or auto: "
                               "chosen from what skipping each leading range costs (KL) on the calibration data."),
    greedy_k: int = typer.Option(1, "--greedy-k", min=1, help="FFNs skipped after a saturated one (grows if the "
                                 "target needs it)."),
    cold_start: Optional[int] = typer.Option(None, "--cold-start", min=0, help="Layers at the start that never skip "
                                             "(default: chosen from the statistics)."),
    cold_end: Optional[int] = typer.Option(None, "--cold-end", min=0, help="Layers at the end that never skip "
                                           "(default: chosen from the statistics)."),
    threshold_mode: str = typer.Option("per-layer", "--threshold-mode", help="per-layer or global quantiles, or "
                                       "budget: skips spread over the layers where they cost least (KL to the dense "
                                       "model per byte saved, measured layer by layer)."),
    stand_in: str = typer.Option(DEFAULT_STANDIN, "--stand-in", help="Closed-form stand-ins that replace skipped FFNs: "
                                 "KIND:SIZE (linear:RANK, core:NEURONS), a bare rank, or none."),
    target_saved: Optional[float] = typer.Option(None, "--target-saved", help="Instead of --target-skip: the share "
                                                 "of FFN weight bytes to save (a skip saves 1 - the stand-in's share "
                                                 "of the FFN's weights), in (0, 1)."),
    device: str = DeviceOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the layer statistics as JSON instead of a table."),
) -> None:
    """Fit the cosine (FFN-SkipLLM) policy: layer statistics, cold regions, thresholds for a target skip ratio.

    Table columns, per layer over the calibration tokens past the warm-up: cos = mean saturation
    cos(h, h + FFN(h)); cos q05 = its 5 % quantile; FFN/h = mean |FFN(h)| / |h|; attn~FFN = mean cosine of the
    attention and FFN deltas; AUC = how well a linear probe on the attention delta finds small FFN deltas
    (0.5 = no signal); threshold = the fitted saturation threshold (cold: never skipped); skip = realised share
    of the layer's tokens skipped.
    """
    from ..calibration.fit import CalibrationSettings, parse_warmup, run_calibrate
    from ..plots import plot_layer_stats
    from ..standins import StandInSpec

    if target_skip is not None and target_saved is not None:
        raise SkipToolError("--target-skip and --target-saved both set the target; give one")
    target = {} if target_skip is None else {"target_skip": target_skip}
    settings = CalibrationSettings(**target, samples=samples, seq_len=seq_len, warmup=parse_warmup(warmup),
                                   greedy_k=greedy_k, cold_start=cold_start, cold_end=cold_end,
                                   threshold_mode=threshold_mode, standin=StandInSpec.parse(stand_in),
                                   target_saved=target_saved)
    with phase_progress() as progress:
        result = run_calibrate(model, data_spec(data, field, split, part), settings, output, device,
                               plot_layer_stats, progress)
    stats = result.layer_stats_json()
    if as_json:
        print_json(stats)
        return
    console.print(layer_stats_table(stats))
    console.print(f"cold layers: first {stats['cold_start']}, last {stats['cold_end']}; greedy-k {stats['greedy_k']}; "
                  f"realised skip ratio on the calibration data {stats['skip_ratio']:.1%} (target "
                  f"{stats['target_skip']:.0%})", soft_wrap=True)
    wrote(result.paths)


@app.command("train-router")
def train_router(
    model: str = ModelArg,
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Skip config whose cold layers and warm-up "
                                          "to reuse (default: cold 2/2, warm-up 32)."),
    output: Path = typer.Option(..., "--output", "-o", **OUTPUT,
                                help="Directory for router.safetensors and skip_config.json."),
    data: str = DataOpt,
    field: str = FieldOpt,
    split: str = SplitOpt,
    part: str = typer.Option("0:0.5", "--part", help="Fractions START:END of the text to train on."),
    target_skip: float = typer.Option(0.25, "--target-skip", min=0.0, max=0.99,
                                      help="Realised share of all FFN blocks to skip (all layers and positions)."),
    target_saved: Optional[float] = typer.Option(None, "--target-saved", help="Instead of --target-skip: the share "
                                                 "of FFN weight bytes to save, in (0, 1)."),
    tokens: int = typer.Option(65_536, "--tokens", help="Training tokens (steps = tokens / (batch size x seq-len), "
                               "rounded up). The default takes about 30 min on 2 CPU cores for the demo model; 2 M "
                               "tokens run overnight (the training part is used in epochs, shuffled per epoch with "
                               "--seed)."),
    lr: float = typer.Option(2e-3, "--lr", min=0.0),
    seq_len: int = typer.Option(512, "--seq-len", min=2),
    batch_size: int = typer.Option(1, "--batch-size", min=1),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Fixed probability threshold in (0, 1) "
                                              "(default: refit to the target)."),
    router: str = typer.Option("linear", "--router", help="Router kind: linear (hidden -> 1) or bottleneck "
                               "(hidden -> hidden/16 -> 1 with a SiLU)."),
    router_init: str = typer.Option("contribution", "--router-init", help="What the closed-form initial routers "
                                    "skip first: the tokens whose FFN adds least (contribution) or whose stand-in "
                                    "error is smallest (recoverable)."),
    estimator: str = typer.Option("ste", "--estimator", help="Hard decisions' gradient: ste (straight-through) or "
                                  "gumbel (hard Bernoulli samples, logistic noise)."),
    temperature: str = typer.Option("1", "--temperature", help="Temperature of the decisions' gradient: T, or "
                                    "START:END annealed geometrically over training (e.g. 2:0.3)."),
    penalty: float = typer.Option(100.0, "--penalty", min=0.0, help="Weight of (skip rate - target)^2."),
    stand_in: str = typer.Option(DEFAULT_STANDIN, "--stand-in", help="Stand-ins trained jointly with the routers: "
                                 "KIND:SIZE (linear:RANK, core:NEURONS), a bare rank, or none (a base config's own "
                                 "stand-ins are then kept as they are)."),
    stand_in_init: str = typer.Option("closed-form", "--stand-in-init", help="Start the stand-ins from the "
                                      "closed-form fit (closed-form) or from zero (zero)."),
    stand_in_lr: float = typer.Option(1e-3, "--stand-in-lr", min=0.0),
    teacher_cache: str = typer.Option("auto", "--teacher-cache", help="Folder of the dense model's top-k "
                                      "next-token distributions per training block, computed once and reused across "
                                      "epochs and runs (auto: under $SKIPTOOL_CACHE; none: recompute every step)."),
    teacher_topk: int = typer.Option(64, "--teacher-topk", help="Tokens of the dense distribution the loss keeps "
                                     "per position (the rest is one bucket)."),
    checkpoint_every: int = typer.Option(25, "--checkpoint-every", help="Steps between checkpoints in OUTPUT/"
                                         ".checkpoint (0: only when interrupted)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run whose checkpoint is in "
                                "OUTPUT/.checkpoint (same options); it ends where an uninterrupted run ends."),
    seed: int = typer.Option(0, "--seed"),
    device: str = DeviceOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Train DiffSkip routers (LLM frozen), with stand-ins trained jointly, to a target skip ratio; writes a router
    skip config (routers, stand-ins and config appear together or not at all)."""
    from ..calibration.router_train import RouterTrainSettings, TemperatureSchedule, run_train_router
    from ..standins import StandInSpec

    settings = RouterTrainSettings(target_skip=target_skip, tokens=tokens, lr=lr, seq_len=seq_len,
                                   batch_size=batch_size, penalty=penalty, estimator=estimator,
                                   temperature=TemperatureSchedule.parse(temperature), router=router,
                                   router_init=router_init, threshold=threshold, seed=seed, device=device,
                                   standin=StandInSpec.parse(stand_in), standin_init=stand_in_init,
                                   target_saved=target_saved, standin_lr=stand_in_lr, teacher_cache=teacher_cache,
                                   teacher_topk=teacher_topk, checkpoint_every=checkpoint_every)
    with phase_progress() as progress:
        def on_step(step: int, r: dict[str, float]) -> None:
            progress(f"train routers (loss {r['loss']:.3f}, skip {r['skip_ratio']:.0%}, "
                     f"{r['tokens_per_s']:.0f} tok/s)", step, int(r["steps"]))

        result = run_train_router(model, config, data_spec(data, field, split, part), output, settings, on_step,
                                  resume)
    if as_json:
        print_json(result.to_dict())
        return
    console.print(router_table(result, target_skip))


@app.command("eval")
def eval_command(
    model: str = ModelArg,
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Skip config (skip_config.json or its "
                                          "directory); not with --onnx."),
    data: str = DataOpt,
    field: str = FieldOpt,
    split: str = SplitOpt,
    part: str = typer.Option("0:1", "--part", help="Fractions START:END of the text, e.g. 0.5:1; must not overlap the "
                             "part the config was calibrated on (see --allow-overlap)."),
    allow_overlap: bool = typer.Option(False, "--allow-overlap", help="Evaluate on text that overlaps the calibration "
                                       "text on purpose (the figure is then not a held-out one)."),
    samples: int = typer.Option(16, "--samples", min=1, help="Number of evaluation blocks."),
    seq_len: int = typer.Option(512, "--seq-len", min=2, help="Tokens per block."),
    sweep: bool = typer.Option(False, "--sweep", help="Also sweep quality vs realised skip ratio: cosine with and "
                               "without stand-ins against random and static-layer skipping, and the routers of a "
                               "router config (writes sweep.json and sweep.png)."),
    targets: str = typer.Option("0.05,0.10,0.15,0.25,0.40", "--targets", help="Skip ratios for --sweep."),
    curves: Optional[str] = typer.Option(None, "--curves", help="Sweep curves, comma-separated (default: "
                                         "cosine,cosine+standin,random,static, plus router and router+standin for a "
                                         "router config; also static+standin)."),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", min=1, help="Calibration blocks the sweep "
                                                "refits on (default: as many as the config was calibrated on)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", **OUTPUT, help="Directory for eval.json (and the "
                                          "sweep); default with --sweep: the config's directory."),
    router_threshold: Optional[float] = typer.Option(None, "--router-threshold", help="Override a router policy's "
                                                     "probability threshold, in (0, 1)."),
    device: str = DeviceOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON (ppl_dense, ppl_skip, skip_ratio, ...)."),
    onnx_dir: Optional[Path] = typer.Option(None, "--onnx", help="Evaluate a `skiptool export` folder with ONNX "
                                            "Runtime: its policy against the same graph forced dense."),
) -> None:
    """Perplexity of the dense and the skipping model on the same held-out tokens, and the realised skip ratio.

    Compared: the dense model against the config's policy (with --onnx: the exported graph forced dense, skip_mask
    all -1, against the same graph deciding), on the same token blocks. Rows: perplexity dense and skipping (change);
    realised FFN skip ratio = skipped FFN blocks / (all layers x all positions); FFN weight bytes saved (stand-ins'
    own bytes counted) and the ideal decode speedup that saving allows; greedy agreement = share of decode steps
    whose greedy token with skipping equals the dense model's, along the dense continuation of held-out prompts;
    per layer = each layer's skip ratio. --sweep compares curves at equal realised skip ratios: each curve is
    refitted for each target on the config's calibration data and run on the evaluation tokens; a cell is
    perplexity @ realised ratio (– out of reach). Curves: cosine (FFN-SkipLLM thresholds), random (random
    eligible tokens), static (whole most-saturated layers), router (the config's routers); +standin: with
    closed-form (router: trained) stand-ins in place of skipped FFNs; BASE+KIND:SIZE: stand-ins of that kind.
    """
    spec = data_spec(data, field, split, part)
    with phase_progress() as progress:
        if onnx_dir is not None:
            if config is not None or sweep or any(v is not None for v in (router_threshold, curves, calib_samples)):
                raise SkipToolError("--onnx evaluates the exported graph with its own policy; drop --config, --sweep "
                                    "(--curves, --calib-samples) and --router-threshold")
            from ..evaluate import evaluate_export

            result = evaluate_export(onnx_dir, spec, samples, seq_len, progress, allow_overlap, output)
        else:
            if config is None:
                raise SkipToolError("eval needs --config (a skip config) or --onnx (an export folder)")
            from ..evaluate import parse_targets, run_eval
            from ..plots import plot_sweep

            curve_names = [c.strip() for c in curves.split(",") if c.strip()] if curves is not None else None
            result = run_eval(model, config, spec, samples, seq_len, parse_targets(targets) if sweep else None,
                              curve_names, output, plot_sweep, router_threshold, calib_samples, device, progress,
                              allow_overlap)
    if as_json:
        print_json(result.to_dict())
        return
    console.print(eval_table(result))
    if result.sweep is not None:
        console.print(sweep_table(result.sweep))
    wrote(result.paths)
