"""The `skiptool` command line: each command parses its options, calls one library function, prints.

Heavy imports (torch, transformers, onnxruntime) happen inside the commands so ``--help`` is fast.
User errors (:class:`skiptool.errors.SkipToolError`) print one line and exit 1, never a traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

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
) -> None:
    """Generate text, streaming it, then print tokens/s and the realised skip ratio."""
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
