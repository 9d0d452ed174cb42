"""The GPU decode path, checked on the CPU: the Triton kernels (interpreted, and compiled ahead for Hopper), the
decode engine's CPU fallback against the PyTorch eager runtime, the engine as a decode backend in the product
(generate, bench), random-weight models as a model source, the benchmark's smoke mode, and the CUDA check."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from typer.testing import CliRunner

from conftest import one_line_error
from skiptool.accelerators import require_cuda
from skiptool.adapters import adapter_for
from skiptool.backends.torch_backend import TorchBackend
from skiptool.bench import BenchRequest, Measurement, cuda_specs, measure, plan_runs, summarise
from skiptool.cli import app
from skiptool.config import ArtifactRef, ModelIdentity, SkipConfig, dense_config, load_config
from skiptool.errors import ConfigError, MissingDependencyError, ModelLoadError, SkipToolError
from skiptool.generate import decode, decode_backend
from skiptool.gpu import DecodeEngine, EngineBackend
from skiptool.gpu.kernels import (gathered_skippable_ffn, kernel_backend, reference_skippable_ffn, skippable_ffn,
                                  substitute_output)
from skiptool.gpu.weights import FFNWeights, SubstituteWeights
from skiptool.models import NO_TOKENIZER, load_model
from skiptool.policies import CosineGreedy, NeverSkip, RouterPolicy, Routers, SkipPolicy, StaticMask
from skiptool.runtime import apply_skip
from skiptool.shapes import SHAPES, build_random_llama
from skiptool.standins import CoreStandIn, LowRankStandIn

REPO = Path(__file__).resolve().parents[1]
LAYERS, SKIPPABLE = 6, [1, 2, 3, 4]
PROMPT, STEPS = 8, 8
# About the median saturation of each layer of the tiny model below: roughly half the tokens skip.
COSINE_THRESHOLDS = [0.9935, 0.9931, 0.9956, 0.9975, 0.9981, 0.9984]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, which also spares them OpenMP barriers on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _subprocess_env(**extra: str) -> dict[str, str]:
    """This checkout first on the path, whatever is installed; one thread, as here."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


