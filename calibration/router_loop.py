"""The distillation loop of router training (the LLM frozen).

Each step takes the next blocks of the epoch (the training blocks shuffled per epoch with the seed, so any
number of tokens cycles through them), runs the skipping model with straight-through hard decisions (the forward
pass skips exactly as inference will) and minimises the KL from the dense model's next-token distribution (the
teacher's top-k targets, :mod:`skiptool.calibration.teacher`) plus ``penalty * (skip rate - target)^2``. Stand-ins
given as `standins` learn from the same loss. The decisions' gradient temperature follows the settings' schedule.

Checkpoints (:mod:`skiptool.calibration.router_checkpoint`) are taken every few steps and when the run is
interrupted (Ctrl-C), always at a step boundary: an optimiser update is never cut in half.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from ..adapters import ArchAdapter
from ..config import SkipConfig
from ..policies import RouterPolicy, Routers, block_positions
from ..runtime import SkipRuntime, skipping
from ..standins import StandIns
from .router_checkpoint import Checkpoints, TrainingState, blocks_digest, restore_rng, rng_states
from .router_settings import RouterTrainSettings, Substitutes, inner_rate, skippable_fraction
from .router_threshold import model_device
from .teacher import Teacher, TeacherCache, topk_kl

StepCallback = Callable[[int, dict[str, float]], None]


def epoch_order(num_blocks: int, seed: int, epoch: int) -> Tensor:
    """The order of the training blocks in `epoch`: a permutation drawn from the seed and the epoch alone."""
    return torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def step_rows(step: int, batch_size: int, num_blocks: int, seed: int) -> Tensor:
    """The block indices of 0-based `step`: the next `batch_size` of the epochs' concatenated orders."""
    positions = range(step * batch_size, (step + 1) * batch_size)
    return torch.stack([epoch_order(num_blocks, seed, p // num_blocks)[p % num_blocks] for p in positions])


@contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold back Ctrl-C until the block ends (then raise it), so the state inside is never left half-updated."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


@dataclass
class Progress:
    """Where a run stands after its completed steps (what a checkpoint holds besides the weights)."""

    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    rng: dict = field(default_factory=rng_states)


class RouterTraining:
    """One training run of `routers` (and `standins`, trained jointly; else fixed `substitutes`) for `config`."""

    def __init__(self, model: nn.Module, adapter: ArchAdapter, config: SkipConfig, routers: Routers,
                 settings: RouterTrainSettings, standins: StandIns | None = None, substitutes: Substitutes = None):
        self.model, self.adapter, self.config, self.settings = model, adapter, config, settings
        self.routers, self.standins = routers, standins
        self.substitutes = standins.by_layer() if standins is not None else substitutes
        self.policy = RouterPolicy(config.model.num_layers, config.skippable_layers, config.warmup, routers, 0.5)
        groups = [{"params": list(routers.parameters()), "lr": settings.lr}]
        if standins is not None:
            groups.append({"params": list(standins.parameters()), "lr": settings.standin_lr})
        self.params = [p for g in groups for p in g["params"]]
        self.optimiser = torch.optim.Adam(groups)

    # -- state -------------------------------------------------------------------------------------------
    def state(self, progress: Progress, blocks: Tensor) -> TrainingState:
        return TrainingState(progress.step, _copy(self.routers.state_dict()),
                             _copy(self.standins.state_dict()) if self.standins is not None else None,
                             self.optimiser.state_dict(), progress.rng, list(progress.history),
                             self.settings.trajectory(), blocks_digest(blocks))

    def restore(self, state: TrainingState) -> Progress:
        """Continue from a checkpoint's state (weights, optimiser, generators, history)."""
        self.routers.load_state_dict(state.routers)
        if self.standins is not None and state.standins is not None:
            self.standins.load_state_dict(state.standins)
        self.optimiser.load_state_dict(state.optimiser)
        restore_rng(state.rng)
        return Progress(state.step, list(state.history), state.rng)

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self, blocks: Tensor, on_step: StepCallback | None = None, cache: TeacherCache | None = None,
            checkpoints: Checkpoints | None = None, resume: TrainingState | None = None) -> list[dict[str, float]]:
        """Train on `blocks` until the settings' step count; returns the per-step history."""
        if resume is None:
            torch.manual_seed(self.settings.seed)  # the decisions' noise comes from the seed alone
        progress = self.restore(resume) if resume is not None else Progress()
        steps, started, first = self.settings.steps, time.perf_counter(), progress.step
        with self._trainable(), skipping(self.model, self.adapter, self.policy, self.substitutes) as rt:
            rt.controller.counting = False
            teacher = Teacher(rt, self.settings.teacher_topk, cache)
            try:
                while progress.step < steps:
                    self._step(rt, teacher, blocks, progress)
                    if checkpoints is not None and checkpoints.due(progress.step, steps):
                        checkpoints.save(self.state(progress, blocks))
                    if on_step is not None:
                        rate = (progress.step - first) * self.settings.tokens_per_step / (time.perf_counter() - started)
                        on_step(progress.step, {**progress.history[-1], "tokens_per_s": rate, "steps": steps})
            except KeyboardInterrupt:
                if checkpoints is None:
                    raise
                path = checkpoints.save(self.state(progress, blocks))
                raise KeyboardInterrupt(f"interrupted after step {progress.step} of {steps}; {path} holds the run: "
                                        "run the same command with --resume to continue") from None
        return progress.history

    def _step(self, rt: SkipRuntime, teacher: Teacher, blocks: Tensor, progress: Progress) -> None:
        s = self.settings
        rows = step_rows(progress.step, s.batch_size, blocks.shape[0], s.seed)
        ids = blocks[rows].to(model_device(self.model))
        self.policy.temperature = temperature = s.temperature.at(progress.step, s.steps)
        kl, rate = self._losses(rt, teacher, ids)
        loss = kl + s.penalty * (rate - inner_rate(self.config, s.target_skip, ids.shape[1])) ** 2
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        with uninterrupted():  # the update and its record happen together or not at all
            self.optimiser.step()
            room = skippable_fraction(self.config, ids.shape[1])
            progress.history.append({"step": progress.step + 1, "loss": loss.item(), "kl": kl.item(),
                                     "skip_ratio": rate.item() * room, "temperature": temperature})
            progress.step += 1
            progress.rng = rng_states()

    def _losses(self, rt: SkipRuntime, teacher: Teacher, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Top-k KL(dense || skipping) over the positions past the warm-up, and their straight-through skip rate."""
        positions = block_positions(ids)
        warm = self.policy.is_warm(positions)  # warm-up positions never skip: their distributions are the dense ones
        with self._hard_decisions():  # the teacher's dense pass draws no noise: cached or not, a run is the same
            targets = teacher.targets(ids).select(warm)
        student = rt.model(ids, position_ids=positions).logits[warm]
        rate = torch.stack([d[warm].mean() for d in self.policy.soft_decisions.values()]).mean()
        return topk_kl(targets, student), rate

    @contextmanager
    def _hard_decisions(self) -> Iterator[None]:
        """Inference decisions inside the block, the training ones again after it."""
        estimator, temperature = self.policy.estimator, self.policy.temperature
        self.policy.train_decisions(None)
        try:
            yield
        finally:
            self.policy.train_decisions(estimator, temperature)

    @contextmanager
    def _trainable(self) -> Iterator[None]:
        """Only the routers (and stand-ins) take gradients, with training decisions; as before afterwards."""
        frozen = [p for p in self.model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        self.policy.train_decisions(self.settings.estimator, self.settings.temperature.start)
        try:
            yield
        finally:
            self.policy.train_decisions(None)
            for p in self.params:
                p.requires_grad_(False)
            for p in frozen:
                p.requires_grad_(True)


def train_routers(model: nn.Module, adapter: ArchAdapter, config: SkipConfig, routers: Routers, blocks: Tensor,
                  settings: RouterTrainSettings, on_step: StepCallback | None = None, substitutes: Substitutes = None,
                  standins: StandIns | None = None, *, cache: TeacherCache | None = None,
                  checkpoints: Checkpoints | None = None,
                  resume: TrainingState | None = None) -> list[dict[str, float]]:
    """Train `routers` in place (the LLM stays frozen) on `blocks`; returns the per-step history.

    `substitutes` are fixed stand-ins; `standins` are trained jointly with the routers (and used as the
    substitutes) at ``settings.standin_lr``. The teacher's targets come from `cache` where it has them; with
    `checkpoints` the run saves its state, and `resume` (a saved state) continues one.
    """
    training = RouterTraining(model, adapter, config, routers, settings, standins, substitutes)
    return training.run(blocks, on_step, cache, checkpoints, resume)


def _copy(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}
