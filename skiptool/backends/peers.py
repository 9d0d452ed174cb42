"""Peers: the runtimes users would pick instead, run on the same weights for ``skiptool bench``.

Each peer is one registration in :data:`PEERS`: a function from the benchmark's :class:`PeerContext` to its
runs (:class:`PeerEntry`), or entries saying why it cannot run here. Built in:

- ``onnxruntime-genai``: its model builder's graphs (fp32, int4; :mod:`skiptool.genai_builder`), decoded
  with its own generator; the same backend runs skiptool's ``ort`` exports (registered as the
  ``onnxruntime-genai`` runtime);
- ``llama.cpp`` (llama-cpp-python) on the GGUF file.

A peer whose package is not installed is reported as skipped with the command that installs it; it is never
an error.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..contract import GENAI_CONFIG_FILE, OVERRIDE_MODEL_FILE, SKIP_DECISIONS, SKIP_MASK, ExportManifest
from ..genai_builder import INSTALL as GENAI_INSTALL
from ..registry import Registry
from .base import DecisionCounter, parse_skip_mask
from .registry import RUNTIMES, RunOptions, Runtime

LLAMA_CPP_INSTALL = "pip install llama-cpp-python  (builds from source, ~8 min on 2 cores)"


@dataclass
class PeerEntry:
    """One peer run: how to build its backend, or why it cannot run here."""

    backend: str  # "onnxruntime-genai" or "llama.cpp"
    precision: str
    make: Callable[[], Any] | None = None
    skipped: str | None = None  # "skipped: not installed — install with ..."
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PeerContext:
    """What a peer may use: the model's local files, thread and spinning settings, the longest sequence, and
    the precisions the benchmark compares."""

    hf_dir: str | None
    gguf: str | None
    threads: int | None
    spin: bool | None
    max_length: int
    precisions: tuple[str, ...] = ("fp32", "int4")


PEERS: Registry[Callable[[PeerContext], list[PeerEntry]]] = Registry("benchmark peer")


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def not_installed(package: str, command: str) -> str:
    return f"skipped: {package} not installed — install with `{command}`"


# ------------------------------------------------------------------------------------------------
# onnxruntime-genai
# ------------------------------------------------------------------------------------------------
class GenaiBackend:
    """onnxruntime-genai's generator as a :class:`~skiptool.backends.base.DecodeBackend`.

    Also runs skiptool's ``ort`` exports (genai's graph with an ``If`` per skippable FFN): give `filename` (the
    export's graph; ``model.skip_mask.onnx`` when a `skip_mask` forces layers, since genai ignores values fed to
    an initializer-backed input). The realised ratio is measured from the graph's ``skip_decisions`` output.
    """

    name = "onnxruntime-genai"

    def __init__(self, model_dir: str | Path, precision: str, threads: int | None = None, spin: bool | None = None,
                 max_length: int = 2048, filename: str | None = None, skip_mask: Sequence[int] | None = None,
                 num_layers: int | None = None) -> None:
        import onnxruntime_genai as og

        self.precision, self.model_dir = precision, Path(model_dir)
        self.mode = "dense" if filename is None else "skip"
        self.num_layers = num_layers
        self._og, self.max_length = og, min(max_length, _context_length(self.model_dir))
        self._filename = filename
        self.model = self._load(threads, spin, filename)
        self.generator: Any = None
        self.set_skip_mask(skip_mask)
        self.counter: DecisionCounter | None = None

    def _load(self, threads: int | None, spin: bool | None, filename: str | None) -> Any:
        overlay = genai_overlay(threads, spin)
        if filename is not None:
            overlay["model"]["decoder"]["filename"] = filename
        config = self._og.Config(str(self.model_dir))
        config.overlay(json.dumps(overlay))
        return self._og.Model(config)

    def set_skip_mask(self, skip_mask: Sequence[int] | None) -> None:
        """Force layers from the next :meth:`reset` on (1 skip, -1 compute, 0 policy); needs the override graph."""
        if skip_mask is not None and self._filename != OVERRIDE_MODEL_FILE:
            raise ValueError(f"a skip_mask needs the export's override graph (filename={OVERRIDE_MODEL_FILE!r})")
        self.skip_mask = None if skip_mask is None else parse_skip_mask(skip_mask, len(skip_mask))

    def reset(self) -> None:
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_length, do_sample=False, batch_size=1)
        self.generator = self._og.Generator(self.model, params)
        if self.skip_mask is not None:
            self.generator.set_model_input(SKIP_MASK, self.skip_mask)
        self.counter = DecisionCounter(self.num_layers) if self.mode == "skip" and self.num_layers else None

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        self.generator.append_tokens(np.asarray([list(token_ids)], dtype=np.int32))
        return self._logits()

    def step(self, token_id: int) -> np.ndarray:
        self.generator.append_tokens(np.asarray([[int(token_id)]], dtype=np.int32))
        if self.counter is not None:
            self.counter.add(np.asarray(self.generator.get_output(SKIP_DECISIONS))[:, 0, -1:])
        return self._logits()

    def _logits(self) -> np.ndarray:
        return np.asarray(self.generator.get_logits()).reshape(-1)

    def skip_ratio(self) -> float | None:
        """Over the decode steps, from the graph's own decisions (0 for genai's dense graph)."""
        if self.mode == "dense":
            return 0.0
        return self.counter.ratio if self.counter is not None else None

    def per_layer_skip(self) -> list[float] | None:
        return self.counter.per_layer() if self.counter is not None else None


def _context_length(folder: Path) -> int:
    """The longest sequence a genai folder's ``genai_config.json`` allows (its generator refuses more)."""
    try:
        return int(json.loads((folder / GENAI_CONFIG_FILE).read_text())["model"]["context_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1 << 30


def genai_overlay(threads: int | None, spin: bool | None) -> dict[str, Any]:
    """A genai_config overlay with the thread count and intra-op spinning (unknown keys become ORT config entries)."""
    options: dict[str, Any] = {}
    if threads:
        options["intra_op_num_threads"] = int(threads)
    if spin is not None:
        options["session.intra_op.allow_spinning"] = "1" if spin else "0"
        options["session.inter_op.allow_spinning"] = "1" if spin else "0"
    return {"model": {"decoder": {"session_options": options}}}


def open_genai_export(folder: Path, manifest: ExportManifest, options: RunOptions) -> GenaiBackend:
    """An ``ort`` export in onnxruntime-genai's generator (its override graph when a skip_mask forces layers)."""
    filename = OVERRIDE_MODEL_FILE if options.skip_mask is not None else manifest.file
    return GenaiBackend(folder, manifest.precision, options.threads, options.spin, options.max_length, filename,
                        options.skip_mask, manifest.num_layers)


def _genai_unavailable() -> str | None:
    return None if installed("onnxruntime_genai") else f"onnxruntime-genai is not installed ({GENAI_INSTALL})"


RUNTIMES.register("onnxruntime-genai", Runtime("onnxruntime-genai", open_genai_export, _genai_unavailable))


@PEERS.add("onnxruntime-genai")
def genai_entries(ctx: PeerContext) -> list[PeerEntry]:
    """onnxruntime-genai's own dense graphs (built lazily on first use), or one skipped entry per precision."""
    from ..genai_builder import genai_model_dir

    if not installed("onnxruntime_genai"):
        return [PeerEntry("onnxruntime-genai", p, skipped=not_installed("onnxruntime-genai", GENAI_INSTALL))
                for p in ctx.precisions]
    if ctx.hf_dir is None:
        return [PeerEntry("onnxruntime-genai", p, skipped="skipped: no Hugging Face directory for the model builder")
                for p in ctx.precisions]
    hf_dir = ctx.hf_dir

    def maker(precision: str) -> Callable[[], GenaiBackend]:
        return lambda: GenaiBackend(genai_model_dir(hf_dir, precision), precision, ctx.threads, ctx.spin,
                                    ctx.max_length)

    return [PeerEntry("onnxruntime-genai", p, make=maker(p), settings={"threads": ctx.threads, "spin": ctx.spin})
            for p in ctx.precisions]


# ------------------------------------------------------------------------------------------------
# llama.cpp
# ------------------------------------------------------------------------------------------------
class LlamaCppBackend:
    """llama.cpp through llama-cpp-python, on a GGUF file, as a DecodeBackend."""

    name = "llama.cpp"
    mode = "dense"

    def __init__(self, gguf: str | Path, threads: int | None = None, n_ctx: int = 2048) -> None:
        from llama_cpp import Llama

        self.gguf = Path(gguf)
        self.precision = gguf_precision(self.gguf)
        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                         logits_all=False, verbose=False)
        self.n_vocab = int(self.llm.n_vocab())

    def reset(self) -> None:
        self.llm.reset()

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        self.llm.eval(list(token_ids))
        return self._logits()

    def step(self, token_id: int) -> np.ndarray:
        self.llm.eval([int(token_id)])
        return self._logits()

    def _logits(self) -> np.ndarray:
        """The last evaluated token's logits (llama.cpp keeps only those without ``logits_all``)."""
        import llama_cpp

        pointer = llama_cpp.llama_get_logits(self.llm.ctx)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).copy()

    def skip_ratio(self) -> float | None:
        return 0.0

    def per_layer_skip(self) -> list[float] | None:
        return None


