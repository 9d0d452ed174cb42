"""Text generation: prompts, and ``skiptool generate`` through any backend.

The decode loop itself (:func:`~skiptool.backends.decode.decode`, one for every backend, with the one result type
:class:`~skiptool.backends.decode.DecodeResult`) lives with the backends, so generation, evaluation and the
benchmark share it.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from torch import Tensor

from .backends.decode import DecodeResult, Sampler, decode
from .errors import SkipToolError


def encode_prompt(tokenizer: Any, prompt: str, raw: bool = False) -> list[int]:
    """Token ids of a prompt, through the chat template when the tokenizer has one (unless `raw`)."""
    if not raw and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt")
        if not isinstance(ids, Tensor):
            ids = ids["input_ids"]
        return [int(t) for t in ids[0]]
    return [int(t) for t in tokenizer(prompt)["input_ids"]]


def check_request(prompt: str, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> None:
    """One clear error line, before a model loads, for a prompt or sampling options the decode loop cannot use."""
    if not prompt.strip():
        raise SkipToolError("--prompt is empty; give some text to continue")
    if not math.isfinite(temperature):
        raise SkipToolError(f"--temperature must be a finite number >= 0 (got {temperature})")
    if not 0 <= seed < 2**64:
        raise SkipToolError(f"--seed must be in [0, 2^64) (got {seed})")
    Sampler(temperature, top_p, seed)  # the decode loop's own rule: temperature >= 0, top-p in (0, 1]


def check_length(prompt_tokens: int, max_new_tokens: int, context: int | None) -> None:
    """One clear error line unless a prompt of `prompt_tokens` and `max_new_tokens` fit a model's `context`
    positions (None: no known limit)."""
    if prompt_tokens < 1:
        raise SkipToolError("the prompt encodes to no tokens; give some text to continue")
    if context is not None and prompt_tokens + max_new_tokens > context:
        raise SkipToolError(f"a {prompt_tokens}-token prompt and {max_new_tokens} new tokens need "
                            f"{prompt_tokens + max_new_tokens} positions; the model has {context} (ask for fewer new "
                            "tokens or shorten the prompt)")


def context_length(lm: Any) -> int | None:
    """The positions a loaded model was trained for (``max_position_embeddings``), None when it does not say."""
    value = getattr(lm.model.config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def generate(lm: Any, prompt: str | Sequence[int], max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, raw: bool = False,
             on_text: Callable[[str], None] | None = None, backend: Any = None) -> DecodeResult:
    """Generate with a loaded model (:class:`skiptool.models.LoadedModel`) through `backend`; by default PyTorch
    eager on the model as it is now — dense, or under the runtime :func:`skiptool.open_runtime` opened on it
    (whose decode-step skip ratio the result reports)."""
    from .backends.torch_backend import TorchBackend
    from .models import eos_token_ids

    if isinstance(prompt, str):
        check_request(prompt, temperature, top_p, seed)
    ids = encode_prompt(lm.tokenizer, prompt, raw) if isinstance(prompt, str) else list(prompt)
    check_length(len(ids), max_new_tokens, context_length(lm))
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
    check_request(prompt, options.get("temperature", 0.0), options.get("top_p", 1.0), options.get("seed", 0))
    config = load_config(config_path) if config_path is not None else None
    if config is not None:
        check_policy(config, threshold=router_threshold)
    elif router_threshold is not None:
        raise SkipToolError("--router-threshold overrides a router config's threshold; give the config (--config)")
    lm = load_model(source, decode_dtype(device, dtype), device)
    ids = encode_prompt(lm.tokenizer, prompt, raw)
    check_length(len(ids), max_new_tokens, context_length(lm))  # before the decode path sizes its cache by them
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

    check_request(prompt, temperature, top_p, seed)
    manifest = read_manifest(folder)
    backend = open_export(folder, runtime, **options)
    tokenizer = load_tokenizer(folder)
    ids = encode_prompt(tokenizer, prompt, raw)
    check_length(len(ids), max_new_tokens, None)
    return decode(backend, ids, max_new_tokens, Sampler(temperature, top_p, seed), set(manifest.eos_token_ids),
                  tokenizer, on_text)
