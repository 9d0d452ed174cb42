"""Lazy package attributes: a package names what it exports and where it lives, and imports it on first use, so
``import skiptool`` (and ``skiptool --help``) stays fast."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving `exports` (name -> module that defines it) for `package`."""

    def attribute(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            # importing a submodule of the same name (skiptool.generate defines generate) sets the package's
            # attribute to the submodule; `from skiptool import generate` would then get the module, not the function
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return attribute
