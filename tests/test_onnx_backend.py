"""The ONNX Runtime decode backend on exported graphs: KV-cache loop, realised skip ratio, blocks, errors.

Tiny exports are shared with tests/test_export.py (one export per policy per session); the demo-model
test is marked `integration`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_export import LAYERS, WARMUP, export_cache, tiny_export

from skiptool.backends.base import greedy_decode
from skiptool.backends.onnxruntime import OrtBackend, session_options
from skiptool.errors import SkipToolError

PROMPT = list(range(3, 3 + WARMUP + 4))  # past the warm-up


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Path:
    return export_cache(tmp_path_factory)


@pytest.mark.parametrize("mask,expected", [(None, 1 / LAYERS), ([0, 1, 1, 0], 2 / LAYERS), ([-1] * LAYERS, 0.0)])
def test_skip_ratio_counts_the_graphs_own_decisions_over_decode_steps(base, mask, expected):
    backend = OrtBackend(tiny_export(base, "static"), skip_mask=mask)  # static policy skips layer 2
    backend.prefill(PROMPT)
    assert backend.skip_ratio() == 0.0  # the prefill is not counted
    for token in range(5):
        backend.step(token)
    assert backend.skip_ratio() == pytest.approx(expected)
    backend.reset()
    assert backend.skip_ratio() == 0.0 and backend.length == 0


def test_kv_cache_steps_match_one_block_forward(base):
    backend = OrtBackend(tiny_export(base, "cosine"))
    ids = PROMPT + [7, 9, 11, 13]
    block = backend.block_logits(np.array([ids]))[0]
    backend.reset()
    stepwise = [backend.prefill(ids[:4])] + [backend.step(t) for t in ids[4:]]
    np.testing.assert_allclose(np.stack(stepwise), block[3:], atol=1e-5, rtol=0)
    assert backend.length == len(ids)
    key, value = backend.present(1)
    assert key.shape[2] == value.shape[2] == len(ids)


def test_reset_starts_a_new_sequence(base):
    backend = OrtBackend(tiny_export(base, "router"))
    first = backend.prefill(PROMPT)
    backend.step(5)
    backend.reset()
    np.testing.assert_array_equal(backend.prefill(PROMPT), first)


def test_greedy_decode_timing_loop_runs_the_backend(base):
    backend = OrtBackend(tiny_export(base, "static"), threads=1, spin=False)
    timing = greedy_decode(backend, PROMPT, new_tokens=6)
    assert len(timing.token_ids) == 6 and len(timing.step_s) == 5
    assert timing.skip_ratio == pytest.approx(1 / LAYERS)
    assert backend.name == "onnxruntime" and backend.precision == "fp32" and backend.mode == "skip"


def test_session_options_set_threads_and_spinning():
    opts = session_options(threads=1, spin=False)
    assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 1
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_a_skip_mask_of_the_wrong_length_is_refused(base):
    with pytest.raises(SkipToolError, match="entries"):
        OrtBackend(tiny_export(base, "static"), skip_mask=[1, 1])


def test_a_folder_that_is_not_an_export_is_a_clear_error(tmp_path):
    with pytest.raises(SkipToolError, match="not a skiptool ONNX export"):
        OrtBackend(tmp_path)


# -- the demo model ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def demo_export(demo, tmp_path_factory) -> Path:
    """The demo model exported once per session with a static mask skipping one of its 30 FFNs (layer 8: the answer survives it)."""
    from skiptool.config import dense_config
    from skiptool.exporters.onnx import export

    base = export_cache(tmp_path_factory) / "demo-export"
    out = base / "out"
    if not (out / "skiptool_export.json").is_file():
        base.mkdir(parents=True, exist_ok=True)
        config = dense_config(demo.model, "smollm2-135m").with_policy("static", skip_layers=[8]).save(base)
        export("smollm2-135m", out, config, parity_steps=32)
    return out


@pytest.mark.integration
def test_demo_export_matches_pytorch_and_answers_paris(demo, demo_export):
    import json

    from skiptool.backends.onnxruntime import generate_from_export

    parity = json.loads((demo_export / "skiptool_export.json").read_text())["report"]["parity"]["graph"]
    assert parity["max_abs_logits"] <= 1e-4 and parity["steps"] >= 32 and parity["decisions_match"] and parity["skip_ratio_ort"] > 0
    result = generate_from_export(demo_export, "What is the capital of France?", max_new_tokens=12)
    assert "Paris" in result.text


def test_cli_eval_onnx_compares_the_graph_with_itself_forced_dense(base, tmp_path):
    import json

    import torch
    from test_export import tiny_model_dir
    from typer.testing import CliRunner

    from skiptool.cli import app
    from skiptool.data import DataSpec, token_blocks
    from skiptool.evaluate import perplexity, token_nll, torch_logits_fn
    from skiptool.models import load_model

    text = tmp_path / "text.txt"
    rng = np.random.default_rng(0)
    text.write_text(" ".join(f"w{i}" for i in rng.integers(0, 100, 400)))
    result = CliRunner().invoke(app, ["eval", "--onnx", str(tiny_export(base, "static")), "--data", str(text),
                                      "--samples", "2", "--seq-len", "16", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    lm = load_model(str(tiny_model_dir(base)))
    blocks = token_blocks(lm.tokenizer, DataSpec(source=str(text)), 16, 2)
    with torch.no_grad():
        dense = perplexity(token_nll(torch_logits_fn(lm.model), blocks))
    assert report["ppl_dense"] == pytest.approx(dense, rel=1e-4)
    assert report["skip_ratio"] > 0 and report["ppl_skip"] != report["ppl_dense"]
    assert report["per_layer_skip_ratio"][2] > 0 and report["per_layer_skip_ratio"][0] == 0


def test_onnxruntime_genai_loads_the_export_and_generates_the_same_tokens(base):
    og = pytest.importorskip("onnxruntime_genai")
    out = tiny_export(base, "static")
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + 10, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([PROMPT], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    genai_tokens = list(generator.get_sequence(0))[len(PROMPT):]
    ours = greedy_decode(OrtBackend(out), PROMPT, new_tokens=10)
    assert genai_tokens == ours.token_ids and ours.skip_ratio > 0
