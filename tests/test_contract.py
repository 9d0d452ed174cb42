"""The export contract: the typed, versioned manifest (round trip, one-line errors) and the I/O names."""

from __future__ import annotations

import json

import pytest
from conftest import one_line_error
from typer.testing import CliRunner

from skiptool.cli import app
from skiptool.contract import (MANIFEST_FILE, MANIFEST_VERSION, ExportManifest, GraphIO, is_export, read_manifest,
                               write_manifest)
from skiptool.errors import SkipToolError

MANIFEST = ExportManifest(target="onnx", runtimes=("onnxruntime",), file="model.onnx", precision="fp32",
                          mode="skip", policy="cosine", source="tiny", num_layers=4, skippable_layers=(1, 2),
                          num_key_value_heads=2, head_dim=8, vocab_size=128, eos_token_ids=(2,), if_count=2,
                          checks={"fp32": {"max_abs_logits": 1e-6}}, files=("model.onnx",))


def test_the_manifest_round_trips_through_its_file(tmp_path):
    write_manifest(tmp_path, MANIFEST)
    assert is_export(tmp_path) and read_manifest(tmp_path) == MANIFEST
    data = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert data["schema_version"] == MANIFEST_VERSION and list(data)[0] == "schema_version"
    assert MANIFEST.io == GraphIO(4) and MANIFEST.runtime == "onnxruntime"


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(schema_version=MANIFEST_VERSION + 1), "written by a newer skiptool"),
    (lambda d: d.pop("schema_version"), "schema_version None.*re-export it"),
    (lambda d: d.update(schema_version=0), "re-export it"),
    (lambda d: d.pop("num_layers"), "lacks num_layers"),
    (lambda d: [d.pop(k) for k in ("file", "precision")], "lacks file, precision"),
    (lambda d: d.update(colour="blue"), "unknown keys colour"),
    (lambda d: d.update(num_layers="four"), "num_layers must be an integer"),
    (lambda d: d.update(runtimes="onnxruntime"), "runtimes must be a list"),
    (lambda d: d.update(mode="fast"), "mode must be one of skip, dense"),
])
def test_a_bad_manifest_is_one_clear_error(tmp_path, edit, message):
    data = MANIFEST.to_dict()
    edit(data)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(SkipToolError, match=message):
        read_manifest(tmp_path)


def test_a_folder_without_a_manifest_or_with_broken_json_is_one_clear_error(tmp_path):
    with pytest.raises(SkipToolError, match="is not a skiptool export"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("{}")
    with pytest.raises(SkipToolError, match="schema_version"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(SkipToolError, match="not valid JSON"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("content", ["{}", "[1, 2]", "{oops"])
def test_generate_and_eval_on_a_folder_with_a_bad_manifest_are_one_line_errors(tmp_path, content):
    (tmp_path / MANIFEST_FILE).write_text(content)
    runner = CliRunner()
    one_line_error(runner.invoke(app, ["generate", "--onnx", str(tmp_path), "-p", "hi"]), str(tmp_path))
    one_line_error(runner.invoke(app, ["eval", "--onnx", str(tmp_path)]), str(tmp_path))
    one_line_error(runner.invoke(app, ["bench", "--onnx", str(tmp_path), "--no-torch", "--no-peers"]), str(tmp_path))
