"""Bad input on every command: one ``error:`` line, exit 1, nothing written — found before the model loads
wherever it can be; the default tables read at 80 columns; the plots name every colour and label every axis.

The cases run in-process with the tiny model. Those marked "before the model loads" run with ``load_model``
replaced by one that fails the test, so they also show that the check comes before the heavy work.
"""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest
from conftest import one_line_error
from rich.console import Console
from typer.testing import CliRunner

from skiptool.cli import app
from skiptool.config import ModelIdentity, SkipConfig

runner = CliRunner()
TINY = ModelIdentity("llama", 6, 32, 64)  # conftest's tiny_llama()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir):
    """Good and bad inputs, outside the folder each case runs in: text, files that are not what they should be,
    skip configs, and export folders with a part missing or broken."""
    from skiptool.contract import MODEL_FILE, ExportManifest, write_manifest

    d = tmp_path_factory.mktemp("inputs")
    words = d / "words.txt"
    words.write_text(" ".join(f"w{i % 100}" for i in range(4000)))
    (d / "notutf8.txt").write_bytes(b"\xff\xfe not \x81 text")
    (d / "empty.txt").write_text("")
    (d / "short.txt").write_text("w1 w2 w3")
    (d / "nofield.jsonl").write_text('{"other": "w1 w2 w3"}\n')
    (d / "afile").write_text("a file where a folder belongs")
    (d / "adir").mkdir()
    (d / "bytes.json").write_bytes(b"\xff\xfe{")
    calibrated = {"source": str(words), "field": "text", "split": "test", "part": [0.0, 0.5], "samples": 2,
                  "seq_len": 16}
    cosine = SkipConfig(TINY, warmup=4, metadata={"calibration_data": calibrated}).with_policy(
        "cosine", thresholds=[None, None, 0.9, 0.9, None, None], greedy_k=1)
    cosine.save(d / "cosine")
    cosine.evolve(metadata={"calibration_data": {**calibrated, "part": "x"}}).save(d / "badpart")
    cosine.with_policy("cosine", thresholds=[0.9], greedy_k=1).save(d / "badpolicy")
    manifest = ExportManifest("onnx", ("onnxruntime",), MODEL_FILE, "fp32", "skip", "cosine", "tiny", 6, (2, 3), 2, 8,
                              128, (2,), 2)
    for name in ("nograph", "corrupt"):
        write_manifest(d / name, manifest)
    (d / "corrupt" / MODEL_FILE).write_bytes(b"not a graph")
    paths = {p.stem if p.is_file() else p.name: str(p) for p in d.iterdir()}
    return {**paths, "model": str(tiny_model_dir), "missing": str(d / "missing")}


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a model loads: the bad input must be found first."""
    import skiptool.exporters.onnx as onnx_target
    import skiptool.exporters.ort_target as ort_target
    import skiptool.models as models

    def refuse(*_args, **_kwargs):
        raise AssertionError("the model loaded before the bad input was found")

    for module in (models, onnx_target, ort_target):
        monkeypatch.setattr(module, "load_model", refuse)


def refused(args: list[str], fragment: str, inputs: dict[str, str], tmp_path, monkeypatch) -> None:
    """Run `args` ({name} filled from `inputs`) in an empty folder: one error line naming `fragment`, nothing
    written there (outputs go to ``out`` inside it), not even an empty folder."""
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, [a.format(**inputs) for a in args])
    one_line_error(result, fragment)
    assert not list(tmp_path.iterdir()), list(tmp_path.iterdir())


# -- info ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, fragment", [
    (["{missing}"], "model not found"),
    (["{afile}"], "neither a .gguf file nor a model directory"),
    (["{adir}"], "without config.json"),
    ([""], "without config.json"),
    (["{missing}.gguf"], "model file not found"),
])
def test_info_refuses_a_bad_model_in_one_line(args, fragment, inputs, tmp_path, monkeypatch):
    refused(["info", *args], fragment, inputs, tmp_path, monkeypatch)


# -- generate --------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, fragment", [
    (["-p", "", "--raw"], "--prompt is empty"),
    (["-p", "   "], "--prompt is empty"),
    (["-p", "w1", "-n", "0"], "--max-new-tokens"),
    (["-p", "w1", "--temperature", "-1"], "--temperature"),
    (["-p", "w1", "--temperature", "inf"], "--temperature must be a finite number"),
    (["-p", "w1", "--temperature", "1", "--seed", str(2**64)], "--seed must be in [0, 2^64)"),
    (["-p", "w1", "--top-p", "0"], "top-p in (0, 1]"),
    (["-p", "w1", "--top-p", "nan"], "top-p in (0, 1]"),
    (["-p", "w1", "--router-threshold", "0.5"], "give the config (--config)"),
    (["-p", "w1", "--config", "{cosine}", "--router-threshold", "0.5"], "no parameter 'threshold'"),
    (["-p", "w1", "--config", "{missing}"], "skip config not found"),
    (["-p", "w1", "--config", "{adir}"], "skip config not found"),
    (["-p", "w1", "--config", "{bytes}"], "is not UTF-8 text"),
    (["-p", "w1", "--config", "{badpolicy}"], "cosine policy needs 6 thresholds"),
    (["-p", "w1", "--device", "gpu"], "--device must be cpu or cuda"),
    (["-p", "w1", "--runtime", "onnxruntime"], "use it with --onnx DIR"),
    (["-p", "w1", "--onnx", "{nograph}", "--config", "{cosine}"], "drop --config"),
    (["-p", "w1", "--onnx", "{nograph}", "--engine", "{nograph}"], "pick one"),
    (["-p", "w1", "--onnx", "{adir}"], "not a skiptool export"),
    (["-p", "w1", "--onnx", "{nograph}", "--runtime", "foo"], "not foo"),
    (["-p", "", "--onnx", "{nograph}"], "--prompt is empty"),
])
def test_generate_refuses_bad_input_before_the_model_loads(args, fragment, inputs, tmp_path, monkeypatch,
                                                           no_model_load):
    refused(["generate", "{model}", *args], fragment, inputs, tmp_path, monkeypatch)


def test_generate_refuses_more_tokens_than_the_model_has_positions(inputs, tmp_path, monkeypatch):
    refused(["generate", "{model}", "-p", "w1", "--raw", "-n", "300"], "the model has 256", inputs, tmp_path,
            monkeypatch)


# an -o folder that cannot be written: every command that writes one refuses it the same way
BAD_OUTPUT_DIR = [
    (["-o", ""], "is empty"),
    (["-o", "{afile}"], "exists and is not a directory"),
    (["-o", "{afile}/sub"], "is not writable"),
]


# -- calibrate -------------------------------------------------------------------------------------
CALIBRATE = ["calibrate", "{model}", "-o", "out", "--data", "{words}", "--samples", "2", "--seq-len", "16",
             "--warmup", "4"]


@pytest.mark.parametrize("args, fragment", [
    *BAD_OUTPUT_DIR,
    (["--target-skip", "0"], "--target-skip"),
    (["--target-skip", "2"], "--target-skip"),
    (["--target-skip", "nan"], "--target-skip"),
    (["--target-saved", "1"], "--target-saved"),
    (["--target-skip", "0.2", "--target-saved", "0.2"], "both set the target; give one"),
    (["--samples", "0"], "--samples"),
    (["--seq-len", "1"], "--seq-len"),
    (["--warmup", "16"], "must be shorter than the sequences"),
    (["--greedy-k", "0"], "--greedy-k"),
    (["--threshold-mode", "foo"], "threshold mode"),
    (["--stand-in", "foo:3"], "stand-in kind"),
    (["--stand-in", "-1"], "stand-in size"),
    (["--data", "{missing}.txt"], "data file not found"),
    (["--data", "{notutf8}"], "is not UTF-8 text"),
    (["--data", "{empty}"], "no text"),
    (["--data", "{nofield}"], "no records with a string field 'text'"),
    (["--data", "{adir}"], "is a directory, not a data file"),
    (["--data", ""], "--data is empty"),
    (["--field", ""], "--field is empty"),
    (["--part", "0.5:0.5"], "--part needs 0 <= START < END <= 1"),
    (["--part", "a:b"], "--part must look like START:END"),
    (["--part", "0:nan"], "--part needs"),
    (["--device", "gpu"], "--device must be cpu or cuda"),
])
def test_calibrate_refuses_bad_input_before_the_model_loads(args, fragment, inputs, tmp_path, monkeypatch,
                                                            no_model_load):
    refused(CALIBRATE + args, fragment, inputs, tmp_path, monkeypatch)


@pytest.mark.parametrize("args, fragment", [
    (["--stand-in", "1000"], "rank must be between 1 and 32"),  # larger than the hidden size
    (["--target-skip", "0.95"], "out of reach"),
    (["--seq-len", "100000", "--warmup", "4"], "fewer than one block"),
    (["--cold-start", "3", "--cold-end", "3"], "leaves no skippable layer"),
])
def test_calibrate_refuses_what_only_the_model_can_tell_in_one_line(args, fragment, inputs, tmp_path, monkeypatch):
    refused(CALIBRATE + args, fragment, inputs, tmp_path, monkeypatch)


# -- train-router ----------------------------------------------------------------------------------
TRAIN = ["train-router", "{model}", "-o", "out", "--data", "{words}", "--seq-len", "16"]


@pytest.mark.parametrize("args, fragment", [
    (["-o", ""], "is empty"),
    (["-o", "{afile}"], "exists and is not a directory"),
    (["--target-skip", "0"], "--target-skip"),
    (["--threshold", "1"], "--threshold"),
    (["--estimator", "foo"], "--estimator"),
    (["--stand-in-init", "foo"], "--stand-in-init"),
    (["--part", "a:b"], "--part must look like START:END"),
    (["--config", "{bytes}"], "is not UTF-8 text"),
    (["--config", "{badpolicy}"], "cosine policy needs 6 thresholds"),
    (["--device", "gpu"], "--device must be cpu or cuda"),
])
def test_train_router_refuses_bad_input_before_the_model_loads(args, fragment, inputs, tmp_path, monkeypatch,
                                                               no_model_load):
    refused(TRAIN + args, fragment, inputs, tmp_path, monkeypatch)


@pytest.mark.parametrize("args, fragment", [
    (["--data", "{notutf8}"], "is not UTF-8 text"),
    (["--data", "{empty}"], "no text"),
])
def test_train_router_refuses_bad_data_in_one_line(args, fragment, inputs, tmp_path, monkeypatch):
    refused(TRAIN + args, fragment, inputs, tmp_path, monkeypatch)


# -- eval ------------------------------------------------------------------------------------------
EVAL = ["eval", "{model}", "--config", "{cosine}", "--data", "{words}", "--part", "0.5:1", "--samples", "2",
        "--seq-len", "16"]


@pytest.mark.parametrize("args, fragment", [
    (["--samples", "0"], "--samples"),
    (["--seq-len", "4"], "must be shorter than the sequences"),  # the config's warm-up is 4
    (["--part", "0:1"], "overlaps the text the config was calibrated on"),
    (["--part", "1:2"], "--part needs"),
    (["--sweep", "--targets", "1.5"], "targets must be skip ratios in (0, 1)"),
    (["--sweep", "--targets", "a"], "targets must be comma-separated numbers"),
    (["--sweep", "--curves", "foo"], "unknown sweep curve 'foo'"),
    (["--sweep", "--curves", ","], "--curves names no curve"),
    (["--sweep", "--curves", "router"], "runs a router config's routers"),
    (["--curves", "cosine"], "add --sweep"),
    (["--sweep", "--calib-samples", "0"], "--calib-samples"),
    (["-o", "{afile}"], "exists and is not a directory"),
    (["-o", ""], "is empty"),
    (["--router-threshold", "0.5"], "no parameter 'threshold'"),
    (["--config", "{bytes}"], "is not UTF-8 text"),
    (["--config", "{badpart}", "--sweep"], "must be [start, end]"),  # brackets survive the error line's markup
    (["--data", "{notutf8}", "--part", "0:1", "--allow-overlap"], "is not UTF-8 text"),
    (["--onnx", "{nograph}"], "drop --config"),
    (["--device", "gpu"], "--device must be cpu or cuda"),
])
def test_eval_refuses_bad_input_before_the_model_loads(args, fragment, inputs, tmp_path, monkeypatch, no_model_load):
    refused(EVAL + args, fragment, inputs, tmp_path, monkeypatch)


@pytest.mark.parametrize("args, fragment", [
    ([], "needs --config (a skip config) or --onnx"),
    (["--onnx", "{nograph}", "-o", "{afile}"], "exists and is not a directory"),  # before the graph is opened
    (["--onnx", "{nograph}", "--sweep"], "drop --config, --sweep"),
    (["--onnx", "{afile}"], "is a file, not an export folder"),
])
def test_eval_of_an_export_refuses_bad_input_before_any_work(args, fragment, inputs, tmp_path, monkeypatch,
                                                             no_model_load):
    refused(["eval", "{model}", "--data", "{words}", "--part", "0.5:1", *args], fragment, inputs, tmp_path,
            monkeypatch)


# -- export ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, fragment", [
    *BAD_OUTPUT_DIR,
    (["--format", "foo"], "unknown export format 'foo'"),
    (["--quantize", "int3"], "--quantize must be one of"),
    (["--dtype", "fp64"], "--dtype must be one of"),
    (["--quantize", "int4", "--dtype", "fp16"], "use it with --dtype fp32"),
    (["--parity-steps", "0"], "--parity-steps"),
    (["--config", "{missing}"], "skip config not found"),
    (["--config", "{bytes}"], "is not UTF-8 text"),
    (["--config", "{badpolicy}"], "cosine policy needs 6 thresholds"),
    (["--format", "ort", "--dense"], "--format ort has no --dense"),
    (["--format", "ort", "--dtype", "fp16"], "--dtype fp16 is not supported"),
])
def test_export_refuses_bad_input_before_the_model_loads(args, fragment, inputs, tmp_path, monkeypatch,
                                                         no_model_load):
    refused(["export", "{model}", "-o", "out", *args], fragment, inputs, tmp_path, monkeypatch)


# -- bench -----------------------------------------------------------------------------------------
BENCH = ["bench", "{model}", "--no-peers", "--new-tokens", "4", "--repeats", "1", "--prompt-tokens", "8"]


@pytest.mark.parametrize("args, fragment", [
    (["--skip-ratio", "2"], "skip ratios must be in [0, 1]"),
    (["--skip-ratio", "nan"], "skip ratios must be in [0, 1]"),
    (["--skip-ratio", "0.5:0.5"], "comma-separated numbers"),
    (["--skip-ratio", ","], "--skip-ratio names no ratio"),
    (["--new-tokens", "1"], "--new-tokens"),
    (["--repeats", "0"], "--repeats"),
    (["--threads", "0"], "--threads"),
    (["--threads", "100000"], "--threads must be between 1 and the"),
    (["--spin", "maybe"], "--spin must be on or off"),
    (["--prompt-tokens", "1"], "--prompt-tokens"),
    (["--json", "{adir}"], "is a folder; name a file"),
    (["--json", "{afile}/report.json"], "exists and is not a directory"),
    (["--json", ""], "is empty"),
    (["--plot", "{adir}"], "is a folder; name a file"),
    (["--markdown", "{afile}/table.md"], "exists and is not a directory"),
    (["--no-torch"], "nothing to run"),
    (["--data", "{notutf8}"], "is not UTF-8 text"),
    (["--data", "{missing}.txt"], "data file not found"),
    (["--onnx", "{nograph}"], "which is missing"),
    (["--onnx", "{corrupt}"], "cannot read the graph"),
    (["--onnx", "{adir}"], "not a skiptool export"),
    (["--config", "{badpolicy}"], "cosine policy needs 6 thresholds"),
    (["--config", "{missing}"], "skip config not found"),
    (["--device", "gpu"], "--device must be cpu or cuda"),
])
def test_bench_refuses_bad_input_before_the_model_loads(args, fragment, inputs, tmp_path, monkeypatch,
                                                        no_model_load):
    refused(BENCH + args, fragment, inputs, tmp_path, monkeypatch)


@pytest.mark.parametrize("args, fragment", [
    (["--data", "{short}"], "fewer than one block of 8"),  # prompts longer than the data
    (["--new-tokens", "1000"], "the model has 256"),  # more positions than the model has
])
def test_bench_refuses_what_only_the_model_can_tell_in_one_line(args, fragment, inputs, tmp_path, monkeypatch):
    refused(BENCH + args, fragment, inputs, tmp_path, monkeypatch)


# -- help ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command, defines", [
    ("info", ["Rows:", "FFN share", "ideal decode speedup"]),
    ("generate", ["tokens/s", "skip ratio"]),
    ("calibrate", ["Table columns", "cos q05", "threshold"]),
    ("train-router", ["router"]),
    ("eval", ["Compared:", "greedy agreement", "Curves:"]),
    ("export", ["Rows:", "parity vs PyTorch"]),
    ("bench", ["Columns:", "of ideal", "dense run"]),
])
def test_help_of_every_command_defines_its_output(command, defines):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for phrase in defines:
        assert phrase in text, (command, phrase)


# -- tables at 80 columns --------------------------------------------------------------------------
def _rendered(*renderables) -> str:
    console = Console(width=80, record=True, file=io.StringIO())
    for renderable in renderables:
        console.print(renderable)
    return console.export_text()


def _assert_readable(text: str) -> None:
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= 80, text


LAYERS = 30


def layer_stats_fixture() -> dict:
    """layer_stats.json of a 30-layer model: layer 0 rewrites the stream, the last layer nearly so (both cold)."""
    def row(i: int) -> dict:
        mean = 0.05 if i == 0 else 0.74 if i == LAYERS - 1 else 0.96 + 0.001 * (i % 7)
        return {"layer": i, "saturation": {"mean": mean, "q05": mean - 0.06, "q95": min(mean + 0.03, 0.999)},
                "ffn_ratio": {"mean": 15.7 if i == 0 else 0.3}, "attn_ffn_cos": {"mean": -0.1 + 0.01 * i},
                "probe_auc": 0.65, "threshold": None if i in (0, LAYERS - 1) else mean + 0.001,
                "skip_ratio": 0.0 if i in (0, LAYERS - 1) else 0.3, "cold": i in (0, LAYERS - 1)}
    return {"num_blocks": 4, "seq_len": 128, "warmup": 32, "cold_start": 1, "cold_end": 1, "target_skip": 0.25,
            "skip_ratio": 0.25, "layers": [row(i) for i in range(LAYERS)]}


def sweep_fixture() -> dict:
    """sweep.json with eight curves (names up to 16 characters) and five targets; one target out of reach."""
    curves = ["cosine", "cosine+standin", "random", "static", "static+standin", "router", "router+standin",
              "static+linear:16"]
    targets = [0.05, 0.10, 0.15, 0.25, 0.40]
    points = {name: [{"target": t, "skip_ratio": t + 0.003 * n, "ppl": 19.5 * (1 + (n + 1) * t)}
                     for t in targets] for n, name in enumerate(curves)}
    points["router"][-1] = {"target": 0.40, "skip_ratio": None, "ppl": None, "note": "out of reach"}
    return {"ppl_dense": 19.5, "targets": targets, "blocks": 4, "seq_len": 512, "warmup": 32, "curves": points}


def bench_fixture() -> dict:
    """A bench report with dense, skipping, forced, export and peer runs, and one that could not run."""
    def run(label: str, backend: str, mode: str, precision: str = "fp32", forced=None, tps=20.0, **extra) -> dict:
        skip = mode == "skip"
        return {"label": label, "backend": backend, "mode": mode, "precision": precision,
                "policy": "cosine" if skip else "dense", "status": "ok", "forced_ratio": forced, "tokens_per_s": tps,
                "tokens_per_s_min": tps * 0.9, "tokens_per_s_max": tps * 1.1, "latency_ms_p50": 50.0,
                "latency_ms_p90": 60.0, "prefill_ms": 120.0, "skip_ratio": 0.25 if skip else 0.0,
                "speedup": 1.1 if skip else None, "ideal_speedup": 1.2 if skip else None,
                "fraction_of_ideal": 0.92 if skip else None, "ideal_tokens_per_s": 24.0 if skip else None,
                "memory": {"rss_load_mib": 512.0}, "perplexity": None, **extra}
    runs = [run("torch fp32 dense", "torch", "dense"), run("torch fp32 skip (cosine)", "torch", "skip"),
            run("torch fp32 skip 50% forced", "torch", "skip", forced=0.5),
            run("onnxruntime fp32 dense", "onnxruntime", "dense", tps=60.0),
            run("onnxruntime int4 skip 25% forced (skiptool graph)", "onnxruntime", "skip", "int4", 0.25),
            run("onnxruntime-genai int4 skip cosine (ort export)", "onnxruntime-genai", "skip", "int4"),
            run("onnxruntime-genai int4 dense (peer)", "onnxruntime-genai", "dense", "int4", tps=80.0),
            run("llama.cpp q4_1 dense (peer)", "llama.cpp", "dense", "q4_1", tps=90.0),
            {**run("onnxruntime CUDA", "onnxruntime", "dense"), "tokens_per_s": None,
             "status": "skipped: CUDAExecutionProvider not available — install with `pip uninstall -y onnxruntime "
                       "&& pip install onnxruntime-gpu` (needs an NVIDIA GPU)"}]
    settings = {"new_tokens": 128, "repeats": 3, "threads": 2, "intra_op_spinning": "off", "prompt_tokens": [32]}
    return {"model": "smollm2-135m", "settings": settings, "runs": runs}


def test_every_default_table_reads_at_80_columns(tiny_model_dir):
    from skiptool.bench import bench_table
    from skiptool.cli.tables import (eval_table, export_table, info_table, layer_stats_table, router_table,
                                     sweep_table)
    from skiptool.contract import MODEL_FILE, ExportManifest
    from skiptool.evaluate import EvalResult
    from skiptool.exporters import ExportReport
    from skiptool.info import describe

    check = {"max_abs_logits": 3.2e-5, "max_abs_present": 1.1e-5, "decision_agreement": 0.998,
             "top1_agreement": 1.0, "skip_ratio_ort": 0.251, "steps": 32}
    manifest = ExportManifest("ort", ("onnxruntime-genai", "onnxruntime"), MODEL_FILE, "int4", "skip", "router",
                              "smollm2-135m", 30, tuple(range(1, 29)), 3, 64, 49152, (2,), 28,
                              checks={"int4": check})
    export = ExportReport(manifest=manifest, out_dir="/a/rather/long/path/to/the/exports/smollm2-135m-int4-router",
                          details={"op_counts": {"If": 28, "MatMulNBits": 210, "GroupQueryAttention": 30},
                                   "size_bytes": 123_456_789}, seconds=154.2)
    evaluation = EvalResult(19.52, 21.31, 0.2503, [0.0] + [0.27] * 28 + [0.0], "cosine", 16, 512,
                            {"source": "/a/long/path/to/data/wiki.test.raw", "part": [0.5, 1.0]}, 0.21, 1.17,
                            greedy_agreement=0.83)
    routers = SimpleNamespace(
        router_path="/a/long/path/to/out/router.safetensors",
        standin_path="/a/long/path/to/out/router_standin.safetensors",
        config_path="/a/long/path/to/out/skip_config.json", seconds=1800.0, tokens=65536, tokens_per_s=41.0,
        cost={"standin": {"standin_params": 19008, "fraction_of_ffn": 0.0072}, "router_params_per_layer": 577,
              "router_kind": "linear", "param_share": 0.0002},
        to_dict=lambda: {"threshold": 0.61, "heldout_skip_ratio": 0.251, "dense_heldout_perplexity": 19.5,
                         "heldout_perplexity": 32.4, "perplexity_ratio": 1.66})
    text = _rendered(info_table(str(tiny_model_dir), describe(str(tiny_model_dir))),
                     layer_stats_table(layer_stats_fixture()), eval_table(evaluation), sweep_table(sweep_fixture()),
                     export_table(export), router_table(routers, 0.25), bench_table(bench_fixture()))
    _assert_readable(text)
    assert "static+linear:16" in text and "81.9@42%" in text  # every curve and its cells, whole
    assert "onnxruntime CUDA: skipped" in text


# -- plots -----------------------------------------------------------------------------------------
@pytest.fixture
def figures():
    """Closes the figures a test made."""
    import matplotlib.pyplot as plt

    yield
    plt.close("all")


def _legend_texts(fig) -> list[str]:
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    return [t.get_text() for legend in legends for t in legend.get_texts()]


def _assert_axes_labelled(fig) -> None:
    for ax in fig.axes:
        assert ax.get_ylabel(), ax
    assert any(ax.get_xlabel() for ax in fig.axes)


def test_the_bench_plot_names_every_colour_in_its_legend(tmp_path, figures):
    from skiptool.bench import write_plot
    from skiptool.bench.report import bench_figure

    fig = bench_figure(bench_fixture())
    labels = " | ".join(_legend_texts(fig))
    for kind in ("skipping run", "dense run", "peer runtime", "ideal at the realised skip ratio"):
        assert kind in labels, labels
    _assert_axes_labelled(fig)
    assert write_plot(bench_fixture(), tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_the_layer_stats_plot_shows_every_layer_and_labels_every_axis(tmp_path, figures):
    from skiptool.plots import layer_stats_figure, plot_layer_stats

    fig = layer_stats_figure(layer_stats_fixture())
    _assert_axes_labelled(fig)
    saturation = fig.axes[0]
    low, _high = saturation.get_ylim()
    off_scale = [row["saturation"]["mean"] for row in layer_stats_fixture()["layers"]
                 if row["saturation"]["mean"] < low]
    written = {t.get_text() for t in saturation.texts}
    assert off_scale and written == {f"{v:.2f}" for v in off_scale}  # layers 0 and 29: marked, value written
    assert "mean below the scale (value written)" in _legend_texts(fig)
    assert {ax.get_ylabel() for ax in fig.axes} >= {"cosine", "AUC"}  # one quantity per axis
    assert plot_layer_stats(layer_stats_fixture(), tmp_path / "stats.png").read_bytes()[:4] == b"\x89PNG"


def test_the_sweep_plot_names_every_curve(tmp_path, figures):
    from skiptool.plots import plot_sweep, sweep_figure

    sweep = sweep_fixture()
    fig = sweep_figure(sweep)
    labels = _legend_texts(fig)
    assert set(sweep["curves"]) <= set(labels) and any(label.startswith("dense") for label in labels)
    _assert_axes_labelled(fig)
    assert plot_sweep(json.loads(json.dumps(sweep)), tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
