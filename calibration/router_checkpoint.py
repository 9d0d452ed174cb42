"""Checkpoints of a router training run, so a long run survives an interruption and ``--resume`` continues it.

A checkpoint is one file, ``OUT/.checkpoint/state.pt``, replaced atomically: the routers, the stand-ins, the
optimiser's state, the steps done, the random number generators' states, the history, the settings that decide
the result and a digest of the training blocks. It is taken at step boundaries only, so a resumed run ends exactly
where an uninterrupted run with the same settings ends.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..fileio import atomic_path
from .router_settings import RouterTrainSettings

CHECKPOINT_DIRNAME = ".checkpoint"
CHECKPOINT_FILENAME = "state.pt"


@dataclass
class TrainingState:
    """Everything a run needs to continue after `step` completed steps."""

    step: int
    routers: dict[str, Tensor]
    standins: dict[str, Tensor] | None
    optimiser: dict[str, Any]
    rng: dict[str, Any]
    history: list[dict[str, float]]
    settings: dict[str, Any]
    data: str


def rng_states() -> dict[str, Any]:
    """The global random number generators' states (CPU, and CUDA once it is in use)."""
    states: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def blocks_digest(blocks: Tensor) -> str:
    """A digest of token blocks (a resumed run must train on the same ones)."""
    return hashlib.sha256(blocks.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()


class Checkpoints:
    """The checkpoint of a run writing to `out_dir`, taken every `every` steps (0: only when interrupted)."""

    def __init__(self, out_dir: str | Path, every: int = 0) -> None:
        self.folder = Path(out_dir) / CHECKPOINT_DIRNAME
        self.path = self.folder / CHECKPOINT_FILENAME
        self.every = every

    def exists(self) -> bool:
        return self.path.is_file()

    def due(self, step: int, steps: int) -> bool:
        """Whether to save after `step` completed steps: every `every` steps and after the last one."""
        return self.every > 0 and (step % self.every == 0 or step == steps)

    def save(self, state: TrainingState) -> Path:
        """Replace the checkpoint with `state`, atomically."""
        with atomic_path(self.path, suffix=".pt") as tmp:
            torch.save(asdict(state), tmp)
        return self.path

    def load(self) -> TrainingState:
        """The saved state; one :class:`ConfigError` for a missing or unreadable checkpoint."""
        if not self.exists():
            raise ConfigError(f"--resume: no checkpoint in {self.folder} (start without --resume)")
        try:
            raw = torch.load(self.path, map_location="cpu", weights_only=True)
            return TrainingState(**raw)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is one clear error
            raise ConfigError(f"cannot read the checkpoint {self.path}: {str(exc).splitlines()[0][:200]} (delete "
                              f"{self.folder} to start again)") from None

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def check_resumable(state: TrainingState, settings: RouterTrainSettings, digest: str, path: Path) -> None:
    """One :class:`ConfigError` unless `state` was saved by a run with these settings on these training blocks."""
    wanted = settings.trajectory()
    changed = sorted(k for k in set(wanted) | set(state.settings) if wanted.get(k) != state.settings.get(k))
    if changed:
        diffs = ", ".join(f"{k} {state.settings.get(k)!r} (checkpoint) vs {wanted.get(k)!r}" for k in changed)
        raise ConfigError(f"the checkpoint {path} was made with other settings: {diffs}; resume with the same ones")
    if state.data != digest:
        raise ConfigError(f"the checkpoint {path} was made on other training data; resume with the same --data, "
                          "--part and --seq-len")
