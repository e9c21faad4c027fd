"""The reference oracle (fastopd.reference) against independent brute-force computations.

Everything else in fastopd is tested against the reference, so the reference itself is checked here
against the definitions in docs/formulas.md, written a second, naive way (loops, sorting, NumPy fp64).
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastopd
from fastopd import reference as R
from helpers import loss_inputs

# ------------------------------------------------------------------------------------------------------
# brute force of docs/formulas.md §1, row by row in float64 NumPy
# ------------------------------------------------------------------------------------------------------


def brute_row(zs, zt, y, k, tau):
    zs = np.asarray(zs, dtype=np.float64)
    zt = np.asarray(zt, dtype=np.float64)
    ls = zs / tau - np.logaddexp.reduce(zs / tau)
    lt = zt / tau - np.logaddexp.reduce(zt / tau)
    order = sorted(range(len(zs)), key=lambda i: (-zs[i], i))  # ties to the lower index
    cand = order[:k]
    tv = sorted((zt[i] for i in cand), reverse=True)
    margin = 0.0 if tv[0] == tv[1] else (tv[0] - tv[1]) / tau
    p = np.exp(ls)
    kl = float(np.sum(np.where(p > 0, p * (ls - lt), 0.0)))
    return ls[y], lt[y], margin, kl, cand


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 6),
    v=st.integers(2, 40),
    k=st.integers(2, 40),
    tau=st.sampled_from([1.0, 0.7, 2.0]),
    ties=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_token_stats_matches_brute_force(n, v, k, tau, ties, seed):
    k = min(k, v)
    g = torch.Generator().manual_seed(seed)
    if ties:  # integer logits: many exact ties, in the student's top-K and in the teacher's top-2
        zs = torch.randint(-2, 3, (n, v), generator=g).double()
        zt = torch.randint(-2, 3, (n, v), generator=g).double()
    else:
        zs = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
        zt = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, v, (n,), generator=g)
    st_ = R.token_stats(zs, zt, y, k=k, temperature=tau, full_kl=True, return_topk=True)
    for i in range(n):
        s, u, m, kl, cand = brute_row(zs[i].numpy(), zt[i].numpy(), int(y[i]), k, tau)
        assert st_.student_logprobs[i].item() == pytest.approx(s, rel=1e-12, abs=1e-12)
        assert st_.teacher_logprobs[i].item() == pytest.approx(u, rel=1e-12, abs=1e-12)
        assert st_.advantages[i].item() == pytest.approx(u - s, rel=1e-12, abs=1e-12)
        assert st_.margins[i].item() == pytest.approx(m, rel=1e-12, abs=1e-12)
        assert st_.reverse_kl[i].item() == pytest.approx(kl, rel=1e-9, abs=1e-12)
        assert st_.topk_ids[i].tolist() == cand


def test_token_stats_fp32_output_and_ignore_index():
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(3, 5, 17, generator=g).bfloat16()
    zt = torch.randn(3, 5, 17, generator=g).half()
    y = torch.randint(0, 17, (3, 5), generator=g)
    y[1] = -100
    y[0, 2] = -100
    s = R.token_stats(zs, zt, y, k=4, full_kl=True, return_topk=True)
    for t in (s.student_logprobs, s.teacher_logprobs, s.advantages, s.margins, s.reverse_kl):
        assert t.dtype == torch.float32 and t.shape == y.shape
        assert torch.all(t[y == -100] == 0)
        assert torch.all(torch.isfinite(t))
    assert torch.all(s.topk_ids[y == -100] == -1)  # padding: no candidate (fastopd.sparse_margins skips it)
    assert torch.equal(s.valid, y != -100)
    assert torch.all(s.margins >= 0)


def test_minus_inf_logits_give_zero_margin_not_nan():
    zs = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    zt = torch.tensor([[-math.inf, 5.0, -math.inf, -math.inf]])
    s = R.token_stats(zs, zt, torch.tensor([1]), k=2)  # candidates {3, 2}: teacher -inf on both
    assert s.margins.item() == 0.0
    s = R.token_stats(zs, zt, torch.tensor([1]), k=3)  # candidates {3, 2, 1}: 5 vs -inf
    assert s.margins.item() == math.inf


def test_vocab_size_cuts_both_widths():
    g = torch.Generator().manual_seed(1)
    zs = torch.randn(4, 10, generator=g)
    zt = torch.randn(4, 13, generator=g)
    y = torch.randint(0, 8, (4,), generator=g)
    cut = R.token_stats(zs, zt, y, k=3, vocab_size=8, full_kl=True)
    same = R.token_stats(zs[:, :8].contiguous(), zt[:, :8].contiguous(), y, k=3, full_kl=True)
    for a, b in ((cut.margins, same.margins), (cut.advantages, same.advantages), (cut.reverse_kl, same.reverse_kl)):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------------
# section 5: loss and gradients
# ------------------------------------------------------------------------------------------------------




@pytest.mark.parametrize("loss", ["pg", "reverse_kl", "forward_kl"])
@pytest.mark.parametrize("tau", [1.0, 0.6])
def test_loss_gradcheck_float64(loss, tau):
    zs, zt, y, w = loss_inputs(3)
    zs.requires_grad_(True)
    old = None
    if loss == "pg":
        old = (torch.log_softmax(zs.detach() / tau, -1).gather(-1, y.clamp_min(0)[..., None])[..., 0] - 0.3)

    def f(z):
        return R.opd_loss(z, zt, y, weights=w, loss=loss, old_logprobs=old, k=3, temperature=tau).loss

    assert torch.autograd.gradcheck(f, (zs,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("tau", [1.0, 1.7])
def test_pg_gradient_matches_design_formula(tau):
    """dl_t/dz_S = w_t A_t rho_t (p_S - e_y) / tau, divided by the normaliser (docs/formulas.md section 5).

    docs/formulas.md §5 prints this with a leading minus sign; that is a sign slip: l_t = -w A rho and
    d rho / dz = rho (e_y - p) / tau, so the two minus signs cancel. Autograd agrees with this form.
    """
    zs, zt, y, w = loss_inputs(4)
    zs.requires_grad_(True)
    old = torch.randn(y.shape, dtype=torch.float64) * 0.1 - 2.0
    out = R.opd_loss(zs, zt, y, weights=w, old_logprobs=old, k=3, temperature=tau, normalizer=5.0)
    out.loss.backward()
    valid = (y != -100).double()
    ls = torch.log_softmax(zs.detach() / tau, -1)
    lt = torch.log_softmax(zt / tau, -1)
    yc = y.clamp_min(0)[..., None]
    s = ls.gather(-1, yc)[..., 0]
    adv = lt.gather(-1, yc)[..., 0] - old
    rho = torch.exp(s - old)
    onehot = torch.nn.functional.one_hot(yc[..., 0], zs.shape[-1]).double()
    expect = ((w * valid * adv * rho)[..., None] * (ls.exp() - onehot) / tau) / 5.0
    torch.testing.assert_close(zs.grad, expect, rtol=1e-10, atol=1e-12)
    # the per-token loss and the metrics follow the same definitions
    torch.testing.assert_close(out.per_token, -(w * valid * adv * rho))
    assert out.metrics["num_valid"] == int(valid.sum())


def test_reverse_kl_gradient_matches_design_formula():
    """dKL_t/dz_S(v) = p_S(v) ((log p_S(v) - log p_T(v)) - KL_t) / tau."""
    tau = 1.3
    zs, zt, y, w = loss_inputs(5)
    zs.requires_grad_(True)
    out = R.opd_loss(zs, zt, y, weights=w, loss="reverse_kl", k=3, temperature=tau, normalizer=1.0)
    out.loss.backward()
    valid = (y != -100).double()
    ls = torch.log_softmax(zs.detach() / tau, -1)
    lt = torch.log_softmax(zt / tau, -1)
    p = ls.exp()
    kl = (p * (ls - lt)).sum(-1, keepdim=True)
    expect = (w * valid)[..., None] * p * ((ls - lt) - kl) / tau
    torch.testing.assert_close(zs.grad, expect, rtol=1e-10, atol=1e-12)


def test_forward_kl_gradient_matches_design_formula():
    """dF_t/dz_S(v) = (p_S(v) - p_T(v)) / tau, F_t = sum_v p_T(v) (log p_T(v) - log p_S(v)) (docs/formulas.md §5)."""
    tau = 0.8
    zs, zt, y, w = loss_inputs(7)
    zs.requires_grad_(True)
    out = R.opd_loss(zs, zt, y, weights=w, loss="forward_kl", k=3, temperature=tau, normalizer=2.0)
    out.loss.backward()
    valid = (y != -100).double()
    ls = torch.log_softmax(zs.detach() / tau, -1)
    lt = torch.log_softmax(zt / tau, -1)
    expect = (w * valid)[..., None] * (ls.exp() - lt.exp()) / tau / 2.0
    torch.testing.assert_close(zs.grad, expect, rtol=1e-10, atol=1e-12)
    fkl = (lt.exp() * (lt - ls)).sum(-1)
    torch.testing.assert_close(out.per_token, w * valid * fkl)
    torch.testing.assert_close(out.stats.forward_kl, valid * fkl)
    assert out.stats.reverse_kl is None
    assert out.metrics["forward_kl_mean"] == pytest.approx(float((valid * fkl).sum() / valid.sum()), rel=1e-12)
    assert "reverse_kl_mean" not in out.metrics


def test_forward_kl_edge_terms():
    """p_T(v) = 0 contributes 0 (no 0 * -inf = NaN); a teacher token the student gives p = 0 is +inf."""
    zt = torch.tensor([[0.0, 1.0, -math.inf]], dtype=torch.float64)
    zs = torch.tensor([[0.5, -0.5, 2.0]], dtype=torch.float64)
    fkl = R.forward_kl(torch.log_softmax(zs, -1), torch.log_softmax(zt, -1))
    pt = torch.softmax(zt[0, :2], -1)
    ps = torch.softmax(zs, -1)[0, :2]
    assert float(fkl) == pytest.approx(float((pt * (pt.log() - ps.log())).sum()), rel=1e-12)
    zs_zero = torch.tensor([[0.5, -math.inf, 2.0]], dtype=torch.float64)
    assert float(R.forward_kl(torch.log_softmax(zs_zero, -1), torch.log_softmax(zt, -1))) == math.inf


def test_loss_defaults_weights_and_normaliser():
    zs, zt, y, _ = loss_inputs(6, dtype=torch.float32)
    out = R.opd_loss(zs, zt, y, k=3)
    valid = y != -100
    # w = valid, s_old = sg(s): l_t = -A_t, loss = mean over valid tokens
    torch.testing.assert_close(out.per_token[valid], -out.stats.advantages[valid])
    torch.testing.assert_close(out.loss, out.per_token.sum() / valid.sum())
    assert out.metrics["kept_fraction"] == 1.0
    assert out.metrics["adv_mean"] == pytest.approx(out.stats.advantages[valid].mean().item(), rel=1e-5)
    # weights at invalid positions are ignored
    w = torch.full(y.shape, 2.0)
    out2 = R.opd_loss(zs, zt, y, k=3, weights=w, normalizer=7)
    torch.testing.assert_close(out2.loss, 2 * out.per_token.sum() / 7)


def test_teacher_gets_no_gradient():
    zs, zt, y, w = loss_inputs(7, dtype=torch.float32)
    zs.requires_grad_(True)
    zt.requires_grad_(True)
    fastopd.opd_loss(zs, zt, y, weights=w, k=3).loss.backward()
    assert zt.grad is None and zs.grad is not None


# ------------------------------------------------------------------------------------------------------
# section 2 (means) and section 4 (weights)
# ------------------------------------------------------------------------------------------------------


def test_segment_means_against_loop():
    rng = np.random.default_rng(0)
    b, length = 5, 23
    vals = rng.normal(size=(b, length))
    seg = np.sort(rng.integers(0, 6, size=(b, length)), axis=1)
    valid = rng.random((b, length)) > 0.2
    valid[3] = False  # a rollout with nothing valid
    sm = fastopd.segment_means(torch.tensor(vals), seg, torch.tensor(valid))
    assert sm.offsets[0] == 0 and sm.offsets[-1] == len(sm.values)
    for i in range(b):
        got = sm.values[sm.offsets[i]:sm.offsets[i + 1]]
        ids = sm.segment_ids[sm.offsets[i]:sm.offsets[i + 1]]
        want_ids = sorted(set(seg[i][valid[i]].tolist()))
        assert ids.tolist() == want_ids
        for g_id, x in zip(want_ids, got):
            assert x == pytest.approx(vals[i][valid[i] & (seg[i] == g_id)].mean(), rel=1e-12)


def test_release_weights_preserve_mass_and_cut():
    seg = torch.tensor([[0, 0, 1, 1, 2, 2, 3, -1], [0, 1, 1, 2, 2, 2, 3, 3]])
    valid = seg >= 0
    w = fastopd.release_weights(seg, valid, np.array([2, 99]))
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.sum(-1), valid.sum(-1).float())
    assert torch.all(w[0, 4:] == 0)
    torch.testing.assert_close(w[0, :4], torch.full((4,), 7 / 4))
    torch.testing.assert_close(w[1], valid[1].float())  # not accepted: w = valid


def test_controls():
    seg = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 3, 3, 3]] * 50)
    valid = torch.ones_like(seg, dtype=torch.bool)
    torch.testing.assert_close(fastopd.control_weights("full", seg, valid), valid.float())
    fp = fastopd.control_weights("fixed_prefix", seg, valid, fraction=0.35)
    assert torch.all((fp > 0).sum(-1) == 4)  # ceil(0.35 * 10)
    torch.testing.assert_close(fp.sum(-1), torch.full((50,), 10.0))
    rnd = fastopd.control_weights("random", seg, valid, generator=0)
    kept = (rnd > 0).sum(-1)
    assert set(kept.tolist()) <= {2, 5, 7}  # cuts only at segment boundaries, never keep-all
    assert len(set(kept.tolist())) == 3  # all three boundaries are drawn over 50 rows
    torch.testing.assert_close(rnd.sum(-1), torch.full((50,), 10.0))
    with pytest.raises(ValueError, match="kind"):
        fastopd.control_weights("suffix", seg, valid)
    with pytest.raises(ValueError, match="fraction"):
        fastopd.control_weights("fixed_prefix", seg, valid, fraction=0)








# ------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [fastopd.token_stats, fastopd.opd_loss, R.token_stats, R.opd_loss])
def test_bad_inputs_raise_clear_errors(fn):
    zs, zt = torch.randn(3, 8), torch.randn(3, 8)
    y = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="k must be >= 2"):
        fn(zs, zt, y, k=1)
    with pytest.raises(ValueError, match="k must be <= the vocabulary size V=8"):
        fn(zs, zt, y, k=9)
    with pytest.raises(ValueError, match="student_logits must have shape"):
        fn(torch.randn(4, 8), zt, y, k=2)
    with pytest.raises(ValueError, match="teacher_logits must have shape"):
        fn(zs, torch.randn(3, 2, 8), y, k=2)
    with pytest.raises(TypeError, match="student_logits must be float16"):
        fn(zs.long(), zt, y, k=2)
    with pytest.raises(TypeError, match="target_ids must be an integer"):
        fn(zs, zt, y.float(), k=2)
    with pytest.raises(ValueError, match="pass vocab_size"):
        fn(zs, torch.randn(3, 9), y, k=2)
    with pytest.raises(ValueError, match=r"target_ids must lie in \[0, 8\).*found 8"):
        fn(zs, zt, torch.tensor([1, 8, -100]), k=2)
    with pytest.raises(ValueError, match="found -3"):
        fn(zs, zt, torch.tensor([1, -3, 2]), k=2)
    with pytest.raises(ValueError, match="vocab_size=10 exceeds"):
        fn(zs, zt, y, k=2, vocab_size=10)
    with pytest.raises(ValueError, match="temperature"):
        fn(zs, zt, y, k=2, temperature=0.0)










@pytest.mark.parametrize("fn", ["token_stats", "opd_loss"])
def test_bool_is_not_a_temperature_or_k(fn):
    """temperature=True used to be taken as 1.0 (issue 14): every public option check refuses bools."""
    zs, zt, y = torch.randn(3, 20), torch.randn(3, 20), torch.tensor([1, 2, 3])
    f = getattr(R, fn)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got True"):
        f(zs, zt, y, temperature=True)
    with pytest.raises(TypeError, match="k must be an int, got bool"):
        f(zs, zt, y, k=True)
    with pytest.raises(ValueError, match="temperature must be"):
        fastopd.token_stats(zs, zt, y, temperature=True)
    with pytest.raises(ValueError, match="temperature must be"):
        fastopd.sparse_margins(torch.tensor([[0, 1]]), torch.tensor([[0]]), torch.tensor([[-0.1]]), temperature=True)


@pytest.mark.parametrize("normalizer", [True, torch.tensor(True)])
def test_bool_is_not_a_normalizer(normalizer):
    zs, zt, y = torch.randn(3, 20), torch.randn(3, 20), torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="normalizer must be a positive finite scalar"):
        R.opd_loss(zs, zt, y, normalizer=normalizer)


@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("bad", ["nan", "+inf", "all -inf"])
def test_non_finite_row_gives_nan_margin(side, bad):
    """A row whose log-softmax does not exist (a NaN or +inf logit, or no finite logit) has a NaN loss; its
    margin is NaN too, never a plausible 0 (issue 14, docs/formulas.md §1). Other rows are untouched."""
    g = torch.Generator().manual_seed(7)
    zs, zt = torch.randn(4, 12, generator=g), torch.randn(4, 12, generator=g)
    y = torch.tensor([1, 2, -100, 4])
    clean = R.token_stats(zs, zt, y, k=4)
    z = zs if side == "student" else zt
    if bad == "nan":
        z[1, 5] = math.nan
        z[2, 5] = math.nan  # an ignored row: stays 0
    elif bad == "+inf":
        z[1, 0] = math.inf
    else:
        z[1, :] = -math.inf
    s = R.token_stats(zs, zt, y, k=4)
    assert math.isnan(s.margins[1].item())
    assert s.margins[2].item() == 0.0
    keep = torch.tensor([True, False, True, True])
    assert torch.equal(s.margins[keep], clean.margins[keep])
    out = R.opd_loss(zs, zt, y, k=4)
    assert not math.isfinite(out.loss.item())  # the loss is not finite either: the two agree
    assert math.isnan(out.stats.margins[1].item())
