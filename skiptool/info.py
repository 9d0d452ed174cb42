"""What a model is and what FFN skipping can at best gain on it (`skiptool info`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .adapters import ArchAdapter

SKIP_RATIOS = (0.10, 0.25, 0.50)


def ideal_speedup(skip_ratio: float, skippable_share: float) -> float:
    """Amdahl: decoding reads ``1 - ratio * share`` of the bytes it read before."""
    return 1.0 / (1.0 - skip_ratio * skippable_share)


def decode_weight_bytes(model: nn.Module, adapter: ArchAdapter) -> tuple[int, int]:
    """(FFN weight bytes, all weight bytes) read per decoded token.

    Every layer's weights and the LM head are read once per token; the embedding lookup reads one row,
    so the embedding table is excluded (unless it is tied to the LM head, where it is read as the head).
    """
    def nbytes(module: nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in module.parameters())

    layers = adapter.decoder_layers(model)
    ffn = sum(nbytes(adapter.mlp_of(layer)) for layer in layers)
    body = sum(nbytes(layer) for layer in layers)
    head = nbytes(adapter.lm_head_module(model))
    final_norm = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n == adapter.final_norm + ".weight")
    return ffn, body + head + final_norm


def model_info(model: nn.Module, adapter: ArchAdapter, source: str = "") -> dict[str, Any]:
    """Shape, size, FFN share of decode weight bytes, and ideal decode speedups for common skip ratios."""
    c = model.config
    ffn_bytes, total_bytes = decode_weight_bytes(model, adapter)
    share = ffn_bytes / total_bytes
    params = sum(p.numel() for p in model.parameters())
    return {
        "source": source,
        "architecture": adapter.family,
        "model_type": c.model_type,
        "num_layers": int(c.num_hidden_layers),
        "hidden_size": int(c.hidden_size),
        "intermediate_size": int(c.intermediate_size),
        "num_attention_heads": int(c.num_attention_heads),
        "num_key_value_heads": int(getattr(c, "num_key_value_heads", c.num_attention_heads)),
        "vocab_size": int(c.vocab_size),
        "parameters": int(params),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "ffn_weight_bytes_per_token": int(ffn_bytes),
        "weight_bytes_per_token": int(total_bytes),
        "ffn_weight_share": share,
        "ideal_speedup": {f"{r:.2f}": ideal_speedup(r, share) for r in SKIP_RATIOS},
    }


def describe(source: str) -> dict[str, Any]:
    """``skiptool info``: load `source` and return :func:`model_info` of it."""
    from .models import load_model

    lm = load_model(source, needs_tokenizer=False)
    return model_info(lm.model, lm.adapter, source=source)
