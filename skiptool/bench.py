"""`skiptool bench`: decode speed of skipping against dense, against the ideal, and against peer runtimes.

Every run is a :class:`RunSpec` — a backend factory plus what the run is (backend, mode, precision,
forced ratio) and the weight bytes it reads per token (:class:`IdealBasis`). :func:`measure` builds
all backends first, then decodes the same prompts with each, round-robin over the repetitions so that
machine noise hits every run alike; the warm-up repetitions are dropped. :func:`summarise` turns the
timings into medians (min–max), latency percentiles, speedups over the dense run of the same backend
and precision, and those speedups as a fraction of the ideal one.

The ideal comes from bytes, not from a formula about the model: decoding is bound by reading the
weights, so a run that reads ``b`` bytes per token where the dense run reads ``d`` can be at best
``d / b`` times faster. For PyTorch the bytes are the model's own (:func:`skiptool.info.decode_weight_bytes`)
plus the policy's (routers); for ONNX they are the initializers of the graph that runs (:func:`onnx_graph_bytes`),
so an int4 graph gets its own ideal.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .backends.base import DecodeBackend, greedy_decode
from .errors import SkipToolError

DEFAULT_NEW_TOKENS = 128


# ------------------------------------------------------------------------------------------------
# Arithmetic
# ------------------------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0–100) with linear interpolation between order statistics; NaN if empty."""
    if len(values) == 0:
        return math.nan
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def median_min_max(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) == 0:
        return math.nan, math.nan, math.nan
    return float(statistics.median(values)), float(min(values)), float(max(values))


def forced_layers(num_layers: int, skippable: Sequence[int], ratio: float) -> list[int]:
    """Which layers to force-skip so that ``k / num_layers`` is as close as possible to `ratio`.

    ``k`` is capped by the skippable layers (a tie goes to the larger ``k``); the chosen layers are spread
    evenly over the skippable ones (a fixed order).
    """
    if not 0.0 <= ratio <= 1.0:
        raise SkipToolError(f"skip ratio must be in [0, 1] (got {ratio})")
    k = min(range(len(skippable) + 1), key=lambda n: (abs(n / num_layers - ratio), -n))  # ties: skip more
    return [skippable[int((i + 0.5) * len(skippable) / k)] for i in range(k)] if k else []


def forced_mask(num_layers: int, skippable: Sequence[int], ratio: float) -> list[int]:
    """Per-layer override: 1 forces a skip on the chosen layers, -1 forces every other layer to compute."""
    chosen = set(forced_layers(num_layers, skippable, ratio))
    return [1 if i in chosen else -1 for i in range(num_layers)]


@dataclass
class IdealBasis:
    """Weight bytes per decoded token behind a run's ideal speedup.

    - `dense_bytes`: what the dense run of the same backend and precision reads;
    - `base_bytes`: what this run reads when nothing is skipped (its own overhead such as routers included);
    - `skippable_bytes`: FFN weights of the skippable layers (inside the ``If`` branches for ONNX);
    - `substitute_bytes`: what skipped layers read instead (stand-ins), over the same layers.
    Skip ratios are over ALL layers (as the runtime counts them); skipping happens in the
    `num_skippable` layers only, whose FFNs are taken to be the same size.
    """

    dense_bytes: float
    base_bytes: float
    skippable_bytes: float
    num_layers: int
    num_skippable: int
    substitute_bytes: float = 0.0

    def bytes_at(self, skip_ratio: float) -> float:
        within = min(1.0, skip_ratio * self.num_layers / max(self.num_skippable, 1))
        return self.base_bytes - within * (self.skippable_bytes - self.substitute_bytes)

    def speedup(self, skip_ratio: float) -> float:
        """Ideal decode speedup over the dense run at a realised skip ratio."""
        return self.dense_bytes / self.bytes_at(skip_ratio)

    def to_dict(self) -> dict[str, Any]:
        return {"dense_bytes": self.dense_bytes, "base_bytes": self.base_bytes, "skippable_bytes": self.skippable_bytes,
                "substitute_bytes": self.substitute_bytes, "num_layers": self.num_layers,
                "num_skippable": self.num_skippable}


def fraction_of_ideal(speedup: float, ideal: float) -> float:
    """A run's speedup as a fraction of the ideal speedup at its realised ratio (1.0 = ideal reached)."""
    return speedup / ideal if ideal > 0 else math.nan


# ------------------------------------------------------------------------------------------------
# Weight bytes of an ONNX graph
# ------------------------------------------------------------------------------------------------
# (op_type, input index) pairs that read only a few rows of a table per token: embedding gathers,
# rotary caches. A weight used only like this is not "read per decoded token".
LOOKUP_INPUTS = {("Gather", 0), ("GatherElements", 0), ("GatherND", 0), ("GatherBlockQuantized", 0),
                 ("GatherBlockQuantized", 1), ("GatherBlockQuantized", 2), ("RotaryEmbedding", 2),
                 ("RotaryEmbedding", 3), ("GroupQueryAttention", 7), ("GroupQueryAttention", 8)}


