"""Evaluation: perplexity dense vs skipping on the same tokens, realised skip ratios, sweeps, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from skiptool.cli import app
from skiptool.config import ModelIdentity, SkipConfig, dense_config
from skiptool.data import DataSpec, token_blocks
from skiptool.evaluate import (SweepContext, evaluate, parse_targets, perplexity, run_sweep, token_nll,
                               torch_logits_fn)
from skiptool.errors import SkipToolError
from skiptool.policies import StaticMask

from conftest import one_line_error
from test_calibration import word_text

runner = CliRunner()


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from skiptool.models import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return word_text(tmp_path_factory.mktemp("data") / "words.txt")


def _one_line_error(result, fragment: str) -> None:
    one_line_error(result, fragment)


def test_token_nll_matches_the_models_own_loss(tiny_model):
    ids = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(0))
    nll = token_nll(torch_logits_fn(tiny_model), ids, batch_size=2)
    assert nll.shape == (3, 19)
    with torch.no_grad():
        loss = tiny_model(input_ids=ids, labels=ids).loss
    assert perplexity(nll) == pytest.approx(float(torch.exp(loss)), rel=1e-5)


def test_a_dense_config_gives_the_dense_perplexity_and_no_skipping(lm, text):
    config = dense_config(lm.model, warmup=4)
    result = evaluate(lm.model, lm.adapter, lm.tokenizer, config, DataSpec(str(text)), samples=3, seq_len=32)
    assert result.ppl_skip == result.ppl_dense
    assert result.skip_ratio == 0.0 and result.per_layer == [0.0] * 6
    assert result.greedy_agreement == 1.0 and result.ffn_saved == 0.0 and result.ideal_speedup == 1.0


def test_static_skip_ratio_counts_all_layers_and_all_positions(lm, text):
    config = dense_config(lm.model, warmup=8, cold_start=1, cold_end=1).with_policy("static", skip_layers=[2, 3])
    result = evaluate(lm.model, lm.adapter, lm.tokenizer, config, DataSpec(str(text), part=(0.5, 1)),
                      samples=3, seq_len=40)
    assert result.skip_ratio == pytest.approx(2 / 6 * 32 / 40)
    assert result.per_layer[2] == pytest.approx(32 / 40) and result.per_layer[1] == 0.0
    assert result.ppl_skip != result.ppl_dense
    data = result.to_dict()
    assert {"ppl_dense", "ppl_skip", "skip_ratio", "per_layer_skip_ratio", "ffn_saved", "greedy_agreement",
            "ideal_speedup"} <= set(data)
    assert result.ffn_saved == pytest.approx(result.skip_ratio)  # zeros in place: a skip saves the whole FFN
    assert 0.0 <= result.greedy_agreement < 1.0 and result.ideal_speedup > 1.0
    assert not any(type(layer).__name__ == "SkipLayer" for layer in lm.adapter.decoder_layers(lm.model))


def test_follow_feeds_the_reference_and_records_the_backends_own_choice():
    from skiptool.backends.decode import Follow

    follow = Follow([3, 1, 2])
    picks = [follow(np.eye(4)[i]) for i in (3, 0, 2)]
    assert picks == [3, 1, 2] and follow.picked == [3, 0, 2] and follow.agreement() == (2, 3)


def test_sweep_runs_extra_curves_and_reports_realised_ratios(lm, text, tmp_path):
    from skiptool.plots import plot_sweep

    config = dense_config(lm.model, warmup=4, cold_start=1, cold_end=1)
    blocks = token_blocks(lm.tokenizer, DataSpec(str(text)), 32, 4)
    dense = token_nll(torch_logits_fn(lm.model), blocks)
    ctx = SweepContext(lm.model, lm.adapter, lm.tokenizer, config, blocks, dense)
    asked = []

    def layer_two(ctx: SweepContext, target: float):
        asked.append(target)
        return StaticMask(ctx.num_layers, ctx.config.skippable_layers, ctx.config.warmup, [2]) if target < 0.3 else None

    sweep = run_sweep(ctx, [0.1, 0.4], ["random", ("layer two", layer_two)])
    assert asked == [0.1, 0.4]
    random_points = sweep["curves"]["random"]
    assert abs(random_points[0]["skip_ratio"] - 0.1) < 0.03 and abs(random_points[1]["skip_ratio"] - 0.4) < 0.04
    mine = sweep["curves"]["layer two"]
    assert mine[0]["skip_ratio"] == pytest.approx(1 / 6 * 28 / 32) and mine[1]["ppl"] is None
    assert sweep["ppl_dense"] == pytest.approx(perplexity(dense))
    assert plot_sweep(json.loads(json.dumps(sweep)), tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_standin_curves_add_closed_form_stand_ins_to_the_policy(lm, text):
    from skiptool.evaluate import SWEEP_CURVES
    from skiptool.standins import CoreStandIn, StandInSpec

    config = dense_config(lm.model, warmup=4, cold_start=1, cold_end=1)
    config = config.evolve(metadata={"calibration_data": {"source": str(text), "part": [0, 0.5], "samples": 3,
                                                          "seq_len": 32}})
    blocks = token_blocks(lm.tokenizer, DataSpec(str(text), part=(0.5, 1)), 32, 3)
    dense = token_nll(torch_logits_fn(lm.model), blocks)
    ctx = SweepContext(lm.model, lm.adapter, lm.tokenizer, config, blocks, dense)
    policy, subs = SWEEP_CURVES["static+standin"](ctx, 0.15)
    assert isinstance(policy, StaticMask) and torch.equal(policy.mask, SWEEP_CURVES["static"](ctx, 0.15).mask)
    assert sorted(subs) == config.skippable_layers
    default = StandInSpec().sized(lm.model.config.hidden_size, lm.model.config.intermediate_size)  # core:auto
    assert all(isinstance(m, CoreStandIn) and m.size == default.size for m in subs.values())
    policy, subs = SWEEP_CURVES["cosine+standin"](ctx, 0.15)
    assert type(policy).__name__ == "CosineGreedy" and sorted(subs) == config.skippable_layers
    sweep = run_sweep(ctx, [0.15], ["static", "static+standin"])
    plain, standin = sweep["curves"]["static"][0], sweep["curves"]["static+standin"][0]
    assert standin["skip_ratio"] == plain["skip_ratio"] > 0  # same decisions, different substitute
    assert standin["ppl"] != plain["ppl"]


def test_unknown_curves_and_bad_targets_are_user_errors(lm, text):
    config = dense_config(lm.model, warmup=4)
    blocks = token_blocks(lm.tokenizer, DataSpec(str(text)), 16, 1)
    ctx = SweepContext(lm.model, lm.adapter, lm.tokenizer, config, blocks, token_nll(torch_logits_fn(lm.model), blocks))
    with pytest.raises(SkipToolError, match="unknown sweep curve"):
        run_sweep(ctx, [0.1], ["nonsense"])
    assert parse_targets("0.05, 0.1") == [0.05, 0.1]
    for bad in ("", "a,b", "0.5,1.5"):
        with pytest.raises(SkipToolError):
            parse_targets(bad)


# -- the command line -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calibrated(tiny_model_dir, text, tmp_path_factory):
    out = tmp_path_factory.mktemp("calib") / "out"
    result = runner.invoke(app, ["calibrate", str(tiny_model_dir), "--data", str(text), "--part", "0:0.5",
                                 "--samples", "6", "--seq-len", "40", "--warmup", "8", "--target-skip", "0.2",
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "realised skip ratio" in result.output
    return out


def test_cli_eval_json_on_the_other_part_of_the_text(tiny_model_dir, text, calibrated):
    result = runner.invoke(app, ["eval", str(tiny_model_dir), "--config", str(calibrated / "skip_config.json"),
                                 "--data", str(text), "--part", "0.5:1", "--samples", "3", "--seq-len", "40",
                                 "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"ppl_dense", "ppl_skip", "skip_ratio", "per_layer_skip_ratio"} <= set(data)
    assert 0.1 < data["skip_ratio"] < 0.3 and data["data"]["part"] == [0.5, 1.0]


def test_cli_eval_sweep_writes_json_and_png(tiny_model_dir, text, calibrated, tmp_path):
    out = tmp_path / "sweep"
    result = runner.invoke(app, ["eval", str(tiny_model_dir), "--config", str(calibrated), "--data", str(text),
                                 "--part", "0.5:1", "--samples", "3", "--seq-len", "40", "--sweep",
                                 "--targets", "0.15", "-o", str(out)])
    assert result.exit_code == 0, result.output
    sweep = json.loads((out / "sweep.json").read_text())
    assert set(sweep["curves"]) == {"cosine", "cosine+standin", "random", "static"}
    cosine = sweep["curves"]["cosine"][0]
    assert abs(cosine["skip_ratio"] - 0.15) < 0.05  # fitted on the calibration part, measured on the other
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "eval.json").is_file()


def test_cli_eval_missing_config_is_one_line_error(tiny_model_dir, text, tmp_path):
    result = runner.invoke(app, ["eval", str(tiny_model_dir), "--config", str(tmp_path / "nope.json"),
                                 "--data", str(text), "-o", str(tmp_path / "out")])
    _one_line_error(result, "skip config not found")
    assert not (tmp_path / "out").exists()


def test_cli_eval_mismatched_config_is_one_line_error(tiny_model_dir, text, tmp_path):
    SkipConfig(ModelIdentity("llama", 30, 576, 1536)).save(tmp_path / "cfg")
    result = runner.invoke(app, ["eval", str(tiny_model_dir), "--config", str(tmp_path / "cfg"),
                                 "--data", str(text), "-o", str(tmp_path / "out")])
    _one_line_error(result, "does not match the model")
    assert not (tmp_path / "out").exists()


def test_cli_eval_unreadable_data_is_one_line_error(tiny_model_dir, calibrated, tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00 not utf-8 \xc3")
    result = runner.invoke(app, ["eval", str(tiny_model_dir), "--config", str(calibrated),
                                 "--data", str(tmp_path / "bad.txt"), "-o", str(tmp_path / "out")])
    _one_line_error(result, "not UTF-8")
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_demo_model_calibrates_on_one_part_and_evaluates_on_the_other(demo, tmp_path):
    """SmolLM2-135M on a small slice of the built-in sample: the fit meets its target, eval is sane."""
    from skiptool.calibration.fit import CalibrationSettings, calibrate

    settings = CalibrationSettings(target_skip=0.15, samples=2, seq_len=128, warmup=32, tolerance=0.01)
    calibrate(demo.model, demo.adapter, demo.tokenizer, DataSpec(part=(0, 0.5)), settings, tmp_path)
    from skiptool.config import load_config

    config = load_config(tmp_path)
    assert config.cold_start >= 1 and config.cold_end >= 1
    assert abs(config.metadata["skip_ratio"] - 0.15) <= 0.02
    result = evaluate(demo.model, demo.adapter, demo.tokenizer, config, DataSpec(part=(0.5, 1)), samples=2,
                      seq_len=128)
    assert 5 < result.ppl_dense < 200
    assert result.ppl_skip > result.ppl_dense
    assert 0.05 < result.skip_ratio < 0.3


def test_cli_eval_refuses_the_calibration_text_unless_asked(tiny_model_dir, text, calibrated):
    args = ["eval", str(tiny_model_dir), "--config", str(calibrated), "--data", str(text), "--samples", "2",
            "--seq-len", "40", "--json"]
    _one_line_error(runner.invoke(app, args), "overlaps the text the config was calibrated on (part 0:0.5")
    assert "--part 0.5:1" in runner.invoke(app, [*args, "--part", "0.25:0.75"]).output
    result = runner.invoke(app, [*args, "--allow-overlap"])
    assert result.exit_code == 0, result.output


def _edited_config(calibrated, tmp_path, edit) -> Path:
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(calibrated, folder)
    data = json.loads((folder / "skip_config.json").read_text())
    edit(data)
    (folder / "skip_config.json").write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize("edit, extra, message", [
    (lambda d: None, ["--samples", "-1"], "Invalid value for '--samples'"),
    (lambda d: None, ["--seq-len", "1"], "Invalid value for '--seq-len'"),
    (lambda d: d.update(metadata=["a", "list"]), ["--sweep"], "metadata must be an object"),
    (lambda d: d["metadata"]["calibration_data"].update(part="x"), [], "calibration_data.part must be"),
    (lambda d: d["metadata"]["calibration_data"].update(samples=0), ["--sweep"], "samples must be a positive"),
    (lambda d: None, ["--router-threshold", "1.0"], "cosine policy has no parameter 'threshold'"),
    (lambda d: d["policy"]["params"].update(greedy_k="two"), [], "greedy_k must be a positive integer"),
    (lambda d: None, ["--sweep", "--targets", "2"], "targets must be skip ratios"),
    (lambda d: None, ["--device", "tpu"], "--device must be cpu or cuda"),
])
def test_cli_eval_bad_inputs_are_one_line_errors_and_write_nothing(tiny_model_dir, text, calibrated, tmp_path, edit,
                                                                   extra, message):
    config = _edited_config(calibrated, tmp_path, edit)
    result = runner.invoke(app, ["eval", str(tiny_model_dir), "--config", str(config), "--data", str(text),
                                 "--part", "0.5:1", "--samples", "2", "--seq-len", "40", "-o", str(tmp_path / "out"),
                                 *extra])
    _one_line_error(result, message)
    assert not (tmp_path / "out").exists()
