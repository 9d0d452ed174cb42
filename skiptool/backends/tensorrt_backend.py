"""TensorRT decode backend for engines written by ``skiptool export --format tensorrt`` (``DIR/model.engine``).

One sequence at a time, KV cache on the GPU. Every step: the host builds ``input_ids`` / ``attention_mask``
/ ``position_ids`` (and ``skip_mask``), copies them to the device, sets each input's shape on the execution
context, asks the context for the output shapes that follow, allocates the outputs as torch CUDA tensors,
points the context at every buffer and enqueues the engine on a private CUDA stream. The ``present.*``
outputs of one step are the ``past_key_values.*`` inputs of the next (the two sets alternate: nothing is
copied, the past grows by the new tokens each step). Buffers are torch tensors, so no pycuda is needed.

TensorRT 10 Python API used (checked against NVIDIA/TensorRT v10.0.0, ``python/src/infer/pyCore.cpp`` and
``python/docstrings/infer/pyCoreDoc.h``, and ``include/NvInferRuntime.h``): ``trt.Logger``, ``trt.Runtime``,
``Runtime.deserialize_cuda_engine``, ``ICudaEngine.num_io_tensors`` / ``get_tensor_name`` /
``get_tensor_mode`` / ``get_tensor_dtype`` / ``get_tensor_location`` / ``get_tensor_profile_shape`` /
``create_execution_context``, ``IExecutionContext.set_input_shape`` / ``get_tensor_shape`` /
``set_tensor_address`` / ``execute_async_v3(stream_handle)``. Every input needs a non-null, 256-byte
aligned address, also an empty one (the past before the prompt), hence the small placeholder buffer.

The pure planning (which tensors go in and out, host feeds and shapes per step, the past/present
rotation) is in plain functions, testable without TensorRT; only :func:`load_engine` and
:meth:`TrtBackend.from_export` need ``tensorrt`` and CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..accelerators import require_tensorrt, tensorrt_unavailable
from ..contract import (ATTENTION_MASK, ENGINE_FILE, INPUT_IDS, LOGITS, POSITION_IDS, SKIP_DECISIONS, SKIP_MASK,
                        ExportManifest, GraphIO, read_manifest)
from ..errors import SkipToolError
from .base import DecisionCounter, parse_skip_mask
from .registry import RUNTIMES, RunOptions, Runtime

__all__ = ["TrtBackend", "tensorrt_unavailable"]

# TensorRT DataType member names (trt.DataType.<NAME>) -> torch dtype names
_TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
                 "INT64": "int64", "BOOL": "bool", "UINT8": "uint8"}
_PLACEHOLDER_BYTES = 256  # the address TensorRT gets for an empty tensor (it must not be null)


# ------------------------------------------------------------------------------------------------
# planning (no TensorRT needed)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineIO:
    """The engine's I/O tensors, checked against the export's I/O contract."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    has_skip_mask: bool
    has_decisions: bool


def engine_io(modes: Mapping[str, str], io: GraphIO) -> EngineIO:
    """Split the engine's tensors (name -> ``"INPUT"`` / ``"OUTPUT"``) and check them against `io`.

    ``skip_mask`` and ``skip_decisions`` are optional (an engine built from a graph whose ``skip_mask`` was
    a constant has no override input); everything else the contract names must be there.
    """
    inputs = tuple(n for n, m in modes.items() if m == "INPUT")
    outputs = tuple(n for n, m in modes.items() if m == "OUTPUT")
    need_in = [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *io.past_names()]
    need_out = [LOGITS, *io.present_names()]
    missing = [n for n in need_in if n not in inputs] + [n for n in need_out if n not in outputs]
    unknown = [n for n in inputs if n not in (*need_in, SKIP_MASK)]
    if missing or unknown:
        what = "; ".join(filter(None, [f"missing {', '.join(missing[:4])}" if missing else "",
                                       f"unexpected inputs {', '.join(unknown[:4])}" if unknown else ""]))
        raise SkipToolError(f"the TensorRT engine does not follow the skiptool I/O contract for "
                            f"{io.num_layers} layers: {what}")
    return EngineIO(inputs, outputs, SKIP_MASK in inputs, SKIP_DECISIONS in outputs)