@dataclass
class GraphBytes:
    """Weight bytes of an ONNX graph per decoded token (lookup tables excluded).

    `heavy[i]` / `light[i]`: bytes of the heavier (the FFN) and lighter (the substitute) branch of the
    i-th top-level ``If``; `outside`: every other weight, read whatever is skipped.
    """

    outside: int
    heavy: list[int] = field(default_factory=list)
    light: list[int] = field(default_factory=list)
    excluded: int = 0

    @property
    def num_ifs(self) -> int:
        return len(self.heavy)

    @property
    def read_dense(self) -> int:
        """Bytes read per token when no ``If`` skips."""
        return self.outside + sum(self.heavy)

    @property
    def branch_share(self) -> float:
        """Weight bytes inside the ``If`` compute branches over all weight bytes read per token."""
        return sum(self.heavy) / self.read_dense if self.read_dense else 0.0

    def basis(self, num_layers: int, dense_bytes: float | None = None) -> IdealBasis:
        return IdealBasis(dense_bytes=float(dense_bytes if dense_bytes is not None else self.read_dense),
                          base_bytes=float(self.read_dense), skippable_bytes=float(sum(self.heavy)),
                          substitute_bytes=float(sum(self.light)), num_layers=num_layers, num_skippable=self.num_ifs)


