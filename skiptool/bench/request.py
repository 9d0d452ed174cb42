"""What ``skiptool bench`` was asked to do."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .harness import DEFAULT_NEW_TOKENS


@dataclass
class BenchRequest:
    """What `skiptool bench` was asked to do."""

    model: str = "smollm2-135m"
    config: Path | None = None
    onnx: list[Path] = field(default_factory=list)
    skip_ratios: list[float] = field(default_factory=list)
    new_tokens: int = DEFAULT_NEW_TOKENS
    repeats: int = 3
    warmup: int = 1
    threads: int | None = None
    spin: bool = False
    quality: bool = False
    data: str | None = None
    prompt_tokens: int = 32
    num_prompts: int = 1
    quality_tokens: int = 512  # tokens per held-out block (--quality-seq-len)
    quality_blocks: int = 8  # held-out blocks (--quality-samples), the same for every run
    peers: bool = True
    torch: bool = True
    device: str = "cpu"
    dtype: str | None = None  # None: fp32 on a CPU, bf16 on CUDA (skiptool.models.decode_dtype)
