"""ONNX Runtime plumbing for skiptool's graphs, shared by the decode backend and the exporters' parity check.

:class:`GraphSession` runs one exported graph (standard ops, or onnxruntime-genai's fused graph) through an
``IOBinding``: ``present.*`` outputs stay where ONNX Runtime produced them (``OrtValue``s on the KV device)
and can be bound as the next call's ``past_key_values.*``; ``logits`` and ``skip_decisions`` are bound on the
host. Session options are tuned for latency (sequential execution, one inter-op thread, all graph
optimisations, a chosen intra-op thread count and spinning).

Where things run is one :class:`Placement` chosen by :func:`plan_placement` from
``onnxruntime.get_available_providers()``: with onnxruntime-gpu and a GPU, the CUDA execution provider
(then CPU) with the KV cache bound on ``cuda``; else CPU. ``skip_mask`` (the ``If`` conditions' input) and
the token inputs are always bound on the host.

``skip_mask`` is an initializer-backed optional input in the file; an ``IOBinding`` cannot address such an
input (ONNX Runtime 1.32: "Failed to find NodeArg with name: skip_mask"), so the session is built from the
graph with that initializer dropped and a mask is always bound (all zeros, the file's default, when none is
set).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .contract import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, SKIP_DECISIONS, SKIP_MASK, GraphIO
from .errors import MissingDependencyError, SkipToolError

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
HOST = "cpu"
EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"
INLINE_EXTERNAL_BYTES = 1 << 16  # external tensors up to this size are read into the graph when it is loaded
NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def onnxruntime() -> Any:
    """The ``onnxruntime`` module, or one clear error line."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingDependencyError("onnxruntime is not installed: pip install onnxruntime "
                                     "(or onnxruntime-gpu for CUDA)") from None
    return ort


def available_providers() -> list[str]:
    """ONNX Runtime's execution providers here (CUDA / TensorRT appear only with onnxruntime-gpu)."""
    try:
        return list(onnxruntime().get_available_providers())
    except MissingDependencyError:
        return []


@dataclass(frozen=True)
class Placement:
    """Execution providers and the device of every bound tensor: ``past_key_values.*`` / ``present.*`` on
    `kv_device` (``"cuda"`` on the CUDA execution provider); everything else on the host."""

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
        available = list(available if available is not None else available_providers())
        providers = [CUDA, CPU] if CUDA in available else [CPU]
    return Placement(tuple(providers), "cuda" if providers[0] == CUDA else HOST)


