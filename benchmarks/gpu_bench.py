#!/usr/bin/env python
"""FFN skipping on the GPU decode path (issue 16): graphed device decisions against dense and against host syncs.

For each model shape (``load_model("random:<shape>")``: random weights, speed does not depend on them) and batch
size, one row per variant:
dense (graphed), skipping with the decisions on the device (one CUDA graph per step) at forced 0/10/25/50 % of
all FFNs, at 25 % with a rank-16 (``linear:16``) and a ``core:auto`` stand-in, and with random routers tuned to skip about 25 %; and the host-sync variant
(each layer's decision read with ``.item()``, the segments between reads graphed, and once eagerly). Each row:
tokens/s, median ms per step, speedup over dense, the realised skip ratios (tokens; FFN calls avoided), the ideal
speedup at that ratio and the fraction reached, the bytes read per step, the bandwidth achieved and its share of
a measured device copy. The engine is driven directly (batches 1 and 8, greedy on the device, no host read per step);
``skiptool bench --device cuda`` measures the same engine at batch 1 through the product's decode loop.

On the H200 (under 5 minutes; rows past ``--budget-s`` are skipped, an erroring row is recorded and the rest run;
offline, so no build isolation, or no install at all with ``PYTHONPATH=.``)::

    pip install --no-deps --no-build-isolation -e . && python benchmarks/gpu_bench.py --out gpu_bench.json

On any CPU, in seconds, with the tiny shape (what the tests run)::

    python benchmarks/gpu_bench.py --smoke --out /tmp/gpu_bench.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from skiptool.accelerators import check_device
from skiptool.adapters import adapter_for
from skiptool.bench import forced_run
from skiptool.config import dense_config
from skiptool.gpu import DecodeEngine, DecodeTiming, achieved_bandwidth, copy_bandwidth, decode_basis, time_decode
from skiptool.gpu.kernels import triton_available
from skiptool.ideal import fraction_of_ideal
from skiptool.models import load_model
from skiptool.policies import RouterPolicy, Routers, SkipPolicy
from skiptool.runtime import policy_and_substitutes
from skiptool.standins import StandIns, StandInSpec

ROUTER_TARGET = 0.25


@dataclass(frozen=True)
class Variant:
    """One benchmark row's setup: FFN mode, where decisions come from, whether the step is graphed."""

    name: str
    mode: str  # dense / device / host
    policy: str  # dense / forced / router
    ratio: float | None = None  # forced share of all FFNs, or the router's target
    standin: str | None = None  # stand-ins with random weights, as --stand-in takes them (KIND:SIZE)
    graph: bool = True


VARIANTS = (
    Variant("dense", "dense", "dense"),
    *(Variant(f"device forced {r:.0%}", "device", "forced", r) for r in (0.0, 0.10, 0.25, 0.50)),
    Variant("device forced 25% +stand-in linear:16", "device", "forced", 0.25, "linear:16"),
    Variant("device forced 25% +stand-in core:auto", "device", "forced", 0.25, "core:auto"),
    Variant("device router ~25%", "device", "router", ROUTER_TARGET),
    Variant("host forced 0%", "host", "forced", 0.0),
    Variant("host forced 25%", "host", "forced", 0.25),
    Variant("host router ~25%", "host", "router", ROUTER_TARGET),
    Variant("host forced 25% eager", "host", "forced", 0.25, graph=False),
)


@dataclass
class Settings:
    """What to run and how long: the device, the shapes and batches, and the decode lengths."""

    device: str
    dtype: str
    shapes: list[str]
    batches: list[int]
    prompt_len: int
    steps: int
    repeats: int
    warmup_steps: int
    budget_s: float
    copy_bytes: int


def parse_settings(argv: list[str] | None) -> tuple[Settings, Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_bench.json", help="JSON file written after every row")
    parser.add_argument("--smoke", action="store_true", help="the tiny shape on the CPU, in seconds")
    parser.add_argument("--shapes", default="demo,1b,8b")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=64, help="decode steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup-steps", type=int, default=8)
    parser.add_argument("--budget-s", type=float, default=240.0, help="rows starting later are skipped")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.smoke:
        return Settings("cpu", "float32", ["tiny"], [1, 2], 8, 4, 1, 2, 120.0, 1 << 23), out
    check_device("cuda")
    return Settings("cuda", args.dtype, args.shapes.split(","), [int(b) for b in args.batches.split(",")],
                    args.prompt_len, args.steps, args.repeats, args.warmup_steps, args.budget_s, 1 << 30), out


