"""``export --format onnx``: one KV-cache ONNX graph in standard ops with an ``If`` per skippable FFN.

Nothing here re-implements a skip rule. The model is wrapped by :func:`skiptool.runtime.apply_skip` (the
single copy of the skip logic) in *export mode*, where each skippable layer's FFN block runs under
``torch.cond``; ``torch.onnx.export(dynamo=True)`` turns that into one ``If`` per skippable layer whose
condition is the policy's decision computed in the graph (static mask, cosine greedy-k state, router logit).
Cold layers get no ``If``. The ``skip_mask`` override flows in as a tensor (the policy's override) and the
per-token decisions flow out as ``skip_decisions``.

:func:`export_standard` is the whole target: load, trace, check (``If`` count, ``onnx.checker``), enforce
parity with the PyTorch skip runtime (:mod:`.validate`), optional quantization, then config, tokenizer,
``genai_config.json`` and the manifest — written to a temporary directory and moved into place only when all
of it worked. The ``tensorrt`` target reuses it and adds an engine.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from skiptool.adapters import cache_kwargs, kv_shape
from skiptool.config import PolicySpec, SkipConfig, dense_config, load_config
from skiptool.contract import (GENAI_CONFIG_FILE, MODEL_FILE, SKIP_MASK, ExportManifest, GraphIO, genai_io,
                               write_manifest)
from skiptool.errors import ConfigError, SkipToolError
from skiptool.fileio import atomic_directory, write_json_atomic
from skiptool.models import LoadedModel, eos_token_ids, load_model
from skiptool.onnx_graph import EXTERNAL_DATA_OVER, count_ops, graphs_by_if, iter_nodes, quiet_exporter
from skiptool.policies import NeverSkip, check_policy
from skiptool.runtime import SkipRuntime, apply_skip, open_runtime

from .target import EXPORT_TARGETS, ExportReport, ExportRequest, ExportTarget, Progress
from .validate import check_parity, enforce_parity, parity_prompt

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
                             use_cache=True, **cache_kwargs(self.model, cache))
            decisions = torch.stack([ctrl.decisions[i] for i in range(self.num_layers)])
        finally:
            ctrl.override, ctrl.record_decisions = None, False
        presents = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return (out.logits, *presents, decisions)


def _sample_inputs(model: nn.Module, num_layers: int) -> tuple[Any, ...]:
    """Batch 2, sequence 3, past 4: no axis of size 0 or 1, so none is specialised by the tracer."""
    batch, seq, past = 2, 3, 4
    kv_heads, head_dim = kv_shape(model.config)
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
    io = GraphIO(runtime.controller.stats.num_layers)
    wrapper = KVCacheDecoder(model, runtime).eval()
    ctrl = runtime.controller
    ctrl.export_mode = True
    try:
        with quiet_exporter():
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


# ------------------------------------------------------------------------------------------------
# graph checks and post-processing
# ------------------------------------------------------------------------------------------------
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
    ``MatMul(x, Transpose(W))``, and so are stand-in weights inside the ``If`` branches; ONNX Runtime keeps such a
    ``Transpose`` in every decode step, and its weight quantizer skips a ``MatMul`` whose weight is not an
    initializer (the int4 export of a core stand-in refused 168 float MatMuls in its branches). Each (weight,
    permutation) is stored once, in the main graph, whatever branch reads it. Returns how many were folded.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    folded = [n for n, _ in iter_nodes(model.graph) if n.op_type == "Transpose" and n.input[0] in inits]
    renamed: dict[str, str] = {}
    for node in folded:
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        name = f"{node.input[0]}.T" if perm in (None, [1, 0]) else f"{node.input[0]}.T{''.join(map(str, perm))}"
        if name not in inits:
            array = numpy_helper.to_array(inits[node.input[0]])
            inits[name] = numpy_helper.from_array(np.ascontiguousarray(array.transpose(perm)), name)
            model.graph.initializer.append(inits[name])
        renamed[node.output[0]] = name
    for graph, _ in list(graphs_by_if(model.graph)):
        for node in [n for n in graph.node if n.op_type == "Transpose" and n.output[0] in renamed]:
            graph.node.remove(node)
        for node in graph.node:
            node.input[:] = [renamed.get(i, i) for i in node.input]
        for out in graph.output:
            out.name = renamed.get(out.name, out.name)
    used = {i for n, _ in iter_nodes(model.graph) for i in n.input} | {o.name for o in model.graph.output}
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
# the export target
# ------------------------------------------------------------------------------------------------
Finish = Callable[[Path, ExportManifest, Progress], dict[str, Any]]


def resolve_config(lm: LoadedModel, request: ExportRequest) -> SkipConfig:
    """The config to export: the given one (checked against the model, its policy exportable), or a dense one
    with the default cold layers; ``--dense`` keeps the cold layers and drops the policy."""
    if request.config_path is not None:
        config = load_config(request.config_path)
        config.check_matches(lm.model)
        check_policy(config)
    else:
        cold = min(2, (lm.model.config.num_hidden_layers - 1) // 2)
        config = dense_config(lm.model, request.source, cold_start=cold, cold_end=cold)
    if request.dense:  # the config written beside a dense graph says what it computes: no skipping
        return config.evolve(policy=PolicySpec("none"), router=None, standin=None)
    return config


def export_standard(request: ExportRequest, progress: Progress, target: str = "onnx",
                    runtimes: tuple[str, ...] = ("onnxruntime",), finish: Finish | None = None) -> ExportReport:
    """Write `request.out_dir` (nothing half-written): graph, parity-checked, config, tokenizer, manifest.

    `finish` adds the target's own files (e.g. a TensorRT engine) into the temporary folder and returns
    details for the report.
    """
    t0 = time.perf_counter()
    progress("loading model")
    lm = load_model(request.source, dtype=request.dtype)
    config = resolve_config(lm, request)
    runtime = _runtime_for(lm, config, request.dense)
    try:
        with atomic_directory(request.out_dir) as tmp, \
                tempfile.TemporaryDirectory(dir=tmp.parent, prefix=".skiptool-x-") as scratch:
            manifest, details = _export_into(lm, config, runtime, request, target, runtimes, tmp, Path(scratch),
                                             progress)
            if finish is not None:
                details.update(finish(tmp, manifest, progress))
            _write_side_files(lm, config, tmp)
            files = tuple(sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()))
            manifest = manifest.replace(files=tuple(sorted({*files, "skiptool_export.json"})))
            write_manifest(tmp, manifest)
            details["size_bytes"] = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    finally:
        runtime.remove()
    return ExportReport(Path(request.out_dir), manifest, details, time.perf_counter() - t0)


def _export_into(lm: LoadedModel, config: SkipConfig, runtime: SkipRuntime, request: ExportRequest, target: str,
                 runtimes: tuple[str, ...], tmp: Path, scratch: Path,
                 progress: Progress) -> tuple[ExportManifest, dict[str, Any]]:
    progress("tracing the skip runtime")
    proto = trace_graph(lm.model, runtime)
    if_count = check_graph(proto, len(runtime.policy.skippable_layers))
    add_optional_skip_mask(proto, runtime.controller.stats.num_layers)
    fold_weight_transposes(proto)
    _set_metadata(proto, config, request.dense)
    progress("saving and checking the graph")
    graph = (scratch if request.quantize != "none" else tmp) / MODEL_FILE
    save_graph(proto, graph)
    del proto
    manifest = _manifest(lm, config, request, target, runtimes, if_count)
    prompt = parity_prompt(lm.tokenizer, runtime.policy.warmup, int(lm.model.config.vocab_size))
    progress("checking ONNX Runtime against PyTorch")
    checks = {"fp32" if request.dtype == "fp32" else request.dtype:
              enforce_parity(check_parity(graph, manifest, lm.model, runtime, prompt, request.parity_steps),
                             target, request.dtype, graph)}
    details: dict[str, Any] = {}
    if request.quantize != "none":
        progress(f"quantizing ({request.quantize})")
        from .quantize import quantize_graph

        details["quantized_ops_in_branches"] = quantize_graph(graph, tmp / MODEL_FILE, request.quantize)
        progress(f"checking the {request.quantize} graph against PyTorch")
        report = check_parity(tmp / MODEL_FILE, manifest, lm.model, runtime, prompt, request.parity_steps)
        checks[request.quantize] = enforce_parity(report, target, request.quantize, tmp / MODEL_FILE)
    return manifest.replace(checks=checks), details


def _runtime_for(lm: LoadedModel, config: SkipConfig, dense: bool) -> SkipRuntime:
    """The PyTorch skip runtime that is traced: the config's policy, or no skippable layer at all."""
    if dense:
        return apply_skip(lm.model, lm.adapter, NeverSkip(config.model.num_layers, [], 0))
    runtime = open_runtime(lm.model, lm.adapter, config)
    if not type(runtime.policy).exportable:
        runtime.remove()
        raise ConfigError(f"the {config.policy.kind} policy cannot be exported (its decisions are not a function of "
                          "the graph's tensors); export static, cosine or router")
    return runtime