# ------------------------------------------------------------------------------------------------
# (a) Triton kernels, interpreted on the CPU, against the reference
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def interpreted() -> dict[str, float | bool]:
    pytest.importorskip("triton", reason="triton is not installed (pip install triton==3.6.0)")
    run = subprocess.run([sys.executable, str(REPO / "tests" / "gpu_kernel_cases.py")], capture_output=True,
                         text=True, env=_subprocess_env(TRITON_INTERPRET="1"), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


@pytest.mark.parametrize("case", ["skip_all_zero", "skip_all_standin", "compute_all_zero", "compute_all_standin",
                                  "mixed_zero", "mixed_standin", "one_row_computes", "layer_flag_skips_every_row",
                                  "integer_decisions", "two_row_blocks_mixed", "masked_tails_mixed"])
def test_triton_kernels_match_the_reference_in_fp32(interpreted, case):
    assert interpreted[case] < 1e-5


@pytest.mark.parametrize("case", ["skip_all_core", "mixed_core", "two_row_blocks_mixed_core",
                                  "masked_tails_mixed_core"])
def test_triton_kernels_compute_core_stand_ins_like_the_reference(interpreted, case):
    assert interpreted[case] < 1e-5


@pytest.mark.parametrize("case", ["fp16_mixed_standin", "fp16_mixed_core"])
def test_triton_kernels_match_the_reference_in_fp16(interpreted, case):
    assert interpreted[case] < 2e-3


def test_triton_ffn_kernel_returns_at_once_when_every_row_skips(interpreted):
    assert interpreted["all_skip_leaves_ffn_intermediate_unwritten"] is True


@pytest.mark.parametrize("case", ["no_skip_leaves_standin_bottleneck_unwritten", "no_skip_leaves_core_inner_unwritten"])
def test_triton_standin_is_computed_only_when_a_row_skips(interpreted, case):
    assert interpreted[case] is True


HOPPER_SHAPES = {"demo": (576, 1536), "8b": (4096, 14336)}  # hidden, intermediate


@pytest.mark.parametrize("shape, rows, kind", [("demo", 1, "linear"), ("demo", 8, "linear"), ("demo", 1, "core"),
                                               ("demo", 8, "core"), ("8b", 1, "core"), ("8b", 64, "core")])
def test_triton_kernels_compile_for_hopper_in_bf16(shape, rows, kind):
    """The interpreter cannot run bf16 dots; compiling for sm_90 checks the bf16 kernels Triton will build there:
    accepted, within a Hopper block's shared memory (an 8B FFN at 64 rows needed 256 KB before the row tile
    counted in the K tile's budget), and streaming weights with 16-byte async copies."""
    pytest.importorskip("triton", reason="triton is not installed (pip install triton==3.6.0)")
    from skiptool.gpu.triton_ffn import compile_ahead, launches

    def meta(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, dtype=torch.bfloat16, device="meta")

    hidden, intermediate = HOPPER_SHAPES[shape]
    ffn = FFNWeights(meta(intermediate, hidden), meta(intermediate, hidden), meta(hidden, intermediate))
    width = 16 if kind == "linear" else intermediate // 16  # rank 16, or the default core:auto (1/16 of the neurons)
    standin = SubstituteWeights(meta(width, hidden), meta(hidden, width), meta(hidden),
                                meta(width, hidden) if kind == "core" else None)
    planned, _ = launches(meta(rows, hidden), ffn, torch.empty(rows, dtype=torch.bool, device="meta"), standin)
    for kernel in compile_ahead(planned, arch=90):
        assert kernel.metadata.shared <= 227 * 1024
        assert "cp.async.cg.shared.global" in kernel.asm["ptx"]


# ------------------------------------------------------------------------------------------------
# Reference kernels (the CPU fallback)
# ------------------------------------------------------------------------------------------------
def test_cpu_runs_the_reference_kernels():
    assert kernel_backend("cpu") == "torch"


def test_gathered_ffn_equals_the_branch_free_reference():
    g = torch.Generator().manual_seed(0)
    ffn = FFNWeights(*(torch.randn(s, generator=g) for s in [(24, 16), (24, 16), (16, 24)]))
    standin = SubstituteWeights(*(torch.randn(s, generator=g) for s in [(4, 16), (16, 4), (16,)]))
    x = torch.randn(2, 3, 16, generator=g)
    skip = torch.tensor([[True, False, True], [False, False, True]])
    expected = reference_skippable_ffn(x, ffn, skip, standin)
    assert torch.allclose(gathered_skippable_ffn(x, ffn, skip, standin), expected, atol=1e-5)
    assert torch.allclose(skippable_ffn(x, ffn, skip, standin), expected)
    standin_of_first_row = standin.out @ (standin.inner @ x[0, 0]) + standin.bias
    assert torch.allclose(expected[0, 0], standin_of_first_row, atol=1e-5)


def test_a_core_stand_in_in_the_kernels_form_computes_what_the_stand_in_computes():
    standin = _random_standins(16, "core")[SKIPPABLE[0]]
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    weights = SubstituteWeights.of(standin, torch.float32, torch.device("cpu"))
    assert weights.width == 4 and weights.gate is not None
    assert torch.allclose(substitute_output(x, weights), standin(x), atol=1e-6)
    assert weights.nbytes == sum(p.numel() * 4 for p in standin.parameters())


def test_a_stand_in_kind_the_kernels_do_not_compute_is_one_config_error():
    with pytest.raises(ConfigError, match="supports zero, linear and core stand-in substitutes, not Linear"):
        SubstituteWeights.of(torch.nn.Linear(4, 4), torch.float32, torch.device("cpu"))


# ------------------------------------------------------------------------------------------------
# (b) The engine's CPU fallback against the PyTorch eager runtime
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return build_random_llama("tiny", seed=0)


def _random_routers(hidden: int) -> Routers:
    routers = Routers(hidden, SKIPPABLE)
    g = torch.Generator().manual_seed(3)
    for linear in routers.nets.values():
        linear.weight.data = torch.randn(linear.weight.shape, generator=g)
    return routers


def _random_standins(hidden: int, kind: str = "linear") -> dict[int, torch.nn.Module]:
    g = torch.Generator().manual_seed(4)
    standins = {i: LowRankStandIn(hidden, 4) if kind == "linear" else CoreStandIn(hidden, 4) for i in SKIPPABLE}
    for standin in standins.values():
        for p in standin.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.05
    return standins


POLICIES = {
    "static": lambda hidden: StaticMask(LAYERS, SKIPPABLE, 3, skip_layers=[2, 4]),
    "cosine": lambda hidden: CosineGreedy(LAYERS, SKIPPABLE, 2, COSINE_THRESHOLDS),
    "router": lambda hidden: RouterPolicy(LAYERS, SKIPPABLE, 0, _random_routers(hidden)),
    "forced": lambda hidden: NeverSkip(LAYERS, SKIPPABLE, 2),
    "cosine+override": lambda hidden: CosineGreedy(LAYERS, SKIPPABLE, 2, COSINE_THRESHOLDS),
    "cosine+standin": lambda hidden: CosineGreedy(LAYERS, SKIPPABLE, 2, COSINE_THRESHOLDS),
    "router+standin": lambda hidden: RouterPolicy(LAYERS, SKIPPABLE, 0, _random_routers(hidden)),
    "router+core": lambda hidden: RouterPolicy(LAYERS, SKIPPABLE, 0, _random_routers(hidden)),
}
STANDIN_KINDS = {"standin": "linear", "core": "core"}  # policy name suffix -> the stand-ins its run uses
OVERRIDES = {"forced": [1, 1, -1, 0, 1, -1], "cosine+override": [0, 1, -1, 0, 1, 0]}  # layers 0, 5: cold


def _token_ids(batch: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, PROMPT + STEPS), generator=torch.Generator().manual_seed(batch))


