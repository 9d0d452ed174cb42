"""The `skiptool` command line: each command parses its options, calls one library function, prints.

Heavy imports (torch, transformers, onnxruntime) happen inside the commands so ``--help`` is fast.
User errors (:class:`skiptool.errors.SkipToolError`) print one line and exit 1, never a traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import SkipToolError

app = typer.Typer(
    name="skiptool",
    help="Adaptive FFN skipping for decoder-only LLMs: calibrate, train routers, export, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

DEMO = "smollm2-135m"
ModelArg = typer.Argument(DEMO, help="HF model id, local HF directory, .gguf file, or 'smollm2-135m' (built-in demo).")


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def command(*args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``app.command`` whose function reports user errors as one line with exit code 1 (no traceback)."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def run(*a: Any, **k: Any) -> Any:
            try:
                return func(*a, **k)
            except SkipToolError as exc:
                _fail(str(exc))
            except KeyboardInterrupt:
                err_console.print("interrupted")
                raise typer.Exit(130) from None

        return app.command(*args, **kwargs)(run)

    return decorate


def _print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------
# info
# ------------------------------------------------------------------------------------------------
@command()
def info(model: str = ModelArg, as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """Show a model's shape and the ideal decode speedup that FFN skipping can reach on it."""
    from .info import model_info
    from .models import load_model

    lm = load_model(model)
    data = model_info(lm.model, lm.adapter, source=model)
    if as_json:
        _print_json(data)
        return
    table = Table(title=f"{model} ({data['architecture']})", show_header=False)
    for key in ("num_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "dtype"):
        table.add_row(key.replace("_", " "), str(data[key]))
    table.add_row("parameters", f"{data['parameters'] / 1e6:.1f} M")
    table.add_row("weight bytes read / token", f"{data['weight_bytes_per_token'] / 2**20:.1f} MiB")
    table.add_row("FFN share of those bytes", f"{data['ffn_weight_share']:.1%}")
    for ratio, speedup in data["ideal_speedup"].items():
        table.add_row(f"ideal decode speedup at {float(ratio):.0%} FFN skip", f"{speedup:.3f}x")
    console.print(table)


# ------------------------------------------------------------------------------------------------
# generate
# ------------------------------------------------------------------------------------------------
@command()
def generate(
    model: str = ModelArg,
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt (sent through the chat template)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Skip config (skip_config.json)."),
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as is, without the chat template."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    seed: int = typer.Option(0, "--seed"),
    router_threshold: Optional[float] = typer.Option(None, "--router-threshold", min=0.0, max=1.0,
                                                     help="Override the router policy's probability threshold."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    onnx_dir: Optional[Path] = typer.Option(None, "--onnx", help="Run a `skiptool export` folder with ONNX Runtime "
                                            "(its own policy; MODEL and --config are not used)."),
    engine: Optional[Path] = typer.Option(None, "--engine", help="Run the TensorRT engine of a `skiptool export "
                                          "--format tensorrt` folder (DIR or DIR/model.engine) on the GPU."),
) -> None:
    """Generate text, streaming it, then print tokens/s and the realised skip ratio."""
    if onnx_dir is not None or engine is not None:
        return _generate_onnx(onnx_dir, engine, prompt, raw, max_new_tokens, temperature, top_p, seed, config)
    from .config import load_config
    from .generate import encode_prompt, generate as run_generate
    from .models import load_model
    from .runtime import runtime_from_config

    skip_config = load_config(config) if config is not None else None
    lm = load_model(model, device=device)
    runtime = runtime_from_config(lm.model, lm.adapter, skip_config, router_threshold) if skip_config else None
    ids = encode_prompt(lm.tokenizer, prompt, raw=raw)
    result = run_generate(lm.model, lm.tokenizer, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, seed=seed, on_text=lambda piece: console.out(piece, end="", highlight=False))
    console.out("")
    policy = skip_config.policy.kind if skip_config else "dense"
    skip = f"{runtime.stats.skip_ratio:.1%}" if runtime else "0.0% (dense)"
    console.print(f"[dim]{len(result.token_ids)} tokens, {result.tokens_per_s:.1f} tokens/s decode, "
                  f"prefill {result.prefill_s * 1000:.0f} ms, policy {policy}, FFN skip ratio {skip}[/]",
                  soft_wrap=True)


def _generate_onnx(onnx_dir: Optional[Path], engine: Optional[Path], prompt: str, raw: bool, max_new_tokens: int,
                   temperature: float, top_p: float, seed: int, config: Optional[Path]) -> None:
    """``--onnx DIR`` (ONNX Runtime) or ``--engine PATH`` (TensorRT): an export run with its own policy."""
    if config is not None:
        raise SkipToolError("--onnx / --engine run the exported graph with the policy it was exported with; "
                            "drop --config")
    if onnx_dir is not None and engine is not None:
        raise SkipToolError("--onnx (ONNX Runtime) and --engine (TensorRT) are two runtimes; pick one")
    if engine is not None:
        from .backends.tensorrt_backend import generate_from_engine as run_export

        path, label = engine, "TensorRT"
    else:
        from .backends.onnxruntime import generate_from_export as run_export

        path, label = onnx_dir, "ONNX Runtime"
    result = run_export(path, prompt, raw=raw, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, seed=seed, on_text=lambda piece: console.out(piece, end="", highlight=False))
    console.out("")
    console.print(f"[dim]{len(result.token_ids)} tokens, {result.tokens_per_s:.1f} tokens/s decode ({label}), "
                  f"prefill {result.prefill_s * 1000:.0f} ms, FFN skip ratio {result.skip_ratio:.1%}[/]",
                  soft_wrap=True)


def _eval_onnx(onnx_dir: Path, spec: Any, samples: int, seq_len: int, output: Optional[Path], as_json: bool,
               torch_only: bool) -> None:
    from .backends.onnxruntime import evaluate_export
    from .evaluate import write_eval

    if torch_only:
        raise SkipToolError("--onnx evaluates the exported graph with its own policy; drop --config and --sweep")
    with _phase_progress() as progress:
        result = evaluate_export(onnx_dir, spec, samples, seq_len, progress=progress)
    if output is not None:
        result.paths = write_eval(result, output)
    if as_json:
        _print_json(result.to_dict())
        return
    _print_eval(result)


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------
@command()
def export(
    model: str = ModelArg,
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Skip config whose policy the graph computes."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for model.onnx, skip_config.json, tokenizer."),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx or tensorrt."),
    quantize: str = typer.Option("none", "--quantize", "-q", help="none, int8 or int4 (weights in If branches too)."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 or fp16 (fp16 for GPU targets)."),
    dense: bool = typer.Option(False, "--dense", help="The same exporter without any If: the dense baseline."),
    parity_steps: int = typer.Option(32, "--parity-steps", min=1, help="Decode steps of the ORT-vs-PyTorch check."),
    target: str = typer.Option("standard", "--target", help="standard or tensorrt (standard ops), or ort: "
                               "onnxruntime-genai's fused graph (GQA, MatMulNBits) with an If per skippable FFN."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Export the model with its skip policy: one KV-cache graph, an If around each skippable FFN."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from .exporters.onnx import export as run_export

    if target not in ("standard", "tensorrt", "ort"):
        raise SkipToolError(f"unknown --target {target!r} (expected standard, tensorrt or ort)")
    if target == "ort":
        return _export_ort_target(model, output, config, fmt, quantize, dtype, dense, as_json)

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err_console,
                  transient=True) as progress:
        task = progress.add_task("export", total=None)
        report = run_export(model, output, config, fmt=fmt, quantize=quantize, dtype=dtype, dense=dense,
                            parity_steps=parity_steps,
                            progress=lambda phase: progress.update(task, description=f"export: {phase}"))
    if as_json:
        _print_json(report.to_dict())
        return
    _print_export(report)


def _export_ort_target(model: str, output: Path, config: Optional[Path], fmt: str, quantize: str, dtype: str,
                       dense: bool, as_json: bool) -> None:
    """``--target ort``: onnxruntime-genai's graph with an If per skippable FFN; prints If and fused-op counts."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from .exporters.ort_target import OVERRIDE_MODEL_FILE, export_ort_source

    if fmt != "onnx" or dense:
        raise SkipToolError("--target ort needs --format onnx and no --dense (its dense baseline is "
                            "onnxruntime-genai's own model builder output)")
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err_console,
                  transient=True) as progress:
        task = progress.add_task("export --target ort", total=None)
        report = export_ort_source(model, output, config, quantize=quantize, dtype=dtype,
                                   progress=lambda phase: progress.update(task, description=f"export: {phase}"))
    if as_json:
        _print_json(report.to_dict())
        return
    table = Table(title=f"export --target ort: {report.out_dir}", show_header=False)
    table.add_row("precision", report.precision)
    table.add_row("skippable layers", f"{len(report.skippable)} ({report.skippable[0]}-{report.skippable[-1]})"
                  if report.skippable else "none")
    for op, n in report.op_counts.items():
        table.add_row(f"{op} nodes", str(n))
    table.add_row("skip_mask override", f"optional input of model.onnx; for onnxruntime-genai select "
                  f"{OVERRIDE_MODEL_FILE} (overlay) and set_model_input('skip_mask', ...)")
    console.print(table)


def _print_export(report: Any) -> None:
    table = Table(title=f"export: {report.out_dir}", show_header=False)
    table.add_row("format / dtype / quantize", f"{report.format} / {report.dtype} / {report.quantize}")
    table.add_row("policy", f"{report.policy} ({report.mode})")
    table.add_row("If nodes", f"{report.if_count} (skippable layers {len(report.skippable_layers)})")
    if report.quantized_ops_in_branches is not None:
        table.add_row("quantized ops inside If branches", str(report.quantized_ops_in_branches))
    table.add_row("size", f"{report.size_bytes / 2**20:.1f} MiB")
    table.add_row("export time", f"{report.export_s:.1f} s")
    for name, p in report.parity.items():
        status = "ok" if p["ok_fp32_tolerance"] else "above 1e-4" if p["decisions_match"] else "decisions differ"
        table.add_row(f"ORT vs PyTorch ({name})", f"logits max |diff| {p['max_abs_logits']:.2e}, present "
                      f"{p['max_abs_present']:.2e}, decisions {'match' if p['decisions_match'] else 'differ'} "
                      f"({status}); skip ratio {p['skip_ratio_ort']:.1%} over {p['steps']} steps")
    console.print(table)


# ------------------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------------------
@command()
def bench(
    model: str = ModelArg,
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Skip config for the skipping runs."),
    onnx: Optional[list[Path]] = typer.Option(None, "--onnx", help="Export folder(s) to run with ONNX Runtime."),
    skip_ratio: Optional[str] = typer.Option(None, "--skip-ratio", help="Forced skip ratios, e.g. 0,0.25,0.5."),
    new_tokens: int = typer.Option(128, "--new-tokens", "-n", min=2),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Measured repetitions (after 1 dropped warm-up)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the full report as JSON here."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG of tokens/s per run (default: beside --json)."),
    quality: bool = typer.Option(False, "--quality", help="Also measure each run's perplexity on a small slice."),
    spin: str = typer.Option("off", "--spin", help="ONNX Runtime intra-op spinning for every ORT-based run: on|off."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Threads for every run (default: all cores)."),
    data: Optional[str] = typer.Option(None, "--data", help="Prompt text source (default: built-in sample)."),
    prompt_tokens: int = typer.Option(32, "--prompt-tokens", min=2),
    no_peers: bool = typer.Option(False, "--no-peers", help="Leave out onnxruntime-genai and llama.cpp."),
    no_torch: bool = typer.Option(False, "--no-torch", help="Leave out the PyTorch eager runs."),
    device: str = typer.Option("cpu", "--device", help="Device for the PyTorch runs: cpu or cuda."),
) -> None:
    """Decode speed: PyTorch, ONNX Runtime and peers, dense vs skipping, against the ideal speedup."""
    from rich.progress import Progress

    from .bench import BenchRequest, bench_table, parse_ratios, run_bench, write_plot
    from .fileio import ensure_writable_dir, write_json_atomic

    if spin not in ("on", "off"):
        raise SkipToolError(f"--spin must be on or off (got {spin!r})")
    for out in (json_path, plot):
        if out is not None:
            ensure_writable_dir(out.parent)
    req = BenchRequest(model=model, config=config, onnx=list(onnx or []), skip_ratios=parse_ratios(skip_ratio),
                       new_tokens=new_tokens, repeats=repeats, threads=threads, spin=spin == "on", quality=quality,
                       data=data, prompt_tokens=prompt_tokens, peers=not no_peers, torch=not no_torch,
                       device=device)
    with Progress(console=err_console, transient=True) as progress:
        task = progress.add_task("bench", total=None)
        report = run_bench(req, on_start=lambda n: progress.update(task, total=n),
                           on_progress=lambda label: progress.update(task, advance=1, description=label))
    console.print(bench_table(report))
    if json_path is not None:
        write_json_atomic(json_path, report)
        console.print(f"[dim]report: {json_path}[/]")
    plot = plot or (json_path.with_suffix(".png") if json_path is not None else None)
    if plot is not None:
        write_plot(report, plot)
        console.print(f"[dim]plot: {plot}[/]")


# ------------------------------------------------------------------------------------------------
# train-router
# ------------------------------------------------------------------------------------------------
@command("train-router")
def train_router(
    model: str = ModelArg,
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Skip config whose cold layers and warm-up "
                                          "to reuse (default: cold 2/2, warm-up 32)."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for router.safetensors and skip_config.json."),
    data: str = typer.Option("builtin:wikitext2-sample", "--data", help="Training text: file, HF dataset or builtin."),
    part: str = typer.Option("0:0.5", "--part", help="Fractions START:END of the text to train on."),
    target_skip: float = typer.Option(0.25, "--target-skip", min=0.0, max=0.99,
                                      help="Realised share of all FFN blocks to skip (all layers and positions)."),
    steps: int = typer.Option(120, "--steps", min=0, help="Training steps (one block each; ~25 min on 2 CPU cores "
                              "for the demo model)."),
    lr: float = typer.Option(2e-3, "--lr", min=0.0),
    seq_len: int = typer.Option(512, "--seq-len", min=2),
    batch_size: int = typer.Option(1, "--batch-size", min=1),
    threshold: Optional[float] = typer.Option(None, "--threshold", min=0.0, max=1.0,
                                              help="Fixed probability threshold (default: refit to the target)."),
    estimator: str = typer.Option("ste", "--estimator", help="Hard decisions' gradient: ste or gumbel."),
    penalty: float = typer.Option(100.0, "--penalty", min=0.0, help="Weight of (skip rate - target)^2."),
    stand_in: int = typer.Option(16, "--stand-in", min=0, help="Rank of low-rank stand-ins trained jointly with the "
                                 "routers (0 = none; a base config's own stand-ins are then kept as they are)."),
    stand_in_init: str = typer.Option("closed-form", "--stand-in-init", help="Start the stand-ins from the "
                                      "closed-form fit (closed-form) or from zero (zero)."),
    stand_in_lr: float = typer.Option(1e-3, "--stand-in-lr", min=0.0),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Train DiffSkip routers (LLM frozen), with low-rank stand-ins, to a target skip ratio; writes a router skip
    config."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from .calibration.router_train import ESTIMATORS, STANDIN_INITS, RouterTrainSettings, run_train_router
    from .data import DataSpec, parse_part

    if estimator not in ESTIMATORS:
        raise SkipToolError(f"--estimator must be one of {', '.join(ESTIMATORS)} (got {estimator!r})")
    if threshold is not None and not 0.0 < threshold < 1.0:
        raise SkipToolError("--threshold must be a probability strictly between 0 and 1")
    if stand_in_init not in STANDIN_INITS:
        raise SkipToolError(f"--stand-in-init must be one of {', '.join(STANDIN_INITS)} (got {stand_in_init!r})")
    settings = RouterTrainSettings(target_skip=target_skip, steps=steps, lr=lr, seq_len=seq_len,
                                   batch_size=batch_size, penalty=penalty, estimator=estimator, threshold=threshold,
                                   seed=seed, device=device, standin_rank=stand_in, standin_init=stand_in_init,
                                   standin_lr=stand_in_lr)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[info]}"), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task("train routers", total=steps, info="")

        def on_step(step: int, r: dict[str, float]) -> None:
            progress.update(task, completed=step, info=f"loss {r['loss']:.4f} kl {r['kl']:.4f} "
                                                      f"skip {r['skip_ratio']:.1%}")

        result = run_train_router(model, config, DataSpec(source=data, part=parse_part(part)), output, settings,
                                  on_step)
    if as_json:
        _print_json(result.to_dict())
        return
    d, cost = result.to_dict(), result.cost
    table = Table(title=f"routers: {result.config_path}", show_header=False)
    table.add_row("router weights", str(result.router_path))
    if result.standin_path is not None:
        sc = cost["standin"]
        table.add_row("stand-in weights (trained)", f"{result.standin_path} (rank {stand_in}, {stand_in_init} start)")
        table.add_row("stand-in params per layer (vs FFN)", f"{sc['standin_params']:,} ({sc['fraction_of_ffn']:.2%} "
                                                            f"of {sc['ffn_params']:,})")
    table.add_row("threshold (probability)", f"{d['threshold']:.4f}")
    table.add_row("held-out realised skip ratio", f"{d['heldout_skip_ratio']:.1%} (target {target_skip:.0%})")
    table.add_row("held-out perplexity dense / router", f"{d['dense_heldout_perplexity']:.2f} / "
                                                        f"{d['heldout_perplexity']:.2f} ({d['perplexity_ratio']:.3f}x)")
    table.add_row("router params per layer (vs FFN)", f"{cost['router_params_per_layer']:,} "
                                                      f"({cost['param_share']:.3%} of {cost['ffn_params_per_layer']:,})")
    table.add_row("router FLOPs per token (vs FFN)", f"{cost['router_flops_per_token']:,} "
                                                     f"({cost['flop_share']:.3%} of {cost['ffn_flops_per_token']:,})")
    table.add_row("training time", f"{result.seconds:.0f} s")
    console.print(table)


# ------------------------------------------------------------------------------------------------
# calibrate / eval
# ------------------------------------------------------------------------------------------------
DataOpt = typer.Option("builtin:wikitext2-sample", "--data", help="Text file, JSONL file, HF dataset name, or the "
                       "built-in sample.")
FieldOpt = typer.Option("text", "--field", help="Text field of JSONL records / dataset rows.")
SplitOpt = typer.Option("test", "--split", help="Hugging Face dataset split.")


@contextmanager
def _phase_progress() -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress bar (on stderr) with one bar per phase label; yields ``update(label, done, total)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as progress:
        tasks: dict[str, Any] = {}

        def update(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = progress.add_task(label, total=total)
            progress.update(tasks[label], completed=done, total=total)

        yield update


def _data_spec(data: str, field: str, split: str, part: str) -> Any:
    from .data import DataSpec, parse_part

    return DataSpec(source=data, field=field, split=split, part=parse_part(part))


@command()
def calibrate(
    model: str = ModelArg,
    output: Path = typer.Option(..., "--output", "-o", help="Directory for skip_config.json, layer_stats.json/png."),
    target_skip: float = typer.Option(0.25, "--target-skip", help="Realised share of all FFN blocks to skip "
                                      "(all layers, all positions) on the calibration data."),
    data: str = DataOpt,
    field: str = FieldOpt,
    split: str = SplitOpt,
    part: str = typer.Option("0:1", "--part", help="Fractions START:END of the text to use, e.g. 0:0.5."),
    samples: int = typer.Option(16, "--samples", help="Number of calibration blocks."),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per block."),
    warmup: int = typer.Option(32, "--warmup", help="Leading positions of a sequence that never skip."),
    greedy_k: int = typer.Option(1, "--greedy-k", help="FFNs skipped after a saturated one (grows if the target "
                                 "needs it)."),
    cold_start: Optional[int] = typer.Option(None, "--cold-start", help="Layers at the start that never skip "
                                             "(default: chosen from the statistics)."),
    cold_end: Optional[int] = typer.Option(None, "--cold-end", help="Layers at the end that never skip "
                                           "(default: chosen from the statistics)."),
    threshold_mode: str = typer.Option("per-layer", "--threshold-mode", help="per-layer or global quantiles."),
    stand_in: int = typer.Option(16, "--stand-in", min=0, help="Rank of closed-form low-rank stand-ins that replace "
                                 "skipped FFNs (0 = none)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print the layer statistics as JSON instead of a table."),
) -> None:
    """Fit the cosine (FFN-SkipLLM) policy: layer statistics, cold regions, thresholds for a target skip ratio."""
    from .calibration.fit import CalibrationSettings, calibrate as run_calibrate
    from .models import load_model
    from .plots import plot_layer_stats

    spec = _data_spec(data, field, split, part)
    settings = CalibrationSettings(target_skip=target_skip, samples=samples, seq_len=seq_len, warmup=warmup,
                                   greedy_k=greedy_k, cold_start=cold_start, cold_end=cold_end,
                                   threshold_mode=threshold_mode, standin_rank=stand_in)
    lm = load_model(model, device=device)
    with _phase_progress() as progress:
        result = run_calibrate(lm.model, lm.adapter, lm.tokenizer, spec, settings, output, source=model,
                               plot=plot_layer_stats, progress=progress)
    stats = result.layer_stats_json()
    if as_json:
        _print_json(stats)
        return
    table = Table(title=f"layer statistics ({stats['num_blocks']} x {stats['seq_len']} tokens, after warm-up "
                        f"{stats['warmup']})")
    for col in ("layer", "cos", "cos q05", "cos q50", "FFN/h", "attn~FFN", "AUC", "threshold", "skip"):
        table.add_column(col, justify="right")
    for r in stats["layers"]:
        th = "cold" if r["cold"] else f"{r['threshold']:.4f}"
        table.add_row(str(r["layer"]), f"{r['saturation']['mean']:.4f}", f"{r['saturation']['q05']:.4f}",
                      f"{r['saturation']['q50']:.4f}", f"{r['ffn_ratio']['mean']:.3f}",
                      f"{r['attn_ffn_cos']['mean']:+.3f}", f"{r['probe_auc']:.3f}", th, f"{r['skip_ratio']:.1%}")
    console.print(table)
    console.print(f"cold layers: first {stats['cold_start']}, last {stats['cold_end']}; greedy-k {stats['greedy_k']}; "
                  f"realised skip ratio on the calibration data {stats['skip_ratio']:.1%} (target "
                  f"{target_skip:.0%})", soft_wrap=True)
    for path in result.paths:
        console.print(f"[dim]wrote {path}[/]", soft_wrap=True)


@command("eval")
def eval_command(
    model: str = ModelArg,
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Skip config (skip_config.json or its "
                                          "directory); not with --onnx."),
    data: str = DataOpt,
    field: str = FieldOpt,
    split: str = SplitOpt,
    part: str = typer.Option("0:1", "--part", help="Fractions START:END of the text, e.g. 0.5:1 (disjoint from "
                             "the calibration part)."),
    samples: int = typer.Option(16, "--samples", help="Number of evaluation blocks."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per block."),
    sweep: bool = typer.Option(False, "--sweep", help="Also sweep quality vs realised skip ratio: cosine with and "
                               "without stand-ins against random and static-layer skipping, and the routers of a "
                               "router config (writes sweep.json and sweep.png)."),
    targets: str = typer.Option("0.05,0.10,0.15,0.25,0.40", "--targets", help="Skip ratios for --sweep."),
    curves: Optional[str] = typer.Option(None, "--curves", help="Sweep curves, comma-separated (default: "
                                         "cosine,cosine+standin,random,static, plus router and router+standin for a "
                                         "router config; also static+standin)."),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", min=1, help="Calibration blocks the sweep "
                                                "refits on (default: as many as the config was calibrated on)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Directory for eval.json (and the sweep); "
                                          "default with --sweep: the config's directory."),
    router_threshold: Optional[float] = typer.Option(None, "--router-threshold", min=0.0, max=1.0,
                                                     help="Override the router policy's probability threshold."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (ppl_dense, ppl_skip, skip_ratio, ...)."),
    onnx_dir: Optional[Path] = typer.Option(None, "--onnx", help="Evaluate a `skiptool export` folder with ONNX "
                                            "Runtime: its policy against the same graph forced dense."),
) -> None:
    """Perplexity of the dense and the skipping model on the same tokens, and the realised skip ratio."""
    if onnx_dir is not None:
        return _eval_onnx(onnx_dir, _data_spec(data, field, split, part), samples, seq_len, output, as_json,
                          config is not None or sweep)
    if config is None:
        raise SkipToolError("eval needs --config (a skip config) or --onnx (an export folder)")
    from .calibration.fit import check_output_dir
    from .config import load_config
    from .evaluate import evaluate, parse_targets
    from .models import load_model
    from .plots import plot_sweep

    spec = _data_spec(data, field, split, part)
    skip_config = load_config(config)
    sweep_targets = parse_targets(targets) if sweep else None
    out = output if output is not None or not sweep else (skip_config.base_dir or Path("."))
    if out is not None:
        check_output_dir(out)
    lm = load_model(model, device=device)
    with _phase_progress() as progress:
        result = evaluate(lm.model, lm.adapter, lm.tokenizer, skip_config, spec, samples, seq_len,
                          sweep_targets=sweep_targets, curves=_sweep_curves(curves, skip_config),
                          out_dir=out, plot=plot_sweep, router_threshold=router_threshold,
                          calibration_samples=calib_samples, progress=progress)
    if as_json:
        _print_json(result.to_dict())
        return
    _print_eval(result)


def _print_eval(result: Any) -> None:
    table = Table(title=f"{result.policy} policy: {result.blocks} x {result.seq_len} tokens of "
                        f"{result.data['source']} (part {result.data['part'][0]}:{result.data['part'][1]})",
                  show_header=False)
    table.add_row("perplexity dense", f"{result.ppl_dense:.3f}")
    table.add_row("perplexity skipping", f"{result.ppl_skip:.3f} ({result.ppl_increase:+.1%})")
    table.add_row("realised FFN skip ratio", f"{result.skip_ratio:.2%} (all layers, all positions)")
    table.add_row("per layer", " ".join(f"{r:.0%}" for r in result.per_layer))
    console.print(table)
    if result.sweep is not None:
        sweep = Table(title="sweep: perplexity at realised skip ratio")
        sweep.add_column("target", justify="right")
        for name in result.sweep["curves"]:
            sweep.add_column(name, justify="right")
        for i, target in enumerate(result.sweep["targets"]):
            cells = [_sweep_cell(points[i]) for points in result.sweep["curves"].values()]
            sweep.add_row(f"{target:.0%}", *cells)
        console.print(sweep)
    for path in result.paths:
        console.print(f"[dim]wrote {path}[/]", soft_wrap=True)


def _sweep_curves(curves: Optional[str], config: Any) -> list[str]:
    """The sweep's curves: those named, or the defaults (with ``router`` and, when the config has stand-ins,
    ``router+standin`` for a router config)."""
    from .evaluate import DEFAULT_CURVES

    if curves is not None:
        return [c.strip() for c in curves.split(",") if c.strip()]
    routers = ["router"] + (["router+standin"] if config.standin is not None else [])
    return list(DEFAULT_CURVES) + (routers if config.policy.kind == "router" else [])


def _sweep_cell(point: dict[str, Any]) -> str:
    if point.get("ppl") is None:
        return "out of reach"
    return f"{point['ppl']:.2f} @ {point['skip_ratio']:.1%}"


# ------------------------------------------------------------------------------------------------
def main() -> None:
    """Console entry point. Unexpected exceptions print one line unless ``SKIPTOOL_DEBUG`` is set."""
    try:
        app()
    except Exception as exc:  # noqa: BLE001 - user errors are handled per command; this is the last resort
        if os.environ.get("SKIPTOOL_DEBUG"):
            raise
        err_console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc} "
                          "(set SKIPTOOL_DEBUG=1 for a traceback)", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
