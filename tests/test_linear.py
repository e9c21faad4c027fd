"""The hidden-state path (fastopd.linear, docs/formulas.md §6) on the reference backend.

Ground truth (helpers in tests/helpers.py): the reference loss (fastopd.reference.opd_loss) on fp64 logits made by a plain fp64 head
z = softcap(scale (h W^T + b)), differentiated by autograd through the head. The chunked path must match it
(fp64 inputs: to rounding; fp32 inputs: within a few times the logits path's own fp32 error), must match the
logits path on the same fp32 logits, and must never create a tensor of N x V elements.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastopd
from fastopd import LMHead, reference
from helpers import LargestTensor, assert_close, grads, leaves, linear_segments, make_case, plain_head, truth


# ----------------------------------------------------------------------------------------------------------
# against the fp64 ground truth, over random shapes and options
# ----------------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    b=st.integers(1, 3), l=st.integers(1, 9), v=st.integers(4, 40), pad=st.integers(0, 5),
    chunk=st.integers(1, 30), loss=st.sampled_from(["pg", "reverse_kl", "forward_kl"]), bias=st.booleans(),
    cap=st.sampled_from([None, 2.5]), scale=st.sampled_from([1.0, 0.6]), use_old=st.booleans(),
    use_w=st.booleans(), dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_matches_fp64_ground_truth(seed, b, l, v, pad, chunk, loss, bias, cap, scale, use_old, use_w, dtype):
    c = make_case(seed, lead=(b, l), v=v, vp=v + pad, bias=bias, dtype=dtype)
    k = min(4, v)
    old = c["old"] if (use_old and loss == "pg") else None
    w = c["w"] if use_w else None
    want, gwant = truth(c, v=v, loss=loss, scale=scale, cap=cap, t_cap=cap, weights=w, old=old, k=k)
    h, wt, bs = leaves(c)
    got = fastopd.linear_opd_loss(
        h, LMHead(wt, bs, logit_scale=scale, softcap=cap), c["th"], LMHead(c["tw"], c["tb"], softcap=cap), c["y"],
        loss=loss, weights=w, old_logprobs=old, k=k, vocab_size=v if pad else None, chunk_size=chunk,
    )
    ggot = grads(got.loss, [h, wt, bs]) if got.loss.requires_grad else [torch.zeros_like(h), torch.zeros_like(wt),
                                                                        None if bs is None else torch.zeros_like(bs)]
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    assert_close("loss", got.loss, want.loss, **tol)
    assert_close("per_token", got.per_token, want.per_token, **tol)
    for name in ("student_logprobs", "teacher_logprobs", "advantages", "margins"):
        assert_close(name, getattr(got.stats, name), getattr(want.stats, name), atol=tol["atol"] * 10, rtol=tol["rtol"] * 10)
    for name, a, e in zip(("grad_hidden", "grad_weight", "grad_bias"), ggot, gwant):
        assert_close(name, a, e, **tol)
    if pad:  # padded rows of the head get exactly zero
        assert torch.all(ggot[1][v:] == 0)
        if bias:
            assert torch.all(ggot[2][v:] == 0)
    assert got.metrics.keys() == want.metrics.keys()
    assert got.metrics["num_valid"] == want.metrics["num_valid"]


@pytest.mark.parametrize("loss", ["pg", "reverse_kl", "forward_kl"])
def test_fp32_equals_logits_path(loss):
    """Same fp32 inputs: the chunked path and opd_loss on materialised fp32 logits agree to fp32 rounding."""
    c = make_case(1, lead=(4, 33), v=300, vp=310, hs=32, ht=24, dtype=torch.float32)
    h, w, b = leaves(c)
    got = fastopd.linear_opd_loss(h, LMHead(w, b, softcap=30.0), c["th"], LMHead(c["tw"], c["tb"]), c["y"], loss=loss,
                                  vocab_size=300, chunk_size=37)
    g1 = grads(got.loss, [h, w, b])
    h2, w2, b2 = leaves(c)
    zs = plain_head(h2, w2, b2, 300, cap=30.0)
    zt = plain_head(c["th"], c["tw"], c["tb"], 300)
    ref = fastopd.opd_loss(zs, zt, c["y"], loss=loss)
    g2 = grads(ref.loss, [h2, w2, b2])
    assert_close("loss", got.loss, ref.loss, atol=1e-6, rtol=1e-5)
    for a, e in zip(g1, g2):
        assert_close("grad", a, e, atol=1e-6, rtol=1e-4)
    assert_close("margins", got.stats.margins, ref.stats.margins, atol=1e-5, rtol=1e-5)


def test_n_smaller_than_chunk_and_empty():
    c = make_case(2, lead=(2, 3), v=20, dtype=torch.float64)
    want, gwant = truth(c, v=20, loss="pg")
    h, w, b = leaves(c)
    got = fastopd.linear_opd_loss(h, LMHead(w, b), c["th"], LMHead(c["tw"], c["tb"]), c["y"], k=4, chunk_size=1000)
    assert_close("loss", got.loss, want.loss, atol=1e-12, rtol=1e-12)
    for a, e in zip(grads(got.loss, [h, w, b]), gwant):
        assert_close("grad", a, e, atol=1e-12, rtol=1e-10)
    # N = 0: a zero loss and zero gradients, like the logits path
    e = make_case(3, lead=(0,), v=20, dtype=torch.float64)
    h, w, b = leaves(e)
    out = fastopd.linear_opd_loss(h, LMHead(w, b), e["th"], LMHead(e["tw"], e["tb"]), e["y"], k=4)
    assert out.loss.item() == 0.0 and out.per_token.shape == (0,)
    gh, gw, gb = grads(out.loss, [h, w, b])
    assert gh.shape == (0, 8) and torch.all(gw == 0) and torch.all(gb == 0)


def test_teacher_gets_no_gradient():
    c = make_case(4, v=30)
    th = c["th"].clone().requires_grad_()
    tw = c["tw"].clone().requires_grad_()
    h, w, b = leaves(c)
    out = fastopd.linear_opd_loss(h, LMHead(w, b), th, tw, c["y"], loss="reverse_kl", k=4, chunk_size=4)
    out.loss.backward()
    assert th.grad is None and tw.grad is None
    assert h.grad is not None and w.grad.abs().sum() > 0


def test_per_token_backward_any_reduction():
    """The per-token loss is differentiable: any reduction of it gets the truth's gradient."""
    c = make_case(5, v=25)
    coef = torch.linspace(-1, 2, c["y"].numel(), dtype=torch.float64).view(c["y"].shape)
    h, w, b = leaves(c)
    got = fastopd.linear_opd_loss(h, LMHead(w, b), c["th"], LMHead(c["tw"], c["tb"]), c["y"], k=4, chunk_size=5)
    h2, w2, b2 = leaves(c)
    ref = reference.opd_loss(plain_head(h2, w2, b2, 25), plain_head(c["th"], c["tw"], c["tb"], 25), c["y"], k=4)
    for a, e in zip(grads((got.per_token * coef).sum(), [h, w, b]), grads((ref.per_token * coef).sum(), [h2, w2, b2])):
        assert_close("grad", a, e, atol=1e-12, rtol=1e-10)


