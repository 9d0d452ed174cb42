"""Export a model with its skip policy to one ONNX graph: a KV-cache decoder with an ``If`` per skippable FFN.

Nothing here re-implements a skip rule. The model is wrapped by :func:`skiptool.runtime.apply_skip`
(the single copy of the skip logic) in *export mode*, where each skippable layer's FFN block runs under
``torch.cond``; ``torch.onnx.export(dynamo=True)`` turns that into one ``If`` per skippable layer whose
condition is the policy's decision computed in the graph (static mask, cosine greedy-k state, router
logit). Cold layers get no ``If``. The ``skip_mask`` override flows in as a tensor (the policy's override)
and the per-token decisions flow out as ``skip_decisions``.

:func:`export` is the whole command: load, trace, check (``If`` count, ``onnx.checker``), ORT parity against
the PyTorch skip runtime, optional quantization / TensorRT engine, then config, tokenizer and
``genai_config.json`` — written to a temporary directory and moved into place only when all of it worked.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from skiptool.config import PolicySpec, SkipConfig, dense_config, load_config
from skiptool.errors import ConfigError, SkipToolError
from skiptool.fileio import atomic_directory, write_json_atomic
from skiptool.policies import NeverSkip, RandomSkip
from skiptool.runtime import SkipRuntime, apply_skip, runtime_from_config

from .io_names import SKIP_MASK, GraphIO, genai_io

FORMATS = ("onnx", "tensorrt")
QUANTIZE = ("none", "int8", "int4")
DTYPES = ("fp32", "fp16")
MODEL_FILE = "model.onnx"
EXPORT_INFO = "skiptool_export.json"
EXTERNAL_DATA_OVER = 1 << 30  # bytes of weights above which they go to model.onnx.data (protobuf caps at 2 GiB)
OPSET = 20


# ------------------------------------------------------------------------------------------------
# the traced module
# ------------------------------------------------------------------------------------------------
class KVCacheDecoder(nn.Module):
    """Flat Optimum-style I/O around a model wrapped by ``apply_skip``: one graph for prefill and decode."""

    def __init__(self, model: nn.Module, runtime: SkipRuntime) -> None:
        super().__init__()
        self.model = model
        self._runtime = [runtime]  # not a child module (its model is already ours)
        self.num_layers = runtime.controller.stats.num_layers

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                past_key_values: tuple[Tensor, ...], skip_mask: Tensor) -> tuple[Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.num_layers):
            cache.update(past_key_values[2 * i], past_key_values[2 * i + 1], i)
        ctrl = self._runtime[0].controller
        ctrl.override, ctrl.record_decisions = skip_mask, True
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            decisions = torch.stack([ctrl.decisions[i] for i in range(self.num_layers)])
        finally:
            ctrl.override, ctrl.record_decisions = None, False
        presents = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return (out.logits, *presents, decisions)


def kv_shape(model: nn.Module) -> tuple[int, int]:
    """(kv heads, head dim) of a Hugging Face decoder."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return int(c.num_key_value_heads), int(head_dim)


