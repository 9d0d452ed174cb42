"""What this machine can run beyond the CPU: CUDA (PyTorch) and TensorRT, with one clear error line when missing."""

from __future__ import annotations

from typing import Any

from .errors import MissingDependencyError


def cuda_unavailable() -> str | None:
    """Why PyTorch cannot use a CUDA GPU here (None when it can)."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to PyTorch here" + ("" if torch.version.cuda else
                                                             " (this PyTorch build has no CUDA)")
    return None


def require_cuda(purpose: str = "--device cuda") -> None:
    """Raise one clear :class:`MissingDependencyError` line unless a CUDA GPU is usable."""
    reason = cuda_unavailable()
    if reason is not None:
        raise MissingDependencyError(f"{purpose} needs an NVIDIA GPU: {reason}")


def tensorrt_unavailable() -> str | None:
    """Why TensorRT cannot build or run engines here (None when ``tensorrt`` imports and CUDA is available)."""
    try:
        import tensorrt  # noqa: F401 - the import is the check
    except ImportError:
        return "TensorRT is not installed here (pip install tensorrt)"
    return cuda_unavailable()


def require_tensorrt(purpose: str = "--format tensorrt") -> Any:
    """The ``tensorrt`` module, or one clear error line saying what is missing."""
    reason = tensorrt_unavailable()
    if reason is not None:
        raise MissingDependencyError(f"{purpose} needs TensorRT and an NVIDIA GPU: {reason}")
    import tensorrt

    return tensorrt


def check_device(device: str) -> str:
    """`device` if it is ``cpu`` or a usable ``cuda`` device; one clear error line otherwise."""
    from .errors import SkipToolError

    if device == "cpu":
        return device
    if device == "cuda" or device.startswith("cuda:"):
        require_cuda(f"--device {device}")
        return device
    raise SkipToolError(f"--device must be cpu or cuda (got {device!r})")
