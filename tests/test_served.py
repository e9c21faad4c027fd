"""fastopd/served.py: the loss and the rule from a served teacher's log-probs, against the in-process exact path
(docs/formulas.md §5, §7, §7a). No server: the "server's answer" is built from dense teacher logits."""

from __future__ import annotations

import math

import pytest
import torch

import fastopd
from fastopd import reference
from fastopd.served import served_opd_loss, student_candidates, topk_forward_kl, topk_reverse_kl


def _batch(seed: int = 0, b: int = 3, l: int = 12, v: int = 40, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(b, l, v, generator=g, dtype=dtype) * 2
    zt = torch.randn(b, l, v, generator=g, dtype=dtype) * 3
    tgt = torch.randint(0, v, (b, l), generator=g)
    tgt[0, -3:] = -100
    tgt[2, -5:] = -100
    return zs, zt, tgt


def _served(zt: torch.Tensor, tgt: torch.Tensor, k: int):
    """What the server returns: u_t and the teacher's top-k at temperature 1."""
    lp = torch.log_softmax(zt, dim=-1)
    u = lp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    vals, ids = torch.topk(lp, k, dim=-1)
    return u, ids, vals


def _segments(tgt: torch.Tensor, per: int = 3) -> torch.Tensor:
    seg = torch.arange(tgt.shape[1]).expand_as(tgt) // per
    return torch.where(tgt != -100, seg, torch.full_like(seg, -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pg_loss_and_gradient_equal_opd_loss_exactly(dtype):
    zs, zt, tgt = _batch(dtype=dtype)
    u, ids, vals = _served(zt, tgt, 5)
    w = torch.rand(tgt.shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    old = torch.randn(tgt.shape, generator=torch.Generator().manual_seed(4), dtype=dtype) - 3
    for kw in ({}, {"weights": w}, {"old_logprobs": old}):
        a = zs.clone().requires_grad_(True)
        b = zs.clone().requires_grad_(True)
        ref = fastopd.opd_loss(a, zt, tgt, loss="pg", backend="reference", **kw)
        out = served_opd_loss(b, tgt, u, ids, vals, loss="pg", **kw)
        ref.loss.backward()
        out.loss.backward()
        assert torch.equal(out.loss, ref.loss)
        assert torch.equal(out.per_token, ref.per_token)
        assert torch.equal(b.grad, a.grad)
        assert torch.equal(out.stats.advantages, ref.stats.advantages)
        assert torch.equal(out.stats.teacher_logprobs, ref.stats.teacher_logprobs)
        assert out.metrics["adv_mean"] == ref.metrics["adv_mean"]


@pytest.mark.parametrize("k_teacher", [1, 3, 8, 40])
def test_margins_equal_the_exact_ones_where_exact_and_bound_them_elsewhere(k_teacher):
    zs, zt, tgt = _batch(seed=1)
    u, ids, vals = _served(zt, tgt, k_teacher)
    ref = reference.token_stats(zs, zt, tgt, k=4, return_topk=True)
    out = served_opd_loss(zs, tgt, u, ids, vals, k=4)
    valid = tgt != -100
    ex = out.margin_exact
    assert torch.equal(out.stats.topk_ids, ref.topk_ids)  # the same candidates C_t, ties included
    assert bool((ex <= valid).all())
    torch.testing.assert_close(out.stats.margins[ex], ref.margins[ex], rtol=0, atol=1e-12)
    assert bool((out.stats.margins[valid & ~ex] <= ref.margins[valid & ~ex] + 1e-12).all())
    n_in = (ref.topk_ids.unsqueeze(-1) == ids.unsqueeze(-2)).any(-1).sum(-1)
    assert torch.equal(ex, valid & (n_in >= 2))
    assert out.metrics["margin_exact_share"] == pytest.approx(float(ex.sum()) / float(valid.sum()))
    if k_teacher == 40:  # the whole vocabulary: every margin exact
        assert out.metrics["margin_exact_share"] == 1.0
        torch.testing.assert_close(out.stats.margins, ref.margins, rtol=0, atol=1e-12)


def test_with_a_rule_equals_opdloss_with_the_rule_when_every_margin_is_exact():
    # a teacher whose margin fades halfway, so the rule releases a suffix
    b, l, v = 4, 24, 30
    g = torch.Generator().manual_seed(5)
    zs = torch.randn(b, l, v, generator=g, dtype=torch.float64)
    zt = torch.randn(b, l, v, generator=g, dtype=torch.float64) * 0.05
    top = zs.argmax(-1)
    zt[:, : l // 2].scatter_add_(-1, top[:, : l // 2, None], torch.full((b, l // 2, 1), 12.0, dtype=torch.float64))
    tgt = torch.randint(0, v, (b, l), generator=g)
    seg = _segments(tgt, per=2)
    u, ids, vals = _served(zt, tgt, v)  # k = V: every margin exact
    for loss in ("pg",):
        a = zs.clone().requires_grad_(True)
        c = zs.clone().requires_grad_(True)
        ref = fastopd.OPDLoss(loss, rule=fastopd.ReleaseRule(k=4), backend=None)(a, zt, tgt, segment_ids=seg)
        out = served_opd_loss(c, tgt, u, ids, vals, loss=loss, rule=fastopd.ReleaseRule(k=4), segment_ids=seg)
        assert ref.release.scan.accepted.any()
        assert torch.equal(out.release.weights, ref.release.weights)
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=0)
        ref.loss.backward()
        out.loss.backward()
        torch.testing.assert_close(c.grad, a.grad, rtol=1e-12, atol=1e-15)
        for key in ("accept_rate", "kept_fraction", "release_position"):
            assert out.metrics[key] == ref.metrics[key]


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl"])
def test_topk_divergences_are_the_exact_ones_at_k_equal_v(loss):
    zs, zt, tgt = _batch(seed=2)
    u, ids, vals = _served(zt, tgt, zt.shape[-1])
    a = zs.clone().requires_grad_(True)
    c = zs.clone().requires_grad_(True)
    ref = fastopd.opd_loss(a, zt, tgt, loss=loss, backend="reference")
    out = served_opd_loss(c, tgt, u, ids, vals, loss=f"{loss}_topk")
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-10, atol=1e-12)
    ref.loss.backward()
    out.loss.backward()
    torch.testing.assert_close(c.grad, a.grad, rtol=1e-9, atol=1e-12)
    assert out.metrics[f"{loss}_topk_mean"] == pytest.approx(ref.metrics[f"{loss}_mean"], rel=1e-10)
    assert f"{loss}_mean" not in out.metrics  # the exact name is never used for the approximation


def test_topk_divergences_by_their_definition_on_a_small_case():
    # one position, V = 4, teacher's top-2 = {2, 0}
    ls = torch.log_softmax(torch.tensor([[0.5, -1.0, 2.0, 0.0]], dtype=torch.float64), -1)
    lt = torch.log_softmax(torch.tensor([[1.0, -2.0, 3.0, -1.0]], dtype=torch.float64), -1)
    ids = torch.tensor([[2, 0]])
    lp = lt[:, [2, 0]]
    fwd = sum(math.exp(lt[0, v]) * (lt[0, v] - ls[0, v]) for v in (2, 0))
    rev = sum(math.exp(ls[0, v]) * (ls[0, v] - lt[0, v]) for v in (2, 0))
    assert float(topk_forward_kl(ls, ids, lp)) == pytest.approx(float(fwd), rel=1e-14)
    assert float(topk_reverse_kl(ls, ids, lp)) == pytest.approx(float(rev), rel=1e-14)
    # padding (-1, log-prob -inf, as the client fills short answers) changes nothing
    ids_p = torch.tensor([[2, -1, 0]])
    lp_p = torch.tensor([[float(lp[0, 0]), -math.inf, float(lp[0, 1])]], dtype=torch.float64)
    assert float(topk_forward_kl(ls, ids_p, lp_p)) == pytest.approx(float(fwd), rel=1e-14)
    assert float(topk_reverse_kl(ls, ids_p, lp_p)) == pytest.approx(float(rev), rel=1e-14)
    # the forward one is below the exact KL's teacher-side part only by the tail: with k < V it differs
    exact = float(reference.forward_kl(ls, lt))
    assert float(topk_forward_kl(ls, ids, lp)) != pytest.approx(exact)


def test_bad_arguments_name_the_argument():
    zs, zt, tgt = _batch()
    u, ids, vals = _served(zt, tgt, 5)
    with pytest.raises(ValueError, match="loss must be one of"):
        served_opd_loss(zs, tgt, u, ids, vals, loss="reverse_kl")  # the exact one: not with a served teacher
    with pytest.raises(ValueError, match="temperature must be 1"):
        served_opd_loss(zs, tgt, u, ids, vals, temperature=2.0)
    with pytest.raises(ValueError, match="teacher_token_logprobs must have"):
        served_opd_loss(zs, tgt, u[:, :-1], ids, vals)
    with pytest.raises(ValueError, match="teacher_topk_logprobs must have"):
        served_opd_loss(zs, tgt, u, ids, vals[..., :-1])
    with pytest.raises(ValueError, match=r"teacher_topk_ids must lie in \[0, 40\)"):
        served_opd_loss(zs, tgt, u, ids + 40, vals)
    with pytest.raises(TypeError, match="teacher_topk_ids must be an integer"):
        served_opd_loss(zs, tgt, u, ids.double(), vals)
    with pytest.raises(ValueError, match="segment_ids"):
        served_opd_loss(zs, tgt, u, ids, vals, rule=fastopd.ReleaseRule())
    with pytest.raises(ValueError, match="differs from rule.k"):
        served_opd_loss(zs, tgt, u, ids, vals, rule=fastopd.ReleaseRule(k=4), k=8, segment_ids=_segments(tgt))
    with pytest.raises(ValueError, match="old_logprobs is only used"):
        served_opd_loss(zs, tgt, u, ids, vals, loss="forward_kl_topk", old_logprobs=u)


def test_student_candidates_are_token_stats_candidates_ties_included():
    g = torch.Generator().manual_seed(7)
    z = torch.randint(-3, 3, (6, 20, 30), generator=g).double()  # many ties, at the K-th value too
    z[0, 0] = 0.0  # a row of equal logits
    tgt = torch.zeros(6, 20, dtype=torch.long)
    for k in (2, 5, 16):
        ref = reference.token_stats(z, z, tgt, k=k, return_topk=True)
        assert torch.equal(student_candidates(z, k), ref.topk_ids)