def _sample_inputs(model: nn.Module, num_layers: int) -> tuple[Any, ...]:
    """Batch 2, sequence 3, past 4: no axis of size 0 or 1, so none is specialised by the tracer."""
    batch, seq, past = 2, 3, 4
    kv_heads, head_dim = kv_shape(model)
    dtype = next(model.parameters()).dtype
    ids = torch.randint(0, int(model.config.vocab_size), (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = tuple(torch.randn(batch, kv_heads, past, head_dim, dtype=dtype) for _ in range(2 * num_layers))
    return ids, mask, positions, kv, torch.zeros(num_layers, dtype=torch.int64)


def _dynamic_shapes(io: GraphIO) -> dict[str, Any]:
    """The I/O contract's dynamic axes as ``torch.export`` dims (named after the axes)."""
    from torch.export import Dim

    dims: dict[str, Any] = {}

    def to_dims(axes: dict[int, str]) -> dict[int, Any]:
        return {k: dims.setdefault(name, Dim(name, max=1 << 20)) for k, name in axes.items()}

    axes = io.dynamic_axes()
    names = io.input_names()
    return {"input_ids": to_dims(axes[names[0]]), "attention_mask": to_dims(axes[names[1]]),
            "position_ids": to_dims(axes[names[2]]),
            "past_key_values": tuple(to_dims(axes[n]) for n in io.past_names()), "skip_mask": None}


def trace_graph(model: nn.Module, runtime: SkipRuntime) -> onnx.ModelProto:
    """Trace the skip runtime (export mode, counting off) into an ONNX model with the I/O contract's names."""
    import warnings

    io = GraphIO(runtime.controller.stats.num_layers)
    wrapper = KVCacheDecoder(model, runtime).eval()
    ctrl = runtime.controller
    ctrl.export_mode = True
    try:
        with warnings.catch_warnings(), _quiet_exporter():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(wrapper, _sample_inputs(model, io.num_layers), dynamo=True,
                                        input_names=io.input_names(), output_names=io.output_names(),
                                        dynamic_shapes=_dynamic_shapes(io), opset_version=OPSET, optimize=True,
                                        verbose=False)
    except Exception as exc:  # noqa: BLE001 - surface exporter failures as one line
        raise SkipToolError(f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    finally:
        ctrl.export_mode = False
    assert program is not None
    return program.model_proto


class _quiet_exporter:
    """Silence torch.onnx's progress prints and logger chatter during one export."""

    def __enter__(self) -> None:
        import contextlib
        import io as _io
        import logging

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(_io.StringIO()))
        self._levels = {name: logging.getLogger(name).level for name in ("torch.onnx", "torch.export", "torch._dynamo")}
        for name in self._levels:
            logging.getLogger(name).setLevel(logging.ERROR)

    def __exit__(self, *exc: Any) -> None:
        import logging

        self._stack.close()
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)


# ------------------------------------------------------------------------------------------------
# graph checks and post-processing
# ------------------------------------------------------------------------------------------------
def iter_nodes(graph: onnx.GraphProto, in_branches: bool = True) -> Iterator[tuple[onnx.NodeProto, bool]]:
    """Every node of `graph` as (node, inside an ``If`` branch?), walking subgraphs."""
    for node in graph.node:
        yield node, False
        if in_branches:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from ((n, True) for n, _ in iter_nodes(attr.g))


def count_ops(model: onnx.ModelProto, op_type: str, in_branches_only: bool = False) -> int:
    """How many `op_type` nodes the graph holds (optionally only those inside ``If`` branches)."""
    return sum(1 for n, inside in iter_nodes(model.graph) if n.op_type == op_type and (inside or not in_branches_only))


def add_optional_skip_mask(model: onnx.ModelProto, num_layers: int) -> None:
    """Back the ``skip_mask`` input by an all-zeros initializer so callers may omit it."""
    from onnx import numpy_helper

    if not any(i.name == SKIP_MASK for i in model.graph.input):
        raise SkipToolError("exported graph has no skip_mask input")
    if not any(t.name == SKIP_MASK for t in model.graph.initializer):
        model.graph.initializer.append(numpy_helper.from_array(np.zeros(num_layers, dtype=np.int64), SKIP_MASK))


def fold_weight_transposes(model: onnx.ModelProto) -> int:
    """Store transposed copies of weights that the graph would otherwise transpose at every run.

    A tied LM head (``lm_head.weight`` is the embedding table, read by ``Gather`` too) is exported as
    ``MatMul(x, Transpose(W))``; ONNX Runtime keeps that ``Transpose`` of the whole table in every
    decode step. Returns how many were folded.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    folded = [n for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in inits]
    for node in folded:
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        array = numpy_helper.to_array(inits[node.input[0]])
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array.transpose(perm)),
                                                               node.output[0]))
        model.graph.node.remove(node)
    used = {i for n, _ in iter_nodes(model.graph) for i in n.input}
    for name in {n.input[0] for n in folded} - used:  # an untied weight now lives only transposed
        model.graph.initializer.remove(inits[name])
    return len(folded)


def check_graph(model: onnx.ModelProto, expected_ifs: int) -> int:
    """The exporter's self-check: one ``If`` per skippable layer, none nested. Returns the count."""
    top = sum(1 for n in model.graph.node if n.op_type == "If")
    total = count_ops(model, "If")
    if top != expected_ifs or total != top:
        raise SkipToolError(f"exported graph has {top} If nodes ({total - top} nested), expected {expected_ifs} "
                            "(one per skippable layer)")
    return top


def save_graph(model: onnx.ModelProto, path: Path) -> None:
    """Save (weights in ``model.onnx.data`` when large) and run the full ``onnx.checker`` on the file."""
    weights = sum(t.ByteSize() for t in model.graph.initializer)
    external = weights > EXTERNAL_DATA_OVER
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001
        raise SkipToolError(f"exported graph fails onnx.checker: {str(exc).splitlines()[0]}") from None


# ------------------------------------------------------------------------------------------------
# the export command
# ------------------------------------------------------------------------------------------------
@dataclass
class ExportReport:
    """What an export wrote and checked."""

    out_dir: str
    format: str
    dtype: str
    quantize: str
    policy: str
    mode: str  # "skip" (an If per skippable layer) or "dense" (no If)
    skippable_layers: list[int]
    if_count: int
    quantized_ops_in_branches: int | None
    size_bytes: int
    export_s: float
    parity: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export(source: str, out_dir: str | Path, config_path: str | Path | None = None, fmt: str = "onnx",
           quantize: str = "none", dtype: str = "fp32", dense: bool = False, parity_steps: int = 32,
           progress: Any = None) -> ExportReport:
    """Export `source` with the policy of `config_path` (or no ``If`` at all if `dense`) to `out_dir`."""
    _check_choices(fmt, quantize, dtype)
    if fmt == "tensorrt":
        from .tensorrt import require_tensorrt

        require_tensorrt()
    if config_path is None and not dense:
        raise ConfigError("export needs --config (a skip config) or --dense (a graph without any If)")
    config = load_config(config_path) if config_path is not None else None
    from skiptool.models import load_model

    say = progress or (lambda message: None)
    say("loading model")
    lm = load_model(source, dtype=dtype)
    if config is not None:
        config.check_matches(lm.model)
    if config is None:
        cold = min(2, (lm.model.config.num_hidden_layers - 1) // 2)
        config = dense_config(lm.model, source, cold_start=cold, cold_end=cold)
    if dense:  # the config written beside a dense graph says what it computes: no skipping
        config = config.evolve(policy=PolicySpec("none"), router=None, standin=None)
    with atomic_directory(out_dir) as tmp, tempfile.TemporaryDirectory(dir=tmp.parent, prefix=".skiptool-x-") as x:
        return _export_into(lm, config, dense, fmt, quantize, dtype, parity_steps, tmp, Path(x), Path(out_dir), say)


def _check_choices(fmt: str, quantize: str, dtype: str) -> None:
    for value, allowed, what in ((fmt, FORMATS, "format"), (quantize, QUANTIZE, "quantize"), (dtype, DTYPES, "dtype")):
        if value not in allowed:
            raise SkipToolError(f"unknown {what} {value!r} (expected one of {', '.join(allowed)})")
    if quantize != "none" and dtype != "fp32":
        raise SkipToolError("--quantize int8/int4 starts from the fp32 graph; use it with --dtype fp32")


def _export_into(lm: Any, config: SkipConfig, dense: bool, fmt: str, quantize: str, dtype: str, parity_steps: int,
                 tmp: Path, scratch: Path, out_dir: Path, say: Any) -> ExportReport:
    t0 = time.perf_counter()
    runtime = _runtime_for(lm, config, dense)
    try:
        say("tracing the skip runtime")
        proto = trace_graph(lm.model, runtime)
        expected = len(runtime.policy.skippable_layers)
        if_count = check_graph(proto, expected)
        add_optional_skip_mask(proto, runtime.controller.stats.num_layers)
        fold_weight_transposes(proto)
        _set_metadata(proto, config, dense)
        say("saving and checking the graph")
        graph = (scratch if quantize != "none" else tmp) / MODEL_FILE
        save_graph(proto, graph)
        del proto
        info = _export_info(lm, config, dense, dtype, quantize, fmt, if_count)
        write_json_atomic(graph.parent / EXPORT_INFO, info)
        say("checking ONNX Runtime against PyTorch")
        from .validate import check_parity

        parity = {"graph": check_parity(graph.parent, lm.model, runtime, steps=parity_steps).to_dict()}
        q_ops = None
        if quantize != "none":
            say(f"quantizing ({quantize})")
            from .quantize import quantize_graph

            q_ops = quantize_graph(graph, tmp / MODEL_FILE, quantize)
            write_json_atomic(tmp / EXPORT_INFO, info)
            parity["quantized"] = check_parity(tmp, lm.model, runtime, steps=parity_steps).to_dict()
    finally:
        runtime.remove()
    if fmt == "tensorrt":
        say("building the TensorRT engine")
        from .tensorrt import build_engine

        build_engine(tmp / MODEL_FILE, tmp / "model.engine", fp16=dtype == "fp16")
    _write_side_files(lm, config, tmp)
    report = ExportReport(str(out_dir), fmt, dtype, quantize, "dense" if dense else config.policy.kind,
                          "dense" if dense else "skip", list(runtime.policy.skippable_layers), if_count, q_ops,
                          _dir_size(tmp), time.perf_counter() - t0, parity,
                          sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()))
    write_json_atomic(tmp / EXPORT_INFO, {**info, "report": report.to_dict()})
    return report


def _runtime_for(lm: Any, config: SkipConfig, dense: bool) -> SkipRuntime:
    """The PyTorch skip runtime that is traced: the config's policy, or no skippable layer at all."""
    if dense:
        num_layers = config.model.num_layers
        return apply_skip(lm.model, lm.adapter, NeverSkip(num_layers, [], 0))
    runtime = runtime_from_config(lm.model, lm.adapter, config)
    if isinstance(runtime.policy, RandomSkip):
        runtime.remove()
        raise ConfigError("the random policy is a baseline that cannot be exported (its decisions are random "
                          "draws, not a function of the graph's tensors); export static, cosine or router")
    return runtime


def _set_metadata(model: onnx.ModelProto, config: SkipConfig, dense: bool) -> None:
    policy = "dense" if dense else config.policy.kind
    skippable = [] if dense else config.skippable_layers
    for key, value in (("skiptool.policy", policy), ("skiptool.skippable_layers", ",".join(map(str, skippable)))):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "skiptool"


def _export_info(lm: Any, config: SkipConfig, dense: bool, dtype: str, quantize: str, fmt: str,
                 if_count: int) -> dict[str, Any]:
    """``skiptool_export.json``: what the ORT backend needs to drive the graph."""
    kv_heads, head_dim = kv_shape(lm.model)
    return {"format": fmt, "file": MODEL_FILE, "dtype": dtype, "quantize": quantize,
            "precision": quantize if quantize != "none" else dtype, "mode": "dense" if dense else "skip",
            "policy": "dense" if dense else config.policy.kind, "source": lm.source,
            "num_layers": config.model.num_layers, "skippable_layers": [] if dense else config.skippable_layers,
            "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": int(lm.model.config.vocab_size),
            "eos_token_ids": sorted(_eos_ids(lm)), "if_count": if_count}


def _write_side_files(lm: Any, config: SkipConfig, tmp: Path) -> None:
    """Skip config (with its router / stand-in weights copied beside it), tokenizer, genai_config.json."""
    config.save_with_artifacts(tmp)
    lm.tokenizer.save_pretrained(str(tmp))
    write_json_atomic(tmp / "genai_config.json", genai_config(lm))


def genai_config(lm: Any) -> dict[str, Any]:
    """onnxruntime-genai's ``genai_config.json`` for the exported graph."""
    c = lm.model.config
    kv_heads, head_dim = kv_shape(lm.model)
    eos = sorted(_eos_ids(lm))
    context = int(getattr(c, "max_position_embeddings", 2048))
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else eos[0] if eos else 0
    return {
        "model": {
            "bos_token_id": c.bos_token_id, "context_length": context,
            "decoder": {"session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                        "filename": MODEL_FILE, "head_size": head_dim, "hidden_size": int(c.hidden_size),
                        **genai_io(), "num_attention_heads": int(c.num_attention_heads),
                        "num_hidden_layers": int(c.num_hidden_layers), "num_key_value_heads": kv_heads},
            "eos_token_id": eos[0] if len(eos) == 1 else eos, "pad_token_id": pad, "type": c.model_type,
            "vocab_size": int(c.vocab_size),
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def _eos_ids(lm: Any) -> set[int]:
    from skiptool.generate import _eos_ids as eos_ids

    return eos_ids(lm.model, lm.tokenizer)


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
