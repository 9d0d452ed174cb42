"""What a router training run is asked to do: its settings, the token budget, the temperature schedule and the
skip-rate arithmetic every part of the training shares."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from ..config import SkipConfig
from ..errors import ConfigError
from ..policies import DEFAULT_ROUTER_KIND, ESTIMATORS, ROUTER_KINDS
from ..standins import StandInSpec
from .fit import eligible_fraction

# The default token budget: about 30 minutes on 2 CPU cores for the demo model (smollm2-135m, 512-token blocks:
# measured 41 tokens/s with the teacher's targets from the cache, 33 tokens/s while the cache is being filled).
DEFAULT_TOKENS = 65_536
DEFAULT_TOPK = 64
STANDIN_INITS = ("closed-form", "zero")
ROUTER_INITS = ("contribution", "recoverable")
TEACHER_CACHE_AUTO = "auto"  # under skiptool.fileio.cache_root()
NO_TEACHER_CACHE = "none"  # the dense model runs beside the student every step
RESUMABLE_CHANGES = ("device", "teacher_cache", "checkpoint_every")  # settings a resumed run may change
Substitutes = dict[int, nn.Module] | None  # what a skipped FFN adds, per layer (None: nothing)


@dataclass(frozen=True)
class TemperatureSchedule:
    """The temperature of the training decisions' gradient, annealed geometrically from `start` to `end` over the
    run (``--temperature 2:0.3``; a single value is constant)."""

    start: float = 1.0
    end: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "TemperatureSchedule":
        """``"1"`` (constant) or ``"START:END"``, both positive."""
        parts = text.split(":")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            values = []
        if len(values) not in (1, 2) or not all(v > 0 and math.isfinite(v) for v in values):
            raise ConfigError(f"--temperature must be a positive number or START:END (e.g. 2:0.3), got {text!r}")
        return cls(values[0], values[-1])

    def at(self, step: int, steps: int) -> float:
        """The temperature of 0-based `step` of `steps`: `start` at the first step, `end` at the last."""
        if steps <= 1 or self.start == self.end:
            return self.start
        return self.start * (self.end / self.start) ** (step / (steps - 1))

    def __str__(self) -> str:
        return f"{self.start:g}" if self.start == self.end else f"{self.start:g}:{self.end:g}"


@dataclass(frozen=True)
class RouterTrainSettings:
    """Hyper-parameters of :func:`skiptool.calibration.router_train.train_router`.

    `tokens` is the training budget: ``steps = ceil(tokens / (batch_size * seq_len))``; the training blocks are
    used in epochs, shuffled per epoch with `seed`. `teacher_cache` is ``"auto"`` (under the skiptool cache), a
    folder, or ``"none"``; `teacher_topk` is how much of the dense model's distribution the loss keeps (see
    :mod:`skiptool.calibration.teacher`).
    """

    target_skip: float = 0.25
    tokens: int = DEFAULT_TOKENS
    lr: float = 2e-3
    seq_len: int = 512
    batch_size: int = 1
    penalty: float = 100.0
    estimator: str = "ste"
    temperature: TemperatureSchedule = TemperatureSchedule()
    router: str = DEFAULT_ROUTER_KIND
    router_init: str = "contribution"
    init_blocks: int = 4
    heldout_blocks: int = 4
    threshold: float | None = None  # None: refit on held-out blocks to the target ratio
    seed: int = 0
    device: str = "cpu"
    standin: StandInSpec | None = StandInSpec()  # None: no trained stand-ins (a base config's own are used as they are)
    standin_init: str = "closed-form"  # or "zero"
    standin_lr: float = 1e-3
    target_saved: float | None = None  # instead of target_skip: the share of FFN weight bytes to save
    teacher_cache: str = TEACHER_CACHE_AUTO
    teacher_topk: int = DEFAULT_TOPK
    checkpoint_every: int = 25  # steps between checkpoints (0: only when interrupted)

    def __post_init__(self) -> None:
        for bad, message in self._problems():
            if bad:
                raise ConfigError(message)

    def _problems(self) -> list[tuple[bool, str]]:
        choices = ((self.estimator, ESTIMATORS, "--estimator"), (self.router, ROUTER_KINDS.names(), "--router"),
                   (self.router_init, ROUTER_INITS, "--router-init"),
                   (self.standin_init, STANDIN_INITS, "--stand-in-init"))
        return [
            (not 0 < self.target_skip < 1, f"--target-skip must be in (0, 1) (got {self.target_skip:.3g}; a "
                                           "--target-saved is turned into the skip ratio that saves it)"),
            (self.target_saved is not None and not 0 < self.target_saved < 1,
             f"--target-saved must be in (0, 1) (got {self.target_saved})"),
            *[(value not in allowed, f"{flag} must be one of {', '.join(allowed)} (got {value!r})")
              for value, allowed, flag in choices],
            (self.threshold is not None and not 0 < self.threshold < 1,
             f"--threshold must be a probability strictly between 0 and 1 (got {self.threshold})"),
            (self.tokens < 1, f"--tokens must be at least 1 (got {self.tokens})"),
            (self.batch_size < 1 or self.seq_len < 2, "--batch-size must be >= 1 and --seq-len >= 2"),
            (self.lr < 0 or self.standin_lr < 0 or self.penalty < 0, "--lr, --stand-in-lr and --penalty must be >= 0"),
            (self.teacher_topk < 1, f"--teacher-topk must be at least 1 (got {self.teacher_topk})"),
            (self.checkpoint_every < 0, f"--checkpoint-every must be >= 0 (got {self.checkpoint_every})"),
            (not self.teacher_cache, "--teacher-cache must be a folder, auto or none"),
        ]

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def steps(self) -> int:
        """Training steps for the token budget (rounded up: at least `tokens` tokens are trained on)."""
        return steps_for_tokens(self.tokens, self.batch_size, self.seq_len)

    def trajectory(self) -> dict[str, Any]:
        """The settings that decide the training's result (a resumed run must match them; see
        :data:`RESUMABLE_CHANGES`), as plain values."""
        values = asdict(self)
        values["temperature"], values["standin"] = str(self.temperature), str(self.standin)
        return {k: v for k, v in values.items() if k not in RESUMABLE_CHANGES}


def steps_for_tokens(tokens: int, batch_size: int, seq_len: int) -> int:
    """``ceil(tokens / (batch_size * seq_len))``: the steps that train on at least `tokens` tokens."""
    if tokens < 1:
        raise ConfigError(f"--tokens must be at least 1 (got {tokens})")
    return -(-tokens // (batch_size * seq_len))


def skippable_fraction(config: SkipConfig, seq_len: int) -> float:
    """Share of all (layer, position) pairs of a ``seq_len`` block that a policy may skip."""
    return eligible_fraction(config.model.num_layers, len(config.skippable_layers), seq_len, config.warmup)


def inner_rate(config: SkipConfig, target_skip: float, seq_len: int) -> float:
    """The skip rate over skippable layers and post-warm-up positions that realises `target_skip` overall."""
    room = skippable_fraction(config, seq_len)
    if room <= 0 or target_skip >= room:
        raise ConfigError(f"target skip {target_skip:.0%} is out of reach: with cold layers {config.cold_start}/"
                          f"{config.cold_end} and warm-up {config.warmup} at {seq_len} tokens, at most "
                          f"{room:.0%} of FFN blocks can be skipped")
    return target_skip / room
