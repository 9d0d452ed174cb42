"""Token generation with the PyTorch model (wrapped for skipping or not): prefill, then one token per step."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor


@dataclass
class GenerationResult:
    """Generated text and timing. Decode figures exclude the prefill."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    prefill_s: float
    step_latencies_s: list[float] = field(default_factory=list)
    skip_ratio: float | None = None

    @property
    def tokens_per_s(self) -> float:
        total = sum(self.step_latencies_s)
        return len(self.step_latencies_s) / total if total > 0 else 0.0


def encode_prompt(tokenizer: Any, prompt: str, raw: bool = False) -> Tensor:
    """Token ids ``[1, n]`` for a prompt, through the chat template when the tokenizer has one (unless `raw`)."""
    if not raw and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt")
        if not isinstance(ids, Tensor):
            ids = ids["input_ids"]
        return ids
    return tokenizer(prompt, return_tensors="pt").input_ids


def _pick(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model: Any, tokenizer: Any, input_ids: Tensor, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, on_text: Callable[[str], None] | None = None,
             stop_at_eos: bool = True) -> GenerationResult:
    """Greedy (``temperature=0``) or sampled generation for one prompt with a KV cache.

    `on_text` receives each new piece of decoded text as it is produced (streaming).
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    eos = _eos_ids(model, tokenizer)
    cache = DynamicCache(config=model.config)
    t0 = time.perf_counter()
    logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True).logits[:, -1]
    token = _pick(logits, temperature, top_p, generator)
    _sync(device)
    prefill_s = time.perf_counter() - t0
    new: list[int] = [int(token)]
    latencies: list[float] = []
    text = _stream(tokenizer, new, "", on_text)
    position = input_ids.shape[1]
    while len(new) < max_new_tokens and not (stop_at_eos and new[-1] in eos):
        t0 = time.perf_counter()
        step_ids = token.view(1, 1)
        logits = model(input_ids=step_ids, past_key_values=cache, use_cache=True,
                       position_ids=torch.tensor([[position]], device=device)).logits[:, -1]
        token = _pick(logits, temperature, top_p, generator)
        _sync(device)
        latencies.append(time.perf_counter() - t0)
        position += 1
        new.append(int(token))
        text = _stream(tokenizer, new, text, on_text)
    if stop_at_eos and new and new[-1] in eos:
        text = tokenizer.decode(new, skip_special_tokens=True)
    return GenerationResult(text=text, token_ids=new, prompt_tokens=input_ids.shape[1], prefill_s=prefill_s,
                            step_latencies_s=latencies)


def _stream(tokenizer: Any, tokens: list[int], previous: str, on_text: Callable[[str], None] | None) -> str:
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if on_text is not None and text.startswith(previous) and len(text) > len(previous):
        on_text(text[len(previous):])
    return text


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
