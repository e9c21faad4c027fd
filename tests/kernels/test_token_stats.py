"""fastopd.kernels.token_stats (the stats pass and the segment sums) against the reference oracle
(docs/formulas.md §1, §2); the shared setup is tests/kernels/kernel_setup.py."""

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
# 1. token statistics
# ----------------------------------------------------------------------------------------------------------

# (N, V, k, dtype, temperature, block_v, kind): V from 2 to ~4k incl. non-powers of two and V < block;
# N = 1 and odd N; k in {2, 4, 16, 64} capped at V; several chunks per row where block_v < V.
STATS_CASES = [
    (1, 2, 2, torch.float32, 1.0, None, "normal"),
    (5, 3, 2, torch.bfloat16, 1.0, None, "normal"),
    (7, 17, 4, torch.float16, 0.7, None, "normal"),
    (3, 100, 16, torch.float32, 1.0, 64, "normal"),
    (6, 257, 16, torch.bfloat16, 2.0, 64, "normal"),
    (4, 1000, 64, torch.float32, 1.0, 256, "normal"),
    (9, 1531, 4, torch.bfloat16, 1.0, 256, "int"),
    (3, 4099, 16, torch.float16, 1.0, 1024, "normal"),
    (5, 640, 16, torch.float32, 1.0, 128, "huge"),
    (4, 300, 64, torch.bfloat16, 0.5, 64, "int"),
    (4, 512, 16, torch.float32, 1.0, 128, "normal"),  # V a multiple of the chunk: no masked tail
]


@pytest.mark.parametrize("n,v,k,dtype,tau,block_v,kind", STATS_CASES)
def test_token_stats_matches_reference(device, n, v, k, dtype, tau, block_v, kind):
    gen = torch.Generator().manual_seed(n * 1000 + v)
    zs = _logits(gen, (n, v), dtype, device, kind=kind)
    zt = _logits(gen, (n, v), dtype, device, kind=kind)
    y = _targets(gen, (n,), v, device, ignore_frac=0.3 if n > 2 else 0.0)
    kw = dict(k=k, temperature=tau, full_kl=True, return_topk=True, block_v=block_v)
    got, ref, truth = _stats_three_ways(zs, zt, y, **kw)
    _check_stats(got, ref, truth, full_kl=True, return_topk=True, atol=1e-5 if kind != "huge" else 1e-3)


# (N, V, k, dtype, temperature, block_v, kind) for the forward KL: mostly k = 4 so that the chunks are small
# (64 columns at least under the interpreter) and every row has several; odd V, V a multiple of the chunk,
# every dtype, integer ties, 1e4 logits.
FORWARD_KL_CASES = [
    (1, 2, 2, torch.float32, 1.0, None, "normal"),
    (5, 17, 4, torch.float16, 0.7, None, "normal"),
    (6, 257, 4, torch.bfloat16, 2.0, 64, "normal"),
    (4, 1000, 16, torch.float32, 1.0, 256, "normal"),
    (9, 1531, 4, torch.bfloat16, 1.0, 256, "int"),
    (3, 2049, 4, torch.float16, 1.3, 512, "normal"),
    (5, 640, 4, torch.float32, 1.0, 128, "huge"),
    (4, 700, 4, torch.bfloat16, 1.0, 64, "huge"),
    (4, 512, 4, torch.float32, 1.0, 128, "normal"),  # V a multiple of the chunk: no masked tail
]


@pytest.mark.parametrize("n,v,k,dtype,tau,block_v,kind", FORWARD_KL_CASES)
def test_forward_kl_matches_reference(device, n, v, k, dtype, tau, block_v, kind):
    """The forward-KL accumulator (the ``forward_kl`` loss's F_t = KL(p_T || p_S)_t in row OUT_KL) against the
    reference's ``forward_kl`` and the fp64 truth, 0 at ignored positions. "normal" rows get a random linear
    ramp on each model (slopes up to +-8 over the row), so both running maxima move from chunk to chunk, by
    different amounts: the accumulator's rescaling (shift = dS - dT) is exercised in every row."""
    gen = torch.Generator().manual_seed(n * 1000 + v + 1)
    zs = _logits(gen, (n, v), torch.float64, device, kind=kind)
    zt = _logits(gen, (n, v), torch.float64, device, kind=kind)
    if kind == "normal":
        ramp = torch.linspace(0, 1, v, dtype=torch.float64, device=device)
        slopes = ((torch.rand(2, n, 1, generator=gen, dtype=torch.float64) * 2 - 1) * 8).to(device)
        zs, zt = zs + slopes[0] * ramp, zt + slopes[1] * ramp
    zs, zt = zs.to(dtype), zt.to(dtype)
    y = _targets(gen, (n,), v, device, ignore_frac=0.3 if n > 2 else 0.0)
    y[0] = 0  # at least one valid row
    got, ref, truth, _ = _forward_kl_three_ways(zs, zt, y, k=k, temperature=tau, block_v=block_v)
    _check_close("forward_kl", got, ref, truth, atol=1e-5 if kind != "huge" else 1e-3)
    assert torch.all(got[y == -100] == 0)
    assert bool((got[y != -100] > 0).all())  # distinct random rows: KL > 0


