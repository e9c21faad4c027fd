"""Backend choice shared by every op: ``"auto" | "triton" | "reference"`` (README, Layout).

``auto`` runs the Triton kernels on CUDA tensors and the reference on CPU tensors. ``triton`` on CPU
tensors needs the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported); without it
the request is a clear error rather than a crash inside a kernel.

The kernels need Triton >= 3.4 (``fastopd.common.TRITON_FLOOR``: ``tl.topk`` on int64 keys; 3.3.1 does not
compile them). Under an older Triton, ``triton`` is a clear RuntimeError and ``auto`` runs the reference
with one warning per process.
"""

from __future__ import annotations

import importlib.util
import os
import re
import warnings

import torch

from fastopd.common import BACKENDS, KERNEL_DTYPES, KERNEL_LOSSES, KERNEL_MAX_K, LOSSES, TRITON_FLOOR

_warned_old_triton = False  # auto's fallback warning is given once per process


def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def parse_version(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as ``"3.6.0"``, ``"3.5.0+git1a2b"`` or ``"3.4.0rc1"``."""
    m = re.match(r"\s*(\d+)\.(\d+)", str(version))
    if not m:
        raise ValueError(f"version must look like 'MAJOR.MINOR[...]', got {version!r}")
    return int(m.group(1)), int(m.group(2))


def triton_problem() -> str | None:
    """None when the installed Triton can run the kernels, else why not (a sentence naming the version)."""
    import triton
    import triton.language as tl

    floor = ".".join(map(str, TRITON_FLOOR))
    try:
        too_old = parse_version(triton.__version__) < TRITON_FLOOR
    except ValueError:
        too_old = False  # an unparsable (development) version is judged by the feature test alone
    if too_old or not hasattr(tl, "topk") or not hasattr(tl, "join"):
        return (
            f"fastopd's Triton kernels need Triton >= {floor} (tl.topk on int64 keys); found triton "
            f"{triton.__version__}"
        )
    return None


def check_triton() -> None:
    """Raise a clear RuntimeError when the installed Triton cannot run the kernels (older than TRITON_FLOOR)."""
    problem = triton_problem()
    if problem is not None:
        raise RuntimeError(f"{problem}. Upgrade triton or use backend='reference'.")


def _triton_ok_for_auto() -> bool:
    """``auto``'s test: True when Triton is usable; else False after warning once per process."""
    global _warned_old_triton
    problem = triton_problem()
    if problem is None:
        return True
    if not _warned_old_triton:
        _warned_old_triton = True
        warnings.warn(f"{problem}: backend='auto' runs the PyTorch reference instead (same formulas; slower, with N x V temporaries). "
                      "Upgrade triton to use the kernels.", RuntimeWarning, stacklevel=4)
    return False


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors (slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _device(t) -> torch.device:
    """The device of a tensor argument (CPU for a non-tensor: the reference then names the bad argument)."""
    return t.device if isinstance(t, torch.Tensor) else torch.device("cpu")


def _dtypes(*ts) -> tuple:
    """The dtypes of the tensor arguments (None for a non-tensor, which no kernel takes)."""
    return tuple(t.dtype if isinstance(t, torch.Tensor) else None for t in ts)



def resolve_backend(backend: str, device: torch.device, *, dtypes=(), k: int | None = None,
                    loss: str | None = None) -> str:
    """Return ``"triton"`` or ``"reference"`` for tensors on ``device``, or raise a clear ValueError.

    ``auto`` picks Triton for CUDA tensors whose ``dtypes`` the kernels take, ``k <= 256`` and a ``loss`` in
    :data:`fastopd.common.KERNEL_LOSSES` (or None), the reference otherwise (fp64 logits, CPU tensors, no
    triton installed, or a Triton older than ``TRITON_FLOOR``: then with one RuntimeWarning per process). ``triton`` under a Triton older than the
    floor raises RuntimeError.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if backend == "auto":
        kernel_ok = (all(d in KERNEL_DTYPES for d in dtypes) and (k is None or (isinstance(k, int) and k <= KERNEL_MAX_K))
                     and (loss is None or loss in KERNEL_LOSSES))
        wants = device.type == "cuda" and kernel_ok and triton_available()
        return "triton" if wants and _triton_ok_for_auto() else "reference"
    if loss in LOSSES and loss not in KERNEL_LOSSES:  # (an unknown name is the loss's own check's to refuse)
        raise ValueError(f"loss={loss!r} has no Triton kernel (kernels: {KERNEL_LOSSES}); use backend='auto' or "
                         "'reference'")
    if not triton_available():
        raise ValueError("backend='triton' needs the triton package (pip install triton); use backend='reference'")
    check_triton()
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


def load_c(function: str, fallback: str):
    """The ``fastopd._C`` module, checked to have ``function``; a clear ImportError naming the pure-Python
    ``fallback`` (e.g. ``"fastopd.reference.bic_release"``) when it is not built or predates ``function``."""
    try:
        from fastopd import _C
    except ImportError as e:  # a source checkout that was never built
        raise ImportError(
            "fastopd's C++ extension fastopd._C is not built: run `pip install -e .` in the repository "
            f"({fallback} is the pure-Python equivalent)"
        ) from e
    if not hasattr(_C, function):
        raise ImportError(f"fastopd._C predates {function}: rebuild it with `pip install -e . --no-build-isolation` "
                          "or `python setup.py build_ext --inplace`")
    return _C