def tensor_nbytes(tensor: Any) -> int:
    """Bytes of an ONNX TensorProto from its dims and type (works for external data without loading it)."""
    from onnx import TensorProto, helper

    four_bit = {getattr(TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(TensorProto, n)}
    count = math.prod(tensor.dims)
    if tensor.data_type in four_bit:
        return (count + 1) // 2
    if tensor.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return 0
    return count * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def onnx_graph_bytes(model: Any) -> GraphBytes:
    """Weight bytes per decoded token of an ONNX model (a path or a ModelProto), split by ``If`` branch.

    A weight counts for one branch of one top-level ``If`` when every use of it is inside that branch
    (at any depth); a weight used only as a lookup table (:data:`LOOKUP_INPUTS`), or not at all, is excluded.
    """
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    sizes: dict[str, int] = {}
    uses: dict[str, list[tuple[str, int, tuple[int, str] | None]]] = {}
    if_count = _scan_graph(model.graph, None, sizes, uses, [0])
    heavy_light = [[0, 0] for _ in range(if_count)]
    branch_bytes: dict[tuple[int, str], int] = {}
    outside = excluded = 0
    for name, nbytes in sizes.items():
        where = uses.get(name, [])
        if all((op, i) in LOOKUP_INPUTS for op, i, _ in where):  # a lookup table, or never used
            excluded += nbytes
            continue
        scopes = {scope for _, _, scope in where}
        if len(scopes) == 1 and None not in scopes:
            (scope,) = scopes
            branch_bytes[scope] = branch_bytes.get(scope, 0) + nbytes
        elif len(scopes) == 2 and None not in scopes and len({s[0] for s in scopes}) == 1:
            for scope in scopes:  # used by both branches of one If: read whichever runs
                branch_bytes[scope] = branch_bytes.get(scope, 0) + nbytes  # type: ignore[index]
        else:
            outside += nbytes
    for index in range(if_count):
        pair = sorted((branch_bytes.get((index, "then_branch"), 0), branch_bytes.get((index, "else_branch"), 0)))
        heavy_light[index] = [pair[1], pair[0]]
    return GraphBytes(outside=outside, heavy=[h for h, _ in heavy_light], light=[lt for _, lt in heavy_light],
                      excluded=excluded)


def _scan_graph(graph: Any, scope: tuple[int, str] | None, sizes: dict[str, int],
                uses: dict[str, list[tuple[str, int, tuple[int, str] | None]]], counter: list[int]) -> int:
    """Collect weight sizes and their uses; `scope` is the enclosing top-level (If index, branch name)."""
    for init in graph.initializer:
        sizes[init.name] = tensor_nbytes(init)
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t is not None:
                    sizes[node.output[0]] = tensor_nbytes(attr.t)
        for i, name in enumerate(node.input):
            if name:
                uses.setdefault(name, []).append((node.op_type, i, scope))
        index = None
        if node.op_type == "If" and scope is None:
            index, counter[0] = counter[0], counter[0] + 1
        for attr in node.attribute:
            if attr.type == attr.GRAPH:
                inner = (index, attr.name) if index is not None else scope
                _scan_graph(attr.g, inner, sizes, uses, counter)
            for sub in attr.graphs:
                _scan_graph(sub, scope, sizes, uses, counter)
    return counter[0]


# ------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    """One benchmark run: what it is and how to build its backend (None with `skipped` set: not runnable)."""

    backend: str
    mode: str  # "dense" or "skip"
    precision: str
    make: Callable[[], DecodeBackend] | None
    label: str = ""
    policy: str = "dense"  # "dense", a policy kind, or "forced"
    forced_ratio: float | None = None
    ideal: IdealBasis | Callable[[DecodeBackend], IdealBasis] | None = None
    skipped: str | None = None
    optional: bool = False  # a peer: a failure is reported, not raised
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.label:
            what = self.mode if self.forced_ratio is None else f"skip {self.forced_ratio:.0%} forced"
            if self.mode == "skip" and self.forced_ratio is None and self.policy not in ("dense", "skip"):
                what = f"skip ({self.policy})"
            self.label = f"{self.backend} {self.precision} {what}"


@dataclass
class RunResult:
    """Raw measurements of one run over the kept repetitions."""

    spec: RunSpec
    tokens_per_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    prefill_s: list[float] = field(default_factory=list)
    skip_ratios: list[float] = field(default_factory=list)
    ffn_calls: int | None = None
    ffn_calls_avoided: int | None = None
    per_layer_skip: list[float] | None = None
    rss_load_mib: float | None = None
    rss_after_mib: float | None = None
    cpu_ms_per_token: list[float] = field(default_factory=list)
    perplexity: float | None = None
    error: str | None = None
    ideal_basis: IdealBasis | None = None
    tokens: list[int] | None = None


def rss_mib() -> float:
    """Current resident set size of this process in MiB."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return math.nan


def peak_rss_mib() -> float:
    """High-water RSS of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 1024


def backend_logits_fn(backend: DecodeBackend) -> Callable[[Any], Any]:
    """``ids [n, seq] -> logits [n, seq, vocab]`` through the decode protocol (KV cache, one token per step:
    the decode regime), for :func:`skiptool.evaluate.token_nll`."""
    import torch

    def logits(ids: Any) -> Any:
        rows = []
        for row in ids.tolist():
            backend.reset()
            rows.append(np.stack([backend.prefill(row[:1])] + [backend.step(int(t)) for t in row[1:]]))
        return torch.from_numpy(np.stack(rows).astype(np.float32))

    return logits


def backend_perplexity(backend: DecodeBackend, blocks: Sequence[Sequence[int]]) -> float:
    """Perplexity of `blocks` through any backend (the evaluation's own NLL and perplexity)."""
    import torch

    from .evaluate import perplexity, token_nll

    return perplexity(token_nll(backend_logits_fn(backend), torch.as_tensor(blocks, dtype=torch.long)))


@dataclass
class Measurement:
    """How to measure: prompts, lengths, repetitions."""

    prompts: list[list[int]]
    new_tokens: int = DEFAULT_NEW_TOKENS
    repeats: int = 3
    warmup: int = 1
    quality_blocks: list[list[int]] | None = None


def _build(spec: RunSpec) -> tuple[DecodeBackend | None, RunResult]:
    result = RunResult(spec)
    if spec.make is None:
        return None, result
    before = rss_mib()
    try:
        backend = spec.make()
    except Exception as exc:  # noqa: BLE001 - a peer that fails to load is reported, not fatal
        if not spec.optional:
            raise
        result.error = f"failed to load: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        return None, result
    result.rss_load_mib = rss_mib() - before
    return backend, result


def _decode_once(backend: DecodeBackend, result: RunResult, m: Measurement, keep: bool) -> None:
    for prompt in m.prompts:
        cpu = time.process_time()
        timing = greedy_decode(backend, prompt, m.new_tokens)
        cpu = time.process_time() - cpu
        if not keep:
            continue
        result.cpu_ms_per_token.append(1000.0 * cpu / max(len(timing.token_ids), 1))
        result.tokens_per_s.append(timing.tokens_per_s)
        result.step_s.extend(timing.step_s)
        result.prefill_s.append(timing.prefill_s)
        result.skip_ratios.append(timing.skip_ratio if timing.skip_ratio is not None else math.nan)
        result.tokens = timing.token_ids
        _add_counters(backend, result)


def _add_counters(backend: DecodeBackend, result: RunResult) -> None:
    counters = getattr(backend, "ffn_counters", None)
    if counters is not None:
        c = counters()
        result.ffn_calls = (result.ffn_calls or 0) + c["ffn_calls"]
        result.ffn_calls_avoided = (result.ffn_calls_avoided or 0) + c["ffn_calls_avoided"]
    per_layer = getattr(backend, "per_layer_skip", None) or getattr(backend, "per_layer_skip_ratio", None)
    if per_layer is not None:
        result.per_layer_skip = per_layer()


def measure(specs: Sequence[RunSpec], m: Measurement,
            on_progress: Callable[[str], None] | None = None) -> list[RunResult]:
    """Build every backend, then decode round-robin: repetition r runs every backend before r + 1.

    The first `m.warmup` repetitions are dropped. A peer (``optional``) that fails is reported in its
    result's `error`; any other failure propagates.
    """
    built = [_build(spec) for spec in specs]
    for rep in range(m.warmup + m.repeats):
        for backend, result in built:
            if backend is not None and result.error is None:
                _guarded(result, lambda: _decode_once(backend, result, m, keep=rep >= m.warmup))
                result.rss_after_mib = max(result.rss_after_mib or 0.0, rss_mib())
            if on_progress is not None:
                on_progress(result.spec.label)
    for backend, result in built:
        if backend is None or result.error is not None:
            continue
        if m.quality_blocks:
            _guarded(result, lambda: setattr(result, "perplexity", backend_perplexity(backend, m.quality_blocks)))
        if result.spec.ideal is not None:
            ideal = result.spec.ideal
            result.ideal_basis = ideal(backend) if callable(ideal) else ideal
        if on_progress is not None and m.quality_blocks:
            on_progress(result.spec.label)
        close = getattr(backend, "close", None)
        if close is not None:
            close()
    return [result for _, result in built]


def progress_steps(specs: Sequence[RunSpec], m: Measurement) -> int:
    """How many times :func:`measure` calls `on_progress`."""
    runnable = sum(1 for s in specs if s.make is not None)
    return len(specs) * (m.warmup + m.repeats) + (runnable if m.quality_blocks else 0)


def _guarded(result: RunResult, action: Callable[[], Any]) -> None:
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - peers only; others re-raise
        if not result.spec.optional:
            raise
        result.error = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


# ------------------------------------------------------------------------------------------------
# Summaries
# ------------------------------------------------------------------------------------------------
def summarise(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """One JSON-ready row per run: medians with min–max, percentiles, skip ratio, speedup, fraction of ideal."""
    rows = [_row(r) for r in results]
    dense = {(r["backend"], r["precision"]): r for r in rows if r["mode"] == "dense" and r["tokens_per_s"]}
    for row, result in zip(rows, results):
        base = dense.get((row["backend"], row["precision"]))
        if row["mode"] != "skip" or base is None or not row["tokens_per_s"]:
            continue
        row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"]
        if row["cpu_ms_per_token"] and base["cpu_ms_per_token"]:
            row["cpu_speedup"] = base["cpu_ms_per_token"] / row["cpu_ms_per_token"]
        if result.ideal_basis is not None and row["skip_ratio"] is not None and not math.isnan(row["skip_ratio"]):
            row["ideal_speedup"] = result.ideal_basis.speedup(row["skip_ratio"])
            row["fraction_of_ideal"] = fraction_of_ideal(row["speedup"], row["ideal_speedup"])
            if row["cpu_speedup"] is not None:
                row["cpu_fraction_of_ideal"] = fraction_of_ideal(row["cpu_speedup"], row["ideal_speedup"])
            row["ideal_tokens_per_s"] = base["tokens_per_s"] * row["ideal_speedup"]
    return rows


def _row(r: RunResult) -> dict[str, Any]:
    s = r.spec
    status = "ok" if r.error is None and s.skipped is None else (s.skipped or r.error)
    tps, tps_min, tps_max = median_min_max(r.tokens_per_s)
    skip = statistics.fmean(r.skip_ratios) if r.skip_ratios and not any(map(math.isnan, r.skip_ratios)) else None
    row: dict[str, Any] = {
        "label": s.label, "backend": s.backend, "mode": s.mode, "precision": s.precision, "policy": s.policy,
        "status": status, "forced_ratio": s.forced_ratio,
        "tokens_per_s": None if math.isnan(tps) else tps,
        "tokens_per_s_min": None if math.isnan(tps_min) else tps_min,
        "tokens_per_s_max": None if math.isnan(tps_max) else tps_max,
        "tokens_per_s_runs": list(r.tokens_per_s),
        "latency_ms_p50": _ms(percentile(r.step_s, 50)), "latency_ms_p90": _ms(percentile(r.step_s, 90)),
        "prefill_ms": _ms(median_min_max(r.prefill_s)[0]),
        "skip_ratio": 0.0 if s.mode == "dense" and r.tokens_per_s else skip,
        "per_layer_skip": r.per_layer_skip,
        "ffn_calls": r.ffn_calls, "ffn_calls_avoided": r.ffn_calls_avoided,
        "speedup": None, "ideal_speedup": None, "fraction_of_ideal": None, "ideal_tokens_per_s": None,
        # process CPU time per generated token (prefill included): less sensitive to other processes than
        # wall time when nothing spins (ORT with --spin off, one thread); with spinning it counts the spin
        "cpu_ms_per_token": _nan_none(median_min_max(r.cpu_ms_per_token)[0]),
        "cpu_speedup": None, "cpu_fraction_of_ideal": None,
        "memory": {"rss_load_mib": r.rss_load_mib, "rss_after_mib": r.rss_after_mib},
        "perplexity": r.perplexity,
        "ideal_basis": r.ideal_basis.to_dict() if r.ideal_basis is not None else None,
        "settings": dict(s.settings),
    }
    return row


def _nan_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else seconds * 1000.0


# ------------------------------------------------------------------------------------------------
# Which runs: PyTorch, ONNX Runtime, peers
# ------------------------------------------------------------------------------------------------
def torch_specs(model: Any, adapter: Any, config: Any | None, ratios: Sequence[float],
                device: str = "cpu") -> list[RunSpec]:
    """PyTorch eager runs on one shared model: dense, the config's policy, and forced ratios.

    Forced runs use the config's policy (so a router still runs and is paid for) with warm-up 0 and an
    override that forces every layer: the chosen ones to skip, all others to compute.
    """
    from .backends.torch_backend import TorchBackend
    from .config import dense_config
    from .info import decode_weight_bytes

    ffn_bytes, total_bytes = decode_weight_bytes(model, adapter)
    base = config if config is not None else dense_config(model)
    layers, skippable = base.model.num_layers, base.skippable_layers

    def basis(backend: Any) -> IdealBasis:
        return IdealBasis(dense_bytes=total_bytes, base_bytes=total_bytes + backend.policy_bytes(),
                          skippable_bytes=ffn_bytes * len(skippable) / layers, num_layers=layers,
                          num_skippable=len(skippable), substitute_bytes=backend.substitute_bytes())

    precision = TorchBackend(model, adapter).precision
    settings = {"device": device}
    specs = [RunSpec("torch", "dense", precision, lambda: TorchBackend(model, adapter, device=device),
                     settings=settings)]
    if config is not None and config.policy.kind != "none":
        specs.append(RunSpec("torch", "skip", precision, lambda: TorchBackend(model, adapter, config, device=device),
                             policy=config.policy.kind, ideal=basis, settings=settings))
    forced = base.evolve(warmup=0)
    for ratio in ratios:
        mask = forced_mask(layers, skippable, ratio)
        specs.append(RunSpec("torch", "skip", precision,
                             lambda mask=mask: TorchBackend(model, adapter, forced, override=mask, device=device),
                             policy="forced", forced_ratio=ratio, ideal=basis,
                             settings={**settings, "forced_layers": [i for i, v in enumerate(mask) if v == 1]}))
    return specs


@dataclass
class ExportPlan:
    """An export folder to benchmark: its graph, precision, weight bytes, mode and skip config (the one the
    export wrote beside its graph; else the one given to bench).

    Two kinds of folders: ``skiptool export --format onnx`` writes ``skiptool_export.json`` and runs in
    skiptool's ONNX Runtime backend (its dense counterpart is a ``--dense`` export of the same precision,
    given with another ``--onnx``); ``--target ort`` writes onnxruntime-genai's graph with ``If`` nodes and
    runs in onnxruntime-genai's generator (its dense counterpart is the model builder's own graph).
    """

    directory: Path
    precision: str
    mode: str  # "skip" or "dense"
    graph_bytes: GraphBytes
    config: Any | None
    info: dict[str, Any] | None = None

    @classmethod
    def of(cls, directory: str | Path, config: Any | None) -> "ExportPlan":
        directory = Path(directory)
        info_path = directory / "skiptool_export.json"
        info = _read_json(info_path) if info_path.is_file() else None
        graph = directory / ((info or {}).get("file") or "model.onnx")
        if not graph.is_file():
            raise SkipToolError(f"no ONNX graph in {directory} (expected a `skiptool export --format onnx` folder)")
        graph_bytes = onnx_graph_bytes(graph)
        precision = (info or {}).get("precision") or onnx_precision(graph)
        mode = (info or {}).get("mode") or ("skip" if graph_bytes.num_ifs else "dense")
        return cls(directory, precision, mode, graph_bytes, _config_beside([directory]) or config, info)

    @property
    def runner(self) -> str | None:
        """"onnxruntime" (skiptool's backend), "onnxruntime-genai" (a --target ort export), or None."""
        if self.info is not None:
            return "onnxruntime"
        from .exporters.ort_target import OVERRIDE_MODEL_FILE

        if (self.directory / "genai_config.json").is_file() and (self.directory / OVERRIDE_MODEL_FILE).is_file():
            return "onnxruntime-genai"
        return None

    def basis(self, num_layers: int, dense_graph_bytes: GraphBytes | None) -> IdealBasis:
        dense = dense_graph_bytes.read_dense if dense_graph_bytes is not None else None
        return self.graph_bytes.basis(num_layers, dense)

    def settings(self, threads: int | None, spin: bool | None) -> dict[str, Any]:
        return {"threads": threads, "spin": spin, "graph": str(self.directory),
                "if_nodes": self.graph_bytes.num_ifs, "branch_weight_share": self.graph_bytes.branch_share}


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SkipToolError(f"cannot read {path}: {exc}") from None


class MaskedView:
    """One loaded backend shared by runs that differ only in their ``skip_mask`` (set at each reset)."""

    def __init__(self, backend: Any, mask: Sequence[int] | None) -> None:
        self.backend, self.mask = backend, mask
        self.name, self.precision, self.mode = backend.name, backend.precision, "skip"

    def reset(self) -> None:
        self.backend.set_skip_mask(self.mask)
        self.backend.reset()

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        return self.backend.prefill(token_ids)

    def step(self, token_id: int) -> np.ndarray:
        return self.backend.step(token_id)

    def skip_ratio(self) -> float | None:
        return self.backend.skip_ratio()

    def per_layer_skip(self) -> list[float] | None:
        per_layer = getattr(self.backend, "per_layer_skip_ratio", None)
        return per_layer() if per_layer is not None else None


def shared(factory: Callable[[], Any]) -> Callable[[], Any]:
    """`factory`, called once: later calls return the same backend."""
    made: list[Any] = []

    def get() -> Any:
        if not made:
            made.append(factory())
        return made[0]

    return get


def export_variant_specs(plan: ExportPlan, backend: str, num_layers: int, ratios: Sequence[float],
                         policy_make: Callable[[], Any], masked_make: Callable[[], Any], basis: IdealBasis,
                         settings: dict[str, Any]) -> list[RunSpec]:
    """A skipping export's runs for one runner: its own policy (if the config has one) and each forced ratio.

    The forced runs share one loaded backend (`masked_make`, called once) and set their mask at reset.
    """
    label = f"{backend} {plan.precision} skip {{}} (skiptool graph)"
    specs = []
    if plan.config is not None and plan.config.policy.kind != "none":
        specs.append(RunSpec(backend, "skip", plan.precision, policy_make, policy=plan.config.policy.kind,
                             ideal=basis, settings=settings, label=label.format(plan.config.policy.kind)))
    skippable = plan.config.skippable_layers if plan.config is not None else list(range(num_layers))
    loaded = shared(masked_make)
    for ratio in ratios:
        mask = forced_mask(num_layers, skippable, ratio)
        specs.append(RunSpec(backend, "skip", plan.precision, lambda mask=mask: MaskedView(loaded(), mask),
                             policy="forced", forced_ratio=ratio, ideal=basis, label=label.format(f"{ratio:.0%} forced"),
                             settings={**settings, "forced_layers": [i for i, v in enumerate(mask) if v == 1]}))
    return specs


def genai_export_specs(plan: ExportPlan, num_layers: int, ratios: Sequence[float], threads: int | None,
                       spin: bool | None, max_length: int, dense_graph: Path | None) -> list[RunSpec]:
    """Runs of a ``--target ort`` export in onnxruntime-genai's own generator (its dense peer is the baseline)."""
    from .backends.peers import GenaiBackend
    from .exporters.ort_target import MODEL_FILE, OVERRIDE_MODEL_FILE

    warmup = plan.config.warmup if plan.config is not None else 0

    def make(filename: str) -> Callable[[], Any]:
        return lambda: GenaiBackend(plan.directory, plan.precision, threads, spin, max_length, filename=filename,
                                    warmup=warmup)

    dense = onnx_graph_bytes(dense_graph) if dense_graph is not None else None
    return export_variant_specs(plan, "onnxruntime-genai", num_layers, ratios, make(MODEL_FILE),
                                make(OVERRIDE_MODEL_FILE), plan.basis(num_layers, dense), plan.settings(threads, spin))


def ort_export_specs(plans: Sequence[ExportPlan], num_layers: int, ratios: Sequence[float], threads: int | None,
                     spin: bool | None) -> list[RunSpec]:
    """skiptool's ONNX Runtime backend on standard exports: each dense export, then each skipping one
    (compared with the dense export of the same precision)."""
    from .backends.onnxruntime import OrtBackend

    specs, dense = [], {p.precision: p for p in plans if p.mode == "dense"}
    for plan in plans:
        settings = plan.settings(threads, spin)
        make = shared(lambda plan=plan: OrtBackend(plan.directory, threads=threads, spin=spin))
        if plan.mode == "dense":
            specs.append(RunSpec("onnxruntime", "dense", plan.precision, make, settings=settings))
            continue
        base = dense.get(plan.precision)
        basis = plan.basis(num_layers, base.graph_bytes if base is not None else None)
        specs += export_variant_specs(plan, "onnxruntime", num_layers, ratios, lambda make=make: MaskedView(make(), None),
                                      make, basis, settings)
    return sorted(specs, key=lambda s: (s.precision, s.mode != "dense"))


def onnx_precision(model: Any) -> str:
    """int4 / int8 / fp16 / fp32 from the ops and weights of an ONNX graph (subgraphs included)."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    ops: set[str] = set()
    float_types: dict[int, int] = {}

    def scan(graph: Any) -> None:
        for init in graph.initializer:
            float_types[init.data_type] = float_types.get(init.data_type, 0) + tensor_nbytes(init)
        for node in graph.node:
            ops.add(node.op_type)
            for attr in node.attribute:
                if attr.type == attr.GRAPH:
                    scan(attr.g)

    scan(model.graph)
    if "MatMulNBits" in ops:
        return "int4"
    if ops & {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearMatMul"}:
        return "int8"
    heaviest = max(float_types, key=float_types.get) if float_types else onnx.TensorProto.FLOAT
    return {onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}.get(heaviest, "fp32")


def peer_specs(hf_dir: str | None, gguf: str | None, threads: int | None, spin: bool | None, max_length: int,
               genai_precisions: Sequence[str] = ("fp32", "int4"), llama_cpp: bool = True) -> list[RunSpec]:
    """onnxruntime-genai and llama.cpp runs, or skipped entries saying how to install them."""
    from .backends.peers import genai_entries, llama_cpp_entries

    entries = genai_entries(hf_dir, threads, spin, genai_precisions, max_length) if genai_precisions else []
    entries += llama_cpp_entries(gguf, threads, max_length) if llama_cpp else []
    return [RunSpec(e.backend, "dense", e.precision, e.make, policy="dense", skipped=e.skipped, optional=True,
                    settings=e.settings or {}, label=f"{e.backend} {e.precision} dense (peer)") for e in entries]


def plan_runs(req: "BenchRequest", lm: Any, config: Any | None, threads: int, max_length: int) -> list[RunSpec]:
    """Every run of a benchmark, in table order: PyTorch, ONNX Runtime, onnxruntime-genai, llama.cpp."""
    from .backends.peers import genai_model_dir, installed

    layers = int(lm.model.config.num_hidden_layers)
    hf_dir, gguf = model_files(req.model, lm.model)
    plans = [ExportPlan.of(d, config) for d in req.onnx]
    for plan in plans:
        if plan.config is not None:
            plan.config.check_matches(lm.model)
        if plan.runner is None:
            raise SkipToolError(f"{plan.directory} is neither a `skiptool export --format onnx` folder nor a "
                                "--target ort one")
    genai = installed("onnxruntime_genai") and hf_dir is not None
    genai_plans = [p for p in plans if p.runner == "onnxruntime-genai"]
    if genai_plans and not genai:
        raise SkipToolError(f"{genai_plans[0].directory} is a --target ort export: running it needs "
                            "onnxruntime-genai (pip install onnxruntime-genai) and the model's Hugging Face folder")
    precisions = list(dict.fromkeys((["fp32", "int4"] if req.peers else []) + [p.precision for p in genai_plans]))
    genai_dense = {p: genai_model_dir(hf_dir, p) for p in precisions} if genai else {}
    specs = torch_specs(lm.model, lm.adapter, config, req.skip_ratios, req.device) if req.torch else []
    specs += ort_export_specs([p for p in plans if p.runner == "onnxruntime"], layers, req.skip_ratios, threads,
                              req.spin)
    peers = peer_specs(hf_dir, gguf, threads, req.spin, max_length, precisions, llama_cpp=req.peers)
    for plan in genai_plans:
        dense = genai_dense[plan.precision] / "model.onnx"
        peers += genai_export_specs(plan, layers, req.skip_ratios, threads, req.spin, max_length, dense)
    order = {"onnxruntime-genai": 0, "llama.cpp": 1}
    notes = gpu_notes() if plans else []
    return specs + sorted(peers, key=lambda s: (order.get(s.backend, 2), s.precision, s.mode != "dense")) + notes


def gpu_notes() -> list[RunSpec]:
    """Skipped entries for ONNX Runtime's CUDA and TensorRT execution providers when they are not here."""
    providers = _ort_providers()
    wanted = {"CUDAExecutionProvider": ("onnxruntime CUDA", "pip install onnxruntime-gpu (needs an NVIDIA GPU)"),
              "TensorrtExecutionProvider": ("onnxruntime TensorRT", "pip install onnxruntime-gpu tensorrt "
                                                                    "(needs an NVIDIA GPU)")}
    return [RunSpec(name.split()[0], "dense", name.split()[1], None, label=name,
                    skipped=f"skipped: {provider} not available — install with `{command}`")
            for provider, (name, command) in wanted.items() if provider not in providers]


def model_files(source: str, model: Any) -> tuple[str | None, str | None]:
    """(Hugging Face directory, GGUF file) holding the model's weights, where they exist locally."""
    from .models import resolve_source

    kind, path = resolve_source(source)
    hf_dir = getattr(model.config, "_name_or_path", None)
    hf_dir = hf_dir if hf_dir and Path(hf_dir).is_dir() else None
    return hf_dir, (str(path) if kind == "gguf" and path is not None else None)


# ------------------------------------------------------------------------------------------------
# The whole benchmark
# ------------------------------------------------------------------------------------------------
@dataclass
class BenchRequest:
    """What `skiptool bench` was asked to do."""

    model: str = "smollm2-135m"
    config: Path | None = None
    onnx: list[Path] = field(default_factory=list)
    skip_ratios: list[float] = field(default_factory=list)
    new_tokens: int = DEFAULT_NEW_TOKENS
    repeats: int = 3
    warmup: int = 1
    threads: int | None = None
    spin: bool = False
    quality: bool = False
    data: str | None = None
    prompt_tokens: int = 32
    num_prompts: int = 1
    quality_tokens: int = 64
    quality_blocks: int = 2
    peers: bool = True
    torch: bool = True
    device: str = "cpu"


def bench_prompts(tokenizer: Any, source: str | None, prompt_tokens: int, num_prompts: int,
                  part: tuple[float, float] = (0.0, 0.5)) -> list[list[int]]:
    """Prompts cut from data (the built-in sample by default): `num_prompts` blocks of `prompt_tokens`."""
    from .data import BUILTIN_SAMPLE, DataSpec, token_blocks

    spec = DataSpec(source or BUILTIN_SAMPLE, part=part)
    return token_blocks(tokenizer, spec, prompt_tokens, num_prompts).tolist()


def run_bench(req: BenchRequest, on_start: Callable[[int], None] | None = None,
              on_progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Load the model, plan every run, measure them interleaved and return the JSON-ready report."""
    import torch

    from .config import load_config
    from .models import load_model

    if req.repeats < 1 or req.new_tokens < 2:
        raise SkipToolError("--repeats must be >= 1 and --new-tokens >= 2")
    threads = req.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    config = load_config(req.config) if req.config is not None else _config_beside(req.onnx)
    lm = load_model(req.model, device=req.device)
    if config is not None:
        config.check_matches(lm.model)
    prompts = bench_prompts(lm.tokenizer, req.data, req.prompt_tokens, req.num_prompts)
    quality = (bench_prompts(lm.tokenizer, req.data, req.quality_tokens, req.quality_blocks, part=(0.5, 1.0))
               if req.quality else None)
    m = Measurement(prompts, req.new_tokens, req.repeats, req.warmup, quality)
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


def _config_beside(onnx_dirs: Sequence[Path]) -> Any | None:
    """The skip config an export wrote next to its graph (the first one found)."""
    from .config import CONFIG_FILENAME, load_config

    for directory in onnx_dirs:
        if (Path(directory) / CONFIG_FILENAME).is_file():
            return load_config(Path(directory) / CONFIG_FILENAME)
    return None


def _settings(req: BenchRequest, threads: int, m: Measurement, load_start: tuple[float, ...]) -> dict[str, Any]:
    import torch

    return {
        "new_tokens": req.new_tokens, "repeats": req.repeats, "warmup_runs_dropped": req.warmup,
        "prompts": len(m.prompts), "prompt_tokens": [len(p) for p in m.prompts], "data": req.data or "builtin",
        "threads": threads, "intra_op_spinning": "on" if req.spin else "off", "torch_threads": torch.get_num_threads(),
        "device": req.device, "skip_ratios": list(req.skip_ratios), "quality": req.quality,
        "quality_tokens": req.quality_tokens * req.quality_blocks if req.quality else 0,
        "versions": _versions(), "ort_providers": _ort_providers(), "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _ort_providers() -> list[str]:
    """ONNX Runtime's execution providers here (CUDA / TensorRT appear only with onnxruntime-gpu)."""
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for dist in ("torch", "transformers", "onnxruntime", "onnxruntime-genai", "llama_cpp_python", "skiptool"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


# ------------------------------------------------------------------------------------------------
# Plot
# ------------------------------------------------------------------------------------------------
def write_plot(report: dict[str, Any], path: str | Path) -> Path:
    """A PNG of decode tokens/s per run (median, min–max whiskers) with each skipping run's ideal marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .fileio import atomic_path

    runs = [r for r in report["runs"] if r["tokens_per_s"]]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(runs) + 1.6))
    y = np.arange(len(runs))[::-1]
    tps = [r["tokens_per_s"] for r in runs]
    err = [[r["tokens_per_s"] - r["tokens_per_s_min"] for r in runs], [r["tokens_per_s_max"] - r["tokens_per_s"] for r in runs]]
    colors = ["tab:orange" if r["mode"] == "skip" else ("tab:gray" if r["backend"] in PEER_NAMES else "tab:blue")
              for r in runs]
    ax.barh(y, tps, xerr=err, color=colors, capsize=3)
    ideal = [(yy, r["ideal_tokens_per_s"]) for yy, r in zip(y, runs) if r.get("ideal_tokens_per_s")]
    if ideal:
        ax.scatter([v for _, v in ideal], [yy for yy, _ in ideal], marker="D", s=36, color="crimson", zorder=3,
                   label="ideal at the realised skip ratio (dense tok/s × weight-byte ratio)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14 - 0.6 / max(len(runs), 1)), frameon=False)
    ax.set_yticks(y, [r["label"] for r in runs])
    ax.set_xlabel("decode tokens/s (median, min–max)")
    s = report["settings"]
    ax.set_title(f"{report['model']}: {s['new_tokens']} new tokens, {s['threads']} threads, "
                 f"spinning {s['intra_op_spinning']}", fontsize=10)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)


PEER_NAMES = ("onnxruntime-genai", "llama.cpp")


# ------------------------------------------------------------------------------------------------
# Table
# ------------------------------------------------------------------------------------------------
def bench_table(report: dict[str, Any]) -> Any:
    """The report as a rich table (one row per run that ran) followed by the runs that could not run."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    s = report["settings"]
    ran = [r for r in report["runs"] if r["tokens_per_s"]]
    quality = any(r.get("perplexity") is not None for r in ran)
    table = Table(title=f"{report['model']}: {s['new_tokens']} new tokens, median of {s['repeats']} (min–max), "
                        f"{s['threads']} threads, ORT spinning {s['intra_op_spinning']}")
    for name in ("run", "tok/s", "min–max", "p50/p90 ms", "prefill ms", "skip", "speedup", "ideal", "of ideal",
                 "+RSS MiB") + (("ppl",) if quality else ()):
        table.add_column(name, justify="left" if name == "run" else "right", no_wrap=name == "run")
    for r in ran:
        cells = [_short_label(r), _fmt(r["tokens_per_s"], "{:.1f}"),
                 f"{_fmt(r['tokens_per_s_min'], '{:.0f}')}–{_fmt(r['tokens_per_s_max'], '{:.0f}')}",
                 f"{_fmt(r['latency_ms_p50'], '{:.1f}')}/{_fmt(r['latency_ms_p90'], '{:.1f}')}",
                 _fmt(r["prefill_ms"], "{:.0f}"), _fmt(r["skip_ratio"], "{:.1%}"), _fmt(r["speedup"], "{:.3f}"),
                 _fmt(r["ideal_speedup"], "{:.3f}"), _fmt(r["fraction_of_ideal"], "{:.2f}"),
                 _fmt(r["memory"]["rss_load_mib"], "{:.0f}")]
        table.add_row(*cells, *([_fmt(r.get("perplexity"), "{:.2f}")] if quality else []))
    notes = [Text(f"{r['label']}: {r['status']}", style="dim") for r in report["runs"] if not r["tokens_per_s"]]
    return Group(table, *notes)


_SHORT = {"onnxruntime": "ort", "onnxruntime-genai": "genai"}


def _short_label(r: dict[str, Any]) -> str:
    mode = r["mode"] if r["forced_ratio"] is None else f"skip {r['forced_ratio']:.0%}"
    if r["mode"] == "skip" and r["forced_ratio"] is None:
        mode = f"skip {r['policy']}"
    return f"{_SHORT.get(r['backend'], r['backend'])} {r['precision']} {mode}"


def _fmt(value: Any, pattern: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return pattern.format(value)


def parse_ratios(text: str | None) -> list[float]:
    """``"0.25,0.5"`` -> ``[0.25, 0.5]``, each in [0, 1]."""
    if not text:
        return []
    try:
        ratios = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SkipToolError(f"--skip-ratio must be comma-separated numbers, e.g. 0.25,0.5 (got {text!r})") from None
    bad = [r for r in ratios if not 0.0 <= r <= 1.0]
    if bad:
        raise SkipToolError(f"skip ratios must be in [0, 1] (got {bad[0]})")
    return ratios


def report_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table (what the README's performance section shows)."""
    s = report["settings"]
    lines = [f"{report['model']}, batch 1, {s['prompt_tokens'][0]}-token prompt, {s['new_tokens']} new tokens, "
             f"{s['threads']} threads, ONNX Runtime intra-op spinning {s['intra_op_spinning']}; median of "
             f"{s['repeats']} interleaved runs (min–max), warm-up dropped.", "",
             "| run | tok/s | min–max | p50 / p90 ms | skip | speedup | ideal | of ideal |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        if not r["tokens_per_s"]:
            lines.append(f"| {r['label']} | {r['status']} | | | | | | |")
            continue
        lines.append(" | ".join([
            f"| {r['label']}", _fmt(r["tokens_per_s"], "{:.1f}"),
            f"{_fmt(r['tokens_per_s_min'], '{:.1f}')}–{_fmt(r['tokens_per_s_max'], '{:.1f}')}",
            f"{_fmt(r['latency_ms_p50'], '{:.1f}')} / {_fmt(r['latency_ms_p90'], '{:.1f}')}",
            _fmt(r["skip_ratio"], "{:.1%}"), _fmt(r["speedup"], "{:.3f}×"), _fmt(r["ideal_speedup"], "{:.3f}×"),
            _fmt(r["fraction_of_ideal"], "{:.2f}") + " |"]))
    return "\n".join(lines) + "\n"