def test_forward_kl_leaves_the_other_outputs_unchanged(device):
    """kl="forward" only changes row OUT_KL: every other output row, and the ids, equal a launch without the
    KL bit for bit (and the public full_kl=True still gives the reverse KL)."""
    from fastopd.kernels._helpers import OUT_KL, Rows
    from fastopd.kernels.token_stats import launch_token_stats

    gen = torch.Generator().manual_seed(31)
    zs, zt = _logits(gen, (4, 333), torch.bfloat16, device), _logits(gen, (4, 333), torch.bfloat16, device)
    y = _targets(gen, (4,), 333, device, ignore_frac=0.3)
    kw = dict(v=333, k=4, temperature=0.9, ignore_index=-100, return_topk=True, block_v=64)
    outs = {kl: launch_token_stats(Rows(zs), Rows(zt), y, kl=kl, **kw) for kl in (None, "forward", "reverse")}
    rows = [i for i in range(outs[None][0].shape[0]) if i != OUT_KL.value]
    for kl in ("forward", "reverse"):
        assert torch.equal(outs[kl][0][rows], outs[None][0][rows]) and torch.equal(outs[kl][1], outs[None][1])
    assert torch.all(outs[None][0][OUT_KL.value] == 0)
    rev = token_stats_triton(zs, zt, y, k=4, temperature=0.9, full_kl=True, block_v=64).reverse_kl
    assert torch.equal(outs["reverse"][0][OUT_KL.value], rev)
    assert not torch.equal(outs["forward"][0][OUT_KL.value], rev)
    with pytest.raises(ValueError, match="full_kl=True is the reverse KL"):
        launch_token_stats(Rows(zs), Rows(zt), y, full_kl=True, kl="forward", **kw)
    with pytest.raises(ValueError, match="kl must be None, 'reverse' or 'forward'"):
        launch_token_stats(Rows(zs), Rows(zt), y, kl="both", **kw)


def _sweep(count, seed):
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        v = rng.choice([2, 5, 31, 64, 129, 500, 1023, 2048, 3001])
        cases.append(dict(
            n=rng.choice([1, 2, 3, 7, 11]), v=v, k=min(rng.choice([2, 4, 16, 64]), v),
            dtype=rng.choice([torch.float32, torch.bfloat16, torch.float16]), tau=rng.choice([1.0, 0.6, 1.7]),
            block_v=rng.choice([None, 32, 128, 512]), kind=rng.choice(["normal", "normal", "int"]),
            ignore=rng.choice([0.0, 0.3]), seed=rng.randrange(10**6),
        ))
    return cases


@pytest.mark.parametrize("case", _sweep(14, seed=2024), ids=lambda c: f"n{c['n']}-v{c['v']}-k{c['k']}-{c['dtype']}")
def test_token_stats_random_sweep(device, case):
    gen = torch.Generator().manual_seed(case["seed"])
    shape = (case["n"], case["v"])
    zs = _logits(gen, shape, case["dtype"], device, kind=case["kind"])
    zt = _logits(gen, shape, case["dtype"], device, kind=case["kind"])
    y = _targets(gen, (case["n"],), case["v"], device, ignore_frac=case["ignore"])
    kw = dict(k=case["k"], temperature=case["tau"], full_kl=True, return_topk=True, block_v=case["block_v"])
    got, ref, truth = _stats_three_ways(zs, zt, y, **kw)
    _check_stats(got, ref, truth, full_kl=True, return_topk=True)