# ----------------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_token_stats_equal_logits_path(chunk):
    c = make_case(6, lead=(3, 11), v=50, vp=56, dtype=torch.float64)
    st_ = fastopd.linear_token_stats(c["sh"], LMHead(c["sw"], c["sb"]), c["th"],
                                     LMHead(c["tw"], c["tb"], logit_scale=1.3, softcap=4.0), c["y"], k=5,
                                     vocab_size=50, chunk_size=chunk, full_kl=True, return_topk=True)
    zs = plain_head(c["sh"], c["sw"], c["sb"], 50)
    zt = plain_head(c["th"], c["tw"], c["tb"], 50, 1.3, 4.0)
    ref = fastopd.token_stats(zs, zt, c["y"], k=5, full_kl=True, return_topk=True)
    for name in ("student_logprobs", "teacher_logprobs", "advantages", "margins", "reverse_kl"):
        assert_close(name, getattr(st_, name), getattr(ref, name), atol=1e-12, rtol=1e-12)
    assert torch.equal(st_.topk_ids, ref.topk_ids)
    assert torch.equal(st_.valid, ref.valid)


# ----------------------------------------------------------------------------------------------------------
# OPDLoss.linear with a release rule
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["pg", "reverse_kl", "forward_kl"])
def test_opdloss_linear_with_rule_equals_logits_forward(loss):
    """The rule decides from the chunked forward's margins: same weights, loss and gradients as forward()."""
    c = make_case(7, lead=(4, 24), v=60, dtype=torch.float64, ignore_frac=0.1)
    seg = linear_segments((4, 24), 7)
    # min_gain far below zero: every rollout with a downward split is released, so the weights are not trivial
    crit = fastopd.OPDLoss(loss, k=4, rule=fastopd.ReleaseRule(k=4, min_gain=-1e9))
    h, w, b = leaves(c)
    got = crit.linear(h, LMHead(w, b), c["th"], LMHead(c["tw"], c["tb"]), c["y"], segment_ids=seg, chunk_size=7)
    h2, w2, b2 = leaves(c)
    ref = crit(plain_head(h2, w2, b2, 60), plain_head(c["th"], c["tw"], c["tb"], 60), c["y"], segment_ids=seg)
    assert torch.equal(got.release.weights, ref.release.weights)
    assert not torch.equal(got.release.weights, c["y"].ne(-100).float())  # the rule did cut something
    assert_close("loss", got.loss, ref.loss, atol=1e-12, rtol=1e-12)
    for a, e in zip(grads(got.loss, [h, w, b]), grads(ref.loss, [h2, w2, b2])):
        assert_close("grad", a, e, atol=1e-12, rtol=1e-10)
    for key, val in ref.metrics.items():
        assert got.metrics[key] == pytest.approx(val, rel=1e-9, abs=1e-12, nan_ok=True), key