def gguf_precision(path: Path) -> str:
    """The weight type in a GGUF file name (``...Q4_1.gguf`` -> ``q4_1``), else ``gguf``."""
    stem = path.stem.lower()
    for tag in ("q4_0", "q4_1", "q4_k_m", "q4_k_s", "q5_0", "q5_1", "q5_k_m", "q6_k", "q8_0", "f16", "bf16", "f32"):
        if stem.endswith(tag) or f".{tag}" in stem or f"-{tag}" in stem:
            return tag
    return "gguf"


@PEERS.add("llama.cpp")
def llama_cpp_entries(ctx: PeerContext) -> list[PeerEntry]:
    """llama.cpp on the model's GGUF file, or one skipped entry saying why not."""
    if not installed("llama_cpp"):
        return [PeerEntry("llama.cpp", "gguf", skipped=not_installed("llama-cpp-python", LLAMA_CPP_INSTALL))]
    if ctx.gguf is None:
        return [PeerEntry("llama.cpp", "gguf", skipped="skipped: the model has no GGUF file")]
    path = Path(ctx.gguf)
    return [PeerEntry("llama.cpp", gguf_precision(path), make=lambda: LlamaCppBackend(path, ctx.threads, ctx.max_length),
                      settings={"threads": ctx.threads, "spin": "n/a"})]


__all__ = ["GenaiBackend", "LlamaCppBackend", "PEERS", "PeerContext", "PeerEntry", "genai_overlay", "gguf_precision",
           "installed", "not_installed", "open_genai_export"]
