"""The skip-aware PyTorch runtime on tiny random models: exactness, KV-cache decoding, gating, batches."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import DynamicCache

from skiptool.adapters import adapter_for, cache_kwargs
from skiptool.policies import CosineGreedy, NeverSkip, RouterPolicy, Routers, StaticMask
from skiptool.runtime import apply_skip, skipping

LAYERS = 6
SKIPPABLE = [1, 2, 3, 4]


class _MaskedFFN(nn.Module):
    """Reference: the original MLP with its output zeroed at positions >= start (a hand-removed FFN)."""

    def __init__(self, mlp: nn.Module, start: int) -> None:
        super().__init__()
        self.mlp, self.start = mlp, start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = (torch.arange(x.shape[1]) < self.start).to(x.dtype).view(1, -1, 1)
        return self.mlp(x) * keep


def _ids(batch: int = 1, seq: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _random_routers(hidden: int = 32, seed: int = 3) -> Routers:
    routers = Routers(hidden, SKIPPABLE)
    g = torch.Generator().manual_seed(seed)
    for lin in routers.nets.values():
        lin.weight.data = torch.randn(lin.weight.shape, generator=g)
        lin.bias.data.zero_()
    return routers


def _decode_token_by_token(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    cache = DynamicCache(config=model.config)
    out = []
    for t in range(ids.shape[1]):
        pos = torch.full((ids.shape[0], 1), t)
        out.append(model(input_ids=ids[:, t:t + 1], use_cache=True, position_ids=pos, **cache_kwargs(model, cache)).logits)
    return torch.cat(out, dim=1)


def test_never_skip_gives_the_unwrapped_logits_exactly(tiny_model):
    ids = _ids(2)
    reference = tiny_model(ids).logits
    with skipping(tiny_model, adapter_for(tiny_model), NeverSkip(LAYERS, SKIPPABLE, warmup=0)) as rt:
        wrapped = tiny_model(ids).logits
        assert rt.stats.skip_ratio == 0.0
    assert torch.equal(wrapped, reference)


def test_remove_restores_the_original_layers(tiny_model):
    originals = list(tiny_model.model.layers)
    rt = apply_skip(tiny_model, adapter_for(tiny_model), NeverSkip(LAYERS, SKIPPABLE, 0))
    assert all(a is not b for a, b in zip(tiny_model.model.layers, originals))
    rt.remove()
    assert all(a is b for a, b in zip(tiny_model.model.layers, originals))


@pytest.mark.parametrize("warmup", [0, 5])
def test_static_mask_equals_ffns_removed_by_hand(tiny_model, warmup):
    ids = _ids(1, 12)
    skip_layers = [2, 4]
    reference_model = copy.deepcopy(tiny_model)
    for i in skip_layers:
        reference_model.model.layers[i].mlp = _MaskedFFN(reference_model.model.layers[i].mlp, warmup)
    reference = reference_model(ids).logits
    with skipping(tiny_model, adapter_for(tiny_model), StaticMask(LAYERS, SKIPPABLE, warmup, skip_layers)) as rt:
        got = tiny_model(ids).logits
        expected_ratio = len(skip_layers) * (12 - warmup) / (LAYERS * 12)
        assert rt.stats.skip_ratio == pytest.approx(expected_ratio)
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-6)


def test_cold_layers_never_skip_even_when_forced(tiny_model):
    policy = StaticMask(LAYERS, SKIPPABLE, 0, skip_layers=list(range(LAYERS)))
    with skipping(tiny_model, adapter_for(tiny_model), policy) as rt:
        rt.set_override([1] * LAYERS)
        tiny_model(_ids())
        per_layer = rt.stats.per_layer()
    assert per_layer[0] == 0.0 and per_layer[-1] == 0.0
    assert all(per_layer[i] == 1.0 for i in SKIPPABLE)


def test_warmup_positions_never_skip(tiny_model):
    with skipping(tiny_model, adapter_for(tiny_model), StaticMask(LAYERS, SKIPPABLE, 10, [2])) as rt:
        with rt.recording() as decisions:
            tiny_model(_ids(1, 16))
        layer2 = decisions[2][0]
    assert not layer2[:10].any() and layer2[10:].all()


def test_override_forces_compute_and_skip(tiny_model):
    policy = StaticMask(LAYERS, SKIPPABLE, 0, [1, 2])
    with skipping(tiny_model, adapter_for(tiny_model), policy) as rt:
        rt.set_override([0, -1, 1, 1, 0, 0])
        tiny_model(_ids())
        assert rt.stats.per_layer() == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]


def test_an_ffn_skipped_by_every_token_is_not_called(tiny_model):
    with skipping(tiny_model, adapter_for(tiny_model), StaticMask(LAYERS, SKIPPABLE, 0, [3])) as rt:
        tiny_model(_ids(2))
        assert rt.stats.ffn_calls_avoided == [0, 0, 0, 1, 0, 0]
        assert rt.stats.ffn_calls[3] == 0


@pytest.mark.parametrize("policy_name", ["static", "cosine", "router"])
def test_kv_cache_decoding_matches_one_full_forward(tiny_model, policy_name):
    policies = {
        "static": lambda: StaticMask(LAYERS, SKIPPABLE, 4, [1, 3]),
        "cosine": lambda: CosineGreedy(LAYERS, SKIPPABLE, 4, [0.2] * LAYERS, greedy_k=2),
        "router": lambda: RouterPolicy(LAYERS, SKIPPABLE, 4, _random_routers()),
    }
    ids = _ids(1, 20)
    with skipping(tiny_model, adapter_for(tiny_model), policies[policy_name]()) as rt:
        with rt.recording() as full_decisions:
            full = tiny_model(ids).logits
            full_decisions = dict(full_decisions)
        stepwise = _decode_token_by_token(tiny_model, ids)
        assert rt.stats.skip_ratio > 0
    torch.testing.assert_close(stepwise, full, rtol=0, atol=1e-5)
    assert any(d.any() for d in full_decisions.values())


def test_batch_rows_with_different_decisions_match_each_row_alone(tiny_model):
    ids = _ids(3, 14)
    policy = RouterPolicy(LAYERS, SKIPPABLE, 2, _random_routers())
    with skipping(tiny_model, adapter_for(tiny_model), policy) as rt:
        with rt.recording() as decisions:
            batched = tiny_model(ids).logits
            rows_differ = any(not torch.equal(d[0], d[1]) for d in decisions.values())
        singles = torch.cat([tiny_model(ids[i:i + 1]).logits for i in range(3)])
    assert rows_differ, "the test needs rows with different decisions"
    torch.testing.assert_close(batched, singles, rtol=0, atol=1e-5)


def test_batched_decode_with_mixed_rows_calls_the_ffn_for_the_rows_that_compute(tiny_model):
    """At decode (one token per row) the FFN runs if any row needs it; skipping rows still get no FFN."""
    policy = StaticMask(LAYERS, SKIPPABLE, 0, [2])
    ids = _ids(2, 6)
    with skipping(tiny_model, adapter_for(tiny_model), policy) as rt:
        rt.set_override(torch.tensor([0, 0, 1, 0, 0, 0]))
        full = tiny_model(ids).logits
        stepwise = _decode_token_by_token(tiny_model, ids)
    torch.testing.assert_close(stepwise, full, rtol=0, atol=1e-5)


def test_apply_skip_refuses_a_policy_for_another_depth(tiny_model):
    with pytest.raises(ValueError, match="layers"):
        apply_skip(tiny_model, adapter_for(tiny_model), NeverSkip(LAYERS + 1, SKIPPABLE, 0))


@pytest.mark.parametrize("make", [lambda: NeverSkip(6, [1, 2, 3, 4], 3),
                                  lambda: StaticMask(6, [1, 2, 3, 4], 3, skip_layers=[2, 4])],
                         ids=["none", "static"])
def test_decide_all_equals_decide_layer_by_layer_under_overrides(make):
    from skiptool.policies import LayerSignals

    policy = make()
    positions = torch.arange(6).repeat(2, 1)
    h = torch.zeros(2, 6, 8)
    for override in (None, torch.tensor([0, 1, -1, 0, 1, 0]), torch.tensor([0, -1, 1, -1, 0, 0])):
        every = policy.decide_all(positions, override)
        assert every.shape == (6, 2, 6)
        for layer in policy.skippable_layers:
            one = policy.decide(LayerSignals(layer, h, h, h, h), positions, None, override)
            assert torch.equal(every[layer], one), (layer, override)


def test_policies_that_read_layer_signals_have_no_all_layer_decision():
    positions = torch.arange(4).unsqueeze(0)
    assert CosineGreedy(6, [1, 2], 0, [None, 0.5, 0.5, None, None, None]).decide_all(positions, None) is None
    assert RouterPolicy(6, [1, 2], 0, Routers(8, [1, 2])).decide_all(positions, None) is None