def test_ties_to_lower_index(device):
    """All-equal rows and bf16-rounded near-ties: candidates (and so margins) follow the lower index."""
    v, k = 200, 16
    zs = torch.zeros(3, v)
    zs[1] = torch.arange(v) % 5  # five tie classes
    zs[2] = 1.0 + torch.arange(v) * 1e-4  # distinct in fp32, tied after bf16 rounding
    zs = zs.to(torch.bfloat16).to(device)
    zt = torch.arange(v, dtype=torch.float32).flip(0).repeat(3, 1).to(torch.bfloat16).to(device)
    y = torch.tensor([0, 5, 199], device=device)
    got, ref, truth = _stats_three_ways(zs, zt, y, k=k, full_kl=True, return_topk=True, block_v=64)
    _check_stats(got, ref, truth, full_kl=True, return_topk=True)
    assert torch.equal(got.topk_ids[0].cpu(), torch.arange(k))  # all tied: the k lowest indices


def test_signed_zero_and_one_ulp_steps(device):
    """-0.0 ties with +0.0 (as in torch); chunk maxima 1 ulp apart must still enter the running top-K, and
    later values equal to the running K-th must lose the tie."""
    v, k = 600, 16
    rows = torch.zeros(4, v, dtype=torch.float32)
    rows[0, 1::2] = -0.0  # alternating +0.0 / -0.0: all tied, lowest indices win
    rows[0, 300:] = -1.0
    rows[1] = 1.0 + torch.arange(v, dtype=torch.float32) * 2.0**-23  # strictly increasing by 1 ulp
    rows[2] = rows[1].flip(0)  # strictly decreasing
    rows[3] = torch.arange(v, dtype=torch.float32) % 7  # every later chunk repeats the running K-th value
    zs = rows.to(device)
    zt = _logits(torch.Generator().manual_seed(6), (4, v), torch.float32, device)
    y = torch.tensor([0, 1, 2, 3], device=device)
    got, ref, truth = _stats_three_ways(zs, zt, y, k=k, full_kl=True, return_topk=True, block_v=32)
    _check_stats(got, ref, truth, full_kl=True, return_topk=True)
    assert torch.equal(got.topk_ids[0].cpu(), torch.arange(k))
    assert torch.equal(got.topk_ids[1].cpu(), torch.arange(v - 1, v - 1 - k, -1))


def test_minus_inf_logits(device):
    """-inf columns: p = 0 terms drop out of the KL, a -inf teacher under p_S > 0 gives KL = +inf, -inf
    candidates tie by index, and a1 == a2 == -inf gives a zero margin."""
    v = 90
    gen = torch.Generator().manual_seed(3)
    zs = torch.randn(4, v, generator=gen) * 2
    zt = torch.randn(4, v, generator=gen) * 2
    zs[0, 10:] = -float("inf")  # only 10 finite student logits; k = 16 reaches into the -inf ties
    zt[1, ::3] = -float("inf")  # teacher -inf where the student has mass: KL = inf
    zs[2, ::2] = -float("inf")
    zt[2, ::2] = -float("inf")  # both -inf: no contribution
    zt[3, :] = -float("inf")
    zt[3, 60] = 0.0  # teacher finite only at column 60, which is no candidate
    zs[3, :] = -float("inf")
    zs[3, 40:44] = 1.0  # candidates: 40..43 and the 12 lowest -inf columns; teacher -inf on all: margin 0
    y = torch.tensor([3, 4, 1, 41])  # row 3: u = -inf, A = -inf
    for dtype in (torch.float32, torch.bfloat16):
        a, b = zs.to(dtype).to(device), zt.to(dtype).to(device)
        got, ref, truth = _stats_three_ways(a, b, y.to(device), k=16, full_kl=True, return_topk=True, block_v=32)
        _check_stats(got, ref, truth, full_kl=True, return_topk=True)
        assert got.reverse_kl[1].item() == float("inf")
        assert got.margins[3].item() == 0.0
        # The forward KL: -inf student columns under teacher mass (rows 0 and 3) give +inf; -inf teacher
        # columns (row 1) and columns -inf in both (row 2) drop out.
        fk, fr, ft, _ = _forward_kl_three_ways(a, b, y.to(device), k=16, block_v=32)
        _check_close("forward_kl", fk, fr, ft)
        assert fk[0].item() == fk[3].item() == float("inf") and bool(torch.isfinite(fk[1:3]).all())


