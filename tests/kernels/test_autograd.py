"""fastopd.kernels.autograd and loss_backward (the loss and its gradient) against the reference oracle
(docs/formulas.md §5); the shared setup is tests/kernels/kernel_setup.py."""

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

from kernel_setup import *  # noqa: F401,F403  (the interpreter setup, fixtures and helpers)

pytestmark = KERNEL_MARKS


# ----------------------------------------------------------------------------------------------------------
# 3. loss and gradient
# ----------------------------------------------------------------------------------------------------------


def _loss_three_ways(zs, zt, y, g, *, inplace=False, **kw):
    """Run kernel / reference-in-dtype / fp64 truth; backprop loss + <per_token, g>; return outputs and grads."""
    knobs = {key: kw.pop(key) for key in ("block_v", "splits") if key in kw}
    results = []
    for impl, s_in, t_in, o_in in (
        ("kernel", zs, zt, kw.get("old_logprobs")),
        ("ref", zs, zt, kw.get("old_logprobs")),
        ("truth", zs.double(), zt.double(), None if kw.get("old_logprobs") is None else kw["old_logprobs"].double()),
    ):
        args = dict(kw, old_logprobs=o_in)
        if impl == "truth" and args.get("weights") is not None:
            args["weights"] = args["weights"].double()
        leaf = s_in.detach().clone().requires_grad_(True)
        x = leaf * 1  # a non-leaf buffer, as logits from lm_head are
        if impl == "kernel":
            out = opd_loss_triton(x, t_in, y, inplace_backward=inplace, **args, **knobs)
        else:
            out = reference.opd_loss(x, t_in, y, **args)
        (out.loss + (out.per_token * g.to(out.per_token.dtype)).sum()).backward()
        results.append((out, leaf.grad))
    return results


LOSS_CASES = [
    # (loss, dtype, tau, with weights, with old_logprobs, normalizer)
    ("pg", torch.float32, 1.0, False, False, None),
    ("pg", torch.bfloat16, 0.7, True, True, 7.5),
    ("pg", torch.float16, 1.0, True, False, None),
    ("reverse_kl", torch.float32, 1.3, True, False, None),
    ("reverse_kl", torch.bfloat16, 1.0, False, False, 3.0),
    ("forward_kl", torch.float32, 1.3, True, False, None),
    ("forward_kl", torch.bfloat16, 1.0, False, False, 3.0),
    ("forward_kl", torch.float16, 0.7, True, False, None),
]


@pytest.mark.parametrize("loss,dtype,tau,use_w,use_old,normalizer", LOSS_CASES)
def test_loss_and_gradient_match_reference(device, loss, dtype, tau, use_w, use_old, normalizer):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{loss}-{dtype}-{tau}".encode()))  # not hash(): salted
    n, v = 9, 300
    zs = _logits(gen, (n, v), dtype, device)
    zt = _logits(gen, (n, v), dtype, device)
    y = _targets(gen, (n,), v, device, ignore_frac=0.25)
    weights = torch.rand(n, generator=gen).to(device) * 2 if use_w else None
    if weights is not None:
        weights[0] = 0.0  # a dropped token: its row of the gradient is exactly 0
    old = (torch.randn(n, generator=gen) - 4).to(device) if use_old else None
    g = torch.randn(n, generator=gen).to(device)
    (ko, kg), (ro, rg), (to, tg) = _loss_three_ways(
        zs, zt, y, g, weights=weights, old_logprobs=old, loss=loss, temperature=tau, normalizer=normalizer,
        k=4, block_v=128,
    )
    _check_close("loss", ko.loss, ro.loss, to.loss)
    _check_close("per_token", ko.per_token, ro.per_token, to.per_token)
    _check_close("advantages", ko.stats.advantages, ro.stats.advantages, to.stats.advantages)
    _check_close("margins", ko.stats.margins, ro.stats.margins, to.stats.margins)
    for div in ("reverse_kl", "forward_kl"):  # TokenStats holds the divergence of the loss, and only it
        if div == loss:
            _check_close(div, getattr(ko.stats, div), getattr(ro.stats, div), getattr(to.stats, div))
            assert torch.all(getattr(ko.stats, div)[~ko.stats.valid] == 0)
        else:
            assert getattr(ko.stats, div) is None and getattr(ro.stats, div) is None
    assert kg.dtype == dtype and kg.shape == zs.shape
    _check_close("grad", kg, rg, tg, atol=1e-6)
    assert torch.all(kg[~ko.stats.valid] == 0)
    if weights is not None and bool(ko.stats.valid[0]):
        assert torch.all(kg[0] == 0)
    assert set(ko.metrics) == set(ro.metrics)
    for key, val in ro.metrics.items():
        assert ko.metrics[key] == pytest.approx(val, rel=1e-4, abs=1e-5), key


