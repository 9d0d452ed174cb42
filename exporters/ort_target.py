"""``--target ort``: onnxruntime-genai's fused graph with an ``If`` around each skippable FFN.

onnxruntime-genai's model builder writes the fastest dense graph ONNX Runtime has for a decoder
(GroupQueryAttention with a KV buffer shared between past and present, rotary embedding inside it,
SkipSimplifiedLayerNormalization, MatMulNBits for int4). This module starts from that graph and
changes only what skipping needs:

- each skippable layer's MLP nodes (``/model/layers.{i}/mlp/...``) move into the *then* branch of an
  ``If``; the *else* branch returns zeros of the FFN input's shape. The MLP's output feeds only the next
  fused skip-layer-norm, so zeros are an exact skip. Cold layers keep their MLP as it was.
- the ``If`` condition is the policy's own code: :meth:`SkipPolicy.decide` (and, for stateful policies,
  :meth:`SkipPolicy.init_state` / :meth:`SkipPolicy.update`) is exported per layer with ``torch.onnx`` on
  the signals the fused graph has — attention delta (``o_proj`` output), residual sum (the post-attention
  norm's ``output_3``), the FFN input and output — and spliced in. No second copy of any rule.
  A policy whose rule reads no layer signal (static mask, dense + override) exports
  :meth:`SkipPolicy.decide_all` once for every layer instead; each layer then adds only a ``Gather``
  of its condition (the per-layer policy nodes cost ~10 % of an int4 decode step).
- with stand-ins in the config, the branches add the layer's stand-in ``up(down(x))`` (two small
  MatMuls and an Add, fp32/fp16 weights even in an int4 graph) instead of zeros.
  A batch skips an FFN only when every token's decision says skip; otherwise rows whose decision says
  skip get zeros (as in the PyTorch runtime).
- ``skip_mask`` (int64 ``[num_layers]``: 1 force skip, -1 force compute, 0 policy) overrides the
  policy. In ``model.onnx`` it is an initializer-backed input, so plain ONNX Runtime callers may omit
  it. onnxruntime-genai ignores values fed to such inputs, so ``model.skip_mask.onnx`` (same weights
  file) declares it as a required input: select it with
  ``og.Config(dir).overlay('{"model": {"decoder": {"filename": "model.skip_mask.onnx"}}}')`` and call
  ``generator.set_model_input("skip_mask", mask)`` once before the first tokens.

Parity (checked in tests/test_ort_target.py and on the demo model): with every FFN computed the skipping
graph is bit-identical to the builder's dense graph (fp32 and int4). Against the PyTorch skip runtime
under the same decisions: tiny models <= 1e-4 (fp32, prefill + 32 decode steps, every policy and forced
masks, decisions identical). On the demo model's real weights, fp32, forced 8/30 skip: 1.2e-4 max |logit
diff|, all 33 greedy tokens equal — the builder's dense fp32 graph itself is 1.5e-4 from PyTorch (fused
kernels). int4 (MatMulNBits, block 32) vs PyTorch fp32: up to ~21 in logits, top-1 agreement 23/33 steps,
the same as the builder's own int4 graph (int4 quantization error, not skipping).

Known builder quirk: a model whose ``intermediate_size`` equals its vocabulary size is mis-built (any
``[vocab, hidden]`` Linear is taken for the LM head); real models are not affected.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from skiptool.config import SkipConfig
from skiptool.errors import ConfigError, MissingDependencyError, SkipToolError
from skiptool.policies import LayerSignals, SkipPolicy

SKIP_MASK = "skip_mask"
MODEL_FILE = "model.onnx"
OVERRIDE_MODEL_FILE = "model.skip_mask.onnx"
OVERRIDE_OVERLAY = json.dumps({"model": {"decoder": {"filename": OVERRIDE_MODEL_FILE}}})
PRECISIONS = {"none": "fp32", "fp32": "fp32", "int8": "int8", "int4": "int4"}
FUSED_OPS = ("GroupQueryAttention", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization",
             "RotaryEmbedding", "MatMulNBits")
DECISION_PREFIX = "/model/skip_policy"


# -- the dense graph -------------------------------------------------------------------------------
def build_dense(hf_dir: str | Path, out_dir: str | Path, precision: str = "fp32",
                execution_provider: str = "cpu") -> Path:
    """Run onnxruntime-genai's model builder on a Hugging Face directory (in a subprocess)."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        raise MissingDependencyError("--target ort needs onnxruntime-genai's model builder: "
                                     "pip install --no-deps onnxruntime-genai") from None
    out_dir, cache = Path(out_dir), Path(out_dir) / ".builder-cache"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out_dir),
           "-p", precision, "-e", execution_provider, "-c", str(cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0 or not (out_dir / MODEL_FILE).is_file():
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        raise SkipToolError(f"onnxruntime-genai's model builder failed: {lines[-1] if lines else proc.returncode}")
    return out_dir / MODEL_FILE


def hf_directory(source: str, scratch: str | Path | None = None) -> Path:
    """A local Hugging Face directory for a model source (the demo GGUF's converted cache included)."""
    from skiptool.models import _gguf_cache_dir, load_model, resolve_source

    kind, path = resolve_source(source)
    if kind == "gguf":
        return _gguf_cache_dir(path)
    if kind == "dir":
        return path
    if scratch is None:
        raise SkipToolError(f"--target ort needs a local model directory for {source!r}")
    loaded = load_model(source)
    loaded.model.save_pretrained(str(scratch))
    loaded.tokenizer.save_pretrained(str(scratch))
    return Path(scratch)


# -- where the policy's signals live in the fused graph ---------------------------------------------
@dataclass(frozen=True)
class LayerTaps:
    """Value names of one layer's skip signals in onnxruntime-genai's graph."""

    layer: int
    h_in: str  # residual stream entering the layer
    attn_delta: str  # o_proj output
    h_mid: str  # residual sum leaving the post-attention norm (output_3)
    x: str  # the FFN's normalised input (output_0)
    ffn_out: str  # the MLP's output (the next norm's skip input)
    mlp_nodes: list[Any] = field(default_factory=list, compare=False, repr=False)


def layer_taps(graph: Any, layer: int) -> LayerTaps:
    """Find a layer's signals from the builder's hierarchical node names."""
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
    return LayerTaps(layer, norm.input[0], norm.input[1], norm.output[3], norm.output[0], leaving[0], mlp)


def _node(graph: Any, name: str) -> Any:
    for n in graph.node:
        if n.name == name:
            return n
    raise SkipToolError(f"node {name!r} not found in the onnxruntime-genai graph (unsupported builder version?)")


# -- the policy, exported per layer ------------------------------------------------------------------
class _Decide(nn.Module):
    """One layer's decision, exactly :meth:`SkipPolicy.decide`, plus the batch condition."""

    def __init__(self, policy: SkipPolicy, layer: int) -> None:
        super().__init__()
        self.policy, self.layer = policy, layer

    def forward(self, h_in: Tensor, attn_delta: Tensor, h_mid: Tensor, x: Tensor, positions: Tensor,
                override: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        skip = self.policy.decide(LayerSignals(self.layer, h_in, attn_delta, h_mid, x), positions, state, override)
        return skip.all(), skip


class _DecideAll(nn.Module):
    """Every layer's decision at once, exactly :meth:`SkipPolicy.decide_all`, for a signal-free policy (static
    mask, dense + override): a handful of nodes for the whole model instead of a few per layer."""

    def __init__(self, policy: SkipPolicy) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, positions: Tensor, override: Tensor) -> tuple[Tensor, Tensor]:
        skip = self.policy.decide_all(positions, override)
        assert skip is not None
        return skip.flatten(1).all(1), skip


class _Update(nn.Module):
    """One layer's state update, exactly :meth:`SkipPolicy.update` (cold layers never skip)."""

    def __init__(self, policy: SkipPolicy, layer: int) -> None:
        super().__init__()
        self.policy, self.layer = policy, layer

    def forward(self, h_mid: Tensor, delta: Tensor, state: Tensor, skip: Tensor | None = None) -> Tensor:
        if skip is None:
            skip = torch.zeros(h_mid.shape[:2], dtype=torch.bool, device=h_mid.device)
        return self.policy.update(self.layer, h_mid, delta, skip, state)


class _InitState(nn.Module):
    def __init__(self, policy: SkipPolicy) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, h: Tensor) -> Tensor:
        return self.policy.init_state(h)


