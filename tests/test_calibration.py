"""Calibration on tiny random models: layer statistics, the greedy-k rule, cold regions, threshold fitting."""

from __future__ import annotations

import json
import math

import pytest
import torch

from skiptool.adapters import adapter_for
from skiptool.calibration.collect import collect_layer_stats, roc_auc
from skiptool.calibration.fit import (CalibrationSettings, calibrate, choose_cold_regions, fit_cosine, measure_ratio,
                                      replay_decisions, replay_ratio, thresholds_for)
from skiptool.config import load_config
from skiptool.data import DataSpec, token_blocks
from skiptool.errors import SkipToolError
from skiptool.policies import CosineGreedy, LayerSignals
from skiptool.runtime import SkipLayer
from skiptool.standins import StandInSpec

from conftest import tiny_llama, one_line_error

LAYERS = 8


def _blocks(n: int = 8, seq: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model8():
    return tiny_llama(num_layers=LAYERS)


@pytest.fixture(scope="module")
def stats8(model8):
    return collect_layer_stats(model8, adapter_for(model8), _blocks(), warmup=8)


# -- statistics -----------------------------------------------------------------------------------
def test_statistics_cover_every_layer_and_every_token_after_warmup(model8, stats8):
    assert stats8.saturation.shape == (LAYERS, 8 * (48 - 8))
    assert stats8.ffn_ratio.shape == stats8.attn_ffn_cos.shape == stats8.saturation.shape
    assert (stats8.saturation.abs() <= 1 + 1e-5).all() and (stats8.ffn_ratio > 0).all()
    assert all(0.0 <= a <= 1.0 for a in stats8.probe_auc)
    summary = stats8.to_dict()
    assert [r["layer"] for r in summary["layers"]] == list(range(LAYERS))
    assert summary["layers"][3]["saturation"]["q05"] <= summary["layers"][3]["saturation"]["q95"]
    assert not any(isinstance(layer, SkipLayer) for layer in adapter_for(model8).decoder_layers(model8))


def test_saturation_equals_the_cosine_computed_from_plain_hooks(model8, stats8):
    """cos(h, h + FFN(h)) of layer 3, recomputed from the stream entering the FFN norm and the MLP output."""
    adapter, seen = adapter_for(model8), {}
    layer = adapter.decoder_layers(model8)[3]
    hooks = [adapter.post_attention_norm_of(layer).register_forward_hook(lambda m, i, o: seen.update(h=i[0])),
             adapter.mlp_of(layer).register_forward_hook(lambda m, i, o: seen.update(d=o))]
    try:
        with torch.no_grad():
            model8.model(input_ids=_blocks()[:1])
    finally:
        for h in hooks:
            h.remove()
    h, d = seen["h"][0, 8:], seen["d"][0, 8:]
    expected = torch.nn.functional.cosine_similarity(h, h + d, dim=-1)
    torch.testing.assert_close(stats8.saturation[3, :40], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(stats8.ffn_ratio[3, :40], d.norm(dim=-1) / h.norm(dim=-1), rtol=1e-4, atol=1e-6)


def test_roc_auc_counts_ties_as_half():
    pos = torch.tensor([False, False, True, True])
    assert roc_auc(torch.tensor([1.0, 2.0, 3.0, 4.0]), pos) == 1.0
    assert roc_auc(torch.tensor([4.0, 3.0, 2.0, 1.0]), pos) == 0.0
    assert roc_auc(torch.tensor([1.0, 1.0, 1.0, 1.0]), pos) == 0.5
    assert roc_auc(torch.tensor([1.0, 2.0, 2.0, 3.0]), pos) == 0.875


# -- the greedy-k rule ----------------------------------------------------------------------------
def _greedy_decisions(policy: CosineGreedy, cosines: list[list[float]], positions: list[int]) -> list[list[bool]]:
    """The policy's own decide/update over hand-made similarities: cosines[layer][token] -> decisions."""
    return replay_decisions(policy, torch.tensor(cosines), torch.tensor(positions)).T.tolist()


def test_greedy_k_skips_the_next_k_ffns_after_a_saturated_one_then_evaluates_again():
    # layers 0 and 7 cold; threshold 0.9 in the middle; k = 2.  token a: saturated at layer 1 -> skip 2, 3;
    # layer 4 runs (0.5, not saturated); layer 5 runs, saturated -> skip 6.  token b: never saturated.
    # token c: like a but inside the warm-up: never skips.
    policy = CosineGreedy(LAYERS, list(range(1, 7)), warmup=4, thresholds=[None] + [0.9] * 6 + [None], greedy_k=2)
    cos = [[0.99, 0.1, 0.99],  # layer 0 (cold: its threshold is None, so it never starts a skip)
           [0.95, 0.2, 0.95],
           [0.10, 0.3, 0.10],  # skipped for a: its value is ignored
           [0.10, 0.2, 0.10],
           [0.50, 0.2, 0.50],
           [0.95, 0.2, 0.95],
           [0.99, 0.2, 0.99],
           [0.99, 0.2, 0.99]]
    decisions = _greedy_decisions(policy, cos, positions=[10, 11, 2])
    assert decisions[0] == [False, False, True, True, False, False, True, False]
    assert decisions[1] == [False] * LAYERS
    assert decisions[2] == [False] * LAYERS


def test_cosine_greedy_state_counts_down_the_layers_left_to_skip():
    """decide/update called by hand: a saturated FFN arms k skips; each skipped layer uses one up."""
    policy = CosineGreedy(4, [1, 2, 3], warmup=2, thresholds=[0.9, 0.9, 0.9, None], greedy_k=2)
    h = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # two tokens: position 5 (eligible) and 0 (warm-up)
    saturated, not_saturated = torch.tensor([[[-0.01, 0.1], [-0.01, 0.1]]]), torch.tensor([[[-1.0, 1.0]] * 2])
    pos, no = torch.tensor([[5, 0]]), torch.zeros(1, 2, dtype=torch.bool)
    signals = LayerSignals(1, h, torch.zeros_like(h), h, h)
    state = policy.update(0, h, saturated, no, policy.init_state(h))
    assert state.tolist() == [[2, 2]]
    skip = policy.decide(signals, pos, state, None)
    assert skip.tolist() == [[True, False]]  # the warm-up position never skips
    state = policy.update(1, h, saturated, skip, state)
    assert state.tolist() == [[1, 2]]  # skipped: one fewer left; computed and saturated: armed again
    state = policy.update(2, h, not_saturated, torch.tensor([[True, False]]), state)
    assert state.tolist() == [[0, 0]]
    assert policy.decide(signals, pos, state, torch.tensor([0, 1, 0, 0])).tolist() == [[True, False]]  # override


def test_greedy_k_one_alternates_when_every_ffn_is_saturated():
    policy = CosineGreedy(LAYERS, list(range(1, 7)), warmup=0, thresholds=[None] + [0.5] * 6 + [None], greedy_k=1)
    decisions = _greedy_decisions(policy, [[0.9]] * LAYERS, positions=[0])
    assert decisions[0] == [False, False, True, False, True, False, True, False]


# -- cold regions and thresholds ------------------------------------------------------------------
@pytest.mark.parametrize("means, expected", [
    ([0.05, 0.96, 0.97, 0.97, 0.96, 0.97, 0.97, 0.77], (1, 1)),  # ends always cold, middle typical
    ([0.05, 0.30, 0.97, 0.96, 0.97, 0.97, 0.96, 0.97, 0.97, 0.96, 0.50, 0.77], (2, 2)),  # outliers join the ends
    ([0.05, 0.97, 0.30, 0.96, 0.97, 0.97, 0.96, 0.97, 0.97, 0.96, 0.97, 0.77], (1, 1)),  # only next to the end
    ([0.97] * 8, (1, 1)),  # no outliers: one layer each end
    ([0.1] * 6 + [0.97] * 10, (4, 1)),  # capped at a quarter of the layers
])
def test_cold_regions_grow_from_the_ends_over_low_saturation_outliers(means, expected):
    assert choose_cold_regions(means) == expected


def test_cold_regions_always_leave_a_skippable_layer():
    start, end = choose_cold_regions([0.1, 0.97])
    assert start + end < 2 and start >= 0 and end >= 0


def test_per_layer_thresholds_mark_the_requested_share_of_tokens_saturated():
    sat = torch.rand(4, 1000, generator=torch.Generator().manual_seed(0))
    th = thresholds_for(sat, [1, 2], p=0.3)
    assert th[0] is None and th[3] is None
    for i in (1, 2):
        assert abs(float((sat[i] > th[i]).float().mean()) - 0.3) < 0.01
    assert all(t < -1 for t in thresholds_for(sat, [1, 2], p=1.0) if t is not None)


def test_replay_is_exact_when_every_ffn_is_saturated(model8, stats8):
    skippable = list(range(1, LAYERS - 1))
    policy = CosineGreedy(LAYERS, skippable, 8, thresholds_for(stats8.saturation, skippable, 1.0), greedy_k=1)
    real = measure_ratio(model8, adapter_for(model8), policy, _blocks()).skip_ratio
    assert replay_ratio(policy, stats8.saturation, 48) == pytest.approx(real)
    assert real == pytest.approx(3 / LAYERS * 40 / 48)  # layers 2, 4, 6 of every token after warm-up


# -- fitting --------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", [0.10, 0.25])
def test_fitted_thresholds_hit_the_target_on_the_calibration_data(model8, stats8, target):
    adapter, skippable = adapter_for(model8), list(range(1, LAYERS - 1))
    fit = fit_cosine(model8, adapter, _blocks(), stats8, target, skippable, greedy_k=1)
    assert fit.greedy_k == 1
    policy = CosineGreedy(LAYERS, skippable, 8, fit.thresholds, fit.greedy_k)
    realised = measure_ratio(model8, adapter, policy, _blocks()).skip_ratio  # counted by the runtime, all layers
    assert abs(realised - target) <= 0.02
    assert realised == pytest.approx(fit.skip_ratio)


def test_a_target_beyond_greedy_k_one_grows_k(model8, stats8):
    adapter, skippable = adapter_for(model8), list(range(1, LAYERS - 1))
    fit = fit_cosine(model8, adapter, _blocks(), stats8, 0.45, skippable, greedy_k=1)
    assert fit.greedy_k >= 2
    assert abs(fit.skip_ratio - 0.45) <= 0.02


def test_an_unreachable_target_is_a_clear_error(model8, stats8):
    with pytest.raises(SkipToolError, match="out of reach"):
        fit_cosine(model8, adapter_for(model8), _blocks(), stats8, 0.9, list(range(1, LAYERS - 1)))


def word_text(path, words: int = 6000, seed: int = 0):
    """A text file of random words of the tiny tokenizer's vocabulary (w0 ... w124)."""
    g = torch.Generator().manual_seed(seed)
    path.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 125, (words,), generator=g)))
    return path