def test_opdloss_linear_rule_arguments():
    c = make_case(8, v=20)
    crit = fastopd.OPDLoss(k=4, rule=fastopd.ReleaseRule(k=4))
    with pytest.raises(ValueError, match="segment_ids"):
        crit.linear(c["sh"], c["sw"], c["th"], c["tw"], c["y"])
    with pytest.raises(ValueError, match="not both"):
        crit.linear(c["sh"], c["sw"], c["th"], c["tw"], c["y"], weights=c["w"], segment_ids=linear_segments((3, 7), 0))


# ----------------------------------------------------------------------------------------------------------
# memory: no tensor of N x V elements is ever created
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["pg", "reverse_kl"])
def test_no_tensor_of_n_by_v(loss):
    n, v, hdim, chunk = 512, 1000, 4, 16
    c = make_case(9, lead=(n,), v=v, hs=hdim, ht=hdim, dtype=torch.float32)
    h, w, b = leaves(c)
    crit = fastopd.OPDLoss(loss, k=4, rule=fastopd.ReleaseRule(k=4))
    with LargestTensor() as mode:
        out = crit.linear(h.view(8, 64, hdim), LMHead(w, b), c["th"].view(8, 64, hdim), c["tw"], c["y"].view(8, 64),
                          segment_ids=linear_segments((8, 64), 9), chunk_size=chunk)
        out.loss.backward()
    bound = max(chunk * v, v * hdim, n * hdim)
    assert mode.largest <= bound < n * v // 4, f"largest tensor {mode.largest} elements > chunk*V bound {bound}"
    # and the logits path, as a check that this measure sees N x V tensors
    with LargestTensor() as mode:
        fastopd.opd_loss(plain_head(h, w, b, v), plain_head(c["th"], c["tw"], None, v), c["y"], k=4, loss=loss).loss.backward()
    assert mode.largest >= n * v