def _export_small(module: nn.Module, args: dict[str, Tensor], outputs: list[str], opset: int) -> Any:
    """Export a small module with dynamic batch/sequence axes; returns the ONNX ModelProto."""
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    dyn = {k: ({0: batch, 1: seq} if v.dim() >= 2 else None) for k, v in args.items()}
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), (), kwargs=args, dynamo=True, opset_version=opset,
                                    input_names=list(args), output_names=outputs, dynamic_shapes=dyn,
                                    verbose=False, optimize=True)
    return program.model_proto


class _quiet_exporter:
    """Silence the exporter's logging (it prints to stdout/logging on every export)."""

    def __enter__(self) -> None:
        import logging

        self._loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
        self._levels = [lg.level for lg in self._loggers]
        for lg in self._loggers:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc: Any) -> None:
        for lg, level in zip(self._loggers, self._levels):
            lg.setLevel(level)


# -- graph surgery ------------------------------------------------------------------------------------
def _splice(graph: Any, sub: Any, inputs: dict[str, str], outputs: dict[str, str], prefix: str,
            shape_proxy: str | None = None) -> None:
    """Copy `sub`'s nodes and initializers into `graph`, wiring its inputs/outputs to the given names.

    So that ONNX Runtime's common-subexpression elimination can share the layer-independent part of the
    per-layer policy graphs, small constants are named by content, and an input that is only read by
    ``Shape`` is wired to `shape_proxy` (a value of the same shape, the same for every layer).
    """
    missing = [i.name for i in sub.graph.input if i.name not in inputs and _is_used(sub.graph, i.name)]
    if missing:
        raise SkipToolError(f"policy graph needs inputs the ORT graph does not provide: {missing}")
    if shape_proxy is not None:
        inputs = {k: shape_proxy if _only_shape_read(sub.graph, k) else v for k, v in inputs.items()}
    rename = {**inputs, **outputs}
    existing = {i.name for i in graph.initializer}
    for init in sub.graph.initializer:
        shared = _shared_constant_name(init)
        rename[init.name] = shared or f"{prefix}/{init.name}"
        if rename[init.name] in existing:
            continue
        t = type(init)()
        t.CopyFrom(init)
        t.name = rename[init.name]
        graph.initializer.append(t)

    def name(v: str) -> str:
        return v if not v else rename.get(v, f"{prefix}/{v}")

    for n in _legalize_for_ort(sub):
        new = graph.node.add()
        new.CopyFrom(n)
        new.name = f"{prefix}/{n.name or n.op_type}"
        new.input[:] = [name(v) for v in n.input]
        new.output[:] = [name(v) for v in n.output]
        if any(a.type in (5, 10) for a in n.attribute):  # GRAPH / GRAPHS
            raise SkipToolError("policy graphs with subgraphs are not supported by --target ort")
    # an output that is directly a graph input or initializer needs an Identity
    for out in sub.graph.output:
        if not any(out.name in n.output for n in sub.graph.node):
            node = graph.node.add()
            node.op_type, node.name = "Identity", f"{prefix}/{out.name}_identity"
            node.input.append(name(out.name) if out.name not in inputs else inputs[out.name])
            node.output.append(outputs[out.name])


