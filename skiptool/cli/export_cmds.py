"""``export`` and ``bench``: a deployable graph with an ``If`` per skippable FFN, and its measured decode speed."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import SkipToolError
from .app import (OUTPUT, DeviceOpt, DtypeOpt, JsonOpt, ModelArg, app, console, err_console, phase_names,
                  phase_progress, print_json)
from .tables import export_table


def _format_help() -> str:
    from ..exporters import EXPORT_TARGETS

    return "; ".join(f"{t.name}: {t.summary}" for _, t in EXPORT_TARGETS.items())


@app.command()
def export(
    model: str = ModelArg,
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Skip config whose policy the graph computes "
                                          "(default: dense, with the default cold layers)."),
    output: Path = typer.Option(..., "--output", "-o", **OUTPUT, help="Directory for the graph, skip_config.json, "
                                "tokenizer and skiptool_export.json."),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx, ort or tensorrt (see below)."),
    quantize: str = typer.Option("none", "--quantize", "-q", help="none, int8 or int4 (weights in If branches too)."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 or fp16 (fp16 for GPU targets)."),
    dense: bool = typer.Option(False, "--dense", help="The same exporter without any If: the dense baseline "
                               "(onnx and tensorrt formats)."),
    parity_steps: int = typer.Option(32, "--parity-steps", min=1, help="Decode steps of the check against PyTorch."),
    as_json: bool = JsonOpt,
) -> None:
    """Export the model with its skip policy: one KV-cache graph, an If around each skippable FFN.

    Formats — onnx: standard ONNX ops, runs in ONNX Runtime and onnxruntime-genai; ort: onnxruntime-genai's fused
    graph (GroupQueryAttention, MatMulNBits), the fastest on CPU, needs onnxruntime-genai; tensorrt: the onnx graph
    plus a TensorRT engine (needs TensorRT and an NVIDIA GPU). Every export checks itself against the PyTorch skip
    runtime (logits, KV cache and skip decisions over a prefill and --parity-steps decode steps) and is refused,
    leaving nothing behind, when it is outside the documented tolerance of its format and precision.

    Rows: target / precision; policy (skip, or dense for --dense); If nodes = one per skippable layer; runs in =
    the runtimes that can open the folder; size and op counts of the graph; parity vs PyTorch = the largest
    absolute difference of the logits and of the KV cache, the share of equal skip decisions and of equal top-1
    tokens, and the skip ratio the graph realised over the checked steps; export time.
    """
    from ..exporters import ExportRequest, run_export

    request = ExportRequest(model, output, config, quantize, dtype, dense, parity_steps)
    with phase_progress() as progress:
        report = run_export(fmt, request, phase_names(progress))
    if as_json:
        print_json(report.to_dict())
        return
    console.print(export_table(report))


@app.command()
def bench(
    model: str = ModelArg,
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Skip config for the PyTorch skipping runs."),
    onnx: Optional[list[Path]] = typer.Option(None, "--onnx", help="Export folder(s) to run, each in every runtime "
                                              "its manifest lists (a --dense export is the baseline of its format "
                                              "and precision)."),
    skip_ratio: Optional[str] = typer.Option(None, "--skip-ratio", help="Forced skip ratios, e.g. 0,0.25,0.5."),
    new_tokens: int = typer.Option(128, "--new-tokens", "-n", min=2),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Measured repetitions (after 1 dropped warm-up)."),
    json_path: Optional[Path] = typer.Option(None, "--json", **OUTPUT, help="Write the full report as JSON here."),
    plot: Optional[Path] = typer.Option(None, "--plot", **OUTPUT,
                                        help="PNG of tokens/s per run (default: beside --json)."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", **OUTPUT,
                                            help="Write the full table as Markdown here."),
    wide: bool = typer.Option(False, "--wide", help="Print every column (needs ~120 columns)."),
    quality: bool = typer.Option(False, "--quality", help="Also measure each run's perplexity on the same held-out "
                                 "slice (the second half of --data or the built-in text) and draw the quality-vs-speed "
                                 "front (tok/s against perplexity) beside --plot as NAME-front.png."),
    quality_samples: int = typer.Option(8, "--quality-samples", help="Held-out blocks --quality scores."),
    quality_seq_len: int = typer.Option(512, "--quality-seq-len", help="Tokens per held-out block."),
    spin: str = typer.Option("off", "--spin", help="ONNX Runtime intra-op spinning for every ORT-based run: on|off."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Threads for every run (default: all cores)."),
    data: Optional[str] = typer.Option(None, "--data", help="Prompt text source (default: built-in sample)."),
    prompt_tokens: int = typer.Option(32, "--prompt-tokens", min=2),
    no_peers: bool = typer.Option(False, "--no-peers", help="Leave out onnxruntime-genai and llama.cpp."),
    no_torch: bool = typer.Option(False, "--no-torch", help="Leave out the PyTorch eager runs."),
    device: str = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
) -> None:
    """Decode speed of skipping against dense, against the ideal, and against the runtimes users already run.

    Every run decodes the same prompt greedily; runs are interleaved round-robin over the repetitions and the
    first repetition is dropped. Columns: tok/s = median decode tokens per second (prefill excluded); skip =
    realised share of FFN blocks skipped over all layers and decode steps, from the run's own decisions ("forced"
    runs skip fixed layers through skip_mask); speedup = tok/s over the dense run of the same backend and precision
    (PyTorch dense, a --dense export, or onnxruntime-genai's own graph for an ort export); ideal = the speedup
    reading fewer weight bytes would give at that skip ratio (dense bytes per token / the run's bytes per token,
    routers and stand-ins counted); of ideal = speedup / ideal. --wide adds min–max, p50/p90 latency, prefill and
    the resident memory a run added when it loaded (+RSS); the JSON and --markdown hold everything.

    --device cuda adds the GPU decode path (torch-cuda-graph): dense, the config's policy and the forced ratios,
    each decode step one CUDA graph with the decisions on the device, and the same with each layer's decision read
    on the host ("host sync", what an ONNX If costs on a GPU). A random:SHAPE model decodes random prompt ids.
    """
    from ..bench import (BenchRequest, bench_table, parse_ratios, report_markdown, run_bench, scored_runs, write_front,
                         write_plot)
    from ..bench.run import check_report_paths
    from ..fileio import write_json_atomic, write_text_atomic

    if spin not in ("on", "off"):
        raise SkipToolError(f"--spin must be on or off (got {spin!r})")
    plot = plot or (json_path.with_suffix(".png") if json_path is not None else None)
    front = plot.with_name(f"{plot.stem}-front.png") if quality and plot is not None else None
    check_report_paths(json_path, plot, markdown, front)
    req = BenchRequest(model=model, config=config, onnx=list(onnx or []), skip_ratios=parse_ratios(skip_ratio),
                       new_tokens=new_tokens, repeats=repeats, threads=threads, spin=spin == "on", quality=quality,
                       quality_blocks=quality_samples, quality_tokens=quality_seq_len,
                       data=data, prompt_tokens=prompt_tokens, peers=not no_peers, torch=not no_torch,
                       device=device, dtype=dtype)
    with phase_progress() as progress:
        total = [0]
        done = [0]

        def on_progress(label: str) -> None:
            done[0] += 1
            progress(f"bench: {label}", done[0], total[0])

        report = run_bench(req, on_start=lambda n: total.__setitem__(0, n), on_progress=on_progress)
    console.print(bench_table(report, wide=wide))
    if json_path is not None:
        write_json_atomic(json_path, report)
        err_console.print(f"[dim]report: {json_path}[/]")
    if markdown is not None:
        write_text_atomic(markdown, report_markdown(report))
    if plot is not None:
        write_plot(report, plot)
        err_console.print(f"[dim]plot: {plot}[/]")
    if front is not None and scored_runs(report):
        write_front(report, front)
        err_console.print(f"[dim]quality-vs-speed front: {front}[/]")
