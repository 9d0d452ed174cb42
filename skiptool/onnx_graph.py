"""One ONNX graph toolkit for the exporters, the quantizer, the runtimes and the ideal-bytes counter.

- walking: :func:`subgraphs`, :func:`iter_nodes` (subgraphs included), :func:`graphs_by_if` (each graph with
  the top-level ``If`` branch it sits in; :func:`graphs_by_branch` also says whether it sits deeper),
  :func:`count_ops`, :func:`op_counts`;
- editing: :func:`splice` (copy a small graph into a big one, wiring its inputs and outputs),
  :func:`toposort`, :func:`constant` (one naming scheme: ``{scope}/const/{content hash}`` for small
  constants, so identical ones are stored once and ONNX Runtime can share what depends on them),
  :func:`drop_initializer_inputs` (graph inputs backed by an initializer become plain inputs),
  :func:`legalize_bool_where`;
- exporting: :func:`quiet_exporter` (silences ``torch.onnx``'s prints and loggers for one export).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
from typing import Any, Iterable, Iterator

import onnx
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, helper

from .errors import SkipToolError

SMALL_CONSTANT_BYTES = 256
EXTERNAL_DATA_OVER = 1 << 30  # weight bytes above which graphs keep them in a .data file (protobuf caps at 2 GiB)


# -- walking ------------------------------------------------------------------------------------------
def subgraphs(node: NodeProto) -> list[GraphProto]:
    """The subgraphs a node holds (an ``If``'s branches, a ``Loop``'s or ``Scan``'s body)."""
    out: list[GraphProto] = []
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            out.append(attr.g)
        elif attr.type == AttributeProto.GRAPHS:
            out.extend(attr.graphs)
    return out


def iter_nodes(graph: GraphProto, in_branches: bool = True) -> Iterator[tuple[NodeProto, bool]]:
    """Every node of `graph` as (node, inside a subgraph?), walking subgraphs at any depth."""
    for node in graph.node:
        yield node, False
        if in_branches:
            for sub in subgraphs(node):
                yield from ((n, True) for n, _ in iter_nodes(sub))


def graphs_by_if(graph: GraphProto) -> Iterator[tuple[GraphProto, tuple[int, str] | None]]:
    """`graph` and every subgraph, each with ``(index of the top-level If, branch name)`` it sits in
    (``None`` outside any top-level ``If``). Top-level ``If`` nodes are numbered in graph order."""
    return ((g, branch) for g, branch, _ in graphs_by_branch(graph))


def graphs_by_branch(graph: GraphProto) -> Iterator[tuple[GraphProto, tuple[int, str] | None, bool]]:
    """:func:`graphs_by_if` with a third item: whether the graph sits below a further node inside its top-level
    branch (e.g. an inner ``If`` there), so it runs only when a further condition holds."""
    yield graph, None, False
    index = 0
    for node in graph.node:
        scope = None
        if node.op_type == "If":
            scope, index = index, index + 1
        for attr in node.attribute:
            branch = (scope, attr.name) if scope is not None else None
            for sub in ([attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs)):
                yield from ((g, branch, nested) for g, nested in _all_graphs(sub))


def _all_graphs(graph: GraphProto, nested: bool = False) -> Iterator[tuple[GraphProto, bool]]:
    yield graph, nested
    for node in graph.node:
        for sub in subgraphs(node):
            yield from _all_graphs(sub, True)


def count_ops(model: ModelProto, op_type: str, in_branches_only: bool = False) -> int:
    """How many `op_type` nodes the graph holds (optionally only those inside subgraphs)."""
    return sum(1 for n, inside in iter_nodes(model.graph) if n.op_type == op_type and (inside or not in_branches_only))


def op_counts(model: ModelProto, ops: Iterable[str] | None = None) -> dict[str, int]:
    """Node counts per op type, subgraphs included (only `ops`, zeros kept, when given)."""
    counts: dict[str, int] = {}
    for node, _ in iter_nodes(model.graph):
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts if ops is None else {op: counts.get(op, 0) for op in ops}


def outer_inputs(node: NodeProto) -> set[str]:
    """A node's inputs, plus the outer-scope values its subgraphs read."""
    used = set(node.input)
    for g in subgraphs(node):
        local = {i.name for i in g.initializer} | {i.name for i in g.input}
        for n in g.node:
            local.update(n.output)
        for n in g.node:
            used |= {v for v in outer_inputs(n) if v not in local}
    return used


def is_used(graph: GraphProto, value: str) -> bool:
    """Whether a node of `graph` (or one of its subgraphs) reads `value`, or the graph outputs it."""
    return any(value in outer_inputs(n) for n in graph.node) or any(value == o.name for o in graph.output)


# -- editing ------------------------------------------------------------------------------------------
def toposort(graph: GraphProto) -> None:
    """Order nodes so every value is produced before use (outer-scope uses inside subgraphs included)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for n in pending:
            if all(v in available for v in outer_inputs(n)):
                ordered.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise SkipToolError(f"cannot order the graph: {rest[0].name or rest[0].op_type} has unmet inputs")
        pending = rest
    copies = [NodeProto() for _ in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def content_name(tensor: TensorProto, scope: str) -> str | None:
    """``{scope}/const/{hash}`` for a small constant tensor (``None`` for a weight, which keeps its own name)."""
    if tensor.data_location == TensorProto.EXTERNAL or tensor.ByteSize() > SMALL_CONSTANT_BYTES:
        return None
    anonymous = TensorProto()
    anonymous.CopyFrom(tensor)
    anonymous.name = ""
    return f"{scope}/const/{hashlib.sha1(anonymous.SerializeToString(deterministic=True)).hexdigest()[:16]}"


def constant(graph: GraphProto, scope: str, dtype: int, dims: list[int], values: list[Any]) -> str:
    """A small main-graph initializer named by its content (added once); returns its name."""
    tensor = helper.make_tensor("", dtype, dims, values)
    name = content_name(tensor, scope)
    if name is None:
        raise ValueError("constant() is for small constants; add weights as named initializers")
    if not any(i.name == name for i in graph.initializer):
        tensor.name = name
        graph.initializer.append(tensor)
    return name


def splice(graph: GraphProto, sub: ModelProto, inputs: dict[str, str], outputs: dict[str, str], prefix: str,
           constant_scope: str, shape_proxy: str | None = None, nodes_into: list[NodeProto] | None = None,
           weight_prefix: str | None = None) -> None:
    """Copy `sub`'s nodes and initializers into `graph`, wiring its inputs and outputs to the given names.

    Nodes and private values get `prefix`; small constants get content names under `constant_scope` (so
    copies spliced for many layers share them); an input only read by ``Shape`` is wired to `shape_proxy`
    (a value of the same shape for every copy), so that ONNX Runtime's common-subexpression elimination can
    share the copies' layer-independent part. Bool ``Where`` is legalised (ONNX Runtime CPU lacks it).
    With `nodes_into` the nodes go there (e.g. an ``If`` branch) while initializers stay in `graph`; weights are
    named under `weight_prefix` (default `prefix`), so two splices of one module can share its weights.
    """
    missing = [i.name for i in sub.graph.input if i.name not in inputs and is_used(sub.graph, i.name)]
    if missing:
        raise SkipToolError(f"the spliced graph needs inputs the target graph does not provide: {missing}")
    if shape_proxy is not None:
        inputs = {k: shape_proxy if _only_shape_read(sub.graph, k) else v for k, v in inputs.items()}
    rename = {**inputs, **outputs}
    existing = {i.name for i in graph.initializer}
    for init in sub.graph.initializer:
        rename[init.name] = content_name(init, constant_scope) or f"{weight_prefix or prefix}/{init.name}"
        if rename[init.name] not in existing:
            existing.add(rename[init.name])
            copy = graph.initializer.add()
            copy.CopyFrom(init)
            copy.name = rename[init.name]

    def name(v: str) -> str:
        return v if not v else rename.get(v, f"{prefix}/{v}")

    target = graph.node if nodes_into is None else nodes_into
    for n in legalize_bool_where(sub):
        if subgraphs(n):
            raise SkipToolError("splicing graphs with subgraphs is not supported")
        new = NodeProto()
        new.CopyFrom(n)
        new.name = f"{prefix}/{n.name or n.op_type}"
        new.input[:] = [name(v) for v in n.input]
        new.output[:] = [name(v) for v in n.output]
        target.append(new)
    for out in sub.graph.output:  # an output that is an input or initializer itself needs an Identity
        if not any(out.name in n.output for n in sub.graph.node):
            target.append(helper.make_node("Identity", [name(out.name)], [outputs[out.name]],
                                           name=f"{prefix}/{out.name}_identity"))


def _only_shape_read(graph: GraphProto, value: str) -> bool:
    readers = [n for n in graph.node if value in n.input]
    return bool(readers) and all(n.op_type == "Shape" for n in readers) and value not in {o.name for o in graph.output}


def legalize_bool_where(model: ModelProto) -> list[NodeProto]:
    """`model`'s nodes with bool ``Where`` (no ONNX Runtime CPU kernel) rewritten as ``And``/``Not``/``Or``."""
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.value_info) + list(inferred.output)}
    nodes: list[NodeProto] = []
    for n in model.graph.node:
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


def drop_initializer_inputs(model: ModelProto, names: Iterable[str] | None = None) -> ModelProto:
    """A copy of `model` in which graph inputs backed by an initializer of the same name (``skip_mask``) are
    plain inputs: their initializers are removed (all such inputs, or those in `names`).

    ONNX Runtime hides initializer-backed inputs from ``get_inputs()`` and an ``IOBinding`` cannot address them;
    TensorRT's parser turns them into constants; onnxruntime-genai ignores values fed to them.
    """
    inputs = {i.name for i in model.graph.input}
    drop = inputs if names is None else inputs & set(names)
    out = ModelProto()
    out.CopyFrom(model)
    kept = [t for t in out.graph.initializer if t.name not in drop]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    return out


# -- exporting ----------------------------------------------------------------------------------------
EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir")


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence ``torch.onnx``'s progress prints, its loggers and warnings for one export."""
    import warnings

    loggers = [logging.getLogger(n) for n in EXPORTER_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
