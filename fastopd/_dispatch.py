"""Backend choice shared by every op: ``"auto" | "triton" | "reference"`` (DESIGN.md, Architecture).

``auto`` runs the Triton kernels on CUDA tensors and the reference on CPU tensors. ``triton`` on CPU
tensors needs the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported); without it
the request is a clear error rather than a crash inside a kernel.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "reference")


def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors (slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Return ``"triton"`` or ``"reference"`` for tensors on ``device``, or raise a clear ValueError."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    if not triton_available():
        raise ValueError("backend='triton' needs the triton package (pip install triton); use backend='reference'")
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and interpreter_enabled():
        return "triton"
    raise ValueError(
        f"backend='triton' got {device.type} tensors: the kernels run on CUDA tensors, or on CPU tensors "
        "under the Triton interpreter (set TRITON_INTERPRET=1 before importing triton); "
        "use backend='auto' or 'reference' otherwise"
    )