def test_calibrate_writes_a_loadable_config_statistics_and_plot(tiny_model_dir, tmp_path):
    from skiptool.models import load_model
    from skiptool.plots import plot_layer_stats

    lm = load_model(str(tiny_model_dir))
    text = word_text(tmp_path / "words.txt")
    settings = CalibrationSettings(target_skip=0.2, samples=6, seq_len=40, warmup=8)
    result = calibrate(lm.model, lm.adapter, lm.tokenizer, DataSpec(str(text), part=(0, 0.5)), settings,
                       tmp_path / "out", plot=plot_layer_stats)
    config = load_config(tmp_path / "out")
    assert config.policy.kind == "cosine" and config.target_skip == 0.2 and config.warmup == 8
    assert config.cold_start >= 1 and config.cold_end >= 1
    assert abs(config.metadata["skip_ratio"] - 0.2) <= 0.02
    assert config.metadata["calibration_data"]["part"] == [0.0, 0.5]
    stats = json.loads((tmp_path / "out" / "layer_stats.json").read_text())
    assert len(stats["layers"]) == 6 and stats["layers"][0]["cold"] is True
    assert stats["layers"][2]["threshold"] == config.policy.params["thresholds"][2]
    assert (tmp_path / "out" / "layer_stats.png").read_bytes()[:4] == b"\x89PNG"
    assert math.isclose(result.fit.skip_ratio, config.metadata["skip_ratio"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["layer_stats.json", "layer_stats.png",
                                                                   "skip_config.json", "standin.safetensors"]


def test_calibrate_reports_every_long_phase_including_the_stand_in_fit(tiny_model_dir, tmp_path):
    from skiptool.models import load_model

    lm = load_model(str(tiny_model_dir))
    seen: dict[str, tuple[int, int]] = {}
    settings = CalibrationSettings(target_skip=0.2, samples=6, seq_len=40, warmup=8, standin=StandInSpec("core", 4))
    calibrate(lm.model, lm.adapter, lm.tokenizer, DataSpec(str(word_text(tmp_path / "w.txt")), part=(0, 0.5)),
              settings, progress=lambda label, done, total: seen.__setitem__(label, (done, total)))
    assert seen["statistics"] == (6, 6)
    assert seen["fit stand-ins"] == (12, 12)  # core: two passes over the six blocks
    assert any(label.startswith("fit run") for label in seen)


def test_calibrate_with_stand_in_writes_the_weights_the_config_names(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from skiptool.cli import app
    from skiptool.runtime import load_standins

    text = word_text(tmp_path / "words.txt")
    result = CliRunner().invoke(app, ["calibrate", str(tiny_model_dir), "--data", str(text), "--samples", "3",
                                      "--seq-len", "24", "--warmup", "4", "--stand-in", "4", "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    config = load_config(tmp_path / "o")
    assert config.standin is not None and config.standin.rank == 4
    standins = load_standins(config)
    assert standins.layers == config.skippable_layers
    assert any(p.abs().sum() > 0 for p in standins.parameters())


def test_thresholds_are_fitted_with_the_stand_ins_in_place(tiny_model_dir, tmp_path):
    from skiptool.models import load_model
    from skiptool.policies import build_policy

    lm = load_model(str(tiny_model_dir))
    text = word_text(tmp_path / "words.txt")
    settings = CalibrationSettings(target_skip=0.2, samples=6, seq_len=40, warmup=8, standin=StandInSpec("linear", 8))
    spec = DataSpec(str(text), part=(0, 0.5))
    result = calibrate(lm.model, lm.adapter, lm.tokenizer, spec, settings)
    blocks = token_blocks(lm.tokenizer, spec, 40, 6)
    config = result.config.evolve(base_dir=None)
    with_standins = measure_ratio(lm.model, lm.adapter, build_policy(config), blocks,
                                  substitutes=result.standins.by_layer())
    assert with_standins.skip_ratio == pytest.approx(result.fit.skip_ratio)  # the ratio the fit reported
    assert abs(with_standins.skip_ratio - 0.2) <= 0.02


def test_a_target_in_bytes_saved_is_realised_on_the_calibration_text(tiny_model_dir, tmp_path):
    from skiptool.models import load_model
    from skiptool.policies import build_policy

    lm = load_model(str(tiny_model_dir))
    text = word_text(tmp_path / "words.txt")
    settings = CalibrationSettings(target_saved=0.2, samples=6, seq_len=40, warmup=8, standin=StandInSpec("core", 8))
    spec = DataSpec(str(text), part=(0, 0.5))
    result = calibrate(lm.model, lm.adapter, lm.tokenizer, spec, settings)
    measured = measure_ratio(lm.model, lm.adapter, build_policy(result.config.evolve(base_dir=None)),
                             token_blocks(lm.tokenizer, spec, 40, 6), substitutes=result.standins.by_layer())
    assert measured.skip_ratio > measured.ffn_saved  # a core stand-in reads some of what a skip saves
    assert abs(measured.ffn_saved - 0.2) <= 0.02


# -- the command line: errors are one line, exit 1, and leave no output behind ----------------------
def _calibrate_cli(model_dir, data, out, *extra):
    from typer.testing import CliRunner

    from skiptool.cli import app

    return CliRunner().invoke(app, ["calibrate", str(model_dir), "--data", str(data), "--samples", "2",
                                    "--seq-len", "24", "--warmup", "4", "-o", str(out), *extra])


def _assert_failed_cleanly(result, fragment: str, out) -> None:
    one_line_error(result, fragment)
    assert not out.exists()


def test_cli_calibrate_empty_data_file(tiny_model_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    result = _calibrate_cli(tiny_model_dir, tmp_path / "empty.txt", tmp_path / "out")
    _assert_failed_cleanly(result, "no text", tmp_path / "out")


def test_cli_calibrate_unreadable_or_missing_data(tiny_model_dir, tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\xc3")
    _assert_failed_cleanly(_calibrate_cli(tiny_model_dir, tmp_path / "bin.txt", tmp_path / "out"), "not UTF-8",
                           tmp_path / "out")
    _assert_failed_cleanly(_calibrate_cli(tiny_model_dir, tmp_path, tmp_path / "out"), "is a directory",
                           tmp_path / "out")
    _assert_failed_cleanly(_calibrate_cli(tiny_model_dir, tmp_path / "none.txt", tmp_path / "out"), "not found",
                           tmp_path / "out")


def test_cli_calibrate_bad_options(tiny_model_dir, tmp_path):
    text = word_text(tmp_path / "words.txt", words=400)
    out = tmp_path / "out"
    _assert_failed_cleanly(_calibrate_cli(tiny_model_dir, text, out, "--part", "0.5:0.2"), "--part", out)
    _assert_failed_cleanly(_calibrate_cli(tiny_model_dir, text, out, "--target-skip", "1.5"), "--target-skip", out)
    _assert_failed_cleanly(_calibrate_cli(tiny_model_dir, text, out, "--target-skip", "0.95"), "out of reach", out)
    _assert_failed_cleanly(_calibrate_cli(tiny_model_dir, text, out, "--cold-start", "3", "--cold-end", "3"),
                           "leaves no skippable layer", out)
    (tmp_path / "file").write_text("x")
    result = _calibrate_cli(tiny_model_dir, text, tmp_path / "file")
    assert result.exit_code == 1 and "not a directory" in result.output


# -- one budget across layers, and a warm-up chosen from the data -----------------------------------------
def test_the_budget_goes_to_the_cheapest_kl_per_byte_first():
    from skiptool.calibration.budget import LayerCurve, allocate, max_budget

    cheap = LayerCurve(1, [(0.5, 0.02, 0.01), (1.0, 0.04, 0.10)])  # the second half costs 9x more per byte
    dear = LayerCurve(2, [(0.5, 0.02, 0.05), (1.0, 0.04, 0.10)])
    assert max_budget([cheap, dear]) == pytest.approx(0.08)
    assert allocate([cheap, dear], 0.02) == {1: pytest.approx(0.5), 2: 0.0}
    assert allocate([cheap, dear], 0.03) == {1: pytest.approx(0.5), 2: pytest.approx(0.25)}  # dear's 2.5/byte next
    assert allocate([cheap, dear], 1.0) == {1: 1.0, 2: 1.0}


def test_a_layer_curve_keeps_only_its_convex_lower_hull():
    from skiptool.calibration.budget import LayerCurve

    curve = LayerCurve(3, [(0.25, 0.01, 0.05), (0.5, 0.02, 0.06), (1.0, 0.04, 0.2)])  # the first point is not worth it
    assert [p[0] for p in curve.hull()] == [0.0, 0.5, 1.0]


def test_the_warm_up_keeps_the_leading_ranges_that_cost_most_per_skip():
    from skiptool.calibration.budget import choose_warmup

    rows = [{"from": a, "to": b, "skipped": 10, "kl_per_skip": c}
            for a, b, c in ((0, 1, 9.0), (1, 2, 5.0), (2, 4, 1.1), (4, 8, 1.0), (8, 16, 0.9), (16, 32, 1.0))]
    assert choose_warmup(rows) == 2
    assert choose_warmup([{**r, "kl_per_skip": 1.0} for r in rows]) == 0


def test_budget_mode_and_an_automatic_warm_up_on_a_tiny_model(tiny_model_dir, tmp_path):
    from skiptool.models import load_model
    from skiptool.policies import build_policy

    lm = load_model(str(tiny_model_dir))
    text = word_text(tmp_path / "words.txt")
    settings = CalibrationSettings(target_skip=0.2, samples=6, seq_len=40, warmup=None, threshold_mode="budget",
                                   cost_blocks=2, standin=None)
    spec = DataSpec(str(text), part=(0, 0.5))
    result = calibrate(lm.model, lm.adapter, lm.tokenizer, spec, settings)
    assert result.warmup_costs and result.config.warmup == result.stats.warmup < 40
    assert {c.layer for c in result.layer_costs} == set(result.config.skippable_layers)
    measured = measure_ratio(lm.model, lm.adapter, build_policy(result.config), token_blocks(lm.tokenizer, spec, 40, 6))
    assert abs(measured.skip_ratio - 0.2) <= 0.02
    stats = result.layer_stats_json()
    assert stats["warmup_costs"] == result.warmup_costs and "layer_cost" in stats["layers"][1]
