"""Tests of fastopd._dispatch: which backend runs for which tensors, and the Triton floor (docs/kernels.md,
"Triton versions"): one number in the code, the metadata and the README; ``backend="triton"`` under an older
Triton is a clear RuntimeError, ``backend="auto"`` falls back to the reference with one warning per process.
The installed Triton is made to look old by monkeypatching its version string (and, for the feature test,
by removing ``tl.topk``)."""

from __future__ import annotations

import pathlib
import re
import sys
import warnings

import pytest
import torch

from fastopd import _dispatch
from fastopd._dispatch import parse_version, resolve_backend
from fastopd.common import LOSSES, TRITON_FLOOR

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402


def test_auto_backend_choice():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_backend("auto", cpu, dtypes=(torch.bfloat16,)) == "reference"
    assert resolve_backend("auto", cuda, dtypes=(torch.bfloat16, torch.float32), k=16) == "triton"
    # the kernels take fp16/bf16/fp32 and k <= 256: auto hands anything else to the reference
    assert resolve_backend("auto", cuda, dtypes=(torch.float64, torch.float32)) == "reference"
    assert resolve_backend("auto", cuda, dtypes=(torch.bfloat16,), k=512) == "reference"
    assert resolve_backend("reference", cuda) == "reference"
    # every loss has its kernels: auto runs them on CUDA and "triton" accepts each (forward_kl included)
    for loss in LOSSES:
        assert resolve_backend("auto", cuda, dtypes=(torch.bfloat16,), k=16, loss=loss) == "triton", loss
        assert resolve_backend("triton", cuda, dtypes=(torch.bfloat16,), k=16, loss=loss) == "triton", loss


def test_a_loss_without_kernel_goes_to_the_reference(monkeypatch):
    """A loss outside KERNEL_LOSSES: auto runs the reference, triton refuses it, naming the loss."""
    monkeypatch.setattr(_dispatch, "KERNEL_LOSSES", ("pg",))
    cuda = torch.device("cuda")
    assert resolve_backend("auto", cuda, dtypes=(torch.bfloat16,), k=16, loss="pg") == "triton"
    assert resolve_backend("auto", cuda, dtypes=(torch.bfloat16,), k=16, loss="reverse_kl") == "reference"
    with pytest.raises(ValueError, match="loss='reverse_kl' has no Triton kernel"):
        resolve_backend("triton", cuda, dtypes=(torch.bfloat16,), k=16, loss="reverse_kl")


ROOT = pathlib.Path(__file__).resolve().parents[1]
FLOOR = ".".join(map(str, TRITON_FLOOR))
CUDA = torch.device("cuda")  # resolve_backend only looks at the device type: no GPU is needed


@pytest.fixture
def old_triton(monkeypatch):
    """Triton looks like 3.3.1 (torch 2.7's), and auto has not warned yet in this process."""
    monkeypatch.setattr(triton, "__version__", "3.3.1")
    monkeypatch.setattr(_dispatch, "_warned_old_triton", False)


@pytest.mark.parametrize("text,expected", [
    ("3.4.0", (3, 4)), ("3.6.0", (3, 6)), ("3.5.0+git1a2b3c", (3, 5)), ("3.10.1rc2", (3, 10)), (" 4.0", (4, 0)),
])
def test_parse_version(text, expected):
    assert parse_version(text) == expected


def test_parse_version_rejects_garbage():
    with pytest.raises(ValueError, match="version must look like"):
        parse_version("main")


def test_installed_triton_meets_the_floor():
    assert _dispatch.triton_problem() is None, _dispatch.triton_problem()


def test_auto_falls_back_to_reference_with_one_warning(old_triton):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = resolve_backend("auto", CUDA, dtypes=(torch.bfloat16, torch.bfloat16), k=16)
        second = resolve_backend("auto", CUDA, dtypes=(torch.float32,), k=4)
    assert first == second == "reference"
    old = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(old) == 1, [str(w.message) for w in caught]
    msg = str(old[0].message)
    assert f"Triton >= {FLOOR}" in msg and "3.3.1" in msg and "reference" in msg


def test_auto_on_cpu_does_not_warn_about_triton(old_triton):
    """CPU tensors go to the reference whatever Triton is installed: nothing to warn about."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("auto", torch.device("cpu"), dtypes=(torch.bfloat16,), k=16) == "reference"
    assert _dispatch._warned_old_triton is False


def test_triton_backend_refuses_an_old_triton(old_triton):
    with pytest.raises(RuntimeError, match=rf"Triton >= {re.escape(FLOOR)}.*found triton 3\.3\.1"):
        resolve_backend("triton", CUDA, dtypes=(torch.bfloat16,), k=16)
    with pytest.raises(RuntimeError, match="backend='reference'"):
        _dispatch.check_triton()


def test_a_triton_without_topk_is_refused(monkeypatch):
    """The feature test stands beside the version test (a development build may carry any version)."""
    monkeypatch.setattr(triton, "__version__", "3.9.0+dev")
    monkeypatch.delattr(tl, "topk")
    monkeypatch.setattr(_dispatch, "_warned_old_triton", False)
    with pytest.raises(RuntimeError, match="tl.topk"):
        resolve_backend("triton", CUDA)
    with pytest.warns(RuntimeWarning, match="runs the PyTorch reference"):
        assert resolve_backend("auto", CUDA, dtypes=(torch.float16,), k=16) == "reference"


def test_floor_is_the_same_in_metadata_and_readme():
    """pyproject.toml's triton requirement and the README state the floor the code enforces."""
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    triton_deps = [d for d in deps if re.match(r"triton\b", d)]
    assert triton_deps and all(f"triton>={FLOOR}" in d.replace(" ", "") for d in triton_deps), triton_deps
    readme = (ROOT / "README.md").read_text()
    assert f"Triton >= {FLOOR}" in readme
