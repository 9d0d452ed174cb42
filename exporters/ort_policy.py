"""The skip policy as nodes of onnxruntime-genai's fused graph (for the ``ort`` target).

Nothing here writes a skip rule: each piece is the policy's own PyTorch code exported with ``torch.onnx`` on
the signals the fused graph has and spliced in (:func:`skiptool.onnx_graph.splice`):

- positions: :func:`skiptool.policies.positions_from_mask` on the graph's ``attention_mask`` (the fused graph
  has no ``position_ids`` input; the rule is the one every other path uses);
- a signal-free policy (static mask, dense + override): :meth:`SkipPolicy.decide_all` once for every layer;
  each layer then reads its condition with one ``Gather``;
- otherwise the gating every policy shares (warm-up and the ``skip_mask`` override) once for every layer, as a
  bias on the policy's score (:meth:`SkipPolicy.gate_bias`), and per skippable layer only the policy's score on the
  layer's taps plus that layer's bias (:meth:`SkipPolicy.gated_score`, equal to :meth:`SkipPolicy.decide` by
  construction), and for stateful policies :meth:`SkipPolicy.init_state` / :meth:`SkipPolicy.update`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from onnx import GraphProto, ModelProto, TensorProto, helper
from torch import Tensor, nn

from skiptool.contract import ATTENTION_MASK, INPUT_IDS, SKIP_DECISIONS, SKIP_MASK
from skiptool.onnx_graph import constant, quiet_exporter, splice
from skiptool.policies import LayerSignals, SkipPolicy, positions_from_mask

SCOPE = "/model/skip_policy"  # node names of the policy's shared nodes, and the scope of shared constants
LAYER_SCOPE = "/model/layers.%d/skip_policy"  # node names of one layer's decision
_LAYER_NODE = re.compile(r"/model/layers\.(\d+)/skip_policy/")


def policy_nodes_by_layer(model: ModelProto) -> Counter[int | None]:
    """Nodes of the main graph that the policy added, by layer (None: shared by every layer). Works on a graph
    ONNX Runtime has optimised too: its fused nodes keep the name of a node they replace."""
    counts: Counter[int | None] = Counter()
    for node in model.graph.node:
        layer = _LAYER_NODE.search(node.name)
        if layer is not None:
            counts[int(layer.group(1))] += 1
        elif SCOPE + "/" in node.name:
            counts[None] += 1
    return counts


@dataclass(frozen=True)
class LayerTaps:
    """Value names of one layer's skip signals in onnxruntime-genai's graph."""

    layer: int
    h_in: str  # residual stream entering the layer
    attn_delta: str  # o_proj output
    h_mid: str  # residual sum leaving the post-attention norm (output_3)
    x: str  # the FFN's normalised input (output_0)
    ffn_out: str  # the MLP's output (the next norm's skip input)


# -- the policy's code, as modules to export ------------------------------------------------------------
class _Positions(nn.Module):
    def forward(self, attention_mask: Tensor, input_ids: Tensor) -> Tensor:
        return positions_from_mask(attention_mask, input_ids.shape[1])


class _GateAll(nn.Module):
    """Every layer's gating at once, exactly :meth:`SkipPolicy.gate_bias`: ``[layers, batch, seq]``."""

    def __init__(self, policy: SkipPolicy) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, positions: Tensor, override: Tensor) -> Tensor:
        return self.policy.gate_bias(positions, override.view(-1, 1, 1))


