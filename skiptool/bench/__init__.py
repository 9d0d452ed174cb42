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

The parts, lower first (each imports only those listed before it):

- :mod:`skiptool.ideal` (below the package: the GPU engine shares it) — the arithmetic: percentiles, forced masks,
  :class:`IdealBasis`, ONNX graph bytes and precision;
- :mod:`.request` — :class:`BenchRequest`, what ``skiptool bench`` was asked;
- :mod:`.harness` — :class:`RunSpec`, :class:`RunResult`, :class:`Measurement` and the round-robin :func:`measure`;
- :mod:`.plans` — which runs to make: PyTorch eager, the GPU decode path on CUDA, ONNX Runtime exports, peers
  (:func:`plan_runs`);
- :mod:`.report` — :func:`summarise`, the rich table, the PNG plots (speed per run; with ``--quality`` the
  quality-vs-speed front), the Markdown table;
- :mod:`.run` — :func:`run_bench`, the whole benchmark.

Everything public is re-exported here, so ``from skiptool.bench import ...`` is all a caller needs.
"""

from __future__ import annotations

from ..errors import SkipToolError
from .harness import (DEFAULT_NEW_TOKENS, MaskedView, Measurement, RunResult, RunSpec, backend_logits_fn,
                      backend_perplexity, measure, peak_rss_mib, progress_steps, rss_mib, shared)
from ..ideal import (LOOKUP_INPUTS, GraphBytes, IdealBasis, forced_layers, forced_mask, fraction_of_ideal,
                    median_min_max, onnx_graph_bytes, onnx_precision, percentile, tensor_nbytes)
from .plans import (ExportPlan, config_beside, cuda_specs, export_variant_specs, folder_specs, forced_run, gpu_notes,
                    model_files, peer_specs, plan_runs, skip_specs, torch_specs)
from .report import (PEER_NAMES, bench_table, front_figure, pareto_front, report_markdown, scored_runs, summarise,
                     write_front, write_plot)
from .request import BenchRequest
from .run import bench_prompts, parse_ratios, random_prompts, run_bench

__all__ = [
    "BenchRequest", "DEFAULT_NEW_TOKENS", "ExportPlan", "GraphBytes", "IdealBasis", "LOOKUP_INPUTS", "MaskedView",
    "Measurement", "PEER_NAMES", "RunResult", "RunSpec", "SkipToolError", "backend_logits_fn", "backend_perplexity",
    "bench_prompts", "bench_table", "config_beside", "cuda_specs", "export_variant_specs", "folder_specs",
    "forced_layers", "forced_mask", "forced_run", "fraction_of_ideal", "gpu_notes", "measure", "median_min_max",
    "model_files", "onnx_graph_bytes", "onnx_precision", "parse_ratios", "peak_rss_mib", "peer_specs", "percentile",
    "plan_runs", "progress_steps", "random_prompts", "report_markdown", "rss_mib", "run_bench", "shared",
    "skip_specs", "summarise", "tensor_nbytes", "torch_specs", "write_plot", "front_figure", "pareto_front",
    "scored_runs", "write_front",
]