def _engine_run(model, policy, ids, mode, substitutes=None, override=None):
    """Logits and ``[layers, batch, seq]`` decisions of the prefill and of each teacher-forced decode step."""
    engine = DecodeEngine(model, adapter_for(model), policy, batch_size=ids.shape[0], max_len=PROMPT + STEPS,
                          mode=mode, substitutes=substitutes, override=override)
    passes = [(engine.prefill(ids[:, :PROMPT]).clone(), engine.last_decisions.clone())]
    for t in range(PROMPT, PROMPT + STEPS):
        logits = engine.step(ids[:, t]).clone()
        passes.append((logits[:, None], engine.last_decisions.clone()))
    return passes, engine.skip_summary()["skip_ratio"]


def _runtime_run(model, policy, ids, substitutes=None, override=None):
    """The same passes through the eager runtime and a normal Hugging Face forward with a DynamicCache."""
    runtime = apply_skip(model, adapter_for(model), policy, substitutes)
    runtime.set_override(override)
    cache = DynamicCache(config=model.config)
    cache_keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    passes = []
    try:
        with torch.no_grad(), runtime.recording() as decisions:
            for start, end in [(0, PROMPT)] + [(t, t + 1) for t in range(PROMPT, PROMPT + STEPS)]:
                positions = torch.arange(start, end).expand(ids.shape[0], -1)
                logits = model(input_ids=ids[:, start:end], position_ids=positions, use_cache=True,
                               **{cache_keyword: cache}).logits
                passes.append((logits, torch.stack([decisions[i] for i in range(LAYERS)])))
    finally:
        runtime.remove()
    return passes, runtime.stats.skip_ratio