def _set_metadata(model: onnx.ModelProto, config: SkipConfig, dense: bool) -> None:
    policy = "dense" if dense else config.policy.kind
    skippable = [] if dense else config.skippable_layers
    for key, value in (("skiptool.policy", policy), ("skiptool.skippable_layers", ",".join(map(str, skippable)))):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "skiptool"


def _manifest(lm: LoadedModel, config: SkipConfig, request: ExportRequest, target: str, runtimes: tuple[str, ...],
              if_count: int) -> ExportManifest:
    kv_heads, head_dim = kv_shape(lm.model.config)
    return ExportManifest(
        target=target, runtimes=runtimes, file=MODEL_FILE,
        precision=request.quantize if request.quantize != "none" else request.dtype,
        mode="dense" if request.dense else "skip", policy="dense" if request.dense else config.policy.kind,
        source=lm.source, num_layers=config.model.num_layers,
        skippable_layers=() if request.dense else tuple(config.skippable_layers), num_key_value_heads=kv_heads,
        head_dim=head_dim, vocab_size=int(lm.model.config.vocab_size), eos_token_ids=tuple(eos_token_ids(lm)),
        if_count=if_count)


def _write_side_files(lm: LoadedModel, config: SkipConfig, tmp: Path) -> None:
    """Skip config (with its router / stand-in weights copied beside it), tokenizer, genai_config.json."""
    config.save_with_artifacts(tmp)
    lm.tokenizer.save_pretrained(str(tmp))
    write_json_atomic(tmp / GENAI_CONFIG_FILE, genai_config(lm))


def genai_config(lm: LoadedModel) -> dict[str, Any]:
    """onnxruntime-genai's ``genai_config.json`` for the exported graph."""
    c = lm.model.config
    kv_heads, head_dim = kv_shape(c)
    eos = eos_token_ids(lm)
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


EXPORT_TARGETS.register("onnx", ExportTarget(
    "onnx", "standard ONNX ops, an If per skippable FFN; runs in ONNX Runtime (skiptool's backend) and "
    "onnxruntime-genai", export_standard))