@pytest.mark.parametrize("frac", [0.0, 0.5, 1.0])
def test_ignore_index_sweep(device, frac):
    gen = torch.Generator().manual_seed(11)
    zs = _logits(gen, (2, 7, 130), torch.bfloat16, device)
    zt = _logits(gen, (2, 7, 130), torch.bfloat16, device)
    y = _targets(gen, (2, 7), 130, device, ignore_frac=frac, ignore_index=-1)
    if frac == 0.0:
        assert bool((y != -1).all())
    got, ref, truth = _stats_three_ways(zs, zt, y, k=4, ignore_index=-1, full_kl=True, return_topk=True, block_v=64)
    _check_stats(got, ref, truth, full_kl=True, return_topk=True)
    assert torch.all(got.topk_ids[y == -1] == -1)
    fk, fr, ft, _ = _forward_kl_three_ways(zs, zt, y, k=4, ignore_index=-1, block_v=64)
    _check_close("forward_kl", fk, fr, ft)
    assert torch.all(fk[y == -1] == 0) and bool((fk[y != -1] > 0).all())
    if frac == 1.0:
        assert not bool(got.valid.any())


@pytest.mark.parametrize("v", [150, 160])
def test_non_contiguous_inputs(device, v):
    """Transposed (L, B, V) views (row offset table; 16-aligned offsets when V = 160), row-strided slices
    and a strided last dim (copied)."""
    gen = torch.Generator().manual_seed(5)
    length, batch = 5, 3
    zs_lbv = _logits(gen, (length, batch, v), torch.bfloat16, device)
    zt_wide = _logits(gen, (batch, length, v + 9), torch.bfloat16, device)
    zs = zs_lbv.transpose(0, 1)  # (B, L, V), leading dims not mergeable
    zt = zt_wide[..., 3:3 + v]  # (B, L, V) with row stride V + 9 and a storage offset
    assert not zs.is_contiguous() and not zt.is_contiguous()
    y = _targets(gen, (batch, length), v, device, ignore_frac=0.2)
    kw = dict(k=16, full_kl=True, return_topk=True)
    got = token_stats_triton(zs, zt, y, block_v=64, **kw)
    ref = reference.token_stats(zs.contiguous(), zt.contiguous(), y, **kw)
    truth = reference.token_stats(zs.double(), zt.double(), y, **kw)
    _check_stats(got, ref, truth, full_kl=True, return_topk=True)
    # last dim with stride != 1: copied once, same answer
    zs_t = zs.contiguous().transpose(-1, -2).contiguous().transpose(-1, -2)
    assert zs_t.stride(-1) != 1
    got2 = token_stats_triton(zs_t, zt, y, block_v=64, **kw)
    for f in STAT_FIELDS + ("reverse_kl", "topk_ids"):
        assert torch.equal(getattr(got2, f), getattr(got, f)), f


def test_vocab_size_cut_with_different_widths(device):
    """Only the first vocab_size columns are read: huge junk beyond them must not change anything."""
    gen = torch.Generator().manual_seed(9)
    v = 211
    zs = _logits(gen, (6, v + 5), torch.float16, device)
    zt = _logits(gen, (6, v + 37), torch.float16, device)
    zs[:, v:] = 6e4
    zt[:, v:] = 6e4
    y = _targets(gen, (6,), v, device)
    got, ref, truth = _stats_three_ways(zs, zt, y, k=16, vocab_size=v, full_kl=True, return_topk=True, block_v=64)
    _check_stats(got, ref, truth, full_kl=True, return_topk=True)
    assert int(got.topk_ids.max()) < v


def test_optional_outputs_off(device):
    gen = torch.Generator().manual_seed(1)
    zs, zt = _logits(gen, (4, 50), torch.float32, device), _logits(gen, (4, 50), torch.float32, device)
    y = _targets(gen, (4,), 50, device)
    got, ref, truth = _stats_three_ways(zs, zt, y, k=8)
    _check_stats(got, ref, truth, full_kl=False, return_topk=False)


