"""The whole benchmark: :func:`run_bench` (load the
model, plan the runs, measure them, summarise), the settings recorded in the report, and the
``--skip-ratio`` parser.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

from ..contract import read_manifest
from ..errors import SkipToolError
from ..generate import check_length, context_length
from ..models import NO_TOKENIZER, decode_dtype
from .harness import Measurement, measure, peak_rss_mib, progress_steps
from .plans import config_beside, plan_runs
from .report import summarise
from .request import BenchRequest


def bench_prompts(tokenizer: Any, source: str | None, prompt_tokens: int, num_prompts: int,
                  part: tuple[float, float] = (0.0, 0.5)) -> list[list[int]]:
    """Prompts cut from data (the built-in sample by default): `num_prompts` blocks of `prompt_tokens`."""
    from ..data import BUILTIN_SAMPLE, DataSpec, token_blocks

    spec = DataSpec(source or BUILTIN_SAMPLE, part=part)
    return token_blocks(tokenizer, spec, prompt_tokens, num_prompts).tolist()


def random_prompts(vocab_size: int, prompt_tokens: int, num_prompts: int, seed: int = 0) -> list[list[int]]:
    """Prompts of random token ids, for a model without a tokenizer (random weights: decode speed does not
    depend on which tokens it reads)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_prompts, prompt_tokens), generator=generator).tolist()