def _only_shape_read(graph: Any, value: str) -> bool:
    readers = [n for n in graph.node if value in n.input]
    return bool(readers) and all(n.op_type == "Shape" for n in readers) and value not in {o.name for o in graph.output}


def _shared_constant_name(init: Any) -> str | None:
    """A content-derived name for a small constant (None for weights, which stay per layer)."""
    import hashlib

    if init.data_location == 1 or init.ByteSize() > 256:
        return None
    anonymous = type(init)()
    anonymous.CopyFrom(init)
    anonymous.name = ""
    key = anonymous.SerializeToString(deterministic=True)
    return f"{DECISION_PREFIX}/const/{hashlib.sha1(key).hexdigest()[:16]}"


def _legalize_for_ort(sub: Any) -> list[Any]:
    """The small graph's nodes, with bool ``Where`` (no ONNX Runtime CPU kernel) rewritten as logic ops."""
    from onnx import TensorProto, helper, shape_inference

    inferred = shape_inference.infer_shapes(sub).graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.value_info) + list(inferred.output)}
    nodes = []
    for n in sub.graph.node:
        if n.op_type != "Where" or types.get(n.output[0]) != TensorProto.BOOL:
            nodes.append(n)
            continue
        c, a, b = n.input
        pre = f"{n.name or n.output[0]}_logic"
        nodes += [helper.make_node("And", [c, a], [f"{pre}/then"], name=f"{pre}/then"),
                  helper.make_node("Not", [c], [f"{pre}/not"], name=f"{pre}/not"),
                  helper.make_node("And", [f"{pre}/not", b], [f"{pre}/else"], name=f"{pre}/else"),
                  helper.make_node("Or", [f"{pre}/then", f"{pre}/else"], [n.output[0]], name=pre)]
    return nodes


