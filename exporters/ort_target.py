"""``export --format ort``: onnxruntime-genai's fused graph with an ``If`` around each skippable FFN.

onnxruntime-genai's model builder writes the fastest dense graph ONNX Runtime has for a decoder
(GroupQueryAttention, rotary embedding inside it, SkipSimplifiedLayerNormalization, MatMulNBits for int4);
:mod:`skiptool.genai_builder` runs it once per model and precision. This target starts from that graph and
changes only what skipping needs:

- each skippable layer's MLP nodes (``/model/layers.{i}/mlp/...``) move into the *else* branch of an ``If``;
  the *then* branch (every token skips) returns the substitute. The MLP's output feeds only the next fused
  skip-layer-norm, so zeros are an exact skip. Cold layers keep their MLP as it was.
- the ``If`` condition is the policy's own code (:mod:`.ort_policy`), with positions derived from the
  attention mask by the rule every path uses. A batch skips an FFN only when every token's decision says skip;
  otherwise rows whose decision says skip get the substitute (as in the PyTorch runtime).
- with stand-ins in the config, the branches add the layer's stand-in (its own small graph, quantized like the
  rest) instead of zeros; in the compute branch it sits inside an inner ``If`` that runs only when some row
  skips, so a step that computes every row does not pay for it.
- ``skip_mask`` (int64 ``[num_layers]``: 1 force skip, -1 force compute, 0 policy) overrides the policy. In
  ``model.onnx`` it is an initializer-backed input, so plain ONNX Runtime callers may omit it.
  onnxruntime-genai ignores values fed to such inputs, so ``model.skip_mask.onnx`` (same weights file)
  declares it as a required input: select it with
  ``og.Config(dir).overlay('{"model": {"decoder": {"filename": "model.skip_mask.onnx"}}}')`` and call
  ``generator.set_model_input("skip_mask", mask)`` once before the first tokens.
- ``skip_decisions`` (bool ``[layers, batch, seq]``) is an output, as in every skiptool graph.

The export checks itself against the PyTorch skip runtime (prefill + ``--parity-steps`` decode steps, logits,
presents and decisions; :mod:`.validate`) and refuses a graph outside the documented tolerance.

Known builder quirk: a model whose ``intermediate_size`` equals its vocabulary size is mis-built (any
``[vocab, hidden]`` Linear is taken for the LM head); real models are not affected.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, helper
from torch import nn

from skiptool.adapters import kv_shape
from skiptool.config import SkipConfig, dense_config, load_config
from skiptool.contract import (MODEL_FILE, OVERRIDE_MODEL_FILE, SKIP_MASK, ExportManifest, read_manifest,
                               write_manifest)
from skiptool.errors import SkipToolError
from skiptool.fileio import atomic_directory
from skiptool.genai_builder import copy_genai_model
from skiptool.models import eos_token_ids, hf_directory, load_model
from skiptool.onnx_graph import constant, drop_initializer_inputs, op_counts, splice, toposort
from skiptool.policies import SkipPolicy, check_policy
from skiptool.runtime import open_runtime

from .ort_policy import SCOPE, LayerTaps, PolicyNodes, export_small
from .target import EXPORT_TARGETS, ExportReport, ExportRequest, ExportTarget, Progress
from .validate import check_parity, enforce_parity, parity_prompt

PRECISIONS = {"none": "fp32", "int8": "int8", "int4": "int4"}
FUSED_OPS = ("GroupQueryAttention", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization",
             "RotaryEmbedding", "MatMulNBits")
TORCH_DTYPES = {TensorProto.FLOAT: torch.float32, TensorProto.FLOAT16: torch.float16,
                TensorProto.BFLOAT16: torch.bfloat16}


# -- where the policy's signals live in the fused graph ---------------------------------------------
def layer_taps(graph: GraphProto, layer: int) -> tuple[LayerTaps, list[NodeProto]]:
    """A layer's signals (from the builder's hierarchical node names) and its MLP nodes."""
    norm = _node(graph, f"/model/layers.{layer}/post_attention_layernorm/SkipLayerNorm")
    prefix = f"/model/layers.{layer}/mlp/"
    mlp = [n for n in graph.node if n.name.startswith(prefix)]
    produced = {o for n in mlp for o in n.output}
    outside = {i for n in graph.node if not n.name.startswith(prefix) for i in n.input}
    outside |= {o.name for o in graph.output}
    leaving = sorted(produced & outside)
    if len(mlp) == 0 or len(leaving) != 1 or len(norm.output) < 4 or not norm.output[3]:
        raise SkipToolError(f"unexpected onnxruntime-genai graph around layer {layer}'s MLP "
                            f"({len(mlp)} nodes, outputs {leaving})")
    return LayerTaps(layer, norm.input[0], norm.input[1], norm.output[3], norm.output[0], leaving[0]), mlp


def _node(graph: GraphProto, name: str) -> NodeProto:
    for n in graph.node:
        if n.name == name:
            return n
    raise SkipToolError(f"node {name!r} not found in the onnxruntime-genai graph (unsupported builder version?)")


def _hidden_size(graph: GraphProto, taps: LayerTaps) -> int:
    producer = next(n for n in graph.node if taps.x in n.output)
    for init in graph.initializer:
        if init.name in producer.input and len(init.dims) == 1:
            return int(init.dims[0])
    raise SkipToolError("cannot read the hidden size from the onnxruntime-genai graph")


# -- the If around each FFN ---------------------------------------------------------------------------
def _wrap_ffn(graph: GraphProto, taps: LayerTaps, mlp: list[NodeProto], cond: str, skip: str, io_dtype: int,
              layer_index: str | None, standin: ModelProto | None) -> None:
    """Move the layer's MLP nodes into an If: then (all skip) = the substitute, else = the MLP (the substitute
    for rows that skip). The compute branch adds as few nodes as it can to the MLP's (they run at every step):
    the layer's rows ``[batch, seq, 1]`` (an ``Unsqueeze`` of its decision, or with `layer_index` a ``Gather``
    from the all-layer rows) and one ``Where`` (with a stand-in, behind :func:`_only_if_a_row_skips`)."""
    p = f"/model/layers.{taps.layer}/mlp"
    inner = f"{p}/ffn_output"
    for n in mlp:
        graph.node.remove(n)
        n.output[:] = [inner if o == taps.ffn_out else o for o in n.output]
    rows = f"{p}/skip_rows"
    if layer_index is not None:
        row_node = helper.make_node("Gather", [skip, layer_index], [rows], name=rows, axis=0)
    else:
        row_node = helper.make_node("Unsqueeze", [skip, constant(graph, SCOPE, TensorProto.INT64, [1], [-1])], [rows],
                                    name=rows)
    compute_sub, compute_value = _substitute_nodes(graph, taps, f"{p}/compute", io_dtype, standin, broadcast=True)
    skip_sub, _ = _substitute_nodes(graph, taps, f"{p}/skip", io_dtype, standin, out=f"{p}/skip_output")
    out = f"{p}/compute_output"
    where = helper.make_node("Where", [rows, compute_value, inner], [out if standin is None else f"{p}/mixed_output"],
                             name=f"{p}/Where")
    # zeros: one Where; a stand-in: its nodes and the Where behind an inner If
    tail = [where] if standin is None else _only_if_a_row_skips(p, rows, inner, compute_sub + [where], out, io_dtype)
    compute_g = helper.make_graph(mlp + [row_node] + tail, f"{p}/compute", [],
                                  [helper.make_tensor_value_info(out, io_dtype, None)])
    skip_g = helper.make_graph(skip_sub, f"{p}/skip", [],
                               [helper.make_tensor_value_info(f"{p}/skip_output", io_dtype, None)])
    graph.node.append(helper.make_node("If", [cond], [taps.ffn_out], name=f"{p}/If", then_branch=skip_g,
                                       else_branch=compute_g))


def _only_if_a_row_skips(p: str, rows: str, inner: str, mixed: list[NodeProto], out: str,
                         io_dtype: int) -> list[NodeProto]:
    """The stand-in for the rows that skip (`mixed`, writing ``{p}/mixed_output``) behind an inner ``If`` on "some
    row skips": a step whose rows all compute (at batch 1, every step that computes) pays one small ``If``
    instead of the stand-in's matmuls."""
    some = f"{p}/some_row_skips"
    mixed_g = helper.make_graph(mixed, f"{p}/mixed", [],
                                [helper.make_tensor_value_info(f"{p}/mixed_output", io_dtype, None)])
    plain_g = helper.make_graph([helper.make_node("Identity", [inner], [f"{p}/plain_output"], name=f"{p}/plain")],
                                f"{p}/plain", [], [helper.make_tensor_value_info(f"{p}/plain_output", io_dtype, None)])
    return [helper.make_node("Cast", [rows], [f"{some}/float"], name=f"{some}/float", to=TensorProto.FLOAT),
            helper.make_node("ReduceMax", [f"{some}/float"], [f"{some}/max"], name=f"{some}/max", keepdims=0),
            helper.make_node("Cast", [f"{some}/max"], [some], name=some, to=TensorProto.BOOL),
            helper.make_node("If", [some], [out], name=f"{p}/mixed_If", then_branch=mixed_g, else_branch=plain_g)]


