"""`skiptool export`: one KV-cache graph with an If per skippable FFN, checked against the PyTorch skip runtime.

Tiny random Llama models (4 layers, cold 1/1, so layers 1 and 2 are skippable, warm-up 4). Each policy is
exported once per test session (tracing takes a while on 2 cores) and shared through :func:`tiny_export`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import one_line_error, save_tiny_model_dir
from typer.testing import CliRunner

from skiptool.cli import app
from skiptool.config import ArtifactRef, dense_config, load_config
from skiptool.errors import ConfigError, SkipToolError
from skiptool.models import load_model
from skiptool.policies import Routers
from skiptool.standins import StandIns

LAYERS = 4
SKIPPABLE = [1, 2]
WARMUP = 4
runner = CliRunner()


# -- shared exports ----------------------------------------------------------------------------------
def tiny_model_dir(base: Path) -> Path:
    path = base / "tiny-model"
    if not (path / "config.json").is_file():
        path.mkdir(parents=True, exist_ok=True)
        save_tiny_model_dir(path, num_layers=LAYERS)
    return path


def tiny_config(base: Path, kind: str) -> Path:
    """A skip config of policy `kind` for the tiny model (router weights random, written beside it)."""
    model = load_model(str(tiny_model_dir(base))).model
    cfg = dense_config(model, "tiny", cold_start=1, cold_end=1, warmup=WARMUP)
    folder = base / f"config-{kind}"
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "static":
        cfg = cfg.with_policy("static", skip_layers=[2])
    elif kind == "cosine":
        cfg = cfg.with_policy("cosine", thresholds=[0.3] * LAYERS, greedy_k=1)
    elif kind == "router":
        routers = Routers(model.config.hidden_size, SKIPPABLE)
        g = torch.Generator().manual_seed(3)
        for lin in routers.nets.values():
            lin.weight.data = torch.randn(lin.weight.shape, generator=g)
        routers.save(folder / "router.safetensors")
        cfg = cfg.evolve(router=ArtifactRef("router.safetensors")).with_policy("router", threshold=0.5)
    elif kind in ("router+standin", "router+core"):
        cfg = load_config(tiny_config(base, "router"))
        standin_kind = "core" if kind == "router+core" else "linear"
        standins = StandIns(model.config.hidden_size, 4, SKIPPABLE, standin_kind, model.config.intermediate_size)
        for p in standins.parameters():
            p.data = torch.randn(p.shape, generator=torch.Generator().manual_seed(4)) * 0.1
        standins.save(folder / "standin.safetensors")
        shutil.copy(base / "config-router" / "router.safetensors", folder / "router.safetensors")
        cfg = cfg.evolve(standin=ArtifactRef("standin.safetensors", rank=4, kind=standin_kind), base_dir=None)
    elif kind == "random":
        cfg = cfg.with_policy("random", rate=0.5)
    elif kind == "forced":
        return None  # no config: the dense config with the default cold layers (only skip_mask skips)
    return cfg.save(folder)


def tiny_export(base: Path, kind: str, fmt: str = "onnx", **options) -> Path:
    """Export the tiny model with policy `kind` (``dense``: no If) once per session; the export folder."""
    from skiptool.exporters import ExportRequest, run_export

    tag = "-".join([kind, fmt, *(f"{k}{v}" for k, v in sorted(options.items()))])
    out = base / f"export-{tag}"
    if not (out / "skiptool_export.json").is_file():
        config = None if kind == "dense" else tiny_config(base, kind)
        run_export(fmt, ExportRequest(str(tiny_model_dir(base)), out, config, dense=kind == "dense", **options))
    return out


def export_cache(tmp_path_factory) -> Path:
    """Where tiny exports live for the session (``SKIPTOOL_TEST_EXPORT_CACHE`` keeps them across sessions)."""
    cached = os.environ.get("SKIPTOOL_TEST_EXPORT_CACHE")
    return Path(cached) if cached else tmp_path_factory.getbasetemp() / "skiptool-exports"


def manifest_of(folder: Path):
    from skiptool.contract import read_manifest

    return read_manifest(folder)


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Path:
    return export_cache(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny(base):
    return load_model(str(tiny_model_dir(base)))


# -- the graph ---------------------------------------------------------------------------------------
def test_export_writes_graph_config_tokenizer_and_genai_config(base):
    out = tiny_export(base, "static")
    for name in ("model.onnx", "skip_config.json", "skiptool_export.json", "genai_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"
    genai = json.loads((out / "genai_config.json").read_text())
    decoder = genai["model"]["decoder"]
    assert decoder["num_hidden_layers"] == LAYERS and decoder["filename"] == "model.onnx"
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert decoder["outputs"]["present_value_names"] == "present.%d.value"
    assert load_config(out).policy.kind == "static"


def test_one_if_per_skippable_layer_with_only_the_ffn_inside(base):
    model = onnx.load(str(tiny_export(base, "static") / "model.onnx"))
    ifs = [n for n in model.graph.node if n.op_type == "If"]
    assert len(ifs) == len(SKIPPABLE)
    onnx.checker.check_model(model, full_check=True)
    for node in ifs:
        branches = {a.name: a.g for a in node.attribute}
        assert sum(n.op_type == "MatMul" for n in branches["else_branch"].node) == 3  # gate, up, down
        assert not any(n.op_type == "MatMul" for n in branches["then_branch"].node)
    assert manifest_of(tiny_export(base, "static")).if_count == len(SKIPPABLE)


def test_io_names_follow_optimum_and_skip_mask_is_optional(base):
    import onnxruntime as ort

    session = ort.InferenceSession(str(tiny_export(base, "static") / "model.onnx"))
    inputs = [i.name for i in session.get_inputs()]
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "past_key_values.3.value" in inputs and "skip_mask" not in inputs
    assert [i.name for i in session.get_overridable_initializers()] == ["skip_mask"]
    outputs = [o.name for o in session.get_outputs()]
    assert outputs[0] == "logits" and "present.0.key" in outputs and outputs[-1] == "skip_decisions"
    past = next(i for i in session.get_inputs() if i.name == "past_key_values.0.key")
    assert past.shape[0] == "batch_size" and past.shape[2] == "past_sequence_length"


@pytest.mark.parametrize("kind", ["static", "cosine", "router", "router+standin", "router+core"])
def test_ort_matches_the_pytorch_skip_runtime_for_each_policy(base, kind):
    parity = manifest_of(tiny_export(base, kind)).checks["fp32"]
    assert parity["steps"] >= 32 and parity["prompt_tokens"] > WARMUP
    assert parity["max_abs_logits"] <= 1e-4 and parity["max_abs_present"] <= 1e-4
    assert parity["decisions_match"] and parity["verdict"]["ok"]
    assert parity["skip_ratio_ort"] > 0, "the check is only meaningful if something was skipped"


@pytest.mark.parametrize("mask", [[0, 1, -1, 0], [0, -1, 1, 0], [1, 1, 1, 1]])
def test_forced_masks_through_skip_mask_match_the_runtime_override(base, tiny, mask):
    from skiptool.exporters.validate import check_parity, parity_prompt, tolerance_for
    from skiptool.runtime import open_runtime

    out = tiny_export(base, "cosine")
    runtime = open_runtime(tiny.model, tiny.adapter, load_config(out))
    prompt = parity_prompt(tiny.tokenizer, WARMUP, 128)
    try:
        report = check_parity(out / "model.onnx", manifest_of(out), tiny.model, runtime, prompt, 32, skip_mask=mask)
    finally:
        runtime.remove()
    assert report.problems(tolerance_for("onnx", "fp32")) == [], report


def test_all_compute_skip_mask_gives_the_dense_model(base, tiny):
    from skiptool.backends.onnxruntime import OrtBackend

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    dense = tiny.model(ids).logits.numpy()
    for kind in ("static", "router"):
        backend = OrtBackend(tiny_export(base, kind), skip_mask=[-1] * LAYERS)
        np.testing.assert_allclose(backend.block_logits(ids.numpy()), dense, atol=1e-4, rtol=0)
        assert not backend.last_decisions.any()


def test_dense_export_has_no_if_and_matches_the_model(base, tiny):
    from skiptool.backends.onnxruntime import OrtBackend

    out = tiny_export(base, "dense")
    assert sum(n.op_type == "If" for n in onnx.load(str(out / "model.onnx")).graph.node) == 0
    backend = OrtBackend(out)
    assert backend.mode == "dense" and load_config(out).policy.kind == "none"
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(6))
    np.testing.assert_allclose(backend.block_logits(ids.numpy()), tiny.model(ids).logits.numpy(), atol=1e-4, rtol=0)
    assert manifest_of(out).checks["fp32"]["max_abs_logits"] <= 1e-4


def test_router_weights_are_copied_beside_the_exported_config(base):
    out = tiny_export(base, "router")
    config = load_config(out)
    assert config.router is not None and (out / config.router.path).is_file()


def test_random_policy_is_refused(base, tmp_path):
    from skiptool.exporters import ExportRequest, run_export

    with pytest.raises(ConfigError, match="random"):
        run_export("onnx", ExportRequest(str(tiny_model_dir(base)), tmp_path / "out", tiny_config(base, "random")))
    assert not (tmp_path / "out").exists()


# -- quantization and precision ------------------------------------------------------------------------
@pytest.mark.parametrize("scheme,op", [("int8", "MatMulNBits"), ("int4", "MatMulNBits")])
def test_quantization_reaches_the_weights_inside_if_branches(base, tmp_path, scheme, op):
    import shutil

    from skiptool.backends.onnxruntime import OrtBackend
    from skiptool.onnx_graph import count_ops
    from skiptool.exporters.quantize import quantize_graph

    src = tiny_export(base, "static")
    shutil.copy(src / "skiptool_export.json", tmp_path)
    inside = quantize_graph(src / "model.onnx", tmp_path / "model.onnx", scheme)
    model = onnx.load(str(tmp_path / "model.onnx"))
    assert inside == count_ops(model, op, in_branches_only=True) == 3 * len(SKIPPABLE)
    assert count_ops(model, "MatMul", in_branches_only=True) == 0
    ids = np.arange(1, 11)[None]
    quantized = OrtBackend(tmp_path).block_logits(ids)
    reference = OrtBackend(src).block_logits(ids)
    assert np.isfinite(quantized).all() and np.abs(quantized - reference).max() < 0.5


@pytest.mark.parametrize("scheme,bits", [("int8", 8), ("int4", 4)])
def test_quantized_branch_weights_have_the_schemes_bit_width(base, tmp_path, scheme, bits):
    from skiptool.onnx_graph import iter_nodes
    from skiptool.exporters.quantize import check_quantized, quantize_graph

    quantize_graph(tiny_export(base, "static") / "model.onnx", tmp_path / "model.onnx", scheme)
    model = onnx.load(str(tmp_path / "model.onnx"))
    widths = {a.i for n, inside in iter_nodes(model.graph) if n.op_type == "MatMulNBits" for a in n.attribute
              if a.name == "bits"}
    assert widths == {bits}
    other = "int4" if scheme == "int8" else "int8"
    with pytest.raises(SkipToolError, match="bit weights inside If branches"):
        check_quantized(model, other)


def test_int8_is_closer_to_fp32_than_int4(base, tmp_path):
    from skiptool.backends.onnxruntime import OrtBackend
    from skiptool.exporters.quantize import quantize_graph

    src = tiny_export(base, "static")
    ids = np.arange(1, 17)[None]
    reference = OrtBackend(src).block_logits(ids)
    errors = {}
    for scheme in ("int8", "int4"):
        out = tmp_path / scheme
        out.mkdir()
        shutil.copy(src / "skiptool_export.json", out)
        quantize_graph(src / "model.onnx", out / "model.onnx", scheme)
        errors[scheme] = float(np.abs(OrtBackend(out).block_logits(ids) - reference).max())
    assert errors["int8"] < errors["int4"] / 4


def test_fp16_export_loads_and_runs_close_to_fp32(base):
    from skiptool.backends.onnxruntime import OrtBackend

    out = tiny_export(base, "static", dtype="fp16")
    backend = OrtBackend(out)
    assert backend.precision == "fp16" and backend.graph.kv_dtype == np.float16
    ids = np.arange(1, 11)[None]
    reference = OrtBackend(tiny_export(base, "static")).block_logits(ids)
    assert np.abs(backend.block_logits(ids) - reference).max() < 5e-2
    assert manifest_of(out).checks["fp16"]["decisions_match"]


# -- TensorRT graph requirements (no TensorRT needed) --------------------------------------------------
def test_exported_graph_meets_tensorrt_parser_requirements(base):
    from skiptool.exporters.tensorrt import graph_problems, profile_shapes

    model = onnx.load(str(tiny_export(base, "router") / "model.onnx"))
    assert graph_problems(model) == []
    shapes = profile_shapes(model, max_batch=2, max_context=512)
    assert "skip_mask" not in shapes
    lo, opt, hi = shapes["past_key_values.0.key"]
    assert lo[0] == 1 and lo[2] == 0 and hi[0] == 2 and hi[2] == 511 and lo[1] == hi[1]


def test_tensorrt_checks_flag_contrib_ops_float_conditions_and_rank_mismatch():
    from onnx import TensorProto, helper

    from skiptool.exporters.tensorrt import graph_problems

    def branch(name: str, rank: int) -> onnx.GraphProto:
        out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [1] * rank)
        return helper.make_graph([helper.make_node("Identity", ["x"], [f"{name}_out"])], name, [], [out])

    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=branch("a", 3), else_branch=branch("b", 2)),
             helper.make_node("FusedMatMul", ["x", "x"], ["z"], domain="com.microsoft")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1]),
                                           helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    problems = " | ".join(graph_problems(model))
    assert "com.microsoft" in problems and "0-d bool" in problems and "ranks 3 / 2" in problems


# -- the command line ----------------------------------------------------------------------------------
def _one_line_error(result) -> str:
    return one_line_error(result)


def test_cli_int4_export_prints_if_count_and_parity_then_generate_runs_it(base, tmp_path):
    out = tmp_path / "cli-export"
    result = runner.invoke(app, ["export", str(tiny_model_dir(base)), "--config", str(tiny_config(base, "static")),
                                 "-o", str(out), "--parity-steps", "4", "--quantize", "int4", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    manifest, checks = report["manifest"], report["manifest"]["checks"]
    assert manifest["if_count"] == len(SKIPPABLE) and manifest["precision"] == "int4"
    assert checks["fp32"]["verdict"]["ok"] and checks["fp32"]["max_abs_logits"] <= 1e-4
    assert report["details"]["quantized_ops_in_branches"] == 3 * len(SKIPPABLE)
    assert checks["int4"]["verdict"]["ok"] and checks["int4"]["max_abs_logits"] < 0.5
    assert json.loads((out / "skiptool_export.json").read_text())["precision"] == "int4"
    gen = runner.invoke(app, ["generate", "--onnx", str(out), "--prompt", "w1 w2 w3 w4 w5 w6", "--raw", "-n", "8"])
    assert gen.exit_code == 0, gen.output
    assert "tokens/s decode (onnxruntime)" in gen.output and "FFN skip ratio" in gen.output


@pytest.mark.parametrize("args,message", [
    (["--format", "coreml"], "unknown export format 'coreml' (known: onnx, ort, tensorrt)"),
    (["--quantize", "int3"], "--quantize must be one of none, int8, int4"),
    (["--dtype", "fp16", "--quantize", "int4"], "use it with --dtype fp32"),
    (["--parity-steps", "0"], "Invalid value for '--parity-steps'"),
    (["--format", "tensorrt"], "TensorRT"),
])
def test_cli_export_bad_options_are_one_line_errors_and_write_nothing(base, tmp_path, args, message):
    out = tmp_path / "out"
    result = runner.invoke(app, ["export", str(tiny_model_dir(base)), "--config", str(tiny_config(base, "static")),
                                 "-o", str(out), *args])
    assert message in _one_line_error(result)
    assert not out.exists()


def test_cli_export_to_an_unwritable_directory_is_one_line_error(base, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = runner.invoke(app, ["export", str(tiny_model_dir(base)), "--config", str(tiny_config(base, "static")),
                                 "-o", str(blocker / "out")])
    assert "not writable" in _one_line_error(result)


def test_cli_export_with_a_config_for_another_model_is_one_line_error(base, tmp_path):
    wrong = load_config(tiny_config(base, "static")).to_dict()
    wrong["model"]["num_layers"] = 6
    path = tmp_path / "wrong.json"
    path.write_text(json.dumps(wrong))
    out = tmp_path / "out"
    result = runner.invoke(app, ["export", str(tiny_model_dir(base)), "--config", str(path), "-o", str(out)])
    assert "does not match" in _one_line_error(result)
    assert not out.exists()


def test_without_a_config_the_graph_skips_only_what_skip_mask_forces(base):
    from skiptool.backends.onnxruntime import OrtBackend

    out = tiny_export(base, "forced")
    assert manifest_of(out).policy == "none" and manifest_of(out).if_count == len(SKIPPABLE)
    warmup, ids = load_config(out).warmup, np.arange(1, 41)[None]
    backend = OrtBackend(out)
    backend.block_logits(ids)
    assert backend.skip_ratio() == 0.0
    backend.set_skip_mask([0, 1, 1, 0])
    backend.reset()
    backend.block_logits(ids)
    assert backend.skip_ratio() == pytest.approx(2 / LAYERS * (40 - warmup) / 40)


def test_a_graph_that_disagrees_with_pytorch_is_refused_and_leaves_no_folder(base, tmp_path, monkeypatch):
    from onnx import numpy_helper

    from skiptool.exporters import ExportRequest, run_export
    from skiptool.exporters import onnx as onnx_target

    real = onnx_target.fold_weight_transposes

    def fold_and_corrupt(model):  # scale one FFN weight inside an If branch: the graph no longer matches
        folded = real(model)
        branch = next(a.g for n in model.graph.node if n.op_type == "If" for a in n.attribute
                      if a.name == "else_branch")
        weight = next(t for t in model.graph.initializer if t.name in {i for n in branch.node for i in n.input}
                      and len(t.dims) == 2)
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.01, weight.name))
        return folded

    monkeypatch.setattr(onnx_target, "fold_weight_transposes", fold_and_corrupt)
    out = tmp_path / "out"
    with pytest.raises(SkipToolError, match="does not match the PyTorch skip runtime: logits differ by up to"):
        run_export("onnx", ExportRequest(str(tiny_model_dir(base)), out, tiny_config(base, "static")))
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_tied_lm_head_is_not_transposed_at_every_run():
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from skiptool.exporters.onnx import fold_weight_transposes

    table = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["W", "ids"], ["h"]),
             helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["h", "Wt"], ["logits"])]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [3, 10])],
                              [numpy_helper.from_array(table, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    ids = np.array([1, 4, 7])
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"ids": ids})[0]
    assert fold_weight_transposes(model) == 1
    assert not any(n.op_type == "Transpose" for n in model.graph.node)
    after = ort.InferenceSession(model.SerializeToString()).run(None, {"ids": ids})[0]
    np.testing.assert_array_equal(after, before)


def test_weight_transposes_inside_if_branches_become_one_shared_initializer():
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from skiptool.exporters.onnx import fold_weight_transposes
    from skiptool.onnx_graph import iter_nodes

    weight = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)  # Linear(4 -> 5) layout

    def branch(name: str, scale: float) -> onnx.GraphProto:
        nodes = [helper.make_node("Transpose", ["W"], [f"{name}_wt"], perm=[1, 0]),
                 helper.make_node("MatMul", ["x", f"{name}_wt"], [f"{name}_y"]),
                 helper.make_node("Mul", [f"{name}_y", f"{name}_s"], [f"{name}_out"])]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT,
                                                                                    [2, 5])],
                                 [numpy_helper.from_array(np.array(scale, dtype=np.float32), f"{name}_s")])

    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", 1.0), else_branch=branch("else", 2.0))
    graph = helper.make_graph([node], "ifs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
                                              helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
                              [numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    feeds = [{"x": x, "cond": np.array(c)} for c in (True, False)]
    before = [ort.InferenceSession(model.SerializeToString()).run(None, f)[0] for f in feeds]
    assert fold_weight_transposes(model) == 2
    assert not any(n.op_type == "Transpose" for n, _ in iter_nodes(model.graph))
    assert [t.name for t in model.graph.initializer] == ["W.T"]  # one transposed copy, the original gone
    after = [ort.InferenceSession(model.SerializeToString()).run(None, f)[0] for f in feeds]
    for a, b in zip(after, before):
        np.testing.assert_array_equal(a, b)


def test_exporting_a_small_module_logs_nothing_even_when_the_root_logger_shows_info(caplog):
    # a library that calls logging.basicConfig(level=INFO) must not turn an export into pages of pass reports
    from skiptool.exporters.ort_policy import export_small

    caplog.set_level("INFO")
    export_small(torch.nn.Linear(4, 2), {"input": torch.randn(2, 3, 4)}, ["y"], opset=18)
    assert [r.getMessage() for r in caplog.records] == []
