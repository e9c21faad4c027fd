"""Backend choice shared by every op: ``"auto" | "triton" | "reference"`` (README, Layout).

``auto`` runs the Triton kernels on CUDA tensors and the reference on CPU tensors. ``triton`` on CPU
tensors needs the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported); without it
the request is a clear error rather than a crash inside a kernel.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from fastopd.common import KERNEL_DTYPES, KERNEL_MAX_K

BACKENDS = ("auto", "triton", "reference")


def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors (slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _device(t) -> torch.device:
    """The device of a tensor argument (CPU for a non-tensor: the reference then names the bad argument)."""
    return t.device if isinstance(t, torch.Tensor) else torch.device("cpu")


def _dtypes(*ts) -> tuple:
    """The dtypes of the tensor arguments (None for a non-tensor, which no kernel takes)."""
    return tuple(t.dtype if isinstance(t, torch.Tensor) else None for t in ts)



def resolve_backend(backend: str, device: torch.device, *, dtypes=(), k: int | None = None) -> str:
    """Return ``"triton"`` or ``"reference"`` for tensors on ``device``, or raise a clear ValueError.

    ``auto`` picks Triton for CUDA tensors whose ``dtypes`` the kernels take and ``k <= 256``, the
    reference otherwise (fp64 logits, CPU tensors, no triton installed).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if backend == "auto":
        kernel_ok = all(d in KERNEL_DTYPES for d in dtypes) and (k is None or (isinstance(k, int) and k <= KERNEL_MAX_K))
        return "triton" if device.type == "cuda" and kernel_ok and triton_available() else "reference"
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


def cpu_ops():
    """The CPU backend: :mod:`fastopd.reference`, whose plain PyTorch/NumPy code doubles as the CPU path.

    This is the one entry through which the package (outside tests and benchmarks) reaches the oracle:
    ``token_stats``, ``opd_loss``, the segment means and the weights on CPU tensors.
    """
    from fastopd import reference

    return reference