def session_options(threads: int | None = None, spin: bool | None = None) -> Any:
    """Latency-tuned session options; `spin` sets ``session.intra_op.allow_spinning`` (None: ORT's default)."""
    ort = onnxruntime()
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
    """The graph at `path` with its initializer-backed inputs (``skip_mask``) made plain inputs, so an
    ``IOBinding`` can address them. External weights are found through `opts` (their folder)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    from .onnx_graph import drop_initializer_inputs

    model = drop_initializer_inputs(onnx.load(str(path), load_external_data=False))
    for tensor in model.graph.initializer:  # small external tensors inline: ORT's shape inference reads them
        if uses_external_data(tensor) and _external_length(tensor) <= INLINE_EXTERNAL_BYTES:
            load_external_data_for_tensor(tensor, str(path.parent))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    opts.add_session_config_entry(EXTERNAL_DATA_FOLDER, str(path.parent.resolve()))
    return model.SerializeToString()


def _external_length(tensor: Any) -> int:
    entries = {e.key: e.value for e in tensor.external_data}
    return int(entries.get("length", 1 << 62))


@dataclass(frozen=True)
class Diagnostics:
    """What a session may write for a benchmark to read: ONNX Runtime's profile (per-node kernel times) under
    the prefix `profile`, the graph after its optimiser at `optimised`."""

    profile: Path | None = None
    optimised: Path | None = None

    def apply(self, opts: Any) -> None:
        if self.profile is not None:
            opts.enable_profiling, opts.profile_file_prefix = True, str(self.profile)
        if self.optimised is not None:
            opts.optimized_model_filepath = str(self.optimised)


def load_session(path: Path, placement: Placement, threads: int | None = None, spin: bool | None = None,
                 diagnostics: Diagnostics | None = None) -> Any:
    """An ``InferenceSession`` over :func:`bindable_graph` of `path` (one clear error line if it cannot load)."""
    ort = onnxruntime()
    opts = session_options(threads, spin)
    if diagnostics is not None:
        diagnostics.apply(opts)
    try:
        return ort.InferenceSession(bindable_graph(path, opts), opts, providers=list(placement.providers))
    except Exception as exc:  # noqa: BLE001 - a broken or missing graph is the user's input
        raise SkipToolError(f"cannot load {path} in ONNX Runtime: {str(exc).splitlines()[0]}") from None


@dataclass
class StepOutput:
    """One run: logits ``[batch, seq, vocab]`` and decisions ``[layers, batch, seq]`` on the host (decisions
    ``None`` for a graph without the output), and the presents (``OrtValue``s on the KV device)."""

    logits: np.ndarray
    decisions: np.ndarray | None
    presents: list[Any]


class GraphSession:
    """A skiptool graph in ONNX Runtime, run through an ``IOBinding`` (see the module docstring)."""

    def __init__(self, path: str | Path, io: GraphIO, kv_heads: int, head_dim: int,
                 providers: Sequence[str] | None = None, threads: int | None = None,
                 spin: bool | None = None, diagnostics: Diagnostics | None = None) -> None:
        self.path, self.io = Path(path), io
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.session = load_session(self.path, plan_placement(providers), threads, spin, diagnostics)
        self.placement = plan_placement(self.session.get_providers())  # ORT falls back to CPU without a GPU
        types = {i.name: i.type for i in self.session.get_inputs()}
        self.kv_dtype = NUMPY_TYPES.get(types.get(io.past_names()[0], ""), np.float32)
        self.has_position_ids = POSITION_IDS in types
        self.has_skip_mask = SKIP_MASK in types
        outputs = {o.name for o in self.session.get_outputs()}
        self.has_decisions = SKIP_DECISIONS in outputs
        self._outputs = [(n, self.placement.device_of(n, io)) for n in (LOGITS, *io.present_names(), SKIP_DECISIONS)
                         if n in outputs]
        self._ort = onnxruntime()
        self._binding = self.session.io_binding()

    def empty_past(self, batch: int) -> list[Any]:
        """An empty KV cache (past length 0) for `batch` sequences, on the KV device."""
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
        return [self._ort.OrtValue.ortvalue_from_numpy(empty, self.placement.kv_device) for _ in self.io.past_names()]

    def run(self, ids: np.ndarray, attention_mask: np.ndarray, positions: np.ndarray, past: Sequence[Any],
            skip_mask: np.ndarray | None = None) -> StepOutput:
        """One bound run (int64 ``ids``/``positions`` ``[batch, seq]``, ``attention_mask`` ``[batch, total]``).

        `positions` are fed only to graphs with a ``position_ids`` input (a fused graph derives them from the
        attention mask by the same rule); `skip_mask` None binds zeros (follow the policy)."""
        b = self._binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        b.bind_cpu_input(INPUT_IDS, np.ascontiguousarray(ids, dtype=np.int64))
        b.bind_cpu_input(ATTENTION_MASK, np.ascontiguousarray(attention_mask, dtype=np.int64))
        if self.has_position_ids:
            b.bind_cpu_input(POSITION_IDS, np.ascontiguousarray(positions, dtype=np.int64))
        if self.has_skip_mask:
            mask = skip_mask if skip_mask is not None else np.zeros(self.io.num_layers, dtype=np.int64)
            b.bind_cpu_input(SKIP_MASK, mask)
        for name, value in zip(self.io.past_names(), past):
            b.bind_ortvalue_input(name, value)
        for name, device in self._outputs:
            b.bind_output(name, device)
        self.session.run_with_iobinding(b)
        out = b.get_outputs()
        presents = list(out[1:1 + len(self.io.present_names())])
        decisions = out[-1].numpy() if self.has_decisions else None
        return StepOutput(out[0].numpy(), decisions, presents)


class KvCursor:
    """A growing sequence in one :class:`GraphSession`: each call appends `ids` ``[batch, n]`` (every row the same
    length, no padding) after what came before, feeding the graph its own ``present.*`` as the next call's
    ``past_key_values.*``. `skip_mask` as in :meth:`GraphSession.run`."""

    def __init__(self, graph: GraphSession, batch: int = 1) -> None:
        self.graph, self.past, self.length = graph, graph.empty_past(batch), 0

    def __call__(self, ids: np.ndarray, skip_mask: np.ndarray | None = None) -> StepOutput:
        ids = np.asarray(ids, dtype=np.int64)
        batch, n = ids.shape
        positions = np.broadcast_to(np.arange(self.length, self.length + n, dtype=np.int64), (batch, n))
        out = self.graph.run(ids, np.ones((batch, self.length + n), dtype=np.int64), positions, self.past, skip_mask)
        self.past, self.length = out.presents, self.length + n
        return out