def test_gpu_topk_path_and_group_size(device):
    """The compiled path's tl.topk (bitonic) and its default GROUP = 64, here forced in any mode."""
    gen = torch.Generator().manual_seed(21)
    zs = _logits(gen, (3, 700), torch.bfloat16, device, kind="int")
    zt = _logits(gen, (3, 700), torch.bfloat16, device)
    y = _targets(gen, (3,), 700, device)
    kw = dict(k=4, full_kl=True, return_topk=True)
    ref = reference.token_stats(zs, zt, y, **kw)
    truth = reference.token_stats(zs.double(), zt.double(), y, **kw)
    for impl, group in (("bitonic", 16), ("select", 64)):
        got = token_stats_triton(zs, zt, y, block_v=256, group=group, topk_impl=impl, **kw)
        _check_stats(got, ref, truth, full_kl=True, return_topk=True)


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")  # log(0): a row of -inf
def test_non_finite_rows_give_nan_margin(device):
    """A NaN or +inf logit, or a row with no finite logit, on either side: NaN margin (not 0), as the
    reference; finite rows are unchanged and ignored rows stay 0 (issue 14, docs/formulas.md §1)."""
    gen = torch.Generator().manual_seed(11)
    v = 70
    zs = torch.randn(8, v, generator=gen) * 2
    zt = torch.randn(8, v, generator=gen) * 2
    zs[0, 33] = float("nan")  # no candidate survives a NaN comparison: the reference used to give 0
    zt[1, 5] = float("nan")
    zs[2, 50] = float("inf")
    zt[3, 2] = float("inf")
    zs[4, :] = -float("inf")
    zt[5, :] = -float("inf")
    zs[6, 1] = float("nan")  # an ignored row: 0
    y = torch.tensor([1, 2, 3, 4, 5, 6, -100, 9])
    for dtype in (torch.float32, torch.bfloat16):
        a, b = zs.to(dtype).to(device), zt.to(dtype).to(device)
        got = token_stats_triton(a, b, y.to(device), k=16, block_v=32)
        ref = reference.token_stats(a, b, y.to(device), k=16)
        m, mr = got.margins.cpu(), ref.margins.cpu()
        assert torch.isnan(m[:6]).all() and torch.isnan(mr[:6]).all(), m
        assert m[6].item() == 0.0 and torch.isfinite(m[7])
        torch.testing.assert_close(m[7], mr[7], rtol=1e-5, atol=1e-5)
        # Both divergences are NaN on all six rows (§1: the loss at such a token is not finite), in the
        # kernel and in the reference.
        fk, fr, _, _ = _forward_kl_three_ways(a, b, y.to(device), k=16, block_v=32)
        assert torch.isnan(fk[:6].cpu()).all() and torch.isnan(fr[:6].cpu()).all(), (fk, fr)
        rk = token_stats_triton(a, b, y.to(device), k=16, block_v=32, full_kl=True).reverse_kl.cpu()
        rr = reference.token_stats(a, b, y.to(device), k=16, full_kl=True).reverse_kl.cpu()
        assert torch.isnan(rk[:6]).all() and torch.isnan(rr[:6]).all(), (rk, rr)
        assert fk[6].item() == 0.0
        torch.testing.assert_close(fk[7].cpu(), fr[7].cpu(), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
def test_nan_hidden_state_margin_and_rule_on_triton(device):
    """The hidden-state path and the rule's segment sums on the Triton backend: NaN in one valid token's
    hidden state gives a NaN margin there and keeps that rollout whole."""
    gen = torch.Generator().manual_seed(5)
    b, length, h, v = 2, 10, 8, 48
    sh = torch.randn(b, length, h, generator=gen).to(device)
    th = torch.randn(b, length, h, generator=gen).to(device)
    sw, tw = torch.randn(v, h, generator=gen).to(device), torch.randn(v, h, generator=gen).to(device)
    y = torch.randint(0, v, (b, length), generator=gen).to(device)
    sh[1, 4, 0] = float("nan")
    st_ = fastopd.linear_token_stats(sh, sw, th, tw, y, k=4, backend="triton")
    assert torch.isnan(st_.margins[1, 4]) and int(torch.isnan(st_.margins).sum()) == 1
    seg = (torch.arange(length, device=device) // 2).repeat(b, 1)
    margins = torch.linspace(3.0, 0.0, length, device=device).repeat(b, 1)  # fading: released when finite
    margins[1, 4] = st_.margins[1, 4]
    dec = fastopd.ReleaseRule(k=4, min_segments=1, min_gain=-float("inf"), backend="triton").from_margins(
        margins, seg, torch.ones(b, length, dtype=torch.bool, device=device))
    assert dec.scan.accepted.tolist() == [True, False]
    assert torch.equal(dec.weights[1].cpu(), torch.ones(length))


def test_dispatch_triton_backend(device):
    gen = torch.Generator().manual_seed(2)
    zs, zt = _logits(gen, (2, 3, 64), torch.bfloat16, device), _logits(gen, (2, 3, 64), torch.bfloat16, device)
    y = _targets(gen, (2, 3), 64, device, ignore_frac=0.3)
    a = fastopd.token_stats(zs, zt, y, k=4, full_kl=True, return_topk=True, backend="triton")
    b = token_stats_triton(zs, zt, y, k=4, full_kl=True, return_topk=True)
    for f in STAT_FIELDS + ("reverse_kl", "topk_ids"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    out = fastopd.opd_loss(zs.float().requires_grad_(), zt, y, k=4, backend="triton")
    ref = reference.opd_loss(zs.float(), zt, y, k=4)
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * (1 + abs(ref.loss.item()))


def test_kernel_argument_errors(device):
    zs = torch.zeros(2, 40, device=device)
    y = torch.zeros(2, dtype=torch.long, device=device)
    with pytest.raises(TypeError, match="student_logits"):
        token_stats_triton(zs.double(), zs, y, k=4)
    with pytest.raises(ValueError, match="k must be <= 256"):
        token_stats_triton(torch.zeros(1, 600, device=device), torch.zeros(1, 600, device=device),
                           torch.zeros(1, dtype=torch.long, device=device), k=300)
    with pytest.raises(ValueError, match="k must be >= 2"):
        token_stats_triton(zs, zs, y, k=1)
    with pytest.raises(ValueError, match="topk_impl"):
        token_stats_triton(zs, zs, y, k=4, topk_impl="heap")


def test_triton_backend_on_cpu_needs_interpreter():
    """backend='triton' with CPU tensors and no TRITON_INTERPRET: the dispatcher's clear ValueError."""
    code = textwrap.dedent(
        """
        import torch, fastopd
        z = torch.zeros(2, 8); y = torch.zeros(2, dtype=torch.long)
        for fn in (fastopd.token_stats, fastopd.opd_loss):
            try:
                fn(z, z, y, k=2, backend="triton")
            except ValueError as e:
                assert "TRITON_INTERPRET" in str(e), str(e)
            else:
                raise SystemExit("no error for " + fn.__name__)
        print("ok")
        """
    )
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    root = str(ROOT)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr


# ----------------------------------------------------------------------------------------------------------
# 2. segment sums
# ----------------------------------------------------------------------------------------------------------


def test_segment_sums_match_segment_means(device):
    gen = torch.Generator().manual_seed(4)
    b, length = 3, 37
    values = torch.randn(b, length, generator=gen).to(device)
    seg = torch.sort(torch.randint(0, 6, (b, length), generator=gen), dim=1).values.to(device)
    valid = (torch.rand(b, length, generator=gen) > 0.25).to(device)
    seg[0, -3:] = -1  # padding ids are skipped
    valid[0, -3:] = True
    sums, counts = segment_sums_triton(values, seg, valid, num_segments=6)
    assert sums.shape == (b, 6) and counts.dtype == torch.int32
    ref = reference.segment_means(values.cpu(), torch.where(seg < 0, 0, seg).cpu(), (valid & (seg >= 0)).cpu())
    present = counts.cpu() > 0
    means = (sums.cpu().double() / counts.cpu().clamp_min(1).double())[present]
    assert torch.allclose(means, torch.as_tensor(ref.values), atol=1e-6)
    expect_counts = torch.zeros(b, 6, dtype=torch.int64)
    ok = (valid & (seg >= 0)).cpu()
    for i in range(b):
        expect_counts[i] = torch.bincount(seg.cpu()[i][ok[i]], minlength=6)
    assert torch.equal(counts.cpu().long(), expect_counts)
    with pytest.raises(ValueError, match="num_segments"):
        segment_sums_triton(values, seg, valid, num_segments=2)


def test_rule_on_triton_refuses_bad_segment_ids(device):
    """The rule's Triton segment sums check the ids like the reference (issue 14): reversed ids and an id of
    2**40 (which used to size the (B, S) sums) are clear errors."""
    seg = (torch.arange(12, device=device) // 3).repeat(2, 1)
    margins = torch.linspace(3.0, 0.0, 12, device=device).repeat(2, 1)
    valid = torch.ones(2, 12, dtype=torch.bool, device=device)
    rule = fastopd.ReleaseRule(backend="triton")
    rule.from_margins(margins, seg, valid)
    with pytest.raises(ValueError, match="non-decreasing"):
        rule.from_margins(margins, seg.flip(1), valid)
    big = seg.clone()
    big[0, -1] = 2**40
    with pytest.raises(ValueError, match="must be < 12"):
        rule.from_margins(margins, big, valid)

