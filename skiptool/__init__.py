"""skiptool: adaptive FFN skipping for decoder-only LLMs.

The small Python API::

    from skiptool import load_model, load_config, build_policy, apply_skip
    lm = load_model("smollm2-135m")
    runtime = apply_skip(lm.model, lm.adapter, build_policy(load_config("out/skip_config.json")))
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "skiptool.models",
    "LoadedModel": "skiptool.models",
    "DEMO_MODEL": "skiptool.models",
    "SkipConfig": "skiptool.config",
    "load_config": "skiptool.config",
    "dense_config": "skiptool.config",
    "build_policy": "skiptool.policies",
    "SkipPolicy": "skiptool.policies",
    "apply_skip": "skiptool.runtime",
    "skipping": "skiptool.runtime",
    "SkipToolError": "skiptool.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import lazily so ``import skiptool`` (and ``skiptool --help``) stays fast."""
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'skiptool' has no attribute {name!r}")
