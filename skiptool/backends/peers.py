"""Peers: the runtimes users would pick instead, run on the same weights for `skiptool bench`.

- onnxruntime-genai: its model builder's graphs (fp32 and int4) built from the model's Hugging Face
  directory, cached under ``~/.cache/skiptool/peers``, decoded with its own generator;
- llama.cpp (llama-cpp-python) on the GGUF file.

A peer whose package is not installed is reported as skipped with the command that installs it;
it is never an error.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

GENAI_INSTALL = "pip install onnxruntime-genai  (or: pip install 'skiptool[compare]')"
LLAMA_CPP_INSTALL = "pip install llama-cpp-python  (builds from source, ~8 min on 2 cores)"


@dataclass
class PeerEntry:
    """One peer run: how to build its backend, or why it cannot run here."""

    backend: str  # "onnxruntime-genai" or "llama.cpp"
    precision: str
    make: Callable[[], Any] | None = None
    skipped: str | None = None  # "skipped: not installed — install with ..."
    settings: dict[str, Any] | None = None


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def not_installed(package: str, command: str) -> str:
    return f"skipped: {package} not installed — install with `{command}`"


# ------------------------------------------------------------------------------------------------
# onnxruntime-genai
# ------------------------------------------------------------------------------------------------
class GenaiBackend:
    """onnxruntime-genai's generator as a :class:`~skiptool.backends.base.DecodeBackend`.

    Also runs skiptool's ``--target ort`` exports (genai's graph with an ``If`` per skippable FFN): give
    `filename` (the export's graph whose ``skip_mask`` is a required input) and `skip_mask` to force
    layers; the realised ratio is then known from the mask, the warm-up and the decoded positions.
    """

    name = "onnxruntime-genai"

    def __init__(self, model_dir: str | Path, precision: str, threads: int | None = None, spin: bool | None = None,
                 max_length: int = 2048, filename: str | None = None, skip_mask: Sequence[int] | None = None,
                 warmup: int = 0) -> None:
        import onnxruntime_genai as og

        self.precision = precision
        self.model_dir = Path(model_dir)
        self.mode = "dense" if filename is None else "skip"
        overlay = genai_overlay(threads, spin)
        if filename is not None:
            overlay["model"]["decoder"]["filename"] = filename
        config = og.Config(str(model_dir))
        config.overlay(json.dumps(overlay))
        self._og = og
        self.model = og.Model(config)
        self.max_length = max_length
        self.set_skip_mask(skip_mask)
        self.warmup = warmup
        self.generator: Any = None
        self._position = self._steps = self._skipping_steps = 0

    def set_skip_mask(self, skip_mask: Sequence[int] | None) -> None:
        """Force layers from the next :meth:`reset` on (1 skip, -1 compute, 0 policy); needs the override graph."""
        if skip_mask is not None and self.mode == "dense":
            raise ValueError("a skip_mask needs the export's override graph (filename=...)")
        self.skip_mask = None if skip_mask is None else np.asarray(skip_mask, dtype=np.int64)

    def reset(self) -> None:
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_length, do_sample=False, batch_size=1)
        self.generator = self._og.Generator(self.model, params)
        if self.skip_mask is not None:
            self.generator.set_model_input("skip_mask", self.skip_mask)
        self._position = self._steps = self._skipping_steps = 0

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        self.generator.append_tokens(np.asarray([list(token_ids)], dtype=np.int32))
        self._position = len(token_ids)
        return self._logits()

    def step(self, token_id: int) -> np.ndarray:
        self.generator.append_tokens(np.asarray([[int(token_id)]], dtype=np.int32))
        self._steps += 1
        self._skipping_steps += int(self._position >= self.warmup)
        self._position += 1
        return self._logits()

    def _logits(self) -> np.ndarray:
        return np.asarray(self.generator.get_logits()).reshape(-1)

    def skip_ratio(self) -> float | None:
        """Over the decode steps: the forced layers' share, on the steps past the warm-up (None: policy-driven)."""
        if self.mode == "dense":
            return 0.0
        if self.skip_mask is None or not np.all(self.skip_mask != 0) or self._steps == 0:
            return None
        forced = float(np.mean(self.skip_mask == 1))
        return forced * self._skipping_steps / self._steps


def genai_overlay(threads: int | None, spin: bool | None) -> dict[str, Any]:
    """A genai_config overlay with the thread count and intra-op spinning (unknown keys become ORT config entries)."""
    options: dict[str, Any] = {}
    if threads:
        options["intra_op_num_threads"] = int(threads)
    if spin is not None:
        options["session.intra_op.allow_spinning"] = "1" if spin else "0"
        options["session.inter_op.allow_spinning"] = "1" if spin else "0"
    return {"model": {"decoder": {"session_options": options}}}


def peer_cache_root() -> Path:
    from ..models import cache_root

    return cache_root() / "peers"


def genai_model_dir(hf_dir: str | Path, precision: str) -> Path:
    """onnxruntime-genai's model builder output for `hf_dir` at `precision`, built once and cached."""
    hf_dir = Path(hf_dir).resolve()
    weights = sorted(hf_dir.glob("*.safetensors")) + [hf_dir / "config.json"]
    stamp = ":".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in weights if p.exists())
    key = hashlib.sha256(f"{hf_dir}:{stamp}".encode()).hexdigest()[:12]
    target = peer_cache_root() / f"{hf_dir.name}-{key}-genai-{precision}"
    if (target / "genai_config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(tmp / "out"),
               "-p", precision, "-e", "cpu", "-c", str(tmp / "cache")]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not (tmp / "out" / "genai_config.json").is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"onnxruntime-genai model builder failed ({precision}): {tail[0][:300]}")
        if not target.exists():
            os.replace(tmp / "out", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def genai_entries(hf_dir: str | Path | None, threads: int | None, spin: bool | None,
                  precisions: Sequence[str] = ("fp32", "int4"), max_length: int = 2048) -> list[PeerEntry]:
    """onnxruntime-genai runs (built lazily on first use), or one skipped entry per precision."""
    if not installed("onnxruntime_genai"):
        return [PeerEntry("onnxruntime-genai", p, skipped=not_installed("onnxruntime-genai", GENAI_INSTALL))
                for p in precisions]
    if hf_dir is None:
        return [PeerEntry("onnxruntime-genai", p, skipped="skipped: no Hugging Face directory for the model builder")
                for p in precisions]
    settings = {"threads": threads, "spin": spin}

    def maker(precision: str) -> Callable[[], GenaiBackend]:
        return lambda: GenaiBackend(genai_model_dir(hf_dir, precision), precision, threads, spin, max_length)

    return [PeerEntry("onnxruntime-genai", p, make=maker(p), settings=settings) for p in precisions]


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


def gguf_precision(path: Path) -> str:
    """The weight type in a GGUF file name (``...Q4_1.gguf`` -> ``q4_1``), else ``gguf``."""
    stem = path.stem.lower()
    for tag in ("q4_0", "q4_1", "q4_k_m", "q4_k_s", "q5_0", "q5_1", "q5_k_m", "q6_k", "q8_0", "f16", "bf16", "f32"):
        if stem.endswith(tag) or f".{tag}" in stem or f"-{tag}" in stem:
            return tag
    return "gguf"


def llama_cpp_entries(gguf: str | Path | None, threads: int | None, n_ctx: int = 2048) -> list[PeerEntry]:
    if not installed("llama_cpp"):
        return [PeerEntry("llama.cpp", "gguf", skipped=not_installed("llama-cpp-python", LLAMA_CPP_INSTALL))]
    if gguf is None:
        return [PeerEntry("llama.cpp", "gguf", skipped="skipped: the model has no GGUF file")]
    path = Path(gguf)
    return [PeerEntry("llama.cpp", gguf_precision(path), make=lambda: LlamaCppBackend(path, threads, n_ctx),
                      settings={"threads": threads, "spin": "n/a"})]