def _substitute_nodes(graph: GraphProto, taps: LayerTaps, scope: str, io_dtype: int, standin: ModelProto | None,
                      out: str | None = None, broadcast: bool = False) -> tuple[list[NodeProto], str]:
    """Nodes computing what a skipped FFN adds inside one branch, and the value they write (`out`): zeros of
    the FFN input's shape (with `broadcast`, no nodes: a shared scalar zero that ``Where`` broadcasts), or the
    layer's stand-in graph (:func:`standin_graph`) spliced in, its weights main-graph initializers that both
    branches share."""
    out = out or f"{scope}/substitute"
    if standin is None:
        if broadcast:
            return [], constant(graph, SCOPE, io_dtype, [], [0])
        return [helper.make_node("Shape", [taps.x], [f"{scope}/zeros_shape"], name=f"{scope}/zeros_shape"),
                helper.make_node("ConstantOfShape", [f"{scope}/zeros_shape"], [out], name=f"{scope}/zeros",
                                 value=helper.make_tensor("value", io_dtype, [1], [0]))], out
    nodes: list[NodeProto] = []
    splice(graph, standin, {"x": taps.x}, {"y": out}, f"{scope}/standin", SCOPE, nodes_into=nodes,
           weight_prefix=f"/model/layers.{taps.layer}/standin")
    return nodes, out