class _Decide(nn.Module):
    """One layer's decision from its taps and its gating bias (:meth:`SkipPolicy.gated_score`), plus the batch
    condition "every token skips"."""

    def __init__(self, policy: SkipPolicy, layer: int) -> None:
        super().__init__()
        self.policy, self.layer = policy, layer

    def forward(self, h_in: Tensor, attn_delta: Tensor, h_mid: Tensor, x: Tensor, positions: Tensor,
                gates: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        signals = LayerSignals(self.layer, h_in, attn_delta, h_mid, x, positions)
        z = self.policy.gated_score(signals, state, gates[self.layer])
        return z.min() > 0, z > 0


class _DecideAll(nn.Module):
    """Every layer's decision at once, exactly :meth:`SkipPolicy.decide_all` (cold layers' rows kept false)."""

    def __init__(self, policy: SkipPolicy) -> None:
        super().__init__()
        self.policy = policy
        skippable = torch.zeros(policy.num_layers, 1, 1, dtype=torch.bool)
        skippable[policy.skippable_layers] = True
        self.register_buffer("skippable", skippable, persistent=False)

    def forward(self, positions: Tensor, override: Tensor) -> tuple[Tensor, Tensor]:
        skip = self.policy.decide_all(positions, override)
        assert skip is not None
        skip = skip & self.skippable
        return skip.flatten(1).all(1), skip


class _Update(nn.Module):
    """One layer's state update, exactly :meth:`SkipPolicy.update` (a cold layer passes no decision)."""

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


def export_small(module: nn.Module, args: dict[str, Tensor], outputs: list[str], opset: int,
                 axes: dict[str, dict[int, str]] | None = None) -> ModelProto:
    """Export a small module; 2-D+ inputs get dynamic ``batch``/``seq`` axes unless `axes` names them."""
    dims: dict[str, Any] = {}

    def dim(name: str) -> Any:
        return dims.setdefault(name, torch.export.Dim(name))

    dynamic = {}
    for k, v in args.items():
        named = (axes or {}).get(k) or ({0: "batch", 1: "seq"} if v.dim() >= 2 else None)
        dynamic[k] = None if named is None else {i: dim(n) for i, n in named.items()}
    with quiet_exporter():
        program = torch.onnx.export(module.eval(), (), kwargs=args, dynamo=True, opset_version=opset,
                                    input_names=list(args), output_names=outputs, dynamic_shapes=dynamic,
                                    verbose=False, optimize=True)
    return program.model_proto


# -- splicing them in -------------------------------------------------------------------------------------
class PolicyNodes:
    """Adds one policy's decisions to a fused graph: positions once, then per layer a condition ``[]`` and a
    per-token decision, and at the end the ``skip_decisions`` output ``[layers, batch, seq]``."""

    def __init__(self, graph: GraphProto, policy: SkipPolicy, hidden: int, io_dtype: torch.dtype, opset: int,
                 h_proxy: str) -> None:
        self.graph, self.policy, self.opset, self.h_proxy = graph, policy, opset, h_proxy
        self.h = torch.zeros(2, 3, hidden, dtype=io_dtype)
        self.fresh = lambda: torch.randn(2, 3, hidden).to(io_dtype)  # distinct tensors: no aliasing in export
        self.pos, self.override = torch.arange(3).repeat(2, 1), torch.zeros(policy.num_layers, dtype=torch.int64)
        self.positions = self._splice_positions()
        self.all_layers = self._splice_decide_all()
        self.gates = self._splice_gates() if self.all_layers is None else None
        self.state: str | None = None
        self.layer_skips: dict[int, str] = {}

    @property
    def signal_free(self) -> bool:
        return self.all_layers is not None

    def _splice(self, module: nn.Module, args: dict[str, Tensor], inputs: dict[str, str], outputs: dict[str, str],
                prefix: str, axes: dict[str, dict[int, str]] | None = None, shape_proxy: str | None = None) -> None:
        sub = export_small(module, args, list(outputs), self.opset, axes)
        splice(self.graph, sub, inputs, outputs, prefix, SCOPE, shape_proxy=shape_proxy)

    def _splice_positions(self) -> str:
        out = f"{SCOPE}/positions"
        args = {"attention_mask": torch.ones(2, 5, dtype=torch.int64), "input_ids": torch.zeros(2, 3, dtype=torch.int64)}
        self._splice(_Positions(), args, {ATTENTION_MASK: ATTENTION_MASK, INPUT_IDS: INPUT_IDS}, {"positions": out},
                     f"{SCOPE}/positions", axes={"attention_mask": {0: "batch", 1: "total"},
                                                 "input_ids": {0: "batch", 1: "seq"}})
        return out

    def _splice_decide_all(self) -> tuple[str, str, str] | None:
        """``(cond [layers], skip [layers, b, s], skip rows [layers, b, s, 1])`` of a signal-free policy."""
        if self.policy.decide_all(self.pos, self.override) is None:
            return None
        out = (f"{SCOPE}/all/cond", f"{SCOPE}/all/skip", f"{SCOPE}/all/skip_rows")
        self._splice(_DecideAll(self.policy), {"positions": self.pos, "override": self.override},
                     {"positions": self.positions, "override": SKIP_MASK}, {"cond": out[0], "skip": out[1]},
                     f"{SCOPE}/all")
        self.graph.node.append(helper.make_node("Unsqueeze", [out[1], self.last_axis()], [out[2]], name=out[2]))
        return out

    def _splice_gates(self) -> str:
        """Every layer's gating bias ``[layers, batch, seq]``, computed once per run."""
        out = f"{SCOPE}/gates"
        self._splice(_GateAll(self.policy), {"positions": self.pos, "override": self.override},
                     {"positions": self.positions, "override": SKIP_MASK}, {"gates": out}, f"{SCOPE}/gates")
        return out

    def last_axis(self) -> str:
        return constant(self.graph, SCOPE, TensorProto.INT64, [1], [-1])

    def init_state(self, h_in: str) -> None:
        """Splice the policy's initial state (stateful policies only), computed from the first layer's input."""
        if self.policy.init_state(self.h) is None:
            return
        self.state = f"{SCOPE}/state.init"
        self._splice(_InitState(self.policy), {"h": self.h}, {"h": h_in}, {"state": self.state},
                     f"{SCOPE}/init_state")

    def decide(self, t: LayerTaps) -> tuple[str, str, str | None]:
        """A skippable layer's ``(condition [], decision, layer index)``: the decision is the layer's own
        ``[batch, seq]`` (index None), or for a signal-free policy the all-layer rows ``[layers, batch, seq, 1]``
        that the layer's compute branch indexes with the scalar int64 value `index`."""
        pre = LAYER_SCOPE % t.layer
        if self.all_layers is not None:
            index = f"{pre}/index"
            self.graph.initializer.append(helper.make_tensor(index, TensorProto.INT64, [], [t.layer]))
            cond = f"{pre}/cond"
            self.graph.node.append(helper.make_node("Gather", [self.all_layers[0], index], [cond], name=cond, axis=0))
            return cond, self.all_layers[2], index
        gates = self.policy.gate_bias(self.pos, self.override.view(-1, 1, 1))
        args = dict(h_in=self.fresh(), attn_delta=self.fresh(), h_mid=self.fresh(), x=self.fresh(), positions=self.pos,
                    gates=gates)
        names = dict(h_in=t.h_in, attn_delta=t.attn_delta, h_mid=t.h_mid, x=t.x, positions=self.positions,
                     gates=str(self.gates))
        if self.state is not None:
            args["state"], names["state"] = self.policy.init_state(self.h), self.state
        cond, skip = f"{pre}/cond", f"{pre}/skip"
        self._splice(_Decide(self.policy, t.layer), args, names, {"cond": cond, "skip": skip}, f"{pre}/decide",
                     axes={"gates": {1: "batch", 2: "seq"}}, shape_proxy=self.h_proxy)
        self.layer_skips[t.layer] = skip
        return cond, skip, None

    def update(self, t: LayerTaps) -> None:
        """After layer `t.layer`'s FFN block: the new state (stateful policies only)."""
        if self.state is None:
            return
        pre = LAYER_SCOPE % t.layer
        args: dict[str, Tensor] = dict(h_mid=torch.randn_like(self.h), delta=torch.randn_like(self.h),
                                       state=self.policy.init_state(self.h))
        names = dict(h_mid=t.h_mid, delta=t.ffn_out, state=self.state)
        if t.layer in self.layer_skips:
            args["skip"], names["skip"] = torch.zeros(self.h.shape[:2], dtype=torch.bool), self.layer_skips[t.layer]
        out = f"{pre}/state"
        self._splice(_Update(self.policy, t.layer), args, names, {"new_state": out}, f"{pre}/update")
        self.state = out

    def add_decisions_output(self) -> None:
        """``skip_decisions`` (bool ``[layers, batch, seq]``, cold layers false), as every skiptool graph has."""
        g, out = self.graph, SKIP_DECISIONS
        if self.all_layers is not None:
            g.node.append(helper.make_node("Identity", [self.all_layers[1]], [out], name=f"{SCOPE}/decisions"))
        else:
            cold = f"{SCOPE}/cold_decision"
            g.node.append(helper.make_node("Shape", [self.positions], [f"{cold}/shape"], name=f"{cold}/shape"))
            g.node.append(helper.make_node("ConstantOfShape", [f"{cold}/shape"], [cold], name=cold,
                                           value=helper.make_tensor("value", TensorProto.BOOL, [1], [False])))
            per_layer = [self.layer_skips.get(i, cold) for i in range(self.policy.num_layers)]
            g.node.append(helper.make_node("SequenceConstruct", per_layer, [f"{SCOPE}/decision_seq"],
                                           name=f"{SCOPE}/decision_seq"))
            g.node.append(helper.make_node("ConcatFromSequence", [f"{SCOPE}/decision_seq"], [out],
                                           name=f"{SCOPE}/decisions", axis=0, new_axis=1))
        g.output.append(helper.make_tensor_value_info(out, TensorProto.BOOL, [self.policy.num_layers, "batch_size",
                                                                               "sequence_length"]))
