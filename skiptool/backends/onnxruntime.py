"""ONNX Runtime decode backend for graphs written by ``skiptool export --format onnx``.

One sequence at a time, through an ``IOBinding``: each step's ``present.*`` outputs stay where ONNX
Runtime produced them (``OrtValue``s on the KV device) and are bound as the next step's
``past_key_values.*`` inputs, never copied through numpy; ``logits`` and ``skip_decisions`` are bound to
the host and read once per step. Session options are tuned for latency (sequential execution, one
inter-op thread, all graph optimisations, a chosen intra-op thread count and spinning).

Where things run is one :class:`Placement` chosen by :func:`plan_placement` from
``onnxruntime.get_available_providers()``: with onnxruntime-gpu and a GPU, the CUDA execution provider
(then CPU) with the KV cache bound on ``cuda``; else CPU. ``skip_mask`` (the ``If`` conditions' input) and
the token inputs are always bound on the host, and ``skip_decisions`` is read there, so
:meth:`OrtBackend.skip_ratio` is the ratio the graph realised.

``skip_mask`` is an initializer-backed optional input in the file; an ``IOBinding`` cannot address such an
input (ONNX Runtime 1.32: "Failed to find NodeArg with name: skip_mask"), so the session is built from
the graph with that initializer dropped and the backend always binds a mask (all zeros, the file's
default, when none is set).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import MissingDependencyError, SkipToolError
from .base import DecisionCounter, parse_skip_mask
from ..exporters.io_names import ATTENTION_MASK, INPUT_IDS, POSITION_IDS, SKIP_MASK, GraphIO

EXPORT_INFO = "skiptool_export.json"
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
HOST = "cpu"
EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"
INLINE_EXTERNAL_BYTES = 1 << 16  # external tensors up to this size are read into the graph when it is loaded


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError("onnxruntime is not installed: pip install onnxruntime "
                                     "(or onnxruntime-gpu for CUDA)") from None
    return onnxruntime


def read_export_info(model_dir: str | Path) -> dict[str, Any]:
    """The ``skiptool_export.json`` an export wrote, with a clear error for anything else."""
    path = Path(model_dir) / EXPORT_INFO
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SkipToolError(f"{model_dir} is not a skiptool ONNX export (no {EXPORT_INFO}); "
                            "run `skiptool export --format onnx -o DIR` first") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise SkipToolError(f"cannot read {path}: {exc}") from None


@dataclass(frozen=True)
class Placement:
    """Execution providers and the device of every bound tensor.

    `kv_device` holds ``past_key_values.*`` / ``present.*`` (``"cuda"`` on the CUDA execution provider);
    everything else — token inputs, ``skip_mask`` (read on the host by the ``If`` conditions), ``logits``
    and ``skip_decisions`` — is bound on the host.
    """

    providers: tuple[str, ...]
    kv_device: str = HOST

    def device_of(self, name: str, io: GraphIO) -> str:
        """Where the tensor `name` of a graph with I/O `io` is bound."""
        kv = set(io.past_names()) | set(io.present_names())
        return self.kv_device if name in kv else HOST


def plan_placement(providers: Sequence[str] | None = None, available: Sequence[str] | None = None) -> Placement:
    """CUDA (then CPU) with the KV cache on ``cuda`` when onnxruntime-gpu sees a GPU, else CPU.

    `providers` forces a list (e.g. ``["CPUExecutionProvider"]``); `available` defaults to
    ``onnxruntime.get_available_providers()``.
    """
    if providers is None:
        available = list(available if available is not None else _ort().get_available_providers())
        providers = [CUDA, CPU] if CUDA in available else [CPU]
    return Placement(tuple(providers), "cuda" if providers[0] == CUDA else HOST)


def default_providers() -> list[str]:
    """CUDA (then CPU) when onnxruntime-gpu sees a GPU, else CPU."""
    return list(plan_placement().providers)


def session_options(threads: int | None = None, spin: bool | None = None) -> Any:
    """Latency-tuned session options; `spin` sets ``session.intra_op.allow_spinning`` (None: ORT's default)."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = int(threads)
    if spin is not None:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return opts


def bindable_graph(path: Path, opts: Any) -> bytes:
    """The graph at `path` with the ``skip_mask`` initializer dropped, so ``skip_mask`` is a plain input an
    ``IOBinding`` can address. External weights are found through `opts` (their folder)."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, load_external_data_for_tensor, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    for init in model.graph.initializer:
        if init.name == SKIP_MASK:
            model.graph.initializer.remove(init)
            break
    for tensor in _get_all_tensors(model):  # small external tensors inline: ORT's shape inference reads them
        if uses_external_data(tensor) and _external_length(tensor) <= INLINE_EXTERNAL_BYTES:
            load_external_data_for_tensor(tensor, str(path.parent))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    opts.add_session_config_entry(EXTERNAL_DATA_FOLDER, str(path.parent.resolve()))
    return model.SerializeToString()


def _external_length(tensor: Any) -> int:
    entries = {e.key: e.value for e in tensor.external_data}
    return int(entries.get("length", 1 << 62))


class OrtBackend:
    """A :class:`~skiptool.backends.base.DecodeBackend` over an exported skiptool graph."""

    name = "onnxruntime"

    def __init__(self, model_dir: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 spin: bool | None = None, skip_mask: Sequence[int] | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.info = read_export_info(model_dir)
        self.precision: str = self.info.get("precision", "fp32")
        self.mode: str = self.info.get("mode", "skip")
        self.io = GraphIO(int(self.info["num_layers"]))
        requested = plan_placement(providers)
        self.session = self._load(self.model_dir / self.info.get("file", "model.onnx"), requested, threads, spin)
        self.placement = plan_placement(self.session.get_providers())  # ORT falls back to CPU without a GPU
        self.device = self.placement.kv_device
        types = {i.name: i.type for i in self.session.get_inputs()}
        self.kv_dtype = _NUMPY_TYPES.get(types.get(self.io.past_names()[0], ""), np.float32)
        self._has_mask = SKIP_MASK in types
        self._ort = _ort()
        self._binding = self.session.io_binding()
        self._past_names = self.io.past_names()
        self._outputs = [(name, self.placement.device_of(name, self.io)) for name in self.io.output_names()]
        self.set_skip_mask(skip_mask)
        self.reset()

    @staticmethod
    def _load(path: Path, placement: Placement, threads: int | None, spin: bool | None) -> Any:
        ort = _ort()
        opts = session_options(threads, spin)
        try:
            graph = bindable_graph(path, opts)
            return ort.InferenceSession(graph, opts, providers=list(placement.providers))
        except Exception as exc:  # noqa: BLE001 - a broken or missing graph is the user's input
            raise SkipToolError(f"cannot load {path} in ONNX Runtime: {str(exc).splitlines()[0]}") from None

    # -- configuration ---------------------------------------------------------------------------
    def set_skip_mask(self, skip_mask: Sequence[int] | None) -> None:
        """Per-layer override fed to the graph: 1 force skip, -1 force compute, 0 policy (None: the default)."""
        if skip_mask is None:
            self.skip_mask = None
            return
        self.skip_mask = parse_skip_mask(skip_mask, self.io.num_layers)

    # -- DecodeBackend ---------------------------------------------------------------------------
    def reset(self) -> None:
        self._past = self._empty_past(1)
        self.length = 0
        self.last_decisions: np.ndarray | None = None
        self.counter = DecisionCounter(self.io.num_layers)

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        return self.forward(token_ids, count=False)[-1]

    def step(self, token_id: int) -> np.ndarray:
        return self.forward([int(token_id)])[-1]

    def skip_ratio(self) -> float | None:
        """Skipped (layer, token) FFN blocks over all of them since :meth:`reset` (decode steps and
        :meth:`block_logits` passes; not the prefill)."""
        return self.counter.ratio

    def per_layer_skip_ratio(self) -> list[float]:
        """Per layer, the share of counted tokens whose FFN was skipped (cold layers 0)."""
        return self.counter.per_layer()

    # -- the decode loop -------------------------------------------------------------------------
    def forward(self, token_ids: Sequence[int], count: bool = True) -> np.ndarray:
        """Append tokens to the cached sequence; return their logits ``[len(token_ids), vocab]`` (float32)."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(1, -1)
        n = ids.shape[1]
        positions = np.arange(self.length, self.length + n, dtype=np.int64)[None]
        logits, decisions, self._past = self._run(ids, np.ones((1, self.length + n), dtype=np.int64), positions,
                                                  self._past)
        self.length += n
        self.last_decisions = decisions[:, 0, :]  # [num_layers, n]
        if count:
            self.counter.add(self.last_decisions)
        return logits[0].astype(np.float32, copy=False)

    def present(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """The cached key and value of `layer` (``[1, kv_heads, length, head_dim]``)."""
        return self._past[2 * layer].numpy(), self._past[2 * layer + 1].numpy()

    def _run(self, ids: np.ndarray, attention: np.ndarray, positions: np.ndarray,
             past: list[Any]) -> tuple[np.ndarray, np.ndarray, list[Any]]:
        """One bound run: (logits, skip_decisions) read on the host, the presents left on the KV device."""
        binding = self._binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, array in ((INPUT_IDS, ids), (ATTENTION_MASK, attention), (POSITION_IDS, positions)):
            binding.bind_cpu_input(name, array)
        if self._has_mask:
            binding.bind_cpu_input(SKIP_MASK, self._mask_value())
        for name, value in zip(self._past_names, past):
            binding.bind_ortvalue_input(name, value)
        for name, device in self._outputs:
            binding.bind_output(name, device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy(), outputs[-1].numpy(), list(outputs[1:-1])

    def _mask_value(self) -> np.ndarray:
        return self.skip_mask if self.skip_mask is not None else np.zeros(self.io.num_layers, dtype=np.int64)

    def _empty_past(self, batch: int) -> list[Any]:
        kv_heads, head_dim = int(self.info["num_key_value_heads"]), int(self.info["head_dim"])
        empty = np.zeros((batch, kv_heads, 0, head_dim), dtype=self.kv_dtype)
        return [self._ort.OrtValue.ortvalue_from_numpy(empty, self.device) for _ in self.io.past_names()]

    # -- whole blocks (evaluation) ---------------------------------------------------------------
    def block_logits(self, token_ids: np.ndarray) -> np.ndarray:
        """Logits ``[n, seq, vocab]`` for a batch of token blocks ``[n, seq]`` from an empty cache (float32).

        The sequence cache is left alone; the decisions count towards :meth:`skip_ratio`. For perplexity:
        ``skiptool.evaluate.token_nll(lambda ids: torch.from_numpy(backend.block_logits(ids.numpy())), blocks)``.
        """
        ids = np.asarray(token_ids, dtype=np.int64)
        batch, seq = ids.shape
        positions = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
        logits, decisions, _ = self._run(ids, np.ones_like(ids), positions, self._empty_past(batch))
        self.last_decisions = decisions
        self.counter.add(decisions)
        return logits.astype(np.float32, copy=False)


def generate_text(backend: OrtBackend, tokenizer: Any, prompt_ids: Sequence[int], max_new_tokens: int = 64,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                  on_text: Callable[[str], None] | None = None, eos_ids: set[int] | None = None) -> Any:
    """Stream a completion through `backend` (prefill, then one token per step); a ``GenerationResult``."""
    import time

    import torch

    from ..generate import GenerationResult, _pick, _stream

    generator = torch.Generator().manual_seed(seed) if temperature > 0 else None
    eos = eos_ids if eos_ids is not None else set(backend.info.get("eos_token_ids", []))

    def pick(logits: np.ndarray) -> int:
        return int(_pick(torch.from_numpy(logits)[None], temperature, top_p, generator))

    backend.reset()
    t0 = time.perf_counter()
    tokens = [pick(backend.prefill(prompt_ids))]
    prefill_s = time.perf_counter() - t0
    text, latencies = _stream(tokenizer, tokens, "", on_text), []
    while len(tokens) < max_new_tokens and tokens[-1] not in eos:
        t0 = time.perf_counter()
        tokens.append(pick(backend.step(tokens[-1])))
        latencies.append(time.perf_counter() - t0)
        text = _stream(tokenizer, tokens, text, on_text)
    return GenerationResult(text=text, token_ids=tokens, prompt_tokens=len(prompt_ids), prefill_s=prefill_s,
                            step_latencies_s=latencies, skip_ratio=backend.skip_ratio())


def generate_from_export(model_dir: str | Path, prompt: str, raw: bool = False, max_new_tokens: int = 64,
                         temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                         on_text: Callable[[str], None] | None = None, threads: int | None = None,
                         spin: bool | None = None, skip_mask: Sequence[int] | None = None) -> Any:
    """``skiptool generate --onnx DIR``: the export's tokenizer and graph, one prompt."""
    from transformers import AutoTokenizer

    from ..generate import encode_prompt

    backend = OrtBackend(model_dir, threads=threads, spin=spin, skip_mask=skip_mask)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:  # noqa: BLE001
        raise SkipToolError(f"cannot load the tokenizer saved in {model_dir}: {str(exc).splitlines()[0]}") from None
    ids = encode_prompt(tokenizer, prompt, raw=raw)[0].tolist()
    return generate_text(backend, tokenizer, ids, max_new_tokens, temperature, top_p, seed, on_text)


def evaluate_export(model_dir: str | Path, data: Any, samples: int = 16, seq_len: int = 512,
                    progress: Callable[[str, int, int], Any] | None = None) -> Any:
    """``skiptool eval --onnx DIR``: perplexity of the exported graph with its policy against the same graph
    forced dense (``skip_mask`` all -1, which equals the dense model), on the same token blocks."""
    import torch
    from transformers import AutoTokenizer

    from ..data import token_blocks
    from ..evaluate import EvalResult, perplexity, token_nll

    backend = OrtBackend(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    blocks = token_blocks(tokenizer, data, seq_len, samples)

    def nll(mask: Sequence[int] | None, label: str) -> Any:
        backend.set_skip_mask(mask)
        backend.reset()
        step = (lambda done, total: progress(label, done, total)) if progress is not None else None
        return token_nll(lambda ids: torch.from_numpy(backend.block_logits(ids.numpy())), blocks, 1, step)

    dense = nll([-1] * backend.io.num_layers, "dense (skip_mask -1)")
    skip = nll(None, f"skip ({backend.info.get('policy')})")
    return EvalResult(perplexity(dense), perplexity(skip), backend.skip_ratio() or 0.0, backend.per_layer_skip_ratio(),
                      str(backend.info.get("policy")), int(blocks.shape[0]), int(blocks.shape[1]),
                      {"source": data.source, "part": list(data.part), "field": data.field, "split": data.split,
                       "onnx": str(model_dir)})