# ----------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------


def test_bad_input_errors():
    c = make_case(10, v=20, vp=24)
    sh, sw, th, tw, y = c["sh"], c["sw"], c["th"], c["tw"], c["y"]
    f = fastopd.linear_opd_loss
    with pytest.raises(ValueError, match="student_hidden must have shape target_ids.shape"):
        f(sh[:, :-1], sw, th, tw, y)
    with pytest.raises(ValueError, match=r"student_head.weight must have shape \(V', H\) with H = student_hidden"):
        f(sh, sw[:, :-1], th, tw, y)
    with pytest.raises(ValueError, match=r"teacher_head.weight must have shape \(V', H\)"):
        f(sh, sw, th, LMHead(tw[:, :-1]), y)
    with pytest.raises(ValueError, match=r"student_head: LMHead weight must have shape \(V', H\)"):
        f(sh, sw[0], th, tw, y)
    with pytest.raises(TypeError, match="student_head must be a fastopd.LMHead or a"):
        f(sh, None, th, tw, y)
    with pytest.raises(TypeError, match="teacher_head must be a fastopd.LMHead or a"):
        f(sh, sw, th, (tw, None), y)
    with pytest.raises(TypeError, match="student_head.weight must have student_hidden's dtype"):
        f(sh, sw.float(), th, tw, y)
    with pytest.raises(ValueError, match="pass vocab_size"):
        f(sh, sw, th, tw[:-1], y)
    with pytest.raises(ValueError, match="vocab_size=30 exceeds the heads' rows"):
        f(sh, sw, th, tw, y, vocab_size=30)
    with pytest.raises(ValueError, match="vocab_size=22 exceeds the heads' rows"):  # the head's own vocab_size bounds it
        f(sh, LMHead(sw, vocab_size=21), th, tw, y, vocab_size=22)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        f(sh, sw, th, tw, y, chunk_size=0)
    for gone in ("student_bias", "student_logit_scale", "teacher_final_logit_softcapping"):  # they live in the head
        with pytest.raises(TypeError, match=gone):
            f(sh, sw, th, tw, y, **{gone: None})
    with pytest.raises(ValueError, match="target_ids must lie in"):
        f(sh, sw, th, tw, torch.full_like(y, 22), vocab_size=20)
    with pytest.raises(ValueError, match="k must be <= the vocabulary size"):
        f(sh, sw, th, tw, y, k=50)
    with pytest.raises(ValueError, match="old_logprobs is only used by loss='pg'"):
        f(sh, sw, th, tw, y, loss="reverse_kl", old_logprobs=c["old"])
    with pytest.raises(TypeError, match="teacher_hidden must be a torch.Tensor"):
        fastopd.linear_token_stats(sh, sw, None, tw, y)


@pytest.mark.parametrize("loss", ["pg", "reverse_kl"])
def test_bare_weight_is_lm_head_of_weight(loss):
    """A bare weight tensor is read as LMHead(weight): the same loss, stats and gradients, bit for bit."""
    c = make_case(14, lead=(3, 8), v=30, dtype=torch.float64)
    outs = []
    for wrap in (lambda w: w, LMHead):
        h, w, _ = leaves(c)
        out = fastopd.linear_opd_loss(h, wrap(w), c["th"], wrap(c["tw"]), c["y"], loss=loss, k=4, chunk_size=7)
        st_ = fastopd.linear_token_stats(h, wrap(w), c["th"], wrap(c["tw"]), c["y"], k=4, chunk_size=7)
        outs.append((out, st_, grads(out.loss, [h, w])))
    (o1, s1, g1), (o2, s2, g2) = outs
    assert torch.equal(o1.loss, o2.loss) and torch.equal(o1.per_token, o2.per_token)
    assert torch.equal(s1.margins, s2.margins) and torch.equal(s1.student_logprobs, s2.student_logprobs)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert g1[1].abs().sum() > 0


