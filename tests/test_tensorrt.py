"""TensorRT target: the graph TensorRT parses, the decode backend's planning and plumbing, the CLI without TensorRT.

TensorRT cannot be installed on the CPU machines, so most of this checks what can be checked without it:
- the graph handed to TensorRT's parser (``skip_mask`` a real input, same outputs as ``model.onnx``), run by ORT;
- the pure planning functions of :mod:`skiptool.backends.tensorrt_backend`;
- the backend's plumbing against ``OrtEngine``, a FAKE engine: ONNX Runtime on the CPU behind the few
  TensorRT methods the backend calls, reading and writing the raw buffer addresses it is given. It shows
  that names, shapes, addresses and the past/present rotation are wired right. It proves nothing about
  TensorRT itself (parsing, building, kernels, CUDA streams): the last test does, and only runs where
  ``tensorrt`` and a CUDA GPU are present.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from test_export import LAYERS, base, tiny_export, tiny_model_dir  # noqa: F401 - `base` is a fixture
from conftest import one_line_error
from typer.testing import CliRunner

from skiptool.accelerators import tensorrt_unavailable
from skiptool.backends.onnxruntime import OrtBackend
from skiptool.backends.tensorrt_backend import TrtBackend, engine_io, rotate, step_feeds, step_input_shapes
from skiptool.cli import app
from skiptool.contract import GraphIO, read_manifest
from skiptool.errors import SkipToolError
from skiptool.exporters.tensorrt import graph_problems, profile_shapes, tensorrt_graph

runner = CliRunner()
_TRT_NAMES = {"tensor(float)": "FLOAT", "tensor(float16)": "HALF", "tensor(int64)": "INT64", "tensor(bool)": "BOOL"}
_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "BOOL": np.bool_}


# -- the graph TensorRT parses ------------------------------------------------------------------------
def _trt_onnx(base: Path, kind: str = "static") -> Path:
    """``tensorrt_graph`` of a tiny export, saved once per session beside it."""
    out = base / f"trt-graph-{kind}.onnx"
    if not out.is_file():
        onnx.save(tensorrt_graph(onnx.load(str(tiny_export(base, kind) / "model.onnx"))), str(out))
    return out


def test_tensorrt_graph_makes_skip_mask_a_required_input_and_computes_the_same(base):
    import onnxruntime as ort

    original = onnx.load(str(tiny_export(base, "static") / "model.onnx"))
    graph = onnx.load(str(_trt_onnx(base)))
    assert "skip_mask" not in {t.name for t in graph.graph.initializer}
    assert "skip_mask" in {t.name for t in original.graph.initializer}, "model.onnx keeps its optional skip_mask"
    assert graph_problems(graph) == []
    assert profile_shapes(graph)["skip_mask"] == ((LAYERS,),) * 3
    trt_session = ort.InferenceSession(str(_trt_onnx(base)), providers=["CPUExecutionProvider"])
    assert "skip_mask" in {i.name for i in trt_session.get_inputs()}
    feeds = {**step_feeds(0, [5, 6, 7, 8, 9, 10]),
             **{n: np.zeros((1, 2, 0, 8), np.float32) for n in GraphIO(LAYERS).past_names()}}
    with pytest.raises(Exception, match="skip_mask"):
        trt_session.run(None, feeds)
    default = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    fed = trt_session.run(None, {**feeds, "skip_mask": np.zeros(LAYERS, np.int64)})
    for a, b in zip(default, fed):
        np.testing.assert_array_equal(a, b)


def test_profile_min_and_opt_points_are_consistent_decode_steps(base):
    shapes = profile_shapes(onnx.load(str(_trt_onnx(base))), max_batch=2, max_context=512)
    for point in (0, 1):  # min, opt: past + new tokens = attention_mask length, one batch size throughout
        seq, total, past = (shapes["input_ids"][point][1], shapes["attention_mask"][point][1],
                            shapes["past_key_values.3.value"][point][2])
        assert past + seq == total, (point, past, seq, total)
        assert len({shapes[n][point][0] for n in shapes if n != "skip_mask"}) == 1
    assert shapes["attention_mask"][2] == (2, 512) and shapes["past_key_values.0.key"][2][2] == 511


# -- planning ---------------------------------------------------------------------------------------------
def test_engine_io_splits_inputs_outputs_and_checks_the_contract():
    io = GraphIO(2)
    modes = {**{n: "INPUT" for n in ["input_ids", "attention_mask", "position_ids", *io.past_names(), "skip_mask"]},
             **{n: "OUTPUT" for n in ["logits", *io.present_names(), "skip_decisions"]}}
    plan = engine_io(modes, io)
    assert plan.has_skip_mask and plan.has_decisions and len(plan.inputs) == 8 and len(plan.outputs) == 6
    without = engine_io({n: m for n, m in modes.items() if n not in ("skip_mask", "skip_decisions")}, io)
    assert not without.has_skip_mask and not without.has_decisions
    with pytest.raises(SkipToolError, match="missing present.1.value"):
        engine_io({n: m for n, m in modes.items() if n != "present.1.value"}, io)
    with pytest.raises(SkipToolError, match="unexpected inputs cache_position"):
        engine_io({**modes, "cache_position": "INPUT"}, io)


def test_step_feeds_and_input_shapes_for_prefill_then_decode():
    io = GraphIO(2)
    prefill = step_feeds(0, [4, 5, 6], np.array([0, -1]))
    assert prefill["input_ids"].tolist() == [[4, 5, 6]] and prefill["position_ids"].tolist() == [[0, 1, 2]]
    assert prefill["attention_mask"].shape == (1, 3) and prefill["skip_mask"].tolist() == [0, -1]
    decode = step_feeds(3, [7])
    assert decode["position_ids"].tolist() == [[3]] and decode["attention_mask"].shape == (1, 4)
    assert "skip_mask" not in decode and all(a.dtype == np.int64 for a in decode.values())
    shapes = step_input_shapes(io, 0, 3, kv_heads=2, head_dim=8, skip_mask=True)
    assert shapes["past_key_values.1.value"] == (1, 2, 0, 8) and shapes["skip_mask"] == (2,)
    shapes = step_input_shapes(io, 3, 1, kv_heads=2, head_dim=8, skip_mask=False)
    assert shapes["input_ids"] == (1, 1) and shapes["attention_mask"] == (1, 4)
    assert shapes["past_key_values.0.key"] == (1, 2, 3, 8) and "skip_mask" not in shapes


def test_rotate_makes_each_present_the_next_past_of_the_same_layer():
    io = GraphIO(3)
    outputs = {name: f"buffer-of-{name}" for name in ["logits", *io.present_names()]}
    past = rotate(io, outputs)
    assert list(past) == io.past_names()
    assert past["past_key_values.2.value"] == "buffer-of-present.2.value"
    assert past["past_key_values.0.key"] == "buffer-of-present.0.key"


# -- the backend's plumbing, with a fake engine --------------------------------------------------------------
class OrtEngine:
    """FAKE TensorRT engine: ORT on the CPU behind ``num_io_tensors``, ``get_tensor_*``,
    ``get_tensor_profile_shape`` and ``create_execution_context``. Not TensorRT."""

    def __init__(self, onnx_path: Path, max_length: int = 64) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        self.tensors = {i.name: ("INPUT", _TRT_NAMES[i.type]) for i in self.session.get_inputs()}
        self.tensors.update({o.name: ("OUTPUT", _TRT_NAMES[o.type]) for o in self.session.get_outputs()})
        self.names = list(self.tensors)
        self.max_length = max_length
        self.contexts: list[FakeContext] = []

    num_io_tensors = property(lambda self: len(self.names))

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(name=self.tensors[name][0])

    def get_tensor_dtype(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(name=self.tensors[name][1])

    def get_tensor_location(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(name="DEVICE")

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        assert name == "attention_mask" and profile == 0
        return [(1, 1), (1, 16), (1, self.max_length)]

    def create_execution_context(self) -> "FakeContext":
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


class FakeContext:
    """FAKE execution context: records shapes and addresses, runs ORT on the bytes found at those addresses."""

    def __init__(self, engine: OrtEngine) -> None:
        self.engine, self.shapes, self.addresses, self.runs = engine, {}, {}, []

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.shapes[name] = tuple(shape)
        return self.engine.tensors[name][0] == "INPUT"

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return address != 0

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if self.engine.tensors[name][0] == "INPUT":
            return self.shapes[name]
        zeros = {n: np.zeros(s, _NUMPY[self.engine.tensors[n][1]]) for n, s in self.shapes.items()}
        return self.engine.session.run([name], zeros)[0].shape  # shapes follow from the input shapes

    def execute_async_v3(self, stream_handle: int) -> bool:
        feeds = {n: _read(self.addresses[n], s, _NUMPY[self.engine.tensors[n][1]]) for n, s in self.shapes.items()}
        names = [n for n, (mode, _) in self.engine.tensors.items() if mode == "OUTPUT"]
        for name, value in zip(names, self.engine.session.run(names, feeds)):
            _write(self.addresses[name], value)
        self.runs.append({"shapes": dict(self.shapes), "addresses": dict(self.addresses)})
        return True


def _read(address: int, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if size == 0:
        return np.zeros(shape, dtype)
    return np.frombuffer((ctypes.c_char * size).from_address(address), dtype=dtype).reshape(shape).copy()


def _write(address: int, array: np.ndarray) -> None:
    data = np.ascontiguousarray(array)
    ctypes.memmove(address, data.ctypes.data, data.nbytes)


def _fake_backend(base: Path, max_length: int = 64, **kwargs) -> TrtBackend:
    manifest = read_manifest(tiny_export(base, "static"))
    return TrtBackend(OrtEngine(_trt_onnx(base), max_length), manifest, device="cpu", **kwargs)


def assert_decodes_alike(backend, reference, steps: int, atol: float) -> None:
    """Prefill a fixed prompt, then greedy steps (tokens from `reference`): equal logits and decisions."""
    a, b = backend.prefill([3, 17, 42, 9, 11, 5]), reference.prefill([3, 17, 42, 9, 11, 5])
    np.testing.assert_allclose(a, b, atol=atol)
    for _ in range(steps):
        token = int(np.argmax(b))
        a, b = backend.step(token), reference.step(token)
        np.testing.assert_allclose(a, b, atol=atol)
        np.testing.assert_array_equal(backend.last_decisions, reference.last_decisions)


def test_trt_backend_matches_onnxruntime_with_a_fake_engine_backed_by_onnxruntime(base):
    """Plumbing only: the fake runs the same graph in ORT, so equal logits mean the right bytes reached it."""
    for mask in (None, [0, 1, -1, 0], [-1] * LAYERS):
        trt_like, ort_ref = _fake_backend(base, skip_mask=mask), OrtBackend(tiny_export(base, "static"))
        ort_ref.set_skip_mask(mask)
        ort_ref.reset()
        assert_decodes_alike(trt_like, ort_ref, steps=8, atol=1e-6)
        assert trt_like.skip_ratio() == pytest.approx(ort_ref.skip_ratio())
        assert trt_like.per_layer_skip() == pytest.approx(ort_ref.per_layer_skip())
        np.testing.assert_allclose(trt_like.present(1)[0], ort_ref.present(1)[0], atol=1e-6)
    assert trt_like.skip_ratio() == 0.0  # forced compute everywhere


def test_trt_backend_rotates_present_into_past_with_a_fake_engine(base):
    backend = _fake_backend(base)
    backend.prefill([1, 2, 3, 4, 5])
    backend.step(6)
    backend.step(7)
    first, second, third = backend.context.runs
    assert first["shapes"]["past_key_values.0.key"][2] == 0 and first["shapes"]["input_ids"] == (1, 5)
    assert second["shapes"]["past_key_values.0.key"][2] == 5 and second["shapes"]["attention_mask"] == (1, 6)
    assert third["shapes"]["past_key_values.1.value"][2] == 6 and third["shapes"]["attention_mask"] == (1, 7)
    for earlier, later in ((first, second), (second, third)):
        for past, present in zip(backend.io.past_names(), backend.io.present_names()):
            assert later["addresses"][past] == earlier["addresses"][present], past
    assert third["shapes"]["skip_mask"] == (LAYERS,)
    assert backend.length == 7


def test_trt_backend_refuses_sequences_beyond_the_engine_profile_with_a_fake_engine(base):
    backend = _fake_backend(base, max_length=6)
    backend.prefill([1, 2, 3, 4, 5])
    backend.step(6)
    with pytest.raises(SkipToolError, match="7 tokens exceed the engine's optimisation profile"):
        backend.step(7)


def test_trt_backend_refuses_a_skip_mask_when_the_engine_has_no_override_input(base):
    engine = OrtEngine(_trt_onnx(base))
    engine.names.remove("skip_mask")  # as an engine built from a graph whose skip_mask was a constant
    backend = TrtBackend(engine, read_manifest(tiny_export(base, "static")), device="cpu")
    with pytest.raises(SkipToolError, match="no skip_mask input"):
        backend.set_skip_mask([1] * LAYERS)
    with pytest.raises(SkipToolError, match="4 entries"):
        _fake_backend(base).set_skip_mask([1, 0])


# -- the command line without TensorRT ------------------------------------------------------------------------
needs_no_tensorrt = pytest.mark.skipif(tensorrt_unavailable() is None, reason="TensorRT and a GPU are present here")


def _one_line_error(result) -> str:
    return one_line_error(result)


@needs_no_tensorrt
def test_cli_generate_engine_without_tensorrt_is_one_line_error(base, tmp_path):
    import shutil

    from skiptool.contract import write_manifest

    folder = tmp_path / "trt-export"
    shutil.copytree(tiny_export(base, "static"), folder)
    write_manifest(folder, read_manifest(folder).replace(target="tensorrt", runtimes=("onnxruntime", "tensorrt")))
    (folder / "model.engine").write_bytes(b"not an engine")
    message = _one_line_error(runner.invoke(app, ["generate", "--engine", str(folder), "--prompt", "w1 w2", "--raw"]))
    assert "tensorrt cannot run" in message and "TensorRT is not installed" in message
    result = runner.invoke(app, ["generate", "--engine", str(tmp_path / "nowhere"), "--prompt", "w1"])
    assert "is not a skiptool export" in _one_line_error(result)


@needs_no_tensorrt
def test_cli_export_format_tensorrt_without_tensorrt_is_one_line_error_and_writes_nothing(base, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["export", str(tiny_model_dir(base)), "--dense", "-o", str(out),
                                 "--format", "tensorrt"])
    message = _one_line_error(result)
    assert "TensorRT" in message and len(message.splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())


# -- real TensorRT (GPU machines with tensorrt only) ------------------------------------------------------------
def test_tensorrt_engine_generates_like_onnxruntime(base, tmp_path):
    pytest.importorskip("tensorrt")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    from test_export import tiny_config

    from skiptool.exporters import ExportRequest, run_export

    out = tmp_path / "trt"
    run_export("tensorrt", ExportRequest(str(tiny_model_dir(base)), out, tiny_config(base, "static"), parity_steps=4))
    assert (out / "model.engine").is_file()
    assert_decodes_alike(TrtBackend.from_export(out), OrtBackend(out), steps=16, atol=1e-3)
    result = runner.invoke(app, ["generate", "--engine", str(out), "--prompt", "w1 w2 w3", "--raw", "-n", "8"])
    assert result.exit_code == 0, result.output
    assert "tokens/s decode (tensorrt)" in result.output