def standin_graph(standin: nn.Module, hidden: int, io_dtype: torch.dtype, precision: str, opset: int) -> ModelProto:
    """A stand-in module as a small ONNX graph ``x -> y`` (its own PyTorch code, exported), its MatMul weights
    quantized like the rest of a quantized graph (block-wise, :mod:`.quantize`'s scheme)."""
    from .quantize import quantize_model

    sub = export_small(standin.eval(), {"x": torch.randn(2, 3, hidden).to(io_dtype)}, ["y"], opset)
    return sub if precision == "fp32" else quantize_model(sub, precision)


# -- the skipping graph -------------------------------------------------------------------------------
@dataclass
class SurgeryResult:
    model: ModelProto  # weights still external
    if_nodes: int
    skippable: list[int]
    signal_free: bool


def add_skipping(model: ModelProto, policy: SkipPolicy, standins: dict[int, nn.Module] | None = None,
                 precision: str = "fp32") -> SurgeryResult:
    """Turn onnxruntime-genai's dense graph into the skipping graph for `policy` (in place); `standins` (per
    skippable layer) replace the zeros a skipped FFN adds, quantized to `precision` when it is int8 or int4."""
    g = model.graph
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    io_dtype = next(o.type.tensor_type.elem_type for o in g.output if o.name == "logits")
    n = policy.num_layers
    g.initializer.append(helper.make_tensor(SKIP_MASK, TensorProto.INT64, [n], [0] * n))
    g.input.append(helper.make_tensor_value_info(SKIP_MASK, TensorProto.INT64, [n]))
    taps = [layer_taps(g, i) for i in range(n)]
    hidden = _hidden_size(g, taps[0][0])
    nodes = PolicyNodes(g, policy, hidden, TORCH_DTYPES[io_dtype], opset, taps[0][0].h_in)
    nodes.init_state(taps[0][0].h_in)
    for t, mlp in taps:
        if policy.is_skippable(t.layer):
            cond, skip, index = nodes.decide(t)
            standin = (standins or {}).get(t.layer)
            graph = None if standin is None else standin_graph(standin, hidden, TORCH_DTYPES[io_dtype], precision,
                                                               opset)
            _wrap_ffn(g, t, mlp, cond, skip, io_dtype, index, graph)
        nodes.update(t)
    nodes.add_decisions_output()
    toposort(g)
    if_nodes = sum(1 for node in g.node if node.op_type == "If")
    return SurgeryResult(model, if_nodes, [t.layer for t, _ in taps if policy.is_skippable(t.layer)], nodes.signal_free)


