"""The house rules of ARCHITECTURE.md, checked so they stay true as the code grows — and shown to fail when broken.

- The import layers and "only the CLI knows typer" are import-linter contracts (``[tool.importlinter]`` in
  pyproject.toml); the suite runs ``lint-imports`` on the package and on a copy with a forbidden import added.
- Optional packages are imported only inside the functions that need them, and no module imports another
  module's private names: two AST checks, each also run on a snippet that breaks it.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "skiptool"
LAZY_ONLY = {"onnxruntime", "tensorrt", "matplotlib", "gguf", "onnxruntime_genai", "llama_cpp", "datasets", "triton"}
LINT = shutil.which("lint-imports") or "lint-imports"


def _lint(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)} if pythonpath is not None else None
    return subprocess.run([LINT, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_import_linter_sees_every_module_of_the_package_from_the_editable_install():
    import grimp

    graph = grimp.build_graph("skiptool")
    for module in ("skiptool.calibration.fit", "skiptool.calibration.router_train", "skiptool.exporters.onnx",
                   "skiptool.exporters.ort_target", "skiptool.backends.onnxruntime", "skiptool.policies.cosine"):
        assert module in graph.modules, f"{module} is invisible to import tooling"


def test_the_import_contracts_hold():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout and "KEPT" in result.stdout


def test_a_forbidden_import_breaks_the_layers_contract(tmp_path):
    copy = tmp_path / "src"
    shutil.copytree(PACKAGE, copy / "skiptool", symlinks=False,  # the links to calibration/ and exporters/ resolved
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    base = copy / "skiptool" / "policies" / "base.py"
    base.write_text(base.read_text() + "\nfrom skiptool import cli  # noqa: E402 - the forbidden import\n")
    result = _lint(copy, pythonpath=copy)
    assert result.returncode != 0, result.stdout
    assert "skiptool.policies is not allowed to import skiptool.cli" in result.stdout


# -- checks on the source -------------------------------------------------------------------------------
def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        if "__pycache__" not in path.parts:
            yield path


def top_level_optional_imports(source: str) -> list[str]:
    """Optional packages imported at module level (they must be imported inside the function that needs them)."""
    tree = ast.parse(source)
    found = []
    for node in tree.body:
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
        found += [n for n in names if n.split(".")[0] in LAZY_ONLY]
    return found


def private_name_imports(source: str) -> list[str]:
    """``from module import _private`` anywhere in the source (each module keeps its private names to itself)."""
    return [f"{node.module}.{alias.name}" for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)
            for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]


def test_optional_packages_are_imported_lazily():
    offenders = {str(p.relative_to(ROOT)): top_level_optional_imports(p.read_text()) for p in _modules()}
    assert not {k: v for k, v in offenders.items() if v}
    assert top_level_optional_imports("import onnxruntime\n\ndef f():\n    import tensorrt\n") == ["onnxruntime"]


def test_no_module_imports_another_modules_private_names():
    offenders = {str(p.relative_to(ROOT)): private_name_imports(p.read_text()) for p in _modules()}
    assert not {k: v for k, v in offenders.items() if v}
    assert private_name_imports("def f():\n    from skiptool.models import _first_line\n") == \
        ["skiptool.models._first_line"]


def test_skiptool_help_imports_no_heavy_package():
    code = ("import sys; from skiptool.cli import app; "
            "print(sorted(m for m in ('torch', 'transformers', 'onnx', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_top_level_api_gives_functions_even_where_a_submodule_has_the_same_name():
    code = ("from skiptool import evaluate, generate, open_runtime; import skiptool; "
            "print(all(callable(f) for f in (generate, evaluate, open_runtime, skiptool.generate)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stdout + out.stderr


@pytest.mark.parametrize("package", ["calibration", "exporters"])
def test_the_top_level_pipeline_folders_are_the_package_s_own(package):
    link = PACKAGE / package
    assert (ROOT / package).is_dir() and link.resolve() == (ROOT / package).resolve()
