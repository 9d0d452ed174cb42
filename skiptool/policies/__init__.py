"""Skip policies: the one place that decides whether a layer's FFN is skipped for a token.

Every consumer — calibration, evaluation, the PyTorch runtime, the GPU decode engine and the exporters
(which trace the policy's own code into the graph) — asks a :class:`SkipPolicy`. A policy is an
``nn.Module`` whose decision is a small, pure function of tensors the graph has, so the same code runs
eagerly, on a GPU inside a CUDA graph, and exported to ONNX.

Built-in kinds: ``none`` (:class:`NeverSkip`), ``static`` (:class:`StaticMask`), ``cosine``
(:class:`CosineGreedy`, FFN-SkipLLM), ``router`` (:class:`RouterPolicy`, DiffSkip), ``random``
(:class:`RandomSkip`, a baseline). A new kind is one module defining the class (``kind``, ``Params``,
``from_config``) decorated with :func:`register_policy`, plus one import line below.
"""

from .base import (FORCE_COMPUTE, FORCE_SKIP, LayerSignals, PolicyParams, SkipPolicy, block_positions, is_warm,
                   positions_from_mask, shape_of)
from .registry import POLICIES, build_policy, check_policy, policy_params, register_policy

from .never import NeverSkip  # noqa: E402,I001 - the built-in kinds register themselves on import
from .static import StaticMask  # noqa: E402
from .cosine import CosineGreedy, saturation  # noqa: E402
from .random_skip import RandomSkip  # noqa: E402
from .router import DEFAULT_ROUTER_KIND, ESTIMATORS, ROUTER_KINDS, RouterPolicy, Routers, router_features  # noqa: E402

__all__ = ["block_positions", "is_warm", "CosineGreedy", "DEFAULT_ROUTER_KIND", "ESTIMATORS", "ROUTER_KINDS", "FORCE_COMPUTE", "FORCE_SKIP", "LayerSignals", "NeverSkip", "POLICIES",
           "PolicyParams", "RandomSkip", "RouterPolicy", "Routers", "SkipPolicy", "StaticMask", "build_policy",
           "check_policy", "policy_params", "positions_from_mask", "register_policy", "router_features",
           "saturation", "shape_of"]
