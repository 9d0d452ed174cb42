"""``info`` and ``generate``: what a model is, and text from it (PyTorch, or an export folder in its runtime)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from ..errors import SkipToolError
from .app import DeviceOpt, DtypeOpt, JsonOpt, ModelArg, app, console, print_json
from .tables import info_table


@app.command()
def info(model: str = ModelArg, as_json: bool = JsonOpt) -> None:
    """Show a model's shape and the ideal decode speedup that FFN skipping can reach on it.

    Rows: the shape (layers, hidden and FFN sizes, attention and KV heads, vocabulary, weight dtype); parameters;
    weight bytes read / token = every layer's weights and the LM head, read once per decoded token (what bounds
    decoding at batch 1); FFN share = the FFN weights' share of those bytes; ideal decode speedup at r FFN skip =
    Amdahl's law on those bytes: at a skip ratio r decoding reads 1 - r x (FFN share) of what it read dense, so it
    is at best 1 / (1 - r x FFN share) times as fast.
    """
    from ..info import describe

    data = describe(model)
    if as_json:
        print_json(data)
        return
    console.print(info_table(model, data))


@app.command()
def generate(
    model: str = ModelArg,
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt (sent through the chat template)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Skip config (skip_config.json)."),
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as is, without the chat template."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass, in (0, 1]."),
    seed: int = typer.Option(0, "--seed"),
    router_threshold: Optional[float] = typer.Option(None, "--router-threshold", help="Override a router policy's "
                                                     "probability threshold, in (0, 1)."),
    device: str = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    onnx_dir: Optional[Path] = typer.Option(None, "--onnx", help="Run a `skiptool export` folder in its runtime "
                                            "(the folder's own policy; MODEL and --config are not used)."),
    runtime: Optional[str] = typer.Option(None, "--runtime", help="With --onnx: one of the runtimes the folder's "
                                          "manifest lists (default: its first; onnxruntime, onnxruntime-genai, "
                                          "tensorrt)."),
    engine: Optional[Path] = typer.Option(None, "--engine", help="Run the TensorRT engine of a `--format tensorrt` "
                                          "folder (same as --onnx DIR --runtime tensorrt)."),
) -> None:
    """Generate text, streaming it, then one line: tokens generated, decode tokens/s (prefill excluded) and where
    they ran, the prefill time, the policy, and the realised FFN skip ratio (skipped FFN blocks over all layers and
    the decode steps; – when the runtime cannot see its decisions).

    --device cuda decodes on the GPU decode path: a static KV cache, the skip decisions on the device and each
    decode step one CUDA graph."""
    stream = {"on_text": lambda piece: console.out(piece, end="", highlight=False)}
    sampling = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
                "raw": raw}
    if onnx_dir is not None or engine is not None:
        result, where = _generate_export(onnx_dir, engine, runtime, prompt, config, router_threshold,
                                         {**sampling, **stream})
        policy = None
    else:
        if runtime is not None:
            raise SkipToolError("--runtime picks how an export folder runs; use it with --onnx DIR")
        from ..generate import run_generate

        result, policy = run_generate(model, prompt, config, device, router_threshold, dtype, **sampling, **stream)
        where = "PyTorch, CUDA graph" if device.startswith("cuda") else f"PyTorch {device}"
    console.out("")
    skip = "–" if result.skip_ratio is None else f"{result.skip_ratio:.1%}"
    console.print(f"[dim]{len(result.token_ids)} tokens, {result.tokens_per_s:.1f} tokens/s decode ({where}), "
                  f"prefill {result.prefill_s * 1000:.0f} ms, " + (f"policy {policy}, " if policy else "") +
                  f"FFN skip ratio {skip}[/]", soft_wrap=True)


def _generate_export(onnx_dir: Optional[Path], engine: Optional[Path], runtime: Optional[str], prompt: str,
                     config: Optional[Path], router_threshold: Optional[float], options: dict[str, Any]) -> Any:
    from ..generate import generate_from_export

    if config is not None or router_threshold is not None:
        raise SkipToolError("--onnx / --engine run the exported graph with the policy it was exported with; "
                            "drop --config and --router-threshold")
    if onnx_dir is not None and engine is not None:
        raise SkipToolError("--onnx and --engine both name an export; pick one")
    if engine is not None:
        if runtime not in (None, "tensorrt"):
            raise SkipToolError("--engine runs TensorRT; drop --runtime")
        folder, runtime = (engine.parent if engine.suffix == ".engine" else engine), "tensorrt"
    else:
        folder = onnx_dir
    from ..contract import read_manifest

    result = generate_from_export(folder, prompt, runtime, **options)
    return result, runtime or read_manifest(folder).runtime