def make_policy(model: torch.nn.Module, variant: Variant) -> tuple[SkipPolicy, list[int] | None]:
    """The policy and override of a variant: forced runs as ``skiptool bench`` makes them (the default config,
    whose skippable layers exclude the cold ends), or random routers tuned to skip about the variant's ratio."""
    base = dense_config(model)
    if variant.policy == "router":
        policy = random_router_policy(base.model.num_layers, base.skippable_layers, model.config.hidden_size,
                                      variant.ratio or 0.0)
        return policy, None
    config, mask = forced_run(base, variant.ratio or 0.0)
    policy, _ = policy_and_substitutes(model, config)
    return policy, mask if variant.policy == "forced" else None


def random_router_policy(num_layers: int, skippable: list[int], hidden: int, target: float) -> RouterPolicy:
    """Routers with random weights whose logits are about N(bias, 1) on the RMS-normalised attention delta, the
    bias placed so that about `target` of ALL FFNs skip (``target * layers / skippable`` within the skippable ones)."""
    routers = Routers(hidden, skippable)
    within = min(0.99, target * num_layers / len(skippable))
    generator = torch.Generator().manual_seed(0)
    for linear in routers.nets.values():
        linear.weight.data = torch.randn(linear.weight.shape, generator=generator) / math.sqrt(hidden)
        linear.bias.data.fill_(statistics.NormalDist().inv_cdf(within))
    return RouterPolicy(num_layers, skippable, warmup=0, routers=routers, threshold=0.5)


def random_standins(model: torch.nn.Module, layers: list[int], spec: str) -> dict[int, torch.nn.Module]:
    """Stand-ins of `spec` (``KIND:SIZE``) with random weights (their values do not change the speed)."""
    hidden, intermediate = model.config.hidden_size, model.config.intermediate_size
    sized = StandInSpec.parse(spec).sized(hidden, intermediate)
    standins = StandIns(hidden, sized.size, layers, sized.kind, intermediate).by_layer()
    for standin in standins.values():
        for weight in standin.parameters():
            torch.nn.init.normal_(weight, std=0.02)
    return standins


def build_engine(model: torch.nn.Module, variant: Variant, batch: int, settings: Settings) -> DecodeEngine:
    """The variant's decode engine, its cache sized to the prompt plus the longest decode."""
    policy, override = make_policy(model, variant)
    substitutes = (random_standins(model, policy.skippable_layers, variant.standin)
                   if variant.standin else None)
    return DecodeEngine(model, adapter_for(model), policy, batch_size=batch, mode=variant.mode,
                        substitutes=substitutes, override=override,
                        max_len=settings.prompt_len + max(settings.steps, settings.warmup_steps) + 1)


def run_variant(model: torch.nn.Module, variant: Variant, batch: int, settings: Settings,
                copy_rate: float) -> dict[str, Any]:
    """Prefill, capture, warm up (counters reset after), time; the row's measurements (speedups come later)."""
    engine = build_engine(model, variant, batch, settings)
    engine.prefill(torch.randint(0, model.config.vocab_size, (batch, settings.prompt_len),
                                 generator=torch.Generator().manual_seed(batch)))
    if variant.graph:
        engine.capture()
    time_decode(engine, settings.prompt_len, settings.warmup_steps, 1)
    engine.reset_counters()
    timing = time_decode(engine, settings.prompt_len, settings.steps, settings.repeats)
    return measurements(model, engine, timing, copy_rate)


def measurements(model: torch.nn.Module, engine: DecodeEngine, timing: DecodeTiming,
                 copy_rate: float) -> dict[str, Any]:
    """Speed, realised skip ratios (read from the device once), and the bytes behind the ideal and the bandwidth;
    bytes are counted at the ratio of FFN calls avoided (a call is avoided only when every row skips)."""
    counts = engine.skip_summary()
    basis = decode_basis(model, adapter_for(model), engine)
    read = basis.bytes_at(counts["call_skip_ratio"])
    bandwidth = achieved_bandwidth(read, timing)
    return {"graphed": engine.graphed or "eager", "kernels": engine.kernel_backend,
            "tokens_per_s": timing.tokens_per_s, "p50_step_ms": timing.p50_ms,
            "skip_ratio": counts["skip_ratio"], "call_skip_ratio": counts["call_skip_ratio"],
            "ideal_speedup": basis.speedup(counts["call_skip_ratio"]), "bytes_per_step": read,
            "achieved_gb_per_s": bandwidth / 1e9, "share_of_copy_bandwidth": bandwidth / copy_rate,
            "per_layer_skip": counts["per_layer"], "basis": basis.to_dict()}