def _is_used(graph: Any, value: str) -> bool:
    return any(value in n.input for n in graph.node) or any(value == o.name for o in graph.output)


def _wrap_ffn(graph: Any, taps: LayerTaps, cond: str, skip: str, io_dtype: int, layer_index: str | None = None,
              standin: nn.Module | None = None) -> Any:
    """Move the layer's MLP nodes into an If: then (all skip) = the substitute, else = the MLP (the substitute
    for rows that skip). The substitute is zeros, or the layer's stand-in ``up(down(x))``.

    `skip` is the layer's ``[batch, seq]`` decision, or with `layer_index` (a scalar int64 value) the all-layer
    ``[layers, batch, seq, 1]`` decision that the compute branch indexes (only when it runs). The compute
    branch adds as few nodes as it can to the MLP's (they run at every decode step).
    """
    from onnx import helper

    p = f"/model/layers.{taps.layer}/mlp"
    inner = f"{p}/ffn_output"
    moved = []
    for n in taps.mlp_nodes:
        graph.node.remove(n)
        n.output[:] = [inner if o == taps.ffn_out else o for o in n.output]
        moved.append(n)
    rows = f"{p}/skip_rows"  # [batch, seq, 1]
    if layer_index is not None:
        row_nodes = [helper.make_node("Gather", [skip, layer_index], [rows], name=rows, axis=0)]
    else:
        row_nodes = [helper.make_node("Unsqueeze", [skip, _shared_constant(graph, "last_axis", 7, [1], [-1])], [rows],
                                      name=rows)]
    compute_sub, compute_value = _substitute_nodes(graph, taps, f"{p}/compute", io_dtype, standin, broadcast=True)
    skip_sub, _ = _substitute_nodes(graph, taps, f"{p}/skip", io_dtype, standin, out=f"{p}/skip_output")
    compute_nodes = moved + row_nodes + compute_sub + [
        helper.make_node("Where", [rows, compute_value, inner], [f"{p}/compute_output"], name=f"{p}/Where")]
    skip_nodes = skip_sub
    compute_g = helper.make_graph(compute_nodes, f"{p}/compute", [],
                                  [helper.make_tensor_value_info(f"{p}/compute_output", io_dtype, None)])
    skip_g = helper.make_graph(skip_nodes, f"{p}/skip", [],
                               [helper.make_tensor_value_info(f"{p}/skip_output", io_dtype, None)])
    # cond is "every token skips": then -> the substitute, else -> the MLP
    node = helper.make_node("If", [cond], [taps.ffn_out], name=f"{p}/If", then_branch=skip_g, else_branch=compute_g)
    graph.node.append(node)
    return node


