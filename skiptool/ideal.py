"""The benchmark's arithmetic, with no backend in sight: percentiles, medians, forced skip masks, and the
ideal speedup from the weight bytes a run reads per decoded token.

:class:`IdealBasis` holds those bytes for one run; :func:`onnx_graph_bytes` counts them in an ONNX graph
(split by ``If`` branch, lookup tables excluded) and :func:`onnx_precision` names the graph's precision.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .errors import SkipToolError


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


def speedup_from_saved(total_bytes: float, ffn_bytes: float, ffn_saved: float, extra_bytes: float = 0.0) -> float:
    """Ideal decode speedup when a share `ffn_saved` of the FFN weight bytes (`ffn_bytes` over all layers) is not
    read, and `extra_bytes` (e.g. routers) are read on top of the dense `total_bytes` per token."""
    return total_bytes / (total_bytes - ffn_saved * ffn_bytes + extra_bytes)


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
    A weight both branches use counts for each branch that reads it whenever it runs: not for a branch that
    reads it only inside a further ``If`` (the ``ort`` target's stand-in for the rows that skip in a step that
    computes, which a batch-1 step never runs).
    """
    import onnx

    from .onnx_graph import graphs_by_branch

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    sizes: dict[str, int] = {}
    uses: dict[str, list[tuple[str, int, tuple[int, str] | None, bool]]] = {}  # (op, input index, branch, deeper)
    for graph, scope, nested in graphs_by_branch(model.graph):
        sizes.update({init.name: tensor_nbytes(init) for init in graph.initializer})
        for node in graph.node:
            if node.op_type == "Constant":
                sizes.update({node.output[0]: tensor_nbytes(a.t) for a in node.attribute if a.name == "value"})
            for i, name in enumerate(node.input):
                if name:
                    uses.setdefault(name, []).append((node.op_type, i, scope, nested))
    if_count = sum(1 for node in model.graph.node if node.op_type == "If")
    branch_bytes: dict[tuple[int, str], int] = {}
    outside = excluded = 0
    for name, nbytes in sizes.items():
        where = uses.get(name, [])
        if all((op, i) in LOOKUP_INPUTS for op, i, _, _ in where):  # a lookup table, or never used
            excluded += nbytes
            continue
        scopes = {scope for _, _, scope, _ in where}
        if None not in scopes and (len(scopes) == 1 or (len(scopes) == 2 and len({s[0] for s in scopes}) == 1)):
            always = {scope for _, _, scope, nested in where if not nested}
            for scope in (always if len(scopes) == 2 and always else scopes):  # read whichever branch runs
                branch_bytes[scope] = branch_bytes.get(scope, 0) + nbytes  # type: ignore[index]
        else:
            outside += nbytes
    pairs = [sorted((branch_bytes.get((i, "then_branch"), 0), branch_bytes.get((i, "else_branch"), 0)))
             for i in range(if_count)]
    return GraphBytes(outside=outside, heavy=[h for _, h in pairs], light=[lt for lt, _ in pairs], excluded=excluded)


def onnx_precision(model: Any) -> str:
    """int4 / int8 / fp16 / fp32 from the ops and weights of an ONNX graph (subgraphs included)."""
    import onnx

    from .onnx_graph import graphs_by_if, iter_nodes

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    nodes = [n for n, _ in iter_nodes(model.graph)]
    ops = {n.op_type for n in nodes}
    nbits = {next((int(a.i) for a in n.attribute if a.name == "bits"), 4) for n in nodes if n.op_type == "MatMulNBits"}
    float_types: dict[int, int] = {}
    for graph, _ in graphs_by_if(model.graph):
        for init in graph.initializer:
            float_types[init.data_type] = float_types.get(init.data_type, 0) + tensor_nbytes(init)
    if "MatMulNBits" in ops:
        return "int8" if nbits == {8} else "int4"
    if ops & {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearMatMul"}:
        return "int8"
    heaviest = max(float_types, key=float_types.get) if float_types else onnx.TensorProto.FLOAT  # type: ignore[arg-type]
    return {onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}.get(heaviest, "fp32")
