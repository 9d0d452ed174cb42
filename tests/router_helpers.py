"""Shared pieces of the router tests: a tiny config, random blocks and routers, training settings sized for
the tiny model, a text file, the train-router command line and a Ctrl-C at a chosen step."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from typer.testing import CliRunner

from skiptool.calibration import router_train as rt
from skiptool.cli import app
from skiptool.config import dense_config
from skiptool.policies import Routers

from conftest import tiny_llama

LAYERS = 6


def tiny_config(model, warmup: int = 4, cold: int = 1):
    return dense_config(model, source="tiny", cold_start=cold, cold_end=cold, warmup=warmup)


def random_blocks(n: int = 8, seq: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def tiny_settings(steps: int = 3, **kw) -> rt.RouterTrainSettings:
    """Settings for the tiny model: `steps` steps of 2 blocks of 32 tokens."""
    base = dict(target_skip=0.3, tokens=steps * 2 * 32, lr=1e-2, seq_len=32, batch_size=2, init_blocks=2,
                heldout_blocks=2)
    return rt.RouterTrainSettings(**{**base, **kw})


def random_routers(layers: list[int], hidden: int = 32, seed: int = 0) -> Routers:
    routers = Routers(hidden, layers)
    g = torch.Generator().manual_seed(seed)
    for lin in routers.nets.values():
        lin.weight.data = torch.randn(lin.weight.shape, generator=g)
        lin.bias.data = torch.randn(lin.bias.shape, generator=g)
    return routers


def text_file(path: Path, words: int = 3000) -> Path:
    rng = random.Random(0)
    path.write_text(" ".join(f"w{rng.randrange(120)}" for _ in range(words)), encoding="utf-8")
    return path


def train_cli(model_dir: Path, out: Path, text: Path, *extra: str):
    base = out.parent / "base.json"
    if not base.exists():
        model = tiny_llama()
        tiny_config(model).save(base)
    args = ["train-router", str(model_dir), "--config", str(base), "-o", str(out), "--data", str(text),
            "--part", "0:1", "--seq-len", "32", "--tokens", "64", "--target-skip", "0.2", "--json", *extra]
    return CliRunner().invoke(app, args)


def interrupt_at(monkeypatch, step: int) -> None:
    """Make the run raise KeyboardInterrupt (as Ctrl-C would) during the loss of 1-based step `step`."""
    from skiptool.calibration import router_loop

    calls = {"n": 0}
    original = router_loop.topk_kl

    def interrupting(*args):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(router_loop, "topk_kl", interrupting)