def _substitute_nodes(graph: Any, taps: LayerTaps, scope: str, io_dtype: int, standin: nn.Module | None,
                      out: str | None = None, broadcast: bool = False) -> tuple[list[Any], str]:
    """Nodes computing what a skipped FFN adds inside one branch, and the value they write (`out`): zeros of
    the FFN input's shape (with `broadcast`, no nodes: a shared scalar zero that ``Where`` broadcasts), or the
    stand-in ``x @ down^T @ up^T + bias`` (its weights are main-graph initializers shared by both branches)."""
    from onnx import helper, numpy_helper

    out = out or f"{scope}/substitute"
    if standin is None:
        if broadcast:
            return [], _shared_constant(graph, "zero", io_dtype, [], [0])
        return [helper.make_node("Shape", [taps.x], [f"{scope}/zeros_shape"], name=f"{scope}/zeros_shape"),
                helper.make_node("ConstantOfShape", [f"{scope}/zeros_shape"], [out], name=f"{scope}/zeros",
                                 value=helper.make_tensor("value", io_dtype, [1], [0]))], out
    w = f"/model/layers.{taps.layer}/standin"
    if not any(i.name == f"{w}/down" for i in graph.initializer):
        np_dtype = helper.tensor_dtype_to_np_dtype(io_dtype)
        for name, value in (("down", standin.down.weight.T), ("up", standin.up.weight.T), ("bias", standin.up.bias)):
            graph.initializer.append(numpy_helper.from_array(value.detach().cpu().numpy().astype(np_dtype),
                                                             f"{w}/{name}"))
    return [helper.make_node("MatMul", [taps.x, f"{w}/down"], [f"{scope}/standin_low"], name=f"{scope}/standin_down"),
            helper.make_node("MatMul", [f"{scope}/standin_low", f"{w}/up"], [f"{scope}/standin_up"],
                             name=f"{scope}/standin_up"),
            helper.make_node("Add", [f"{scope}/standin_up", f"{w}/bias"], [out], name=f"{scope}/standin_bias")], out


def _shared_constant(graph: Any, name: str, dtype: int, dims: list[int], values: list[Any]) -> str:
    """A main-graph initializer ``{DECISION_PREFIX}/{name}`` (added once) that every layer's nodes can read."""
    from onnx import helper

    full = f"{DECISION_PREFIX}/{name}"
    if not any(i.name == full for i in graph.initializer):
        graph.initializer.append(helper.make_tensor(full, dtype, dims, values))
    return full


def _positions(graph: Any) -> str:
    """Token positions [batch, seq] from the attention mask (what GroupQueryAttention uses)."""
    from onnx import helper

    p = f"{DECISION_PREFIX}/positions"
    consts = {"one": [1], "axis": [1], "seq_axis": [1], "big": [2**62]}
    for k, v in consts.items():
        graph.initializer.append(helper.make_tensor(f"{p}/{k}", 7, [1], v))
    nodes = [
        helper.make_node("Cast", ["attention_mask"], [f"{p}/mask64"], to=7),
        helper.make_node("CumSum", [f"{p}/mask64", f"{p}/axis"], [f"{p}/cumsum"]),
        helper.make_node("Sub", [f"{p}/cumsum", f"{p}/one"], [f"{p}/all"]),
        helper.make_node("Shape", ["input_ids"], [f"{p}/seq_len"], start=1, end=2),
        helper.make_node("Neg", [f"{p}/seq_len"], [f"{p}/start"]),
        helper.make_node("Slice", [f"{p}/all", f"{p}/start", f"{p}/big", f"{p}/seq_axis"], [f"{p}/output"]),
    ]
    for i, n in enumerate(nodes):
        n.name = f"{p}/{n.op_type}_{i}"
    graph.node.extend(nodes)
    return f"{p}/output"


def _toposort(graph: Any) -> None:
    """Order nodes so every value is produced before use (outer-scope uses of If branches included)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[Any] = []
    while pending:
        rest = []
        for n in pending:
            if all(v in available for v in _outer_inputs(n)):
                ordered.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise SkipToolError(f"cannot order the skip graph: {rest[0].name} has unmet inputs")
        pending = rest
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def _outer_inputs(node: Any) -> set[str]:
    """A node's inputs, plus the outer-scope values its subgraphs read."""
    used = set(node.input)
    for a in node.attribute:
        for g in ([a.g] if a.type == 5 else list(a.graphs) if a.type == 10 else []):
            local = {i.name for i in g.initializer} | {i.name for i in g.input}
            for n in g.node:
                local.update(n.output)
            for n in g.node:
                used |= {v for v in _outer_inputs(n) if v not in local}
    return used


