"""Session-wide test setup.

Triton decides "interpreted or compiled" when a function is decorated with ``@triton.jit``, including its
own library (tl.max, tl.topk, ...) at ``import triton``. On a machine without a GPU, triton is therefore
imported here, before any test module, with ``TRITON_INTERPRET=1`` set for the duration of the import only,
so that tests/kernels/ can run the kernels under the interpreter whatever the collection order.
The variable is restored right away: other tests see the environment they were started with.
"""

from __future__ import annotations

import importlib.util
import os
import sys

# tests/helpers.py (shared helpers) is importable from every test folder as ``helpers``.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    import torch

    if torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        return
    if "triton" in sys.modules:
        return
    prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    finally:
        if prev is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = prev
