"""The policy registry: kinds, typed parameters that validate themselves, overrides, and the positions rule."""

from __future__ import annotations

import pytest
import torch

from skiptool.config import ArtifactRef, ModelIdentity, PolicySpec, SkipConfig
from skiptool.errors import ConfigError, SkipToolError
from skiptool.policies import (POLICIES, CosineGreedy, NeverSkip, RandomSkip, RouterPolicy, Routers, StaticMask,
                               build_policy, check_policy, policy_params, positions_from_mask)

IDENTITY = ModelIdentity("llama", 6, 32, 64, "tiny")


def _config(kind: str, **params) -> SkipConfig:
    return SkipConfig(IDENTITY, PolicySpec(kind, params), cold_start=1, cold_end=1, warmup=2)


def test_the_built_in_kinds_are_registered_with_their_classes():
    assert {k: POLICIES.get(k) for k in POLICIES} == {"none": NeverSkip, "static": StaticMask, "cosine": CosineGreedy,
                                                      "random": RandomSkip, "router": RouterPolicy}
    assert [k for k in POLICIES if not POLICIES.get(k).exportable] == ["random"]


@pytest.mark.parametrize("kind, params, message", [
    ("magic", {}, "unknown policy kind 'magic' .known: none, static, cosine, random, router"),
    ("cosine", {"thresholds": [0.5]}, "6 thresholds"),
    ("cosine", {"thresholds": [None] * 6, "greedy_k": 0}, "greedy_k"),
    ("cosine", {"thresholds": ["x"] * 6}, "cosines"),
    ("cosine", {"greedy_k": 1}, "cosine policy needs thresholds"),
    ("static", {"skip_layers": [9]}, "layer indices below 6"),
    ("static", {"skip_layers": [2], "extra": 1}, "no parameter 'extra'"),
    ("random", {"rate": 1.5}, "rate in .0, 1."),
    ("router", {"threshold": 0.5}, "needs a 'router' entry"),
])
def test_bad_parameters_are_one_clear_error(kind, params, message):
    with pytest.raises(SkipToolError, match=message):
        check_policy(_config(kind, **params))


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.2, 7])
def test_a_router_threshold_outside_zero_one_is_refused_not_ignored(tmp_path, threshold):
    routers = Routers(32, [1, 2, 3, 4])
    routers.save(tmp_path / "router.safetensors")
    config = _config("router", threshold=0.5).evolve(router=ArtifactRef("router.safetensors"), base_dir=tmp_path)
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        build_policy(config, threshold=threshold)
    assert build_policy(config, threshold=0.3).threshold == 0.3
    assert build_policy(config, threshold=None).threshold == 0.5  # None keeps the config's value


def test_parameters_are_typed_and_build_the_policy():
    config = _config("cosine", thresholds=[None, .9, .8, .9, .9, None], greedy_k=2)
    params = policy_params(config)
    assert params.greedy_k == 2 and params.to_dict() == config.policy.params
    policy = build_policy(config)
    assert isinstance(policy, CosineGreedy) and policy.greedy_k == 2 and policy.skippable_layers == [1, 2, 3, 4]


def test_positions_count_the_real_tokens_before_each_one_in_a_left_padded_batch():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions_from_mask(mask, 5).tolist() == [[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert positions_from_mask(mask, 2).tolist() == [[1, 2], [3, 4]]  # the last two tokens (a decode step of 2)


@pytest.mark.parametrize("kind, params, message", [
    ("cosine", {"thresholds": [None, 2.0, .9, .9, .9, None]}, "cosines"),
    ("cosine", {"thresholds": [None, float("nan"), .9, .9, .9, None]}, "cosines"),
    ("static", {"skip_layers": [0, 2]}, "layers .0. are cold"),
])
def test_values_a_policy_could_never_use_are_refused(kind, params, message):
    with pytest.raises(ConfigError, match=message):
        check_policy(_config(kind, **params))