# -- the skipping graph -------------------------------------------------------------------------------
@dataclass
class SurgeryResult:
    model: Any  # onnx.ModelProto (weights still external)
    if_nodes: int
    skippable: list[int]


def add_skipping(model: Any, policy: SkipPolicy, decision_outputs: bool = False,
                 standins: dict[int, nn.Module] | None = None) -> SurgeryResult:
    """Turn onnxruntime-genai's dense graph into the skipping graph for `policy` (in place).

    `standins` (per skippable layer) replace the zeros a skipped FFN adds. `decision_outputs` adds
    ``skip_decision.{i}`` outputs (bool ``[batch, seq]``) for parity checks.
    """
    from onnx import TensorProto, helper

    g = model.graph
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    io_dtype = next(o.type.tensor_type.elem_type for o in g.output if o.name == "logits")
    n = policy.num_layers
    g.initializer.append(helper.make_tensor(SKIP_MASK, TensorProto.INT64, [n], [0] * n))
    g.input.append(helper.make_tensor_value_info(SKIP_MASK, TensorProto.INT64, [n]))
    positions = _positions(g)
    taps = [layer_taps(g, i) for i in range(n)]
    torch_dtype = {TensorProto.FLOAT: torch.float32, TensorProto.FLOAT16: torch.float16,
                   TensorProto.BFLOAT16: torch.bfloat16}[io_dtype]
    hidden = _hidden_size(g, taps[0])
    h = torch.zeros(2, 3, hidden, dtype=torch_dtype)
    fresh = lambda: torch.randn(2, 3, hidden).to(torch_dtype)  # noqa: E731 (distinct tensors: no aliasing)
    pos = torch.arange(3).repeat(2, 1)
    override = torch.zeros(n, dtype=torch.int64)
    all_layers = _export_decide_all(g, policy, pos, override, positions, opset)
    state = _export_init_state(g, policy, h, taps[0].h_in, opset)
    for t in taps:
        pre = f"/model/layers.{t.layer}/skip_policy"
        skip_name = None
        if policy.is_skippable(t.layer):
            standin = (standins or {}).get(t.layer)
            if all_layers is not None:
                cond, skip_name, index = _layer_of_all(g, all_layers, t.layer, pre)
                _wrap_ffn(g, t, cond, all_layers[2], io_dtype, index, standin)
            else:
                args = dict(h_in=fresh(), attn_delta=fresh(), h_mid=fresh(), x=fresh(), positions=pos,
                            override=override)
                names = dict(h_in=t.h_in, attn_delta=t.attn_delta, h_mid=t.h_mid, x=t.x, positions=positions,
                             override=SKIP_MASK)
                if state is not None:
                    args["state"], names["state"] = policy.init_state(h), state
                sub = _export_small(_Decide(policy, t.layer), args, ["cond", "skip"], opset)
                cond, skip_name = f"{pre}/cond", f"{pre}/skip"
                _splice(g, sub, names, {"cond": cond, "skip": skip_name}, f"{pre}/decide", shape_proxy=taps[0].h_in)
                _wrap_ffn(g, t, cond, skip_name, io_dtype, standin=standin)
            if decision_outputs:
                if all_layers is not None:
                    g.node.append(helper.make_node("Gather", [all_layers[1], index], [skip_name], axis=0))
                g.node.append(helper.make_node("Identity", [skip_name], [f"skip_decision.{t.layer}"]))
                g.output.append(helper.make_tensor_value_info(f"skip_decision.{t.layer}", TensorProto.BOOL,
                                                              ["batch_size", "sequence_length"]))
        if state is not None:
            state = _export_update(g, policy, t, h, state, skip_name, opset)
    _toposort(g)
    if_nodes = sum(1 for node in g.node if node.op_type == "If")
    return SurgeryResult(model, if_nodes, [t.layer for t in taps if policy.is_skippable(t.layer)])


