"""A padded batch of 2 through the three paths that run a policy: the PyTorch runtime, the standard ``onnx``
export and the ``ort`` export give the same per-token decisions and logits.

Positions follow one rule everywhere (:func:`skiptool.policies.positions_from_mask`): PyTorch and the standard graph
receive them as ``position_ids``, the fused graph derives them from the attention mask inside the graph.

The ``ort`` graph is onnxruntime-genai's, whose GroupQueryAttention kernel reads each row's real tokens as the first
ones: it computes right-padded batches exactly and left-padded prompts wrongly, with or without skipping (measured on
the builder's own dense graph of this tiny model: max |logit difference| to PyTorch 2e-7 right-padded, 0.32
left-padded). So the ``ort`` path is checked right-padded, the other two both ways.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_model_dir

from skiptool.adapters import cache_kwargs
from skiptool.config import ArtifactRef, dense_config
from skiptool.contract import read_manifest
from skiptool.exporters import ExportRequest, run_export
from skiptool.models import load_model
from skiptool.ort import GraphSession
from skiptool.policies import Routers, positions_from_mask
from skiptool.runtime import open_runtime

LAYERS, HIDDEN, WARMUP, PAD = 6, 64, 3, 0  # GroupQueryAttention on CPU needs head_size % 16 == 0
PROMPTS = [[5, 9, 11, 3, 7, 21], [4, 8, 15, 16, 23, 42, 17, 30]]  # lengths 6 and 8: the first is padded by 2
STEPS = 6


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny model with a router config whose random routers skip some tokens and not others."""
    base = tmp_path_factory.mktemp("padding")
    save_tiny_model_dir(base / "model", num_layers=LAYERS, hidden=HIDDEN, intermediate=160)
    lm = load_model(str(base / "model"))
    config = dense_config(lm.model, "tiny", cold_start=1, cold_end=1, warmup=WARMUP)
    routers = Routers(HIDDEN, config.skippable_layers)
    g = torch.Generator().manual_seed(7)
    for lin in routers.nets.values():
        lin.weight.data = torch.randn(lin.weight.shape, generator=g)
    routers.save(base / "config" / "router.safetensors")
    config.evolve(router=ArtifactRef("router.safetensors")).with_policy("router", threshold=0.5).save(base / "config")
    return base


def _batch(side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, PROMPTS))

    def pad(row: list[int], fill: int) -> list[int]:
        padding = [fill] * (width - len(row))
        return padding + row if side == "left" else row + padding

    return torch.tensor([pad(p, PAD) for p in PROMPTS]), torch.tensor([pad([1] * len(p), 0) for p in PROMPTS])


def _torch_run(folder: Path, side: str) -> tuple[list[np.ndarray], list[np.ndarray], list[list[int]]]:
    """Prefill + STEPS greedy steps through the PyTorch runtime: logits, decisions [layers, 2, seq], tokens."""
    from transformers import DynamicCache

    from skiptool.config import load_config

    lm = load_model(str(folder / "model"))
    runtime = open_runtime(lm.model, lm.adapter, load_config(folder / "config"))
    ids, mask = _batch(side)
    cache, logits, decisions, tokens = DynamicCache(config=lm.model.config), [], [], []
    try:
        with torch.no_grad():
            for _ in range(STEPS + 1):
                positions = positions_from_mask(mask, ids.shape[1])
                with runtime.recording() as rec:
                    out = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                   **cache_kwargs(lm.model, cache)).logits
                    decisions.append(np.stack([rec[i].numpy() for i in range(LAYERS)]))
                logits.append(out.numpy())
                ids = out[:, -1].argmax(-1, keepdim=True)
                tokens.append(ids[:, 0].tolist())
                mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
    finally:
        runtime.remove()
    return logits, decisions, tokens


def _ort_run(export: Path, side: str, tokens: list[list[int]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The same batch through an export in ONNX Runtime, fed PyTorch's tokens."""
    manifest = read_manifest(export)
    session = GraphSession(export / manifest.file, manifest.io, manifest.num_key_value_heads, manifest.head_dim)
    ids, mask = (t.numpy() for t in _batch(side))
    past, logits, decisions = session.empty_past(2), [], []
    for step in range(STEPS + 1):
        out = session.run(ids, mask, positions_from_mask(torch.from_numpy(mask), ids.shape[1]).numpy(), past)
        logits.append(out.logits)
        decisions.append(out.decisions)
        past = out.presents
        ids = np.array([[t] for t in tokens[step]], dtype=np.int64)
        mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
    return logits, decisions


def _export(folder: Path, fmt: str) -> Path:
    export = folder / f"export-{fmt}"
    if not (export / "skiptool_export.json").is_file():
        run_export(fmt, ExportRequest(str(folder / "model"), export, folder / "config", parity_steps=4))
    return export


@pytest.mark.parametrize("fmt, side, atol", [("onnx", "left", 1e-4), ("onnx", "right", 1e-4), ("ort", "right", 1e-3)])
def test_a_padded_batch_gives_the_same_decisions_and_logits_in_pytorch_and_the_export(folder, fmt, side, atol):
    if fmt == "ort":
        pytest.importorskip("onnxruntime_genai", reason="the ort format needs onnxruntime-genai's model builder")
    ref_logits, ref_decisions, tokens = _torch_run(folder, side)
    logits, decisions = _ort_run(_export(folder, fmt), side, tokens)
    real = _batch(side)[1].bool().numpy()  # the prompt's real tokens (padding's logits are meaningless)
    np.testing.assert_allclose(logits[0][real], ref_logits[0][real], atol=atol)
    for a, b in zip(logits[1:], ref_logits[1:]):
        np.testing.assert_allclose(a, b, atol=atol)
    for step, (a, b) in enumerate(zip(decisions, ref_decisions)):
        np.testing.assert_array_equal(a, b, err_msg=f"decisions at step {step}")
    skipped = np.concatenate([d[:, :, -1] for d in ref_decisions[1:]], axis=1)
    assert 0 < skipped.mean() < 1, "the routers must mix skipped and computed FFNs for the check to mean anything"
    padding = ~real
    assert padding.any() and not ref_decisions[0][:, padding].any()  # padding sits inside the warm-up: never skipped
