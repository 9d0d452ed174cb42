"""Reproduce the README's performance table on this machine.

    python benchmarks/run_bench.py                       # demo model, --spin off, 5 repeats, 128 new tokens
    python benchmarks/run_bench.py --spin on --out /tmp/bench-spin

1. Exports the demo model twice in ONNX Runtime's fast format (``export --format ort``: onnxruntime-genai's
   graph with an ``If`` per skippable FFN), fp32 and int4, with ``--config`` (default: a dense config, so
   only the forced ratios skip; pass a calibrated or trained config to measure what its decisions cost);
   ``--standard`` adds the standard-ops export with and without ``If``. Existing exports are reused.
2. Runs ``skiptool bench`` on both exports with forced ratios 0 (the ``If`` overhead), 25% and 50%,
   beside PyTorch eager and the peers (onnxruntime-genai fp32/int4, llama.cpp on the GGUF), interleaved.
3. Writes ``OUT/bench-cpu.json``, ``OUT/bench-cpu.png`` and ``OUT/bench-cpu.md`` (the README's table).
4. With ``--router-config DIR`` (a ``skiptool train-router`` output), a second run: the trained router (and its
   stand-ins) in PyTorch and in the standard-ops export against its ``--dense`` twin, where skiptool's ONNX
   Runtime backend counts the realised skip ratio, so the fraction of ideal includes the router's own cost.
   Writes ``OUT/bench-cpu-router.{json,png,md}``.

The machine should be otherwise idle: on 2 vCPUs any other busy process changes the figures a lot,
and ONNX Runtime's intra-op spinning (``--spin``) makes that worse (see the README).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

DEMO = "smollm2-135m"


def export_ort_target(model: str, config: Path, quantize: str, out: Path) -> Path:
    """``skiptool export --format ort`` (onnxruntime-genai's graph + an If per skippable FFN), reused when complete."""
    if (out / "skiptool_export.json").is_file():
        return out
    return _export("ort", ["--config", str(config)], model, quantize, out)


def export_standard(model: str, config: Path, quantize: str, out: Path, dense: bool) -> Path:
    """``skiptool export --format onnx`` (the standard-ops graph; ``--dense``: the same without any If)."""
    if (out / "skiptool_export.json").is_file():
        return out
    return _export("onnx", ["--dense"] if dense else ["--config", str(config)], model, quantize, out)


def _export(fmt: str, options: list[str], model: str, quantize: str, out: Path) -> Path:
    cmd = ["skiptool", "export", model, "--format", fmt, "--quantize", quantize, "-o", str(out), *options]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out


def dense_config(model: str, out: Path) -> Path:
    """A never-skip config for the model (forced ratios do all the skipping)."""
    from skiptool.config import dense_config as make
    from skiptool.models import load_model

    path = out / "dense_config" / "skip_config.json"
    if not path.is_file():
        make(load_model(model).model, source=model).save(path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEMO)
    parser.add_argument("--config", type=Path, help="skip config to export (default: dense, forced ratios only)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="report, plot and table")
    parser.add_argument("--exports", type=Path, help="where the exports go (default: ~/.cache/skiptool/bench-exports)")
    parser.add_argument("--spin", choices=("on", "off"), default="off")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--skip-ratio", default="0,0.25,0.5")
    parser.add_argument("--quality", action="store_true", help="add each run's perplexity on held-out text and the "
                        "quality-vs-speed front (bench --quality)")
    parser.add_argument("--data", help="text for the prompt and --quality (default: the built-in excerpt)")
    parser.add_argument("--quality-samples", type=int, default=8, help="held-out blocks of 512 tokens (--quality)")
    parser.add_argument("--router-config", type=Path, help="also bench this trained router config (see 4. above)")
    parser.add_argument("--fresh", action="store_true", help="rebuild the exports even when they exist")
    parser.add_argument("--standard", action="store_true",
                        help="also bench the standard-ops export (fp32, with and without If) in plain ONNX Runtime")
    args = parser.parse_args()

    from skiptool.models import cache_root

    args.out.mkdir(parents=True, exist_ok=True)
    work = args.exports or cache_root() / "bench-exports"
    config = args.config or dense_config(args.model, work)
    if args.fresh:
        for name in ("ort-none", "ort-int4", "onnx-fp32", "onnx-fp32-dense", "onnx-fp32-router"):
            shutil.rmtree(work / name, ignore_errors=True)
    exports = [export_ort_target(args.model, config, q, work / f"ort-{q}") for q in ("none", "int4")]
    if args.standard:
        exports += [export_standard(args.model, config, "none", work / "onnx-fp32", dense=False),
                    export_standard(args.model, config, "none", work / "onnx-fp32-dense", dense=True)]
    common = ["--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--spin", args.spin,
              "--threads", str(args.threads)] + \
        (["--quality", "--quality-samples", str(args.quality_samples)] if args.quality else []) + \
        (["--data", args.data] if args.data else [])
    run_bench(args.model, config, exports, ["--skip-ratio", args.skip_ratio, *common], args.out / "bench-cpu")
    if args.router_config is not None:
        router_exports = [export_standard(args.model, args.router_config, "none", work / "onnx-fp32-router", False),
                          export_standard(args.model, config, "none", work / "onnx-fp32-dense", dense=True)]
        run_bench(args.model, args.router_config, router_exports, ["--no-peers", *common],
                  args.out / "bench-cpu-router")
    return 0


def run_bench(model: str, config: Path, exports: list[Path], options: list[str], stem: Path) -> None:
    """One `skiptool bench` run over `exports`; writes STEM.json, STEM.png and STEM.md (printed)."""
    from skiptool.bench import report_markdown

    report = stem.with_suffix(".json")
    cmd = ["skiptool", "bench", model, "--config", str(config), *options, "--json", str(report)]
    for folder in exports:
        cmd += ["--onnx", str(folder)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    table = stem.with_suffix(".md")
    table.write_text(report_markdown(json.loads(report.read_text())))
    print(table.read_text())


if __name__ == "__main__":
    sys.exit(main())