def run_bench(req: BenchRequest, on_start: Callable[[int], None] | None = None,
              on_progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Load the model, plan every run, measure them interleaved and return the JSON-ready report."""
    import torch

    from ..config import load_config
    from ..models import load_model
    from ..policies import check_policy

    check_request(req)
    threads = req.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    config = load_config(req.config) if req.config is not None else \
        next(filter(None, (config_beside(Path(d)) for d in req.onnx)), None)
    if config is not None:
        check_policy(config)
    lm = load_model(req.model, decode_dtype(req.device, req.dtype), req.device, needs_tokenizer=False)
    check_length(req.prompt_tokens, req.new_tokens, context_length(lm))
    if config is not None:
        config.check_matches(lm.model)
    m = Measurement(_prompts(req, lm), req.new_tokens, req.repeats, req.warmup, _quality_blocks(req, lm))
    max_length = max(req.prompt_tokens + req.new_tokens, req.quality_tokens) + 16
    specs = plan_runs(req, lm, config, threads, max_length)
    if on_start is not None:
        on_start(progress_steps(specs, m))
    load_start = os.getloadavg()
    results = measure(specs, m, on_progress)
    return {
        "schema": "skiptool-bench/1",
        "model": req.model,
        "config": str(req.config) if req.config else None,
        "onnx": [str(d) for d in req.onnx],
        "settings": _settings(req, threads, m, load_start),
        "memory": {"process_peak_rss_mib": peak_rss_mib()},
        "runs": summarise(results),
    }


def check_request(req: BenchRequest) -> None:
    """One clear error line, before the model loads, for a benchmark that cannot run as asked."""
    from ..accelerators import check_device
    from ..data import DataSpec, check_blocks, check_data

    check_device(req.device)
    if req.repeats < 1 or req.new_tokens < 2:
        raise SkipToolError("--repeats must be >= 1 and --new-tokens >= 2")
    cores = os.cpu_count() or 1
    if req.threads is not None and not 1 <= req.threads <= cores:
        raise SkipToolError(f"--threads must be between 1 and the {cores} CPU cores here (got {req.threads})")
    check_ratios(req.skip_ratios)
    check_blocks(req.num_prompts, req.prompt_tokens)
    if req.quality and (req.quality_blocks < 1 or req.quality_tokens < 2):
        raise SkipToolError(f"--quality-samples must be >= 1 and --quality-seq-len >= 2 "
                            f"(got {req.quality_blocks} and {req.quality_tokens})")
    if not (req.torch or req.peers or req.onnx or req.device.startswith("cuda")):
        raise SkipToolError("nothing to run: --no-torch and --no-peers leave no run; add an export (--onnx DIR)")
    for folder in req.onnx:
        check_export_folder(folder)
    if req.data is not None:
        check_data(DataSpec(req.data))


def check_export_folder(folder: str | Path) -> None:
    """Fail in one line unless `folder` is an export bench can run: its manifest and the graph it names readable."""
    from google.protobuf.message import DecodeError

    from .plans import ExportPlan

    try:
        ExportPlan.of(folder, None)
    except (DecodeError, OSError) as exc:
        raise SkipToolError(f"{folder}: cannot read the graph its manifest names ({read_manifest(folder).file}): "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; re-export it") from None


def check_report_paths(*paths: Path | None) -> None:
    """Fail in one line, before the work, unless each given path is a file that can be written."""
    from ..fileio import check_output_dir

    for path in filter(None, paths):
        if path.is_dir():
            raise SkipToolError(f"{path} is a folder; name a file to write to")
        check_output_dir(path.parent)


def _prompts(req: BenchRequest, lm: Any) -> list[list[int]]:
    """The prompts every run decodes: cut from text, or random token ids for a model without a tokenizer."""
    if lm.tokenizer is not None:
        return bench_prompts(lm.tokenizer, req.data, req.prompt_tokens, req.num_prompts)
    if req.data is not None:
        raise SkipToolError(f"--data needs text: {NO_TOKENIZER}")
    return random_prompts(int(lm.config.vocab_size), req.prompt_tokens, req.num_prompts)


def _quality_blocks(req: BenchRequest, lm: Any) -> list[list[int]] | None:
    """Held-out text blocks for --quality (perplexity needs real text, so a tokenizer)."""
    if not req.quality:
        return None
    if lm.tokenizer is None:
        raise SkipToolError(f"--quality needs text: {NO_TOKENIZER}")
    positions = context_length(lm)
    if positions is not None and req.quality_tokens > positions:
        raise SkipToolError(f"--quality-seq-len {req.quality_tokens} is beyond the model's {positions} positions")
    blocks = bench_prompts(lm.tokenizer, req.data, req.quality_tokens, req.quality_blocks, part=(0.5, 1.0))
    if len(blocks) < req.quality_blocks:
        raise SkipToolError(f"--quality: the second half of {req.data or 'the built-in sample'} holds {len(blocks)} "
                            f"blocks of {req.quality_tokens} tokens, not the {req.quality_blocks} asked for; "
                            "lower --quality-samples or --quality-seq-len, or pass more --data")
    return blocks


def _settings(req: BenchRequest, threads: int, m: Measurement, load_start: tuple[float, ...]) -> dict[str, Any]:
    import torch

    from ..ort import available_providers

    return {
        "new_tokens": req.new_tokens, "repeats": req.repeats, "warmup_runs_dropped": req.warmup,
        "prompts": len(m.prompts), "prompt_tokens": [len(p) for p in m.prompts], "data": req.data or "builtin",
        "threads": threads, "intra_op_spinning": "on" if req.spin else "off", "torch_threads": torch.get_num_threads(),
        "device": req.device, "dtype": decode_dtype(req.device, req.dtype), "skip_ratios": list(req.skip_ratios),
        "quality": req.quality,
        "quality_tokens": req.quality_tokens * req.quality_blocks if req.quality else 0,
        "versions": _versions(), "ort_providers": available_providers(), "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for dist in ("torch", "transformers", "onnxruntime", "onnxruntime-genai", "llama_cpp_python", "skiptool"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def parse_ratios(text: str | None) -> list[float]:
    """``"0.25,0.5"`` -> ``[0.25, 0.5]``, each in [0, 1]."""
    if text is None:
        return []
    try:
        ratios = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SkipToolError(f"--skip-ratio must be comma-separated numbers, e.g. 0.25,0.5 (got {text!r})") from None
    if not ratios:
        raise SkipToolError(f"--skip-ratio names no ratio (got {text!r}); e.g. --skip-ratio 0.25,0.5")
    return check_ratios(ratios)


def check_ratios(ratios: list[float]) -> list[float]:
    """`ratios` if each forced skip ratio is in [0, 1]; one clear error line otherwise."""
    bad = [r for r in ratios if not 0.0 <= r <= 1.0]
    if bad:
        raise SkipToolError(f"skip ratios must be in [0, 1] (got {bad[0]})")
    return ratios