def run_row(model: torch.nn.Module | None, shape: str, variant: Variant, batch: int, settings: Settings,
            copy_rate: float, deadline: float, model_error: str | None) -> dict[str, Any]:
    """One row, whatever happens: measurements, or the error (or the reason it was skipped)."""
    row: dict[str, Any] = {"shape": shape, "batch": batch, **asdict(variant), "error": None, "skipped": None}
    if model_error is not None:
        return {**row, "error": model_error}
    if time.perf_counter() > deadline:
        return {**row, "skipped": "time budget spent"}
    begun = time.perf_counter()
    try:
        return {**row, **run_variant(model, variant, batch, settings, copy_rate),
                "row_s": time.perf_counter() - begun}
    except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
        traceback.print_exc(file=sys.stderr)
        return {**row, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    finally:
        release_memory()


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Speedup over the dense row of the same shape and batch, and its fraction of the ideal."""
    for row in rows:
        dense = next((r for r in rows if r["shape"] == row["shape"] and r["batch"] == row["batch"]
                      and r["mode"] == "dense" and r.get("tokens_per_s")), None)
        if dense is not None and row.get("tokens_per_s"):
            row["speedup_vs_dense"] = row["tokens_per_s"] / dense["tokens_per_s"]
            row["fraction_of_ideal"] = fraction_of_ideal(row["speedup_vs_dense"], row["ideal_speedup"])


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def environment(settings: Settings, copy_rate: float) -> dict[str, Any]:
    import transformers

    meta = {"settings": asdict(settings), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "copy_bandwidth_gb_per_s": copy_rate / 1e9,
            "triton": None, "device_name": platform.processor() or platform.machine()}
    if triton_available():
        import triton

        meta["triton"] = triton.__version__
    if settings.device.startswith("cuda"):
        meta["device_name"] = torch.cuda.get_device_name()
    return meta


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Write atomically (a crash mid-run leaves the previous complete file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".tmp")
    partial.write_text(json.dumps(report, indent=1, default=str))
    os.replace(partial, path)


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (f"{'shape':<5} {'B':>2} {'variant':<31} {'graph':<6} {'tok/s':>9} {'p50 ms':>7} {'speedup':>7} "
              f"{'skip':>5} {'calls':>5} {'ideal':>5} {'of id.':>6} {'GB/s':>7} {'%copy':>5}")
    print(header)
    for r in rows:
        lead = f"{r['shape']:<5} {r['batch']:>2} {r['name']:<31}"
        if r.get("tokens_per_s") is None:
            print(f"{lead} {r.get('error') or r.get('skipped')}")
            continue
        print(f"{lead} {r['graphed']:<6} {r['tokens_per_s']:>9.1f} {r['p50_step_ms']:>7.3f} "
              f"{r.get('speedup_vs_dense', math.nan):>7.3f} {r['skip_ratio']:>5.2f} {r['call_skip_ratio']:>5.2f} "
              f"{r['ideal_speedup']:>5.2f} {r.get('fraction_of_ideal', math.nan):>6.2f} "
              f"{r['achieved_gb_per_s']:>7.1f} {100 * r['share_of_copy_bandwidth']:>5.1f}")


def main(argv: list[str] | None = None) -> int:
    settings, out = parse_settings(argv)
    started = time.perf_counter()
    deadline = started + settings.budget_s
    device = torch.device(settings.device)
    copy_rate = copy_bandwidth(device, settings.copy_bytes)
    report: dict[str, Any] = {"meta": environment(settings, copy_rate), "rows": []}
    for shape in settings.shapes:
        model, model_error = None, None
        try:
            model = load_model(f"random:{shape}", settings.dtype, settings.device, needs_tokenizer=False).model
        except Exception as exc:  # noqa: BLE001 - the other shapes still run
            model_error = f"building {shape}: {type(exc).__name__}: {exc}"
        for batch in settings.batches:
            for variant in VARIANTS:
                report["rows"].append(run_row(model, shape, variant, batch, settings, copy_rate, deadline,
                                              model_error))
                add_speedups(report["rows"])
                write_json(out, report)
        del model
        release_memory()
    report["meta"]["elapsed_s"] = time.perf_counter() - started
    write_json(out, report)
    print_table(report["rows"])
    print(f"copy bandwidth {copy_rate / 1e9:.1f} GB/s (read + write); {report['meta']['elapsed_s']:.0f} s; "
          f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
