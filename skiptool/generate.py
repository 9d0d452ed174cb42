"""Text generation: the one decode loop over any backend, and the one result type.

:func:`decode` runs a :class:`~skiptool.backends.base.DecodeBackend` — PyTorch (:class:`TorchBackend`), ONNX
Runtime, onnxruntime-genai, TensorRT, llama.cpp — prefill then one token per step, timing each step, streaming
text, and returns a :class:`DecodeResult`. ``skiptool generate``, ``skiptool bench`` and the evaluation's greedy
agreement all use it, so every backend is measured the same way.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from .errors import SkipToolError


@dataclass
class DecodeResult:
    """Generated tokens (and text, when a tokenizer was given) with timing. Decode figures exclude the prefill;
    the skip ratio covers the decode steps only (``None`` when the backend cannot see its decisions)."""

    token_ids: list[int]
    prompt_tokens: int
    prefill_s: float
    step_s: list[float] = field(default_factory=list)
    text: str = ""
    skip_ratio: float | None = None
    per_layer_skip: list[float] | None = None

    @property
    def tokens_per_s(self) -> float:
        total = sum(self.step_s)
        return len(self.step_s) / total if total > 0 else 0.0


def encode_prompt(tokenizer: Any, prompt: str, raw: bool = False) -> list[int]:
    """Token ids of a prompt, through the chat template when the tokenizer has one (unless `raw`)."""
    if not raw and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt")
        if not isinstance(ids, Tensor):
            ids = ids["input_ids"]
        return [int(t) for t in ids[0]]
    return [int(t) for t in tokenizer(prompt)["input_ids"]]


class Sampler:
    """Greedy (``temperature`` 0) or temperature / top-p sampling from one position's logits."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> None:
        if temperature < 0 or not 0 < top_p <= 1:
            raise SkipToolError(f"temperature must be >= 0 and top-p in (0, 1] (got {temperature}, {top_p})")
        self.temperature, self.top_p = temperature, top_p
        self.generator = torch.Generator().manual_seed(seed) if temperature > 0 else None

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature <= 0:
            return int(np.argmax(logits))
        probs = torch.softmax(torch.from_numpy(np.asarray(logits, dtype=np.float32)) / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, idx = probs.sort(descending=True)
            sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p > self.top_p, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def decode(backend: Any, prompt_ids: Sequence[int], max_new_tokens: int, sampler: Sampler | None = None,
           eos_ids: set[int] | None = None, tokenizer: Any = None,
           on_text: Callable[[str], None] | None = None) -> DecodeResult:
    """Prefill, then up to ``max_new_tokens - 1`` timed decode steps (stopping at an EOS id when given).

    With a `tokenizer`, the text is decoded as it grows and new pieces go to `on_text` (streaming).
    """
    if max_new_tokens < 1:
        raise SkipToolError(f"max new tokens must be at least 1 (got {max_new_tokens})")
    pick = sampler or Sampler()
    backend.reset()
    t0 = time.perf_counter()
    tokens = [pick(backend.prefill(list(prompt_ids)))]
    prefill_s = time.perf_counter() - t0
    stream = _Stream(tokenizer, on_text)
    stream.update(tokens)
    steps: list[float] = []
    while len(tokens) < max_new_tokens and not (eos_ids and tokens[-1] in eos_ids):
        t0 = time.perf_counter()
        tokens.append(pick(backend.step(tokens[-1])))
        steps.append(time.perf_counter() - t0)
        stream.update(tokens)
    per_layer = getattr(backend, "per_layer_skip", None)
    return DecodeResult(tokens, len(prompt_ids), prefill_s, steps, stream.text, backend.skip_ratio(),
                        per_layer() if per_layer is not None else None)


class _Stream:
    """Decodes the growing token list and hands each new piece of text to `on_text`."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None] | None) -> None:
        self.tokenizer, self.on_text, self.text = tokenizer, on_text, ""

    def update(self, tokens: list[int]) -> None:
        if self.tokenizer is None:
            return
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if self.on_text is not None and text.startswith(self.text) and len(text) > len(self.text):
            self.on_text(text[len(self.text):])
        self.text = text


def generate(lm: Any, prompt: str | Sequence[int], max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, raw: bool = False,
             on_text: Callable[[str], None] | None = None, backend: Any = None) -> DecodeResult:
    """Generate with a loaded model (:class:`skiptool.models.LoadedModel`) through `backend`; by default PyTorch
    eager on the model as it is now — dense, or under the runtime :func:`skiptool.open_runtime` opened on it
    (whose decode-step skip ratio the result reports)."""
    from .backends.torch_backend import TorchBackend
    from .models import eos_token_ids

    ids = encode_prompt(lm.tokenizer, prompt, raw) if isinstance(prompt, str) else list(prompt)
    return decode(backend or TorchBackend(lm.model, lm.adapter), ids, max_new_tokens,
                  Sampler(temperature, top_p, seed), set(eos_token_ids(lm)), lm.tokenizer, on_text)


def run_generate(source: str, prompt: str, config_path: str | Path | None = None, device: str = "cpu",
                 router_threshold: float | None = None, dtype: str | None = None, raw: bool = False,
                 max_new_tokens: int = 64, **options: Any) -> tuple[DecodeResult, str]:
    """``skiptool generate``: load `source` and generate with the skip config (if any); (result, policy kind).

    On a CPU the PyTorch eager runtime decodes; on CUDA the GPU decode path (:class:`~skiptool.gpu.EngineBackend`:
    a static KV cache, the decisions on the device, each step one CUDA graph). `dtype` None: fp32 on a CPU, bf16
    on CUDA."""
    from .accelerators import check_device
    from .config import load_config
    from .models import decode_dtype, load_model
    from .policies import check_policy

    check_device(device)
    config = load_config(config_path) if config_path is not None else None
    if config is not None:
        check_policy(config, threshold=router_threshold)
    lm = load_model(source, decode_dtype(device, dtype), device)
    ids = encode_prompt(lm.tokenizer, prompt, raw)
    overrides = {"threshold": router_threshold}
    with decode_backend(lm, config, device, len(ids) + max_new_tokens, overrides) as backend:
        result = generate(lm, ids, max_new_tokens, backend=backend, **options)
    return result, config.policy.kind if config is not None else "dense"


@contextmanager
def decode_backend(lm: Any, config: Any, device: str, max_len: int,
                   policy_overrides: dict[str, Any] | None = None) -> Iterator[Any]:
    """The decode backend ``generate`` uses on `device`: on CUDA the GPU decode path (decisions on the device, each
    step one CUDA graph; dense without a config); on a CPU, PyTorch eager under the config's runtime (taken off the
    model again afterwards). `max_len` bounds prompt plus new tokens."""
    from .backends.torch_backend import TorchBackend
    from .runtime import open_runtime

    if device.startswith("cuda"):
        from .gpu.backend import EngineBackend

        yield EngineBackend(lm.model, lm.adapter, config, ffn_mode="device" if config is not None else "dense",
                            max_len=max_len, policy_overrides=policy_overrides)
        return
    runtime = open_runtime(lm.model, lm.adapter, config, **(policy_overrides or {})) if config is not None else None
    try:
        yield TorchBackend(lm.model, lm.adapter)
    finally:
        if runtime is not None:
            runtime.remove()


def generate_from_export(folder: str | Path, prompt: str, runtime: str | None = None, raw: bool = False,
                         max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                         on_text: Callable[[str], None] | None = None, **options: Any) -> DecodeResult:
    """``skiptool generate --onnx DIR`` / ``--engine DIR``: the export's tokenizer and graph in `runtime`."""
    from .backends import open_export
    from .contract import read_manifest
    from .models import load_tokenizer

    manifest = read_manifest(folder)
    backend = open_export(folder, runtime, **options)
    tokenizer = load_tokenizer(folder)
    ids = encode_prompt(tokenizer, prompt, raw)
    return decode(backend, ids, max_new_tokens, Sampler(temperature, top_p, seed), set(manifest.eos_token_ids),
                  tokenizer, on_text)
