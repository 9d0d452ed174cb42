"""TensorRT: graph requirements of its ONNX parser (checked on the CPU) and the engine build.

TensorRT's ONNX parser needs standard ONNX ops only (no ONNX Runtime contrib ops), an ``If`` condition
that is a 0-d bool tensor, and ``If`` branches whose outputs have equal ranks. :func:`graph_problems`
checks those on any exported graph; :func:`build_engine` builds a serialized engine with one
optimisation profile covering the dynamic axes of the I/O contract (needs ``tensorrt`` and a GPU) and
writes it as ``model.engine`` beside ``model.onnx``; :mod:`skiptool.backends.tensorrt_backend` runs it.

``skip_mask`` is an optional input in ``model.onnx`` because an all-zeros initializer of the same name
backs it. TensorRT's ONNX parser treats every initializer as a constant weight and drops graph inputs that
share its name, so the engine would have the override baked in as zeros (and could fold the ``If``
conditions of a static policy into build-time constants). :func:`tensorrt_graph` therefore hands the parser
the same graph with such initializers removed: ``skip_mask`` becomes a required engine input, fed on every
step by the backend (zeros = follow the policy, the ONNX default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from skiptool.contract import BATCH, ENGINE_FILE, MODEL_FILE, PAST, PRESENT, SEQUENCE, TOTAL, ExportManifest
from skiptool.accelerators import require_tensorrt
from skiptool.errors import SkipToolError
from skiptool.onnx_graph import drop_initializer_inputs, iter_nodes

from .onnx import export_standard
from .target import EXPORT_TARGETS, ExportReport, ExportRequest, ExportTarget, Progress

STANDARD_DOMAINS = ("", "ai.onnx")


def graph_problems(model: onnx.ModelProto) -> list[str]:
    """What TensorRT's ONNX parser would refuse in `model` (empty when it is fine)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - e.g. unknown custom domains: judge the types the graph declares
        inferred = model
    types = {v.name: v.type for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    problems = [f"{n.op_type} ({n.name}) is in non-standard domain {n.domain!r}"
                for n, _ in iter_nodes(model.graph) if n.domain not in STANDARD_DOMAINS]
    for node, _ in iter_nodes(inferred.graph):
        if node.op_type == "If":
            problems += _if_problems(node, types)
    return problems


def _if_problems(node: onnx.NodeProto, types: dict[str, onnx.TypeProto]) -> list[str]:
    out = []
    cond = types.get(node.input[0])
    if cond is None or cond.tensor_type.elem_type != onnx.TensorProto.BOOL or _rank(cond) != 0:
        out.append(f"If {node.name}: condition {node.input[0]!r} is not a 0-d bool tensor")
    branches = {a.name: a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}
    then_out, else_out = branches["then_branch"].output, branches["else_branch"].output
    for a, b in zip(then_out, else_out):
        if _rank(a.type) is None or _rank(a.type) != _rank(b.type):
            out.append(f"If {node.name}: branch outputs {a.name!r} / {b.name!r} have ranks "
                       f"{_rank(a.type)} / {_rank(b.type)}")
    return out


def _rank(t: onnx.TypeProto) -> int | None:
    return len(t.tensor_type.shape.dim) if t.tensor_type.HasField("shape") else None


def check_graph_for_tensorrt(model: onnx.ModelProto) -> None:
    """Raise with the first problems TensorRT's parser would have with `model`."""
    problems = graph_problems(model)
    if problems:
        raise SkipToolError(f"graph is not TensorRT-compatible: {'; '.join(problems[:3])}")


def tensorrt_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` in which inputs backed by an initializer (``skip_mask``) are plain runtime inputs.

    TensorRT's parser would otherwise import them as constants (see the module docstring). Weights stored
    as external data stay references to ``model.onnx.data``; parse the result with the graph's path.
    """
    return drop_initializer_inputs(model)


def profile_shapes(model: onnx.ModelProto, max_batch: int = 1, max_context: int = 2048,
                   opt_context: int = 256) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shape of every graph input, from its dims: fixed ones stay, named axes get ranges.

    The min and opt points are real decode steps (past + sequence = total: the empty-past first token, and
    one token after ``opt_context - 1``): TensorRT's builder rejects an opt point that violates the graph's
    shape constraints ("kOPT values for profile 0 violate shape constraints"). The max point cannot be
    one (sequence and past both reach their maxima), which the builder only warns about.
    """
    ranges = {BATCH: (1, 1, max_batch), SEQUENCE: (1, 1, max_context), TOTAL: (1, opt_context, max_context),
              PAST: (0, opt_context - 1, max_context - 1), PRESENT: (1, opt_context, max_context)}
    initializers = {t.name for t in model.graph.initializer}
    shapes = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = [ranges.get(d.dim_param, (d.dim_value,) * 3) if d.dim_param else (d.dim_value,) * 3
                for d in value.type.tensor_type.shape.dim]
        shapes[value.name] = tuple(tuple(d[k] for d in dims) for k in range(3))
    return shapes


def build_engine(onnx_path: Path, engine_path: Path, fp16: bool = False, max_batch: int = 1,
                 max_context: int = 2048) -> Path:
    """Parse :func:`tensorrt_graph` of the graph at `onnx_path` with TensorRT and write a serialized engine
    (one optimisation profile: batch up to `max_batch`, past + new tokens up to `max_context`)."""
    trt = require_tensorrt()
    graph = tensorrt_graph(onnx.load(str(onnx_path), load_external_data=False))
    check_graph_for_tensorrt(graph)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(graph.SerializeToString(), str(onnx_path)):  # the path locates external weights
        errors = "; ".join(str(parser.get_error(i)) for i in range(min(parser.num_errors, 3)))
        raise SkipToolError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(graph, max_batch, max_context).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise SkipToolError("TensorRT failed to build the engine (see its log above)")
    engine_path.write_bytes(bytes(engine))
    return engine_path


def export_tensorrt(request: ExportRequest, progress: Progress) -> ExportReport:
    """``export --format tensorrt``: the ``onnx`` target's folder (graph, parity check, config, tokenizer) plus
    ``model.engine``, TensorRT's build of that graph. Fails before any work without TensorRT or a GPU."""
    require_tensorrt()

    def add_engine(folder: Path, manifest: ExportManifest, say: Progress) -> dict[str, Any]:
        say("building the TensorRT engine")
        build_engine(folder / MODEL_FILE, folder / ENGINE_FILE, fp16=request.dtype == "fp16")
        return {"engine": ENGINE_FILE}

    return export_standard(request, progress, target="tensorrt", runtimes=("tensorrt", "onnxruntime"),
                           finish=add_engine)


EXPORT_TARGETS.register("tensorrt", ExportTarget(
    "tensorrt", "the onnx graph plus a TensorRT engine built from it (needs TensorRT and an NVIDIA GPU)",
    export_tensorrt))