# -- the export target ----------------------------------------------------------------------------------
def export_ort(request: ExportRequest, progress: Progress) -> ExportReport:
    """Write the ORT-tuned skipping graph for the request's config (nothing half-written on failure)."""
    if request.dtype != "fp32":
        raise SkipToolError("--format ort builds the CPU graph (fp32 activations); --dtype fp16 is not supported")
    if request.dense:
        raise SkipToolError("--format ort has no --dense (its dense baseline is onnxruntime-genai's own model "
                            "builder output, which bench runs as a peer)")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="skiptool-hf-") as scratch:
        progress("loading model")
        hf_dir = hf_directory(request.source, scratch)
        lm = load_model(str(hf_dir))
        config = load_config(request.config_path) if request.config_path is not None else \
            dense_config(lm.model, request.source)
        config.check_matches(lm.model)
        check_policy(config)
        runtime = open_runtime(lm.model, lm.adapter, config)
        try:
            if not type(runtime.policy).exportable:
                raise SkipToolError(f"the {config.policy.kind} policy cannot be exported")
            with atomic_directory(request.out_dir) as tmp:
                precision = PRECISIONS[request.quantize]
                progress(f"building onnxruntime-genai's {precision} graph")
                graph_path = copy_genai_model(hf_dir, precision, tmp)
                model = onnx.load(str(graph_path), load_external_data=False)
                progress(f"adding the {config.policy.kind} policy and an If per skippable FFN")
                result = add_skipping(model, runtime.policy.eval(), _standins_of(runtime), precision)
                if result.if_nodes != len(config.skippable_layers):
                    raise SkipToolError(f"expected {len(config.skippable_layers)} If nodes, found {result.if_nodes}")
                onnx.save(model, str(graph_path))
                onnx.save(drop_initializer_inputs(model, [SKIP_MASK]), str(tmp / OVERRIDE_MODEL_FILE))
                manifest = _manifest(lm, config, request, result)
                progress("checking ONNX Runtime against PyTorch")
                prompt = parity_prompt(lm.tokenizer, config.warmup, int(lm.model.config.vocab_size))
                report = check_parity(graph_path, manifest, lm.model, runtime, prompt, request.parity_steps)
                check = enforce_parity(report, "ort", precision, graph_path)
                config.save_with_artifacts(tmp)
                files = tuple(sorted({*(p.name for p in tmp.iterdir() if p.is_file()), "skiptool_export.json"}))
                write_manifest(tmp, manifest.replace(checks={precision: check}, files=files))
        finally:
            runtime.remove()
    counts = op_counts(onnx.load(str(Path(request.out_dir) / MODEL_FILE), load_external_data=False),
                       ("If",) + FUSED_OPS)
    details = {"op_counts": {k: v for k, v in counts.items() if v or k == "If"}, "signal_free": result.signal_free}
    return ExportReport(Path(request.out_dir), read_manifest(request.out_dir), details, time.perf_counter() - t0)


def _standins_of(runtime: Any) -> dict[int, nn.Module] | None:
    subs = runtime.substitutes()
    return subs or None


def _manifest(lm: Any, config: SkipConfig, request: ExportRequest, result: SurgeryResult) -> ExportManifest:
    kv_heads, head_dim = kv_shape(lm.model.config)
    return ExportManifest(
        target="ort", runtimes=("onnxruntime-genai", "onnxruntime"), file=MODEL_FILE,
        precision=PRECISIONS[request.quantize], mode="skip", policy=config.policy.kind, source=request.source,
        num_layers=config.model.num_layers, skippable_layers=tuple(result.skippable), num_key_value_heads=kv_heads,
        head_dim=head_dim, vocab_size=int(lm.model.config.vocab_size), eos_token_ids=tuple(eos_token_ids(lm)),
        if_count=result.if_nodes, has_position_ids=False)


EXPORT_TARGETS.register("ort", ExportTarget(
    "ort", "onnxruntime-genai's fused graph (GroupQueryAttention, MatMulNBits) with an If per skippable FFN; "
    "runs in onnxruntime-genai's generator (needs onnxruntime-genai)", export_ort))