@pytest.mark.parametrize("mode", ["device", "host"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", list(POLICIES))
def test_engine_decides_and_decodes_like_the_eager_runtime(tiny, name, batch, mode):
    hidden = tiny.config.hidden_size
    policy = POLICIES[name](hidden)
    kind = STANDIN_KINDS.get(name.rpartition("+")[2])
    substitutes = _random_standins(hidden, kind) if kind else None
    ids = _token_ids(batch, tiny.config.vocab_size)
    engine, engine_ratio = _engine_run(tiny, policy, ids, mode, substitutes, OVERRIDES.get(name))
    runtime, runtime_ratio = _runtime_run(tiny, policy, ids, substitutes, OVERRIDES.get(name))
    all_decisions = torch.cat([d.flatten() for _, d in runtime])
    assert all_decisions.any() and not all_decisions.all()  # a test of real skipping, not of one branch
    for (engine_logits, engine_decisions), (runtime_logits, runtime_decisions) in zip(engine, runtime, strict=True):
        assert torch.equal(engine_decisions, runtime_decisions)
        torch.testing.assert_close(engine_logits, runtime_logits, atol=2e-5, rtol=1e-4)
    assert engine_ratio == pytest.approx(runtime_ratio)


def test_dense_engine_decodes_like_the_unwrapped_model(tiny):
    policy = NeverSkip(LAYERS, SKIPPABLE, 0)
    ids = _token_ids(2, tiny.config.vocab_size)
    engine, ratio = _engine_run(tiny, policy, ids, "dense")
    runtime, _ = _runtime_run(tiny, policy, ids)
    for (engine_logits, _), (runtime_logits, _) in zip(engine, runtime, strict=True):
        torch.testing.assert_close(engine_logits, runtime_logits, atol=2e-5, rtol=1e-4)
    assert ratio == 0.0


class _FirstRowSkipsLayer3(SkipPolicy):
    """Test double: at layer 3, the first row of the batch skips, the others compute."""

    def rule(self, s, state):
        skip = torch.zeros(s.x.shape[:2], dtype=torch.bool)
        skip[0] = s.layer == 3
        return skip


def test_engine_counts_avoided_ffn_calls_apart_from_skipped_tokens(tiny):
    """Batch 2: layer 2 forced to skip (both rows), layer 3 skipping one row: 3 of 12 (layer, token) pairs
    skipped, but only 1 of 6 FFN calls avoided (a call is avoided only when every row skips)."""
    engine = DecodeEngine(tiny, adapter_for(tiny), _FirstRowSkipsLayer3(LAYERS, SKIPPABLE, 0), batch_size=2,
                          max_len=16, override=[0, 0, 1, 0, 0, 0])
    engine.prefill(_token_ids(2, tiny.config.vocab_size)[:, :4])
    engine.reset_counters()
    engine.step()
    summary = engine.skip_summary()
    assert summary["skip_ratio"] == pytest.approx(3 / 12) and summary["call_skip_ratio"] == pytest.approx(1 / 6)
    assert summary["forwards"] == 1 and summary["tokens"] == 2


def test_engine_refuses_a_model_wrapped_by_the_runtime(tiny):
    runtime = apply_skip(tiny, adapter_for(tiny), NeverSkip(LAYERS, SKIPPABLE, 0))
    try:
        with pytest.raises(ConfigError, match="remove"):
            DecodeEngine(tiny, adapter_for(tiny), NeverSkip(LAYERS, SKIPPABLE, 0), batch_size=1, max_len=16)
    finally:
        runtime.remove()


class _ReplayingGraph:
    """Stands in for a CUDA graph on the CPU: capturing computes nothing, each replay runs the captured ops on the
    same carry (as a replay reruns the recorded kernels on the captured buffers)."""

    def __init__(self, ops):
        self.ops = ops

    def replay(self):
        self.ops()


@pytest.mark.parametrize("mode", ["device", "host"])
def test_captured_decode_step_replays_like_the_eager_step(tiny, monkeypatch, mode):
    """The capture plumbing, graphs aside: one graph per step (device) or pieces between host reads, each
    layer's branch chosen by its flag and writing the shared delta buffer (host)."""
    import skiptool.gpu.decoder as decoder

    monkeypatch.setattr(decoder, "_captured", _ReplayingGraph)
    policy = CosineGreedy(LAYERS, SKIPPABLE, 2, COSINE_THRESHOLDS)
    substitutes = _random_standins(tiny.config.hidden_size)
    ids = _token_ids(2, tiny.config.vocab_size)
    eager, _ = _engine_run(tiny, policy, ids, mode, substitutes)
    engine = DecodeEngine(tiny, adapter_for(tiny), policy, batch_size=2, max_len=PROMPT + STEPS, mode=mode,
                          substitutes=substitutes)
    engine.prefill(ids[:, :PROMPT])
    engine._capture_graphs()
    assert engine.graphed == ("pieces" if mode == "host" else "whole")
    for t, (eager_logits, eager_decisions) in zip(range(PROMPT, PROMPT + STEPS), eager[1:]):
        torch.testing.assert_close(engine.step(ids[:, t])[:, None], eager_logits)
        assert torch.equal(engine.last_decisions, eager_decisions)


def test_engine_stays_eager_on_a_cpu(tiny):
    engine = DecodeEngine(tiny, adapter_for(tiny), NeverSkip(LAYERS, SKIPPABLE, 0), batch_size=1, max_len=16)
    engine.prefill(torch.zeros(1, 4, dtype=torch.int64))
    assert engine.capture() is False and engine.graphed is None


# ------------------------------------------------------------------------------------------------
# (c) The engine as a decode backend: the one decode loop, generate and bench
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def configs(tiny, tmp_path_factory) -> dict[str, SkipConfig]:
    """A static and a router skip config for the tiny model (skippable layers 1-4, no warm-up)."""
    folder = tmp_path_factory.mktemp("configs")
    base = dense_config(tiny, cold_start=1, cold_end=1, warmup=0)
    _random_routers(tiny.config.hidden_size).save(folder / "router.safetensors")
    router = base.evolve(router=ArtifactRef("router.safetensors")).with_policy("router", threshold=0.5)
    return {"static": base.with_policy("static", skip_layers=[2, 4]), "router": load_config(router.save(folder))}


def _prompt(vocab: int) -> list[int]:
    return _token_ids(1, vocab)[0, :PROMPT].tolist()


def _torch_decode(model, config):
    """Greedy decode through the PyTorch eager backend; the result and its FFN counters."""
    backend = TorchBackend(model, adapter_for(model), config)
    try:
        return decode(backend, _prompt(model.config.vocab_size), STEPS), backend.ffn_counters()
    finally:
        backend.close()


@pytest.mark.parametrize("ffn_mode", ["device", "host"])
@pytest.mark.parametrize("kind", ["static", "router"])
def test_engine_backend_decodes_like_the_torch_backend_through_the_one_decode_loop(tiny, configs, kind, ffn_mode):
    expected, expected_counters = _torch_decode(tiny, configs[kind])
    backend = EngineBackend(tiny, adapter_for(tiny), configs[kind], ffn_mode=ffn_mode, max_len=PROMPT + STEPS)
    result = decode(backend, _prompt(tiny.config.vocab_size), STEPS)
    assert result.token_ids == expected.token_ids
    assert result.per_layer_skip == pytest.approx(expected.per_layer_skip)
    assert 0 < result.skip_ratio < 1 and result.skip_ratio == pytest.approx(expected.skip_ratio)
    assert backend.ffn_counters() == expected_counters
    again = decode(backend, _prompt(tiny.config.vocab_size), STEPS)  # reset reuses the engine and its cache
    assert again.token_ids == result.token_ids and again.skip_ratio == pytest.approx(result.skip_ratio)


def test_dense_engine_backend_decodes_like_the_unwrapped_model(tiny):
    expected, _ = _torch_decode(tiny, None)
    backend = EngineBackend(tiny, adapter_for(tiny), ffn_mode="dense", max_len=PROMPT + STEPS)
    result = decode(backend, _prompt(tiny.config.vocab_size), STEPS)
    assert (backend.mode, backend.precision) == ("dense", "fp32")
    assert result.token_ids == expected.token_ids and result.skip_ratio == 0.0 and result.per_layer_skip is None


def test_engine_backend_captures_the_decode_step_once_and_replays_it_for_later_sequences(tiny, configs,
                                                                                          monkeypatch):
    import skiptool.gpu.decoder as decoder

    captures = []
    monkeypatch.setattr(decoder, "_captured", _ReplayingGraph)
    monkeypatch.setattr(DecodeEngine, "capture", lambda engine: captures.append(engine._capture_graphs()))
    expected, _ = _torch_decode(tiny, configs["router"])
    backend = EngineBackend(tiny, adapter_for(tiny), configs["router"], max_len=PROMPT + STEPS)
    results = [decode(backend, _prompt(tiny.config.vocab_size), STEPS) for _ in range(2)]
    assert len(captures) == 1 and backend.graphed == "whole"
    assert [r.token_ids for r in results] == [expected.token_ids] * 2


def test_generate_decodes_through_the_engine_on_cuda_and_through_the_eager_runtime_on_a_cpu(configs):
    lm = load_model("random:tiny", needs_tokenizer=False)
    with decode_backend(lm, configs["static"], "cuda", max_len=32) as on_cuda:
        assert isinstance(on_cuda, EngineBackend) and on_cuda.engine.mode == "device"
    with decode_backend(lm, None, "cuda", max_len=32) as dense_on_cuda:
        assert dense_on_cuda.engine.mode == "dense"
    with decode_backend(lm, configs["static"], "cpu", max_len=32) as on_cpu:
        assert isinstance(on_cpu, TorchBackend) and on_cpu.mode == "skip"  # under the config's runtime
    assert not any(type(layer).__name__ == "SkipLayer" for layer in lm.model.model.layers)


def test_the_eager_runtime_moves_stand_ins_to_the_model_s_device():
    """Stand-ins load on the CPU; on ``--device cuda`` the eager runtime (eval, bench's eager runs) must find them
    beside the model ("meta" stands in for a GPU here: nothing runs)."""
    model = build_random_llama("tiny").to("meta")
    standins = _random_standins(model.config.hidden_size)
    runtime = apply_skip(model, adapter_for(model), NeverSkip(LAYERS, SKIPPABLE, 0), standins)
    runtime.remove()
    assert {p.device.type for s in standins.values() for p in s.parameters()} == {"meta"}


def test_bench_adds_the_gpu_runs_on_cuda_only():
    lm = load_model("random:tiny", needs_tokenizer=False)
    backends = {device: {spec.backend for spec in plan_runs(BenchRequest("random:tiny", skip_ratios=[0.25],
                                                                         peers=False, device=device),
                                                            lm, None, 1, 32)}
                for device in ("cpu", "cuda")}
    assert backends == {"cpu": {"torch"}, "cuda": {"torch", "torch-cuda-graph"}}


def test_bench_gpu_runs_pair_with_the_graphed_dense_run_and_decide_alike_on_device_and_host(tiny, configs):
    specs = cuda_specs(tiny, adapter_for(tiny), configs["static"], [0.5], max_length=PROMPT + STEPS)
    measurement = Measurement([_prompt(tiny.config.vocab_size)], new_tokens=4, repeats=1, warmup=0)
    rows = {row["label"]: row for row in summarise(measure(specs, measurement))}
    assert sorted(rows) == sorted([
        "torch-cuda-graph fp32 dense", "torch-cuda-graph fp32 skip (static)", "torch-cuda-graph fp32 skip 50% forced",
        "torch-cuda-graph fp32 skip (static) (host sync)", "torch-cuda-graph fp32 skip 50% forced (host sync)"])
    for label, row in rows.items():
        if row["mode"] == "skip":
            assert row["speedup"] > 0 and row["ideal_speedup"] > 1 and row["ideal_basis"]["num_layers"] == LAYERS
            assert row["skip_ratio"] == pytest.approx(rows[label.removesuffix(" (host sync)")]["skip_ratio"])
    assert rows["torch-cuda-graph fp32 skip (static)"]["skip_ratio"] == pytest.approx(2 / 6)
    assert rows["torch-cuda-graph fp32 skip 50% forced (host sync)"]["settings"]["ffn_mode"] == "host"


# ------------------------------------------------------------------------------------------------
# (d) Random-weight models as a model source
# ------------------------------------------------------------------------------------------------
def test_a_random_model_has_the_named_shape_and_dtype_and_no_tokenizer():
    lm = load_model("random:tiny", dtype="bf16", needs_tokenizer=False)
    shape = SHAPES["tiny"]
    assert lm.tokenizer is None and lm.adapter.family == "llama"
    assert (lm.config.num_hidden_layers, lm.config.hidden_size, lm.config.vocab_size) == \
        (shape.num_layers, shape.hidden, shape.vocab)
    assert next(lm.model.parameters()).dtype == torch.bfloat16


def test_a_random_model_can_be_built_from_a_llama_shaped_config_json(tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path)
    lm = load_model(f"random:{tmp_path / 'config.json'}", needs_tokenizer=False)
    assert lm.adapter.family == "qwen2" and lm.config.hidden_size == 32 and lm.tokenizer is None


def test_a_random_model_of_an_unknown_shape_or_architecture_is_refused(tmp_path):
    from transformers import AutoConfig

    with pytest.raises(ModelLoadError, match="neither a known shape"):
        load_model("random:13b", needs_tokenizer=False)
    AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gpt2'"):
        load_model(f"random:{tmp_path}", needs_tokenizer=False)


COMMANDS = {  # each command on the tiny random model, writing (if it ever does) under {out}
    "generate": ["generate", "random:tiny", "-p", "hi"],
    "eval": ["eval", "random:tiny", "--config", "{config}", "-o", "{out}"],
    "calibrate": ["calibrate", "random:tiny", "-o", "{out}"],
    "train-router": ["train-router", "random:tiny", "-o", "{out}"],
    "export": ["export", "random:tiny", "-o", "{out}"],
    "bench": ["bench", "random:tiny", "--no-peers", "--json", "{out}/bench.json"],
}


def _cli(command: str, tmp_path: Path, *options: str):
    """Run a command of :data:`COMMANDS` with `{out}` (a folder that does not exist yet) and `{config}` (a skip
    config) filled in."""
    config = SkipConfig(ModelIdentity("llama", 6, 64, 128)).save(tmp_path / "config")
    args = [a.format(out=tmp_path / "out", config=config) for a in COMMANDS[command]]
    return CliRunner().invoke(app, [*args, *options])


@pytest.mark.parametrize("command", ["generate", "eval", "calibrate", "train-router", "export"])
def test_commands_that_need_text_refuse_a_random_model_in_one_line_and_write_nothing(command, tmp_path):
    one_line_error(_cli(command, tmp_path), NO_TOKENIZER)
    assert not (tmp_path / "out").exists()


def test_bench_on_a_random_model_decodes_random_prompt_ids_on_the_cpu(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "random:tiny", "--skip-ratio", "0.5", "-n", "4", "--repeats", "1",
                                      "--prompt-tokens", "8", "--no-peers", "--threads", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [run["label"] for run in report["runs"]] == ["torch fp32 dense", "torch fp32 skip 50% forced"]
    assert report["settings"]["prompt_tokens"] == [8] and report["settings"]["dtype"] == "fp32"
    assert all(run["tokens_per_s"] > 0 for run in report["runs"])


@pytest.mark.parametrize("option", [["--quality"], ["--data", "builtin:wikitext2-sample"]])
def test_bench_refuses_text_options_for_a_random_model_in_one_line(option, tmp_path):
    one_line_error(_cli("bench", tmp_path, *option), NO_TOKENIZER)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# (e) The benchmark's smoke mode; (f) asking for CUDA without one
# ------------------------------------------------------------------------------------------------
def test_gpu_bench_smoke_runs_every_variant_and_writes_json(tmp_path):
    out = tmp_path / "gpu_bench.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_bench.py"), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, env=_subprocess_env(), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {r["batch"] for r in rows} == {1, 2} and not [r for r in rows if r["error"] or r["skipped"]]
    standin_rows = {"device forced 25% +stand-in linear:16", "device forced 25% +stand-in core:auto"}
    assert standin_rows <= {r["name"] for r in rows}
    assert all(r["tokens_per_s"] > 0 and r["p50_step_ms"] > 0 for r in rows)
    forced = next(r for r in rows if r["name"] == "device forced 25%" and r["batch"] == 2)
    assert forced["call_skip_ratio"] == pytest.approx(2 / 6) and forced["ideal_speedup"] > 1
    assert forced["speedup_vs_dense"] > 0 and report["meta"]["copy_bandwidth_gb_per_s"] > 0
    assert "tok/s" in run.stdout


def test_require_cuda_without_a_gpu_raises_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SkipToolError, match="needs an NVIDIA GPU") as raised:
        require_cuda()
    assert isinstance(raised.value, MissingDependencyError)


@pytest.mark.parametrize("command", ["generate", "eval", "bench", "calibrate", "train-router"])
def test_device_cuda_without_a_gpu_is_one_error_line_and_writes_nothing(command, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    one_line_error(_cli(command, tmp_path, "--device", "cuda"), "needs an NVIDIA GPU")
    assert not (tmp_path / "out").exists()
