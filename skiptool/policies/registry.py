"""The policy registry: kind -> policy class (with its typed ``Params`` and ``exportable`` flag)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from ..config import SkipConfig
from ..registry import Registry

if TYPE_CHECKING:
    from .base import PolicyParams, SkipPolicy

POLICIES: "Registry[type[SkipPolicy]]" = Registry("policy kind")
C = TypeVar("C")


def register_policy(cls: C) -> C:
    """Class decorator: make a :class:`SkipPolicy` subclass available under its ``kind``."""
    POLICIES.register(cls.kind, cls)  # type: ignore[attr-defined]
    return cls


def policy_params(config: SkipConfig, **overrides: Any) -> "PolicyParams":
    """The config's policy parameters, typed and checked (``overrides`` that are not None replace values)."""
    cls = POLICIES.get(config.policy.kind)
    raw = {**config.policy.params, **{k: v for k, v in overrides.items() if v is not None}}
    return cls.Params.parse(raw, config, cls.kind)


def build_policy(config: SkipConfig, **overrides: Any) -> "SkipPolicy":
    """The policy a skip config describes (weights, e.g. routers, are read from beside the config).

    ``overrides`` replace parameters (``threshold=0.3`` for a router); None means "keep the config's".
    """
    cls = POLICIES.get(config.policy.kind)
    return cls.from_config(config, policy_params(config, **overrides))


def check_policy(config: SkipConfig, **overrides: Any) -> None:
    """Raise one clear error line unless the config's policy kind is known and its parameters are valid."""
    policy_params(config, **overrides)