def _loss_sweep(count, seed, losses=("pg", "reverse_kl")):
    rng = random.Random(seed)
    return [
        dict(loss=rng.choice(losses), v=rng.choice([3, 40, 257, 1100]), n=rng.choice([1, 4, 9]),
             dtype=rng.choice([torch.float32, torch.bfloat16, torch.float16]), tau=rng.choice([1.0, 0.8, 2.0]),
             weights=rng.random() < 0.5, old=rng.random() < 0.5, normalizer=rng.choice([None, 5.0]),
             block_v=rng.choice([None, 64, 256]), seed=rng.randrange(10**6))
        for _ in range(count)
    ]


@pytest.mark.parametrize("case", _loss_sweep(8, seed=7) + _loss_sweep(4, seed=8, losses=("forward_kl",)),
                         ids=lambda c: f"{c['loss']}-v{c['v']}-n{c['n']}-{c['dtype']}")
def test_loss_random_sweep(device, case):
    gen = torch.Generator().manual_seed(case["seed"])
    n, v = case["n"], case["v"]
    zs, zt = _logits(gen, (n, v), case["dtype"], device), _logits(gen, (n, v), case["dtype"], device)
    y = _targets(gen, (n,), v, device, ignore_frac=0.2)
    weights = torch.rand(n, generator=gen).to(device) if case["weights"] else None
    old = (torch.randn(n, generator=gen) - 3).to(device) if case["old"] and case["loss"] == "pg" else None
    g = torch.randn(n, generator=gen).to(device)
    (ko, kg), (ro, rg), (to, tg) = _loss_three_ways(
        zs, zt, y, g, weights=weights, old_logprobs=old, loss=case["loss"], temperature=case["tau"],
        normalizer=case["normalizer"], k=min(4, v), block_v=case["block_v"],
    )
    _check_close("loss", ko.loss, ro.loss, to.loss)
    _check_close("per_token", ko.per_token, ro.per_token, to.per_token)
    _check_close("grad", kg, rg, tg, atol=1e-6)


@pytest.mark.parametrize("loss", ["pg", "reverse_kl", "forward_kl"])
def test_inplace_backward_and_vocab_cut(device, loss):
    """In-place gradient equals the out-of-place one; columns >= vocab_size get exactly 0; teacher no grad."""
    gen = torch.Generator().manual_seed(8)
    v = 180
    zs = _logits(gen, (2, 4, v + 12), torch.bfloat16, device)
    zt = _logits(gen, (2, 4, v + 3), torch.bfloat16, device)
    y = _targets(gen, (2, 4), v, device, ignore_frac=0.2)
    grads = []
    for inplace in (False, True):
        leaf = zs.detach().clone().requires_grad_(True)
        teacher = zt.detach().clone().requires_grad_(True)
        x = leaf * 1
        out = opd_loss_triton(x, teacher, y, loss=loss, k=4, vocab_size=v, inplace_backward=inplace, block_v=64)
        per_token_before = out.per_token.detach().clone()
        out.loss.backward()
        assert teacher.grad is None
        assert torch.equal(out.per_token.detach(), per_token_before)
        if inplace:
            assert torch.equal(x.detach(), leaf.grad)  # the logits buffer now holds the gradient
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])
    assert torch.all(grads[0][..., v:] == 0)
    ref_leaf = zs.detach().clone().requires_grad_(True)
    ref = reference.opd_loss(ref_leaf * 1, zt, y, loss=loss, k=4, vocab_size=v)
    ref.loss.backward()
    truth_leaf = zs.detach().double().requires_grad_(True)
    reference.opd_loss(truth_leaf * 1, zt.double(), y, loss=loss, k=4, vocab_size=v).loss.backward()
    _check_close("grad", grads[0], ref_leaf.grad, truth_leaf.grad, atol=1e-6)