def step_feeds(length: int, token_ids: Sequence[int], skip_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Host inputs for appending `token_ids` to a cached sequence of `length` tokens (batch 1, int64)."""
    ids = np.asarray(token_ids, dtype=np.int64).reshape(1, -1)
    n = ids.shape[1]
    feeds = {INPUT_IDS: ids, ATTENTION_MASK: np.ones((1, length + n), dtype=np.int64),
             POSITION_IDS: np.arange(length, length + n, dtype=np.int64)[None]}
    if skip_mask is not None:
        feeds[SKIP_MASK] = np.asarray(skip_mask, dtype=np.int64).reshape(-1)
    return feeds


def past_shape(length: int, kv_heads: int, head_dim: int) -> tuple[int, int, int, int]:
    """``[batch 1, kv_heads, length, head_dim]``: a past (and, with the new tokens, a present) tensor."""
    return (1, kv_heads, length, head_dim)


def step_input_shapes(io: GraphIO, length: int, n: int, kv_heads: int, head_dim: int,
                      skip_mask: bool) -> dict[str, tuple[int, ...]]:
    """The shape of every engine input when `n` tokens follow a past of `length` tokens."""
    shapes: dict[str, tuple[int, ...]] = {INPUT_IDS: (1, n), ATTENTION_MASK: (1, length + n), POSITION_IDS: (1, n)}
    shapes.update({name: past_shape(length, kv_heads, head_dim) for name in io.past_names()})
    if skip_mask:
        shapes[SKIP_MASK] = (io.num_layers,)
    return shapes


def rotate(io: GraphIO, outputs: Mapping[str, Any]) -> dict[str, Any]:
    """Next step's ``past_key_values.*`` inputs: this step's ``present.*`` outputs, in the same order."""
    return {past: outputs[present] for past, present in zip(io.past_names(), io.present_names())}


def context_limit(profile_max_mask_shape: Sequence[int]) -> int:
    """Longest sequence (past + new tokens) the engine's profile allows: ``attention_mask``'s max length."""
    return int(profile_max_mask_shape[1])


# ------------------------------------------------------------------------------------------------
# TensorRT and CUDA
# ------------------------------------------------------------------------------------------------
def locate_engine(path: str | Path) -> tuple[Path, Path]:
    """(engine file, export directory) from an engine file or an export directory holding one."""
    path = Path(path)
    engine = path / ENGINE_FILE if path.is_dir() else path
    if not engine.is_file():
        raise SkipToolError(f"no TensorRT engine at {engine}; build one with "
                            "`skiptool export --format tensorrt -o DIR` (on a machine with TensorRT and a GPU)")
    return engine, engine.parent


def load_engine(engine_path: Path) -> Any:
    """Deserialize a TensorRT engine (needs ``tensorrt`` and CUDA)."""
    trt = require_tensorrt("running a TensorRT engine")
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise SkipToolError(f"TensorRT could not load {engine_path} (built by another TensorRT version or GPU?)")
    return engine


def _enum_name(value: Any) -> str:
    """``trt.TensorIOMode.INPUT`` -> ``"INPUT"`` (pybind11 enums have ``.name``)."""
    return str(getattr(value, "name", value)).rsplit(".", 1)[-1]


def torch_dtype(trt_dtype: Any) -> Any:
    """The torch dtype of a TensorRT ``DataType``."""
    import torch

    name = _TORCH_DTYPES.get(_enum_name(trt_dtype))
    if name is None:
        raise SkipToolError(f"the TensorRT engine uses data type {_enum_name(trt_dtype)}, which this backend "
                            "cannot hold in a torch tensor")
    return getattr(torch, name)


# ------------------------------------------------------------------------------------------------
# the backend
# ------------------------------------------------------------------------------------------------
class TrtBackend:
    """A :class:`~skiptool.backends.base.DecodeBackend` over a deserialized TensorRT engine.

    `engine` is a ``tensorrt.ICudaEngine`` (or anything with the methods listed in the module docstring);
    `manifest` is the export's. `device` is ``"cuda"`` for a real engine.
    """

    name = "tensorrt"

    def __init__(self, engine: Any, manifest: ExportManifest, device: str = "cuda",
                 skip_mask: Sequence[int] | None = None) -> None:
        import torch

        self.engine, self.manifest = engine, manifest
        self.precision, self.mode = manifest.precision, manifest.mode
        self.io = manifest.io
        self.kv_heads, self.head_dim = manifest.num_key_value_heads, manifest.head_dim
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.plan = engine_io({n: _enum_name(engine.get_tensor_mode(n)) for n in names}, self.io)
        self.dtypes = {n: torch_dtype(engine.get_tensor_dtype(n)) for n in names}
        self.device = torch.device(device)
        self.on_host = {n for n in self.plan.inputs if _enum_name(engine.get_tensor_location(n)) == "HOST"}
        self.max_length = context_limit(engine.get_tensor_profile_shape(ATTENTION_MASK, 0)[2])
        self.context = engine.create_execution_context()
        if self.context is None:
            raise SkipToolError("TensorRT could not create an execution context (out of GPU memory?)")
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._placeholder = torch.empty(_PLACEHOLDER_BYTES, dtype=torch.uint8, device=self.device)
        self.set_skip_mask(skip_mask)
        self.reset()

    @classmethod
    def from_export(cls, folder: str | Path, manifest: ExportManifest | None = None,
                    options: RunOptions = RunOptions()) -> "TrtBackend":
        """Load ``model.engine`` from an export directory (or an engine file inside one)."""
        engine_path, folder = locate_engine(folder)
        return cls(load_engine(engine_path), manifest or read_manifest(folder), "cuda", options.skip_mask)

    # -- configuration ---------------------------------------------------------------------------
    def set_skip_mask(self, skip_mask: Sequence[int] | None) -> None:
        """Per-layer override: 1 force skip, -1 force compute, 0 policy (None: all 0, the ONNX default)."""
        if skip_mask is None:
            self.skip_mask = None
            return
        if not self.plan.has_skip_mask:
            raise SkipToolError("this TensorRT engine has no skip_mask input (its graph held it as a constant); "
                                "rebuild it with the current `skiptool export --format tensorrt`")
        self.skip_mask = parse_skip_mask(skip_mask, self.io.num_layers)

    # -- DecodeBackend ---------------------------------------------------------------------------
    def reset(self) -> None:
        import torch

        empty = past_shape(0, self.kv_heads, self.head_dim)
        self._past = {n: torch.empty(empty, dtype=self.dtypes[n], device=self.device) for n in self.io.past_names()}
        self.length = 0
        self.last_decisions: np.ndarray | None = None
        self.counter = DecisionCounter(self.io.num_layers)

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        return self.forward(token_ids, count=False)[-1]

    def step(self, token_id: int) -> np.ndarray:
        return self.forward([int(token_id)])[-1]

    def skip_ratio(self) -> float | None:
        """Skipped (layer, token) FFN blocks over all of them in the decode steps since :meth:`reset`
        (None for an engine without a ``skip_decisions`` output)."""
        if not self.plan.has_decisions:
            return None
        return self.counter.ratio

    def per_layer_skip(self) -> list[float] | None:
        if not self.plan.has_decisions:
            return None
        return self.counter.per_layer()

    # -- the decode loop -------------------------------------------------------------------------
    def forward(self, token_ids: Sequence[int], count: bool = True) -> np.ndarray:
        """Append tokens to the cached sequence; their logits ``[len(token_ids), vocab]`` (float32)."""
        n = len(token_ids)
        if self.length + n > self.max_length:
            raise SkipToolError(f"{self.length + n} tokens exceed the engine's optimisation profile "
                                f"(at most {self.max_length}); rebuild the engine with a larger max_context")
        mask = self.skip_mask if self.skip_mask is not None else np.zeros(self.io.num_layers, dtype=np.int64)
        feeds = step_feeds(self.length, token_ids, mask if self.plan.has_skip_mask else None)
        shapes = step_input_shapes(self.io, self.length, n, self.kv_heads, self.head_dim, self.plan.has_skip_mask)
        outputs = self._run(feeds, shapes)
        self._past = rotate(self.io, outputs)
        self.length += n
        logits = outputs[LOGITS][0].float().cpu().numpy()
        if self.plan.has_decisions:
            self.last_decisions = outputs[SKIP_DECISIONS][:, 0, :].cpu().numpy()  # [num_layers, n]
            if count:
                self.counter.add(self.last_decisions)
        return logits

    def _run(self, feeds: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        """One engine execution on the past plus `feeds` (planned input `shapes`); the outputs as torch
        tensors (stream synchronised)."""
        import contextlib

        import torch

        ctx = self.context
        with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            inputs = {name: self._to_engine(name, array) for name, array in feeds.items()}
            inputs.update(self._past)
            for name, tensor in inputs.items():
                if tuple(tensor.shape) != shapes[name]:
                    raise RuntimeError(f"{name} holds shape {tuple(tensor.shape)}, the step needs {shapes[name]}")
                if not ctx.set_input_shape(name, shapes[name]):
                    raise SkipToolError(f"TensorRT refused shape {shapes[name]} for input {name} "
                                        "(outside the engine's optimisation profile?)")
                self._bind(name, tensor)
            outputs = {}
            for name in self.plan.outputs:
                shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise SkipToolError(f"TensorRT reports a data-dependent shape {shape} for output {name}; "
                                        "this backend needs output shapes that follow from the input shapes")
                outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
                self._bind(name, outputs[name])
            if not ctx.execute_async_v3(self._stream.cuda_stream if self._stream is not None else 0):
                raise SkipToolError("TensorRT failed to execute the engine (see its log above)")
            if self._stream is not None:
                self._stream.synchronize()
        return outputs

    def _to_engine(self, name: str, array: np.ndarray) -> Any:
        """A host array as a tensor of the engine's dtype, on the device (or host) the engine wants it."""
        import torch

        device = torch.device("cpu") if name in self.on_host else self.device
        return torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=self.dtypes[name])

    def _bind(self, name: str, tensor: Any) -> None:
        address = tensor.data_ptr() if tensor.numel() else self._placeholder.data_ptr()
        if not self.context.set_tensor_address(name, address):
            raise SkipToolError(f"TensorRT refused the buffer address for {name}")

    def present(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """The cached key and value of `layer` (``[1, kv_heads, length, head_dim]``)."""
        key, value = self.io.past_names()[2 * layer: 2 * layer + 2]
        return self._past[key].float().cpu().numpy(), self._past[value].float().cpu().numpy()


RUNTIMES.register("tensorrt", Runtime("tensorrt", TrtBackend.from_export, tensorrt_unavailable))