def _export_decide_all(graph: Any, policy: SkipPolicy, pos: Tensor, override: Tensor, positions: str,
                       opset: int) -> tuple[str, str, str] | None:
    """Splice the all-layer decision of a signal-free policy once; ``(cond [layers], skip [layers, b, s],
    skip rows [layers, b, s, 1])``."""
    if policy.decide_all(pos, override) is None:
        return None
    from onnx import helper

    out = (f"{DECISION_PREFIX}/all/cond", f"{DECISION_PREFIX}/all/skip", f"{DECISION_PREFIX}/all/skip_rows")
    sub = _export_small(_DecideAll(policy), {"positions": pos, "override": override}, ["cond", "skip"], opset)
    _splice(graph, sub, {"positions": positions, "override": SKIP_MASK}, {"cond": out[0], "skip": out[1]},
            f"{DECISION_PREFIX}/all")
    graph.node.append(helper.make_node("Unsqueeze", [out[1], _shared_constant(graph, "last_axis", 7, [1], [-1])],
                                       [out[2]], name=out[2]))  # once for all layers: [layers, batch, seq, 1]
    return out


def _layer_of_all(graph: Any, all_layers: tuple[str, str, str], layer: int, pre: str) -> tuple[str, str, str]:
    """One node per layer: its If condition, a scalar Gather from the all-layer conditions."""
    from onnx import helper

    index = f"{pre}/index"
    graph.initializer.append(helper.make_tensor(index, 7, [], [layer]))
    cond = f"{pre}/cond"
    graph.node.append(helper.make_node("Gather", [all_layers[0], index], [cond], name=f"{pre}/cond", axis=0))
    return cond, f"{pre}/skip", index


def _hidden_size(graph: Any, taps: LayerTaps) -> int:
    for init in graph.initializer:
        if init.name in _node_by_output(graph, taps.x).input and len(init.dims) == 1:
            return int(init.dims[0])
    raise SkipToolError("cannot read the hidden size from the onnxruntime-genai graph")


def _node_by_output(graph: Any, value: str) -> Any:
    return next(n for n in graph.node if value in n.output)


def _export_init_state(graph: Any, policy: SkipPolicy, h: Tensor, h_name: str, opset: int) -> str | None:
    if policy.init_state(h) is None:
        return None
    out = f"{DECISION_PREFIX}/state.init"
    _splice(graph, _export_small(_InitState(policy), {"h": h}, ["state"], opset), {"h": h_name},
            {"state": out}, f"{DECISION_PREFIX}/init_state")
    return out


def _export_update(graph: Any, policy: SkipPolicy, t: LayerTaps, h: Tensor, state: str, skip: str | None,
                   opset: int) -> str:
    pre = f"/model/layers.{t.layer}/skip_policy"
    args: dict[str, Tensor] = dict(h_mid=torch.randn_like(h), delta=torch.randn_like(h), state=policy.init_state(h))
    names = dict(h_mid=t.h_mid, delta=t.ffn_out, state=state)
    if skip is not None:
        args["skip"], names["skip"] = torch.zeros(h.shape[:2], dtype=torch.bool), skip
    out = f"{pre}/state"
    _splice(graph, _export_small(_Update(policy, t.layer), args, ["new_state"], opset), names, {"new_state": out},
            f"{pre}/update")
    return out


def override_variant(model: Any) -> Any:
    """The same graph with ``skip_mask`` a required input (for onnxruntime-genai's set_model_input)."""
    import onnx

    variant = onnx.ModelProto()
    variant.CopyFrom(model)
    keep = [i for i in variant.graph.initializer if i.name != SKIP_MASK]
    del variant.graph.initializer[:]
    variant.graph.initializer.extend(keep)
    return variant


def op_counts(model: Any) -> dict[str, int]:
    """Counts of If nodes and fused operators, branches included."""
    counts: Counter[str] = Counter()

    def walk(graph: Any) -> None:
        for n in graph.node:
            counts[n.op_type] += 1
            for a in n.attribute:
                if a.type == 5:
                    walk(a.g)

    walk(model.graph)
    return {op: counts[op] for op in ("If",) + FUSED_OPS if counts[op] or op == "If"}


# -- the export -----------------------------------------------------------------------------------------
@dataclass
class OrtExport:
    """What ``export --target ort`` wrote."""

    out_dir: Path
    precision: str
    skippable: list[int]
    op_counts: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "precision": self.precision, "skippable": self.skippable,
                "op_counts": self.op_counts}


