"""Import directions from ARCHITECTURE.md, checked on the source so they stay true as the code grows."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"skiptool": ROOT / "skiptool", "skiptool.calibration": ROOT / "calibration",
            "skiptool.exporters": ROOT / "exporters"}
# Optional or heavy packages that may only be imported inside the function that needs them.
LAZY_ONLY = {"onnxruntime", "tensorrt", "matplotlib", "gguf", "onnxruntime_genai", "llama_cpp", "datasets"}
LEVEL = {  # lower never imports higher
    "skiptool.errors": 0, "skiptool.fileio": 0, "skiptool.config": 1, "skiptool.adapters": 1,
    "skiptool.models": 2, "skiptool.data": 2, "skiptool.policies": 2, "skiptool.info": 2, "skiptool.runtime": 3,
}


def _modules():
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield ".".join([package, *parts]), path


def _imports(module: str, path: Path) -> list[tuple[str, bool]]:
    """(imported module, imported at module top level?) for every import in the file."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((name, id(node) in top_level))
    return found


def test_only_the_cli_imports_typer_or_the_cli():
    for module, path in _modules():
        if module == "skiptool.cli":
            continue
        for name, _ in _imports(module, path):
            assert not name.startswith(("typer", "skiptool.cli")), f"{module} imports {name}"


def test_calibration_and_exporters_never_import_each_other():
    for module, path in _modules():
        for name, _ in _imports(module, path):
            if module.startswith("skiptool.calibration"):
                assert not name.startswith("skiptool.exporters"), f"{module} imports {name}"
            if module.startswith("skiptool.exporters"):
                assert not name.startswith("skiptool.calibration"), f"{module} imports {name}"


def test_optional_packages_are_imported_lazily():
    for module, path in _modules():
        for name, top_level in _imports(module, path):
            root = name.split(".")[0]
            assert not (top_level and root in LAZY_ONLY), f"{module} imports {name} at module level"


def test_lower_layers_never_import_higher_ones():
    for module, path in _modules():
        if module not in LEVEL:
            continue
        for name, _ in _imports(module, path):
            target = next((m for m in LEVEL if name == m or name.startswith(m + ".")), None)
            if target is None and name.startswith("skiptool"):
                target = name  # any other skiptool module is above the foundation levels
                assert LEVEL[module] >= 3, f"{module} (level {LEVEL[module]}) imports higher module {name}"
                continue
            if target is not None:
                assert LEVEL[target] <= LEVEL[module], f"{module} imports higher module {name}"
