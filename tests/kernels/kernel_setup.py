"""Shared setup of the kernel tests: imports fastopd.kernels under the Triton interpreter on a CPU-only
machine, the ``device`` fixture, input makers and the accuracy checks.

On a machine without a GPU the kernels run under the Triton interpreter: this module sets
``TRITON_INTERPRET=1`` only while it imports ``fastopd.kernels`` (Triton decides "interpreted or compiled"
when a kernel is decorated) and again, through the autouse fixture ``_interpreter_env``, while each kernel
test runs (the dispatcher reads it at call time); it restores the variable otherwise, so other test modules
see the environment they started with. With a GPU the same tests run on CUDA tensors with compiled kernels.

Accuracy is judged the Cut-Cross-Entropy way: the ground truth is the reference on the inputs cast to
fp64 (exact for bf16/fp16/fp32 inputs); the kernel's error against it must stay within twice the error of
the reference run in the input dtype, plus a small absolute tolerance. Top-K ids must match exactly.
Test modules import what they use from here (fixtures included) and set ``pytestmark = KERNEL_MARKS``.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
import torch

_CUDA = torch.cuda.is_available()
_PREV_INTERPRET = os.environ.get("TRITON_INTERPRET")
_WANT_INTERPRET = (not _CUDA) or _PREV_INTERPRET == "1"
if _WANT_INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    triton = pytest.importorskip("triton")
    import fastopd
    from fastopd import reference
    from helpers import ROOT
    from fastopd.kernels import opd_loss_triton, segment_sums_triton, token_stats_triton
    from fastopd.kernels._helpers import is_interpreted
    from fastopd.kernels.token_stats import _token_stats_kernel
finally:
    if _PREV_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREV_INTERPRET

_INTERPRETED = is_interpreted(_token_stats_kernel)
if _INTERPRETED and not is_interpreted(triton.language.standard.max):
    # Triton's own jit library (tl.max, tl.topk, ...) is decorated when triton is first imported.
    pytest.skip(
        "triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py imports it under the "
        "interpreter on CPU-only machines); the interpreted kernels cannot run",
        allow_module_level=True,
    )
DEVICES = ["cpu"] if _INTERPRETED else []
if _CUDA and not _INTERPRETED:
    DEVICES.append("cuda")
if not DEVICES:  # kernels were compiled (imported earlier without the interpreter) but there is no GPU
    pytest.skip(
        "fastopd.kernels was imported without TRITON_INTERPRET=1 and no GPU is present", allow_module_level=True
    )

KERNEL_MARKS = [
    # The interpreter evaluates both sides of tl.where: inf - inf in a discarded lane warns in numpy.
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION:UserWarning"),
]

STAT_FIELDS = ("student_logprobs", "teacher_logprobs", "advantages", "margins")


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    if _INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def _logits(gen, shape, dtype, device, *, scale=3.0, kind="normal"):
    if kind == "normal":
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    elif kind == "int":  # integer-valued: many exact ties
        x = torch.randint(-3, 4, shape, generator=gen).double()
    elif kind == "huge":  # +-1e4 logits
        x = (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * 1e4
    else:
        raise ValueError(kind)
    return x.to(dtype).to(device)


def _targets(gen, shape, v, device, *, ignore_frac=0.0, ignore_index=-100):
    y = torch.randint(0, v, shape, generator=gen)
    if ignore_frac > 0:
        y = torch.where(torch.rand(shape, generator=gen) < ignore_frac, torch.full_like(y, ignore_index), y)
    return y.to(device)


def _check_close(name, got, ref, truth, *, atol=1e-5, rtol=1e-6):
    """|got - truth| <= 2 |ref - truth| + atol + rtol |truth| (max over entries); non-finite entries equal."""
    got, ref, truth = (t.detach().double().cpu() for t in (got, ref, truth))
    assert got.shape == truth.shape, f"{name}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    bad = ~torch.isfinite(truth)
    assert torch.equal(~torch.isfinite(got), bad), f"{name}: non-finite pattern differs from the fp64 truth"
    assert torch.equal(got[bad].nan_to_num(0.0), truth[bad].nan_to_num(0.0)), f"{name}: inf signs differ"
    ok = ~bad
    if not bool(ok.any()):
        return
    err = (got - truth)[ok].abs().max().item()
    ref_err = (ref - truth)[ok].abs().max().item()
    bound = 2 * ref_err + atol + rtol * truth[ok].abs().max().item()
    assert err <= bound, f"{name}: kernel error {err:.3g} > bound {bound:.3g} (reference-in-dtype error {ref_err:.3g})"


def _check_stats(got, ref, truth, *, full_kl, return_topk, atol=1e-5):
    assert torch.equal(got.valid.cpu(), ref.valid.cpu())
    for f in STAT_FIELDS:
        _check_close(f, getattr(got, f), getattr(ref, f), getattr(truth, f), atol=atol)
        assert getattr(got, f).dtype == torch.float32
    invalid = ~got.valid
    for f in STAT_FIELDS:
        assert torch.all(getattr(got, f)[invalid] == 0), f"{f} must be 0 at ignored positions"
    if full_kl:
        _check_close("reverse_kl", got.reverse_kl, ref.reverse_kl, truth.reverse_kl, atol=atol)
        assert torch.all(got.reverse_kl[invalid] == 0)
    else:
        assert got.reverse_kl is None
    if return_topk:
        assert got.topk_ids.dtype == torch.int64
        assert torch.equal(got.topk_ids.cpu(), ref.topk_ids.cpu()), "top-K ids differ from the reference"
    else:
        assert got.topk_ids is None


def _stats_three_ways(zs, zt, y, **kw):
    """(kernel, reference in the input dtype, reference on fp64 inputs = truth)."""
    knobs = {key: kw.pop(key) for key in ("block_v", "group", "topk_impl") if key in kw}
    got = token_stats_triton(zs, zt, y, **kw, **knobs)
    ref = reference.token_stats(zs, zt, y, **kw)
    truth = reference.token_stats(zs.double(), zt.double(), y, **kw)
    return got, ref, truth


def _forward_kl_three_ways(zs, zt, y, *, k=4, temperature=1.0, ignore_index=-100, vocab_size=None, **knobs):
    """The stats kernel's forward KL F_t = KL(p_T || p_S)_t (``launch_token_stats(kl="forward")``, row OUT_KL:
    the ``forward_kl`` loss's divergence, which the public ``token_stats`` does not return), and the
    reference's ``forward_kl`` in the input dtype and on fp64 inputs (the truth), each 0 at ignored positions.
    ``knobs``: block_v, group, topk_impl, splits of the launch. Returns (kernel, reference, truth, buffer)."""
    from fastopd.kernels._helpers import OUT_KL, Rows
    from fastopd.kernels.token_stats import launch_token_stats

    v = zs.shape[-1] if vocab_size is None else vocab_size
    out, _ = launch_token_stats(Rows(zs), Rows(zt), y, v=v, k=k, temperature=temperature,
                                ignore_index=ignore_index, kl="forward", return_topk=False, **knobs)
    valid = y != ignore_index

    def ref(a, b):
        _, ls = reference.logprobs(a, v, temperature)
        _, lt = reference.logprobs(b, v, temperature)
        f = reference.forward_kl(ls, lt)
        return torch.where(valid, f, torch.zeros((), dtype=f.dtype, device=f.device))

    return out[OUT_KL.value].view(y.shape), ref(zs, zt), ref(zs.double(), zt.double()), out


__all__ = [
    "_forward_kl_three_ways",
    "_CUDA",
    "triton",
    "fastopd",
    "reference",
    "ROOT",
    "opd_loss_triton",
    "segment_sums_triton",
    "token_stats_triton",
    "is_interpreted",
    "_token_stats_kernel",
    "_INTERPRETED",
    "DEVICES",
    "KERNEL_MARKS",
    "STAT_FIELDS",
    "_interpreter_env",
    "device",
    "_logits",
    "_targets",
    "_check_close",
    "_check_stats",
    "_stats_three_ways",
]
