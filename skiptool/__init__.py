"""skiptool: adaptive FFN skipping for decoder-only LLMs.

The small Python API (what the CLI runs)::

    from skiptool import generate, load_config, load_model, open_runtime
    lm = load_model("smollm2-135m")
    runtime = open_runtime(lm.model, lm.adapter, load_config("out/skip_config.json"))  # policy + stand-ins
    result = generate(lm, "What is the capital of France?")                             # through the runtime
    print(result.text, result.tokens_per_s, result.skip_ratio)
    runtime.remove()                                                                    # the dense model again
"""

from __future__ import annotations

from .lazy import lazy_exports

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
    "open_runtime": "skiptool.runtime",
    "skipping": "skiptool.runtime",
    "generate": "skiptool.generate",
    "evaluate": "skiptool.evaluate",
    "ExportRequest": "skiptool.exporters",
    "run_export": "skiptool.exporters",
    "SkipToolError": "skiptool.errors",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