@pytest.mark.parametrize("splits", [1, 3])
def test_forward_kl_edge_rows_and_gradient(device, splits):
    """forward_kl on rows with edge terms: z_S = -inf where the teacher has mass gives l_t = +inf (kernel and
    reference); a -inf teacher column, 1e4-magnitude logits and an ignored row stay finite / 0. The gradient
    is c_t (p_S - p_T) / tau on every row (finite on the +inf row too), as the reference's autograd and the
    fp64 truth; the ignored row's and the dropped token's rows are exactly 0."""
    gen = torch.Generator().manual_seed(21)
    n, v, tau = 6, 400, 0.9
    zs = torch.randn(n, v, generator=gen, dtype=torch.float64) * 2
    zt = torch.randn(n, v, generator=gen, dtype=torch.float64) * 2
    zs[0, 17] = -float("inf")  # teacher mass there: +inf
    zt[1, ::5] = -float("inf")  # drops out
    zs[2] = (torch.rand(v, generator=gen, dtype=torch.float64) * 2 - 1) * 1e4
    zt[2] = (torch.rand(v, generator=gen, dtype=torch.float64) * 2 - 1) * 1e4
    y = torch.tensor([3, 4, 5, -100, 7, 8], device=device)
    weights = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.0, 1.5], device=device)
    g = torch.randn(n, generator=gen).to(device)
    for dtype in (torch.float32, torch.bfloat16):
        a, b = zs.to(dtype).to(device), zt.to(dtype).to(device)
        (ko, kg), (ro, rg), (to, tg) = _loss_three_ways(
            a, b, y, g, weights=weights, loss="forward_kl", temperature=tau, k=4, block_v=64, splits=splits)
        assert ko.per_token[0].item() == ro.per_token[0].item() == float("inf")
        assert ko.stats.forward_kl[0].item() == float("inf") and ko.loss.item() == float("inf")
        _check_close("per_token", ko.per_token, ro.per_token, to.per_token, atol=1e-3)
        _check_close("forward_kl", ko.stats.forward_kl, ro.stats.forward_kl, to.stats.forward_kl, atol=1e-3)
        assert bool(torch.isfinite(kg).all())
        _check_close("grad", kg, rg, tg, atol=1e-6)
        assert torch.all(kg[3] == 0) and torch.all(kg[4] == 0)  # ignored row; weight 0
        # the formula itself: d l / d z_S = c (p_S - p_T) / tau, c = w (1 / #valid + g) on row 0
        p_s = torch.softmax(a[0].double() / tau, -1)
        p_t = torch.softmax(b[0].double() / tau, -1)
        want = weights[0].double() * (1.0 / 5 + g[0].double()) * (p_s - p_t) / tau
        assert (kg[0].double() - want).abs().max().item() <= 1e-2 * want.abs().max().item() + 1e-6


def test_per_token_is_differentiable(device):
    """A caller's own reduction of per_token: only the rows it touches get a gradient."""
    gen = torch.Generator().manual_seed(12)
    zs = _logits(gen, (5, 128), torch.float32, device)
    zt = _logits(gen, (5, 128), torch.float32, device)
    y = _targets(gen, (5,), 128, device)
    leaf = zs.clone().requires_grad_(True)
    out = opd_loss_triton(leaf, zt, y, loss="reverse_kl", k=4, block_v=64)  # two full chunks, no tail
    (out.per_token[1] * 3.0).backward()
    ref_leaf = zs.clone().requires_grad_(True)
    (reference.opd_loss(ref_leaf, zt, y, loss="reverse_kl", k=4).per_token[1] * 3.0).backward()
    assert torch.all(leaf.grad[[0, 2, 3, 4]] == 0)
    assert torch.allclose(leaf.grad, ref_leaf.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not _CUDA or _INTERPRETED, reason="needs a GPU: N * V > 2**31 elements")
