"""The hidden-state path on the Triton backend (fastopd.kernels.linear) against the fp64 ground truth.

Runs the kernels on CUDA when there is a GPU, else under the Triton interpreter on CPU tensors at small V
(tests/kernels/kernel_setup.py: TRITON_INTERPRET=1 while fastopd.kernels is imported and while each test
runs). The truth is the reference loss on fp64 logits from a plain fp64 head, by autograd;
the Triton path's error must stay within twice the fp32 reference path's error plus a small tolerance.
"""

from __future__ import annotations

import pytest
import torch

from kernel_setup import *  # noqa: F401,F403  (the interpreter setup, fixtures and helpers)

import fastopd  # noqa: E402
from helpers import assert_close, grads, leaves, linear_segments, make_case, plain_head, truth  # noqa: E402

pytestmark = KERNEL_MARKS
DEVICE = DEVICES[0]


def _on(c, dtype):
    return {k: (x.to(DEVICE, dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else
                (x.to(DEVICE) if isinstance(x, torch.Tensor) else x)) for k, x in c.items()}


@pytest.mark.parametrize(
    "loss,cap,use_old,chunk,bias",
    [("pg", None, False, 7, True), ("pg", 8.0, True, 64, False), ("reverse_kl", None, False, 5, True),
     ("reverse_kl", 8.0, False, 13, True), ("forward_kl", None, False, 5, True), ("forward_kl", 8.0, False, 13, False)],
)
def test_triton_matches_fp64_truth(loss, cap, use_old, chunk, bias):
    v, vp = 300, 307
    c = make_case(11, lead=(2, 13), v=v, vp=vp, hs=16, ht=12, bias=bias, dtype=torch.float64)
    old = c["old"] if use_old else None
    want, gwant = truth(c, v=v, loss=loss, scale=0.8, cap=cap, weights=c["w"], old=old, k=4)
    errs = {}
    for backend in ("reference", "triton"):
        d = _on(c, torch.float32)
        h, w, b = leaves(d)
        out = fastopd.linear_opd_loss(
            h, fastopd.LMHead(w, b, logit_scale=0.8, softcap=cap), d["th"], fastopd.LMHead(d["tw"], d["tb"]), d["y"],
            loss=loss, weights=d["w"], old_logprobs=None if old is None else d["old"], k=4, vocab_size=v,
            chunk_size=chunk, backend=backend,
        )
        gs = grads(out.loss, [h, w, b])
        errs[backend] = (out, gs)
    (rt, grt), (tr, gtr) = errs["reference"], errs["triton"]
    divs = [(d, getattr(tr.stats, d), getattr(rt.stats, d), getattr(want.stats, d)) for d in ("reverse_kl", "forward_kl")]
    for name, got, ref, want_ in [("loss", tr.loss, rt.loss, want.loss), ("per_token", tr.per_token, rt.per_token, want.per_token),
                                  ("margins", tr.stats.margins, rt.stats.margins, want.stats.margins)] + divs + [
        (f"grad{i}", a, r, e) for i, (a, r, e) in enumerate(zip(gtr, grt, gwant))
    ]:
        if want_ is None:
            assert got is None
            continue
        ref_err = (ref.double().cpu() - want_).abs().max().item()
        assert_close(name, got.cpu(), want_, atol=2 * ref_err + 1e-5, rtol=1e-5)
    assert torch.all(gtr[1][v:] == 0)  # padded head rows


@pytest.mark.parametrize("loss", ["reverse_kl", "forward_kl"])
def test_triton_recompute_path_matches_reference(loss):
    """The recompute backward (a reduction of ``per_token`` other than ``out.loss``, and a release rule's
    weights: OPDLoss.linear) on the Triton backend: it recomputes the teacher tile for the divergence and
    runs the loss-backward kernel's branch of ``loss``; loss, per-token divergence and gradients equal the
    reference backend's."""
    v = 256
    c = _on(make_case(15, lead=(3, 16), v=v, hs=8, ht=8, dtype=torch.float64), torch.float32)
    gen = torch.Generator().manual_seed(3)
    gw = torch.rand(3, 16, generator=gen).to(DEVICE)
    seg = linear_segments((3, 16), 15).to(DEVICE)
    res = {}
    for backend in ("reference", "triton"):
        h, w, b = leaves(c)
        out = fastopd.linear_opd_loss(h, fastopd.LMHead(w, b), c["th"], fastopd.LMHead(c["tw"], c["tb"]), c["y"],
                                      loss=loss, k=4, chunk_size=10, backend=backend)
        g1 = grads((out.per_token * gw).sum(), [h, w, b])
        h2, w2, b2 = leaves(c)
        crit = fastopd.OPDLoss(loss, rule=fastopd.ReleaseRule(k=4, min_gain=-1e9, backend=backend))
        rule = crit.linear(h2, fastopd.LMHead(w2, b2), c["th"], fastopd.LMHead(c["tw"], c["tb"]), c["y"],
                           segment_ids=seg, chunk_size=10)
        res[backend] = (out, g1, rule, grads(rule.loss, [h2, w2, b2]))
    (ro, rg1, rr, rg2), (to, tg1, tr, tg2) = res["reference"], res["triton"]
    assert torch.equal(tr.release.weights.cpu(), rr.release.weights.cpu())
    assert_close("divergence", getattr(to.stats, loss), getattr(ro.stats, loss), atol=1e-5, rtol=1e-5)
    assert getattr(to.stats, "reverse_kl" if loss == "forward_kl" else "forward_kl") is None
    pairs = [("per_token", to.per_token, ro.per_token), ("rule loss", tr.loss, rr.loss)]
    pairs += [(f"grad{i}", a, e) for i, (a, e) in enumerate(zip(tg1 + tg2, rg1 + rg2))]
    for name, got, want in pairs:
        assert_close(name, got, want, atol=1e-5, rtol=1e-4)


def test_triton_rule_and_stats():
    v = 256
    c = _on(make_case(12, lead=(3, 16), v=v, hs=8, ht=8, dtype=torch.float64), torch.float32)
    seg = linear_segments((3, 16), 12).to(DEVICE)
    crit = fastopd.OPDLoss(rule=fastopd.ReleaseRule(k=4, min_gain=-1e9, backend="triton"))
    h, w, b = leaves(c)
    got = crit.linear(h, fastopd.LMHead(w, b), c["th"], c["tw"], c["y"], segment_ids=seg, chunk_size=10)
    ref = fastopd.OPDLoss(rule=fastopd.ReleaseRule(k=4, min_gain=-1e9, backend="reference")).linear(
        h, fastopd.LMHead(w, b), c["th"], c["tw"], c["y"], segment_ids=seg, chunk_size=10)
    assert torch.equal(got.release.weights.cpu(), ref.release.weights.cpu())
    assert_close("loss", got.loss, ref.loss, atol=1e-5, rtol=1e-5)
    for a, e in zip(grads(got.loss, [h, w, b]), grads(ref.loss, [h, w, b])):
        assert_close("grad", a, e, atol=1e-5, rtol=1e-4)
    st = fastopd.linear_token_stats(c["sh"], c["sw"], c["th"], c["tw"], c["y"], k=4, chunk_size=9, backend="triton",
                                    full_kl=True, return_topk=True)
    zs, zt = plain_head(c["sh"], c["sw"], None, v), plain_head(c["th"], c["tw"], None, v)
    want = fastopd.token_stats(zs, zt, c["y"], k=4, full_kl=True, return_topk=True, backend="reference")
    for name in ("student_logprobs", "teacher_logprobs", "margins", "reverse_kl"):
        assert_close(name, getattr(st, name), getattr(want, name), atol=1e-4, rtol=1e-4)
    assert torch.equal(st.topk_ids.cpu(), want.topk_ids.cpu())


@pytest.mark.skipif(DEVICE != "cuda", reason="the side stream exists on CUDA only")
@pytest.mark.parametrize("loss", ["pg", "reverse_kl"])
def test_overlap_streams_same_result(loss):
    """fastopd.linear.OVERLAP_TEACHER (teacher tiles on a side stream) gives the same loss, statistics and
    gradients as the serial loop, on the eager path and on the recompute path of a release rule; chunk None
    (the CUDA default) gives them too."""
    from fastopd import linear as lin

    v = 4096
    c = _on(make_case(14, lead=(4, 300), v=v, hs=64, ht=48, dtype=torch.float64), torch.bfloat16)
    seg = linear_segments((4, 300), 14).to(DEVICE)
    runs = []
    for overlap, chunk in [(False, 128), (True, 128), (True, 256), (False, None)]:
        lin.OVERLAP_TEACHER = overlap
        try:
            h, w, b = leaves(c)
            out = fastopd.linear_opd_loss(h, fastopd.LMHead(w, b), c["th"], fastopd.LMHead(c["tw"], c["tb"]), c["y"],
                                          loss=loss, k=4, chunk_size=chunk)
            g = grads(out.loss, [h, w, b])
            h2, w2, b2 = leaves(c)
            crit = fastopd.OPDLoss(loss, rule=fastopd.ReleaseRule(k=4, min_gain=0.0))
            rule = crit.linear(h2, fastopd.LMHead(w2, b2), c["th"], fastopd.LMHead(c["tw"], c["tb"]), c["y"],
                               segment_ids=seg, chunk_size=chunk)
            g2 = grads(rule.loss, [h2, w2, b2])
        finally:
            lin.OVERLAP_TEACHER = False
        runs.append((out, rule, g + g2))
    (out0, rule0, g0), same_chunk = runs[0], runs[1]
    assert torch.equal(same_chunk[0].loss, out0.loss) and torch.equal(same_chunk[1].loss, rule0.loss)
    assert torch.equal(same_chunk[0].stats.margins, out0.stats.margins)
    for a, e in zip(same_chunk[2], g0):
        assert a is None and e is None or torch.equal(a, e)
    for out, rule, g in runs[2:]:  # other chunk sizes: the bf16 weight gradient is summed in another order
        assert_close("loss", out.loss, out0.loss, atol=1e-5, rtol=1e-5)
        assert_close("rule loss", rule.loss, rule0.loss, atol=1e-5, rtol=1e-5)
        for a, e in zip(g, g0):
            if e is not None:
                assert_close("grad", a.float(), e.float(), atol=2e-2, rtol=2e-2)