def export_ort(hf_dir: str | Path, config: SkipConfig, out_dir: str | Path, quantize: str = "none",
               progress: Callable[[str], None] | None = None) -> OrtExport:
    """Write the ORT-tuned skipping graph for `config` to `out_dir` (nothing half-written on failure)."""
    import onnx

    from skiptool.fileio import atomic_directory
    from skiptool.policies import build_policy
    from skiptool.runtime import load_standins

    if quantize not in PRECISIONS:
        raise ConfigError(f"unknown quantization {quantize!r} for --target ort (expected none, int8 or int4)")
    config.check_matches(_ConfigOnly(hf_dir))
    policy = build_policy(config).eval()
    standins = load_standins(config).by_layer() if config.standin is not None else None
    precision = PRECISIONS[quantize]
    say = progress or (lambda _msg: None)
    with atomic_directory(out_dir) as tmp:
        say(f"building onnxruntime-genai's {precision} graph")
        dense = build_dense(hf_dir, tmp, precision)
        model = onnx.load(str(dense), load_external_data=False)
        say(f"adding the {config.policy.kind} policy and an If per skippable FFN")
        result = add_skipping(model, policy, standins=standins)
        if result.if_nodes != len(config.skippable_layers):
            raise SkipToolError(f"expected {len(config.skippable_layers)} If nodes, found {result.if_nodes}")
        onnx.save(model, str(dense))
        onnx.save(override_variant(model), str(tmp / OVERRIDE_MODEL_FILE))
        _check_loads(tmp)
        config.save_with_artifacts(tmp)
    out = Path(out_dir)
    return OrtExport(out, precision, result.skippable, op_counts(onnx.load(str(out / MODEL_FILE),
                                                                           load_external_data=False)))


def export_ort_source(source: str, out_dir: str | Path, config_path: str | Path | None = None,
                      quantize: str = "none", dtype: str = "fp32",
                      progress: Callable[[str], None] | None = None) -> OrtExport:
    """``skiptool export SOURCE --format onnx --target ort``: resolve the model and config, then :func:`export_ort`."""
    from skiptool.config import dense_config, load_config
    from skiptool.fileio import ensure_writable_dir

    if dtype != "fp32":
        raise ConfigError("--target ort builds the CPU graph (fp32 activations); --dtype fp16 is not supported yet")
    ensure_writable_dir(out_dir)
    with tempfile.TemporaryDirectory(prefix="skiptool-hf-") as scratch:
        hf_dir = hf_directory(source, scratch)
        config = load_config(config_path) if config_path is not None else dense_config(_ConfigOnly(hf_dir), source)
        return export_ort(hf_dir, config, out_dir, quantize, progress)


class _ConfigOnly:
    """Just enough of a model for :meth:`SkipConfig.check_matches`: its Hugging Face config."""

    def __init__(self, hf_dir: str | Path) -> None:
        from transformers import AutoConfig

        try:
            self.config = AutoConfig.from_pretrained(str(hf_dir))
        except Exception as exc:  # noqa: BLE001
            raise SkipToolError(f"cannot read the model config in {hf_dir}: {str(exc).splitlines()[0]}") from None


def _check_loads(folder: Path) -> None:
    """The self-check: both graphs load in ONNX Runtime (onnx.checker rejects genai's contrib-op graphs)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    for name in (MODEL_FILE, OVERRIDE_MODEL_FILE):
        try:
            ort.InferenceSession(str(folder / name), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001
            raise SkipToolError(f"the exported {name} does not load in ONNX Runtime: {str(exc).splitlines()[0]}")


def genai_model(folder: str | Path, override: bool = False) -> Any:
    """An ``og.Model`` for an exported folder; `override` selects the graph whose skip_mask genai can set."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise MissingDependencyError("pip install --no-deps onnxruntime-genai") from None
    cfg = og.Config(str(folder))
    if override:
        cfg.overlay(OVERRIDE_OVERLAY)
    return og.Model(cfg)


def skip_mask_array(values: list[int] | np.ndarray) -> np.ndarray:
    """A skip_mask value (1 force skip, -1 force compute, 0 policy) in the graph's dtype."""
    return np.asarray(values, dtype=np.int64)