def test_int64_offsets_cuda():
    """Rows beyond 2**31 elements into the buffer: offsets must be int64."""
    n, v = 16400, 131072 + 16
    assert n * v > 2**31
    zs = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    zt = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(0, v, (n,), device="cuda")
    got = token_stats_triton(zs, zt, y, k=16, full_kl=True, return_topk=True)
    tail = slice(n - 3, n)
    kw = dict(k=16, full_kl=True, return_topk=True)
    ref = reference.token_stats(zs[tail], zt[tail], y[tail], **kw)
    truth = reference.token_stats(zs[tail].double(), zt[tail].double(), y[tail], **kw)
    sliced = type(got)(**{f: (getattr(got, f)[tail] if getattr(got, f) is not None else None)
                          for f in ("student_logprobs", "teacher_logprobs", "advantages", "margins", "valid",
                                    "reverse_kl", "topk_ids")})
    _check_stats(sliced, ref, truth, full_kl=True, return_topk=True)


def test_public_inplace_backward_reaches_the_kernel(device):
    """fastopd.OPDLoss(..., inplace_backward=True) forwards the option: the logits buffer holds the gradient."""
    gen = torch.Generator().manual_seed(21)
    zs = _logits(gen, (3, 5, 96), torch.float32, device)
    zt = _logits(gen, (3, 5, 96), torch.float32, device)
    y = _targets(gen, (3, 5), 96, device, ignore_frac=0.2)
    grads = []
    for inplace in (False, True):
        leaf = zs.detach().clone().requires_grad_(True)
        x = leaf * 1
        crit = fastopd.OPDLoss(k=4, backend="triton", inplace_backward=inplace)
        crit(x, zt, y).loss.backward()
        assert torch.equal(x.detach(), leaf.grad) == inplace
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])


def test_opdloss_with_rule_on_the_kernels(device):
    """OPDLoss(rule=...) weights the kernels' per-token loss after the forward: same loss, weights and
    gradient as the reference path."""
    gen = torch.Generator().manual_seed(22)
    zs = _logits(gen, (2, 12, 70), torch.float32, device)
    zt = _logits(gen, (2, 12, 70), torch.float32, device)
    y = _targets(gen, (2, 12), 70, device, ignore_frac=0.1)
    seg = torch.arange(12, device=device).div(3, rounding_mode="floor").repeat(2, 1)
    results = []
    for backend in ("triton", "reference"):
        leaf = zs.detach().clone().requires_grad_(True)
        rule = fastopd.ReleaseRule(k=4, min_gain=-float("inf"), min_segments=1, backend=backend)
        out = fastopd.OPDLoss(rule=rule)(leaf, zt, y, segment_ids=seg)
        assert out.loss.device == zs.device and fastopd.OPDLoss(rule=rule).backend == backend
        out.loss.backward()
        results.append((out, leaf.grad))
    (kt, gt), (kr, gr) = results
    assert torch.equal(kt.release.weights, kr.release.weights)
    torch.testing.assert_close(kt.loss, kr.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gt, gr, rtol=1e-4, atol=1e-6)


def test_release_rule_takes_segment_sums_from_the_kernel(device):
    """ReleaseRule on the Triton backend builds its series from segment_sums_triton's (B, S) sums and counts:
    the same series as the reference's float64 segment_means (to fp32 rounding), the same segment ids."""
    gen = torch.Generator().manual_seed(31)
    margins = torch.rand((3, 40), generator=gen).to(device)
    seg = torch.arange(40).div(5, rounding_mode="floor").repeat(3, 1).to(device)
    seg[1, 10:] += 5  # a row whose segment ids skip 2..6 (0, 1, 7, 8, ...: still non-decreasing)
    valid = (torch.rand((3, 40), generator=gen) > 0.2).to(device)
    valid[2, 5:10] = False  # segment 1 of row 2 has no valid token: left out of the series
    got = fastopd.ReleaseRule(backend="triton").segment_series(margins, seg, valid)
    want = reference.segment_means(margins, seg, valid)
    np.testing.assert_array_equal(got.offsets, want.offsets)
    np.testing.assert_array_equal(got.segment_ids, want.segment_ids)
    np.testing.assert_allclose(got.values, want.values, rtol=1e-6, atol=1e-7)