def test_head_vocab_size_cuts_like_the_shared_vocab_size():
    """A padded head that says its vocabulary (LMHead(vocab_size=V)) needs no shared vocab_size= and gives
    what vocab_size=V gives on the bare weights; its rows beyond V get a zero gradient."""
    c = make_case(15, lead=(2, 9), v=20, vp=26, dtype=torch.float64)
    h, w, b = leaves(c)
    got = fastopd.linear_opd_loss(h, LMHead(w, b, vocab_size=20), c["th"], LMHead(c["tw"][:20], c["tb"][:20]), c["y"], k=4)
    g = grads(got.loss, [h, w, b])
    h2, w2, b2 = leaves(c)
    want = fastopd.linear_opd_loss(h2, LMHead(w2, b2), c["th"], LMHead(c["tw"], c["tb"]), c["y"], k=4, vocab_size=20)
    assert torch.equal(got.loss, want.loss)
    assert all(torch.equal(a, e) for a, e in zip(g, grads(want.loss, [h2, w2, b2])))
    assert torch.all(g[1][20:] == 0) and torch.all(g[2][20:] == 0) and g[1][:20].abs().sum() > 0


@pytest.mark.parametrize("loss", ["pg", "reverse_kl", "forward_kl"])
def test_eager_gradient_scaled_and_backward_twice(loss):
    """The eager gradient (computed in the forward for g = w) is scaled by the upstream gradient, and a
    second backward through the same graph (retain_graph) recomputes and gives the same gradient."""
    c = make_case(13, lead=(3, 9), v=30, dtype=torch.float64)
    want, gwant = truth(c, v=30, loss=loss, weights=c["w"])
    h, w, b = leaves(c)
    out = fastopd.linear_opd_loss(h, LMHead(w, b), c["th"], LMHead(c["tw"], c["tb"]), c["y"], k=4,
                                  loss=loss, weights=c["w"], chunk_size=4)
    first = torch.autograd.grad(out.loss * 0.25, [h, w, b], retain_graph=True)
    second = torch.autograd.grad(out.loss * 3.0, [h, w, b])
    for a, a2, e in zip(first, second, gwant):
        assert_close("eager", a, 0.25 * e, atol=1e-12, rtol=1e-10)
        assert_close("recompute", a2, 3.0 * e, atol=1e-12, rtol=1e-10)


# ----------------------------------------------------------------------------------------------------------
# the chunk size: a pure function of the shape and the device, the result independent of it
# ----------------------------------------------------------------------------------------------------------


def test_cuda_chunk_rows_is_a_function_of_the_shape_and_free_memory():
    from fastopd import linear as lin

    # room on the device: the 4.5 %-of-the-logits-path cap, 1024 rows, whatever V and the dtype
    for v, itemsize in [(151936, 2), (32768, 2), (151936, 4), (50257, 2)]:
        assert lin.cuda_chunk_rows(v, itemsize, 140 * 2**30) == 1024
        assert lin.cuda_chunk_rows(v, itemsize, None) == 1024
    # the two tiles at V = 151936, bf16 are <= 5 % of the logits path's three (16384, V) tensors
    rows = lin.cuda_chunk_rows(151936, 2, None)
    assert 2 * rows * 151936 * 2 <= 0.05 * 3 * 16384 * 151936 * 2
    # little free memory: the tiles take at most a quarter of it, still a multiple of 128 rows
    free = 1 * 2**30
    rows = lin.cuda_chunk_rows(151936, 2, free)
    assert rows % 128 == 0 and 2 * rows * 151936 * 2 <= 0.25 * free and rows == 384
    # almost none: multiples of 16, then at least one row
    assert lin.cuda_chunk_rows(151936, 2, 40 * 2 * 151936 * 2 * 4) == 32
    assert lin.cuda_chunk_rows(151936, 2, 3 * 2 * 151936 * 2 * 4) == 3
    assert lin.cuda_chunk_rows(151936, 2, 0) == 1
    # a larger share of the logits path (a setting) reaches the tensor cores' target and stops there
    orig = lin.CUDA_TILE_SHARE
    try:
        lin.CUDA_TILE_SHARE = 1.0
        assert lin.cuda_chunk_rows(151936, 2, None) == lin.CUDA_TARGET_ROWS == 4096
    finally:
        lin.CUDA_TILE_SHARE = orig


