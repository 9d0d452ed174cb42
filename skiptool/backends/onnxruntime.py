"""ONNX Runtime decode backend for graphs written by ``skiptool export --format onnx``.

One sequence at a time: the KV cache stays in ONNX Runtime's own buffers between steps: each step's
``present.*`` outputs (``OrtValue``s, on the execution provider's device) are fed as the next step's
``past_key_values.*`` inputs, never copied through numpy. (``run_with_ort_values`` rather than an
``IOBinding``: a binding cannot address ``skip_mask``, an input backed by an initializer.) Session options are tuned for latency (sequential execution, one inter-op
thread, all graph optimisations, a chosen intra-op thread count and spinning). The CUDA execution
provider is used when onnxruntime-gpu and a GPU are present; the ``If`` conditions and the per-layer
``skip_decisions`` are read on the host, so :meth:`OrtBackend.skip_ratio` is the ratio the graph realised.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import MissingDependencyError, SkipToolError
from ..exporters.io_names import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, SKIP_DECISIONS, SKIP_MASK, GraphIO

EXPORT_INFO = "skiptool_export.json"
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


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


def default_providers() -> list[str]:
    """CUDA (then CPU) when onnxruntime-gpu sees a GPU, else CPU."""
    available = _ort().get_available_providers()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available \
        else ["CPUExecutionProvider"]


def session_options(threads: int | None = None, spin: bool | None = None) -> Any:
    """Latency-tuned session options; `spin` sets ``session.intra_op.allow_spinning`` (None: ORT's default)."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # the optional skip_mask initializer logs a (harmless) warning otherwise
    if threads:
        opts.intra_op_num_threads = int(threads)
    if spin is not None:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return opts


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
        ort = _ort()
        path = self.model_dir / self.info.get("file", "model.onnx")
        try:
            self.session = ort.InferenceSession(str(path), session_options(threads, spin),
                                                providers=providers or default_providers())
        except Exception as exc:  # noqa: BLE001 - a broken or missing graph is the user's input
            raise SkipToolError(f"cannot load {path} in ONNX Runtime: {str(exc).splitlines()[0]}") from None
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        types = {i.name: i.type for i in self.session.get_inputs()}
        self.kv_dtype = _NUMPY_TYPES.get(types.get(self.io.past_names()[0], ""), np.float32)
        self._ort = ort
        self._outputs = self.io.output_names()
        self.set_skip_mask(skip_mask)
        self.reset()

    # -- configuration ---------------------------------------------------------------------------
    def set_skip_mask(self, skip_mask: Sequence[int] | None) -> None:
        """Per-layer override fed to the graph: 1 force skip, -1 force compute, 0 policy (None: the default)."""
        if skip_mask is None:
            self.skip_mask = None
            return
        mask = np.asarray(skip_mask, dtype=np.int64).reshape(-1)
        if mask.shape[0] != self.io.num_layers:
            raise SkipToolError(f"skip_mask needs {self.io.num_layers} entries (one per layer), got {mask.shape[0]}")
        self.skip_mask = mask

    # -- DecodeBackend ---------------------------------------------------------------------------
    def reset(self) -> None:
        ort = _ort()
        kv_heads, head_dim = int(self.info["num_key_value_heads"]), int(self.info["head_dim"])
        empty = np.zeros((1, kv_heads, 0, head_dim), dtype=self.kv_dtype)
        self._past = [ort.OrtValue.ortvalue_from_numpy(empty, self.device) for _ in self.io.past_names()]
        self.length = 0
        self.last_decisions: np.ndarray | None = None
        self._skipped = self._total = 0.0
        self._skipped_per_layer = np.zeros(self.io.num_layers)
        self._total_per_layer = 0.0

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        return self.forward(token_ids, count=False)[-1]

    def step(self, token_id: int) -> np.ndarray:
        return self.forward([int(token_id)])[-1]

    def skip_ratio(self) -> float | None:
        """Skipped (layer, token) FFN blocks over all of them since :meth:`reset` (decode steps and
        :meth:`block_logits` passes; not the prefill)."""
        return self._skipped / self._total if self._total else 0.0

    def per_layer_skip_ratio(self) -> list[float]:
        """Per layer, the share of counted tokens whose FFN was skipped (cold layers 0)."""
        return (self._skipped_per_layer / max(self._total_per_layer, 1.0)).tolist()

    # -- the decode loop -------------------------------------------------------------------------
    def forward(self, token_ids: Sequence[int], count: bool = True) -> np.ndarray:
        """Append tokens to the cached sequence; return their logits ``[len(token_ids), vocab]`` (float32)."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(1, -1)
        n = ids.shape[1]
        feeds = {INPUT_IDS: ids, ATTENTION_MASK: np.ones((1, self.length + n), dtype=np.int64),
                 POSITION_IDS: np.arange(self.length, self.length + n, dtype=np.int64)[None]}
        if self.skip_mask is not None:
            feeds[SKIP_MASK] = self.skip_mask
        values = {name: self._ort.OrtValue.ortvalue_from_numpy(array) for name, array in feeds.items()}
        values.update(zip(self.io.past_names(), self._past))
        outputs = self.session.run_with_ort_values(self._outputs, values)
        self._past = outputs[1:-1]
        self.length += n
        self.last_decisions = outputs[-1].numpy()[:, 0, :]  # [num_layers, n]
        if count:
            self._count(self.last_decisions)
        return outputs[0].numpy()[0].astype(np.float32, copy=False)

    def present(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """The cached key and value of `layer` (``[1, kv_heads, length, head_dim]``)."""
        return self._past[2 * layer].numpy(), self._past[2 * layer + 1].numpy()

    # -- whole blocks (evaluation) ---------------------------------------------------------------
    def block_logits(self, token_ids: np.ndarray) -> np.ndarray:
        """Logits ``[n, seq, vocab]`` for a batch of token blocks ``[n, seq]`` from an empty cache (float32).

        The sequence cache is left alone; the decisions count towards :meth:`skip_ratio`. For perplexity:
        ``skiptool.evaluate.token_nll(lambda ids: torch.from_numpy(backend.block_logits(ids.numpy())), blocks)``.
        """
        ids = np.asarray(token_ids, dtype=np.int64)
        batch, seq = ids.shape
        kv_heads, head_dim = int(self.info["num_key_value_heads"]), int(self.info["head_dim"])
        empty = np.zeros((batch, kv_heads, 0, head_dim), dtype=self.kv_dtype)
        feeds = {INPUT_IDS: ids, ATTENTION_MASK: np.ones_like(ids),
                 POSITION_IDS: np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy(),
                 **{name: empty for name in self.io.past_names()}}
        if self.skip_mask is not None:
            feeds[SKIP_MASK] = self.skip_mask
        logits, decisions = self.session.run([LOGITS, SKIP_DECISIONS], feeds)
        self.last_decisions = decisions
        self._count(decisions)
        return logits.astype(np.float32, copy=False)

    def _count(self, decisions: np.ndarray) -> None:
        """Add a pass's decisions ``[num_layers, batch, seq]`` (or ``[num_layers, seq]``) to the counters."""
        flat = decisions.reshape(decisions.shape[0], -1)
        self._skipped_per_layer += flat.sum(axis=1)
        self._total_per_layer += flat.shape[1]
        self._skipped += float(flat.sum())
        self._total += float(flat.size)


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