def test_default_chunk_size_per_device(monkeypatch):
    from fastopd import linear as lin

    # off CUDA: the elements-per-tile defaults, unchanged (the tests and the CPU benchmark rely on them)
    assert lin.default_chunk_size("reference", 32768) == 256
    assert lin.default_chunk_size("reference", 32768, torch.device("cpu"), 4) == 256
    assert lin.default_chunk_size("triton", 151936) == 432
    assert lin.default_chunk_size("triton", 151936, "cpu") == 432
    assert lin.default_chunk_size("reference", 10**8) == 1
    # on CUDA: the device's free memory read through torch.cuda.mem_get_info (mocked here)
    calls = []

    def fake_mem_get_info(device=None):
        calls.append(device)
        return (2 * 2**30, 141 * 2**30)

    monkeypatch.setattr(torch.cuda, "mem_get_info", fake_mem_get_info)
    assert lin.default_chunk_size("triton", 151936, torch.device("cuda", 0), 2) == lin.cuda_chunk_rows(151936, 2, 2 * 2**30)
    assert lin.default_chunk_size("triton", 151936, "cuda:0", 2) == 768 and len(calls) == 2

    def broken(device=None):
        raise RuntimeError("no driver")

    monkeypatch.setattr(torch.cuda, "mem_get_info", broken)
    assert lin.default_chunk_size("triton", 151936, "cuda", 2) == 1024


@pytest.mark.parametrize("loss", ["pg", "reverse_kl", "forward_kl"])
def test_same_loss_and_gradients_for_every_chunk_size(loss):
    """fp64: the loss, statistics and gradients do not depend on the chunk size (nor on the overlap switch,
    which has no effect off CUDA), on the eager path and on the recompute path of a release rule."""
    from fastopd import linear as lin

    c = make_case(21, lead=(3, 40), v=50, hs=8, ht=6, dtype=torch.float64)
    seg = linear_segments((3, 40), 5)
    results = []
    for chunk, overlap in [(None, False), (1, False), (7, False), (64, False), (120, False), (7, True)]:
        lin.OVERLAP_TEACHER = overlap
        try:
            h, w, b = leaves(c)
            out = fastopd.linear_opd_loss(h, LMHead(w, b), c["th"], LMHead(c["tw"], c["tb"]), c["y"], loss=loss,
                                          weights=c["w"], k=4, chunk_size=chunk)
            g = grads(out.loss, [h, w, b])
            h2, w2, b2 = leaves(c)
            crit = fastopd.OPDLoss(loss, rule=fastopd.ReleaseRule(k=4, min_gain=0.0))
            rule = crit.linear(h2, LMHead(w2, b2), c["th"], LMHead(c["tw"], c["tb"]), c["y"], segment_ids=seg,
                               chunk_size=chunk)
            g2 = grads(rule.loss, [h2, w2, b2])
        finally:
            lin.OVERLAP_TEACHER = False
        results.append((out, g, rule, g2))
    out0, g0, rule0, gr0 = results[0]
    for out, g, rule, g2 in results[1:]:
        assert_close("loss", out.loss, out0.loss, atol=1e-13, rtol=1e-12)
        assert_close("margins", out.stats.margins, out0.stats.margins, atol=1e-13, rtol=1e-12)
        assert_close("rule loss", rule.loss, rule0.loss, atol=1e-13, rtol=1e-12)
        for a, e in zip(g + g2, g0 + gr0):
            assert_close("grad", a, e, atol=1e-12, rtol=1e-10)
