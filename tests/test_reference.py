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
    assert torch.all(s.topk_ids[y == -100] == 0)
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


def _loss_inputs(seed, b=2, t=4, v=9, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(b, t, v, generator=g, dtype=dtype)
    zt = torch.randn(b, t, v, generator=g, dtype=dtype)
    y = torch.randint(0, v, (b, t), generator=g)
    y[1, -1] = -100
    w = torch.rand(b, t, generator=g, dtype=dtype) * 2
    return zs, zt, y, w


@pytest.mark.parametrize("loss", ["pg", "reverse_kl"])
@pytest.mark.parametrize("tau", [1.0, 0.6])
def test_loss_gradcheck_float64(loss, tau):
    zs, zt, y, w = _loss_inputs(3)
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
    zs, zt, y, w = _loss_inputs(4)
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
    zs, zt, y, w = _loss_inputs(5)
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


def test_loss_defaults_weights_and_normaliser():
    zs, zt, y, _ = _loss_inputs(6, dtype=torch.float32)
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
    zs, zt, y, w = _loss_inputs(7, dtype=torch.float32)
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


def test_release_rule_cuts_a_fading_rollout():
    # 10 sentences of 3 tokens: the teacher's margin is large for 5 sentences and then fades to ~0.
    rng = np.random.default_rng(1)
    seg = np.repeat(np.arange(10), 3)[None].repeat(2, 0)
    margins = np.where(seg < 5, 4.0, 0.05) + rng.normal(0, 0.01, seg.shape)
    margins[1] = 1.0 + rng.normal(0, 0.01, 30)  # flat: no release
    valid = np.ones_like(seg, dtype=bool)
    dec = fastopd.ReleaseRule().from_margins(torch.tensor(margins), torch.tensor(seg), torch.tensor(valid))
    assert dec.scan.accepted.tolist() == [True, False]
    assert dec.release_segment.tolist() == [5, 10]
    assert torch.all(dec.weights[0, 15:] == 0)
    torch.testing.assert_close(dec.weights.sum(-1), torch.tensor([30.0, 30.0]))
    assert dec.kept_fraction.tolist() == [0.5, 1.0]
    assert dec.metrics["accept_rate"] == 0.5
    full = fastopd.ReleaseRule("full").from_margins(torch.tensor(margins), torch.tensor(seg), torch.tensor(valid))
    assert torch.all(full.weights == 1) and full.scan.accepted.tolist() == [True, False]
    # a control keeps its own tokens, but the release position is the release point's, in every mode
    assert full.kept_fraction.tolist() == [1.0, 1.0] and full.release_fraction.tolist() == [0.5, 1.0]
    assert full.metrics["release_position"] == 0.5 and full.metrics["kept_fraction"] == 1.0
    assert dec.metrics["release_position"] == 0.5 and dec.metrics["kept_fraction"] == 0.75


def test_opdloss_with_rule_equals_opd_loss_with_rule_weights():
    g = torch.Generator().manual_seed(8)
    zs = torch.randn(2, 12, 11, generator=g)
    zt = torch.randn(2, 12, 11, generator=g)
    y = torch.randint(0, 11, (2, 12), generator=g)
    seg = torch.arange(12).div(2, rounding_mode="floor").repeat(2, 1)
    rule = fastopd.ReleaseRule(k=4, min_gain=-math.inf)  # accept any downward split
    out = fastopd.OPDLoss(rule=rule, k=4)(zs, zt, y, segment_ids=seg)
    dec = fastopd.ReleaseRule(k=4, min_gain=-math.inf)(zs, zt, y, seg)
    ref = fastopd.opd_loss(zs, zt, y, weights=dec.weights, k=4)
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(out.per_token, ref.per_token)
    assert "accept_rate" in out.metrics and out.release.scan.accepted.tolist() == dec.scan.accepted.tolist()
    assert dec.scan.accepted.any()  # the comparison above exercised a real cut
    for key in ("kept_fraction", "num_kept", "adv_mean", "loss"):
        assert out.metrics[key] == pytest.approx(ref.metrics[key], rel=1e-6)


@pytest.mark.parametrize("loss", ["pg", "reverse_kl"])
def test_opdloss_with_rule_gradient_equals_weighted_loss_gradient(loss):
    """The rule's weights applied after the forward give the gradient of the loss with those weights."""
    g = torch.Generator().manual_seed(10)
    zs = torch.randn(3, 14, 13, generator=g, dtype=torch.float64)
    zt = torch.randn(3, 14, 13, generator=g, dtype=torch.float64)
    y = torch.randint(0, 13, (3, 14), generator=g)
    y[2, -3:] = -100
    seg = torch.arange(14).div(2, rounding_mode="floor").repeat(3, 1)
    rule = fastopd.ReleaseRule(k=3, min_gain=-math.inf, min_segments=1)
    a = zs.clone().requires_grad_(True)
    out = fastopd.OPDLoss(loss, k=3, rule=rule)(a, zt, y, segment_ids=seg, normalizer=7.0)
    out.loss.backward()
    b = zs.clone().requires_grad_(True)
    fastopd.opd_loss(b, zt, y, loss=loss, k=3, weights=out.release.weights.double(), normalizer=7.0).loss.backward()
    assert (out.release.weights == 0).any()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)


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


def test_bad_options_raise_clear_errors():
    zs, zt, y = torch.randn(3, 8), torch.randn(3, 8), torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="backend must be one of"):
        fastopd.token_stats(zs, zt, y, k=2, backend="cuda")
    with pytest.raises(ValueError, match="loss must be one of"):
        fastopd.opd_loss(zs, zt, y, k=2, loss="forward_kl")
    with pytest.raises(ValueError, match="weights must have shape"):
        fastopd.opd_loss(zs, zt, y, k=2, weights=torch.ones(4))
    with pytest.raises(ValueError, match="normalizer"):
        fastopd.opd_loss(zs, zt, y, k=2, normalizer=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        fastopd.ReleaseRule("suffix")
    with pytest.raises(ValueError, match="segment_ids="):
        fastopd.OPDLoss(k=2, rule=fastopd.ReleaseRule(k=2))(zs, zt, y)
    with pytest.raises(ValueError, match=r"OPDLoss\(k=2\) differs from rule.k=4"):
        fastopd.OPDLoss(k=2, rule=fastopd.ReleaseRule(k=4))
    with pytest.raises(ValueError, match=r"OPDLoss\(backend='triton'\) differs from rule.backend='auto'"):
        fastopd.OPDLoss(backend="triton", rule=fastopd.ReleaseRule())


def test_opdloss_takes_k_temperature_backend_from_its_rule():
    rule = fastopd.ReleaseRule(k=5, temperature=2.0, backend="reference")
    crit = fastopd.OPDLoss(rule=rule)
    assert (crit.k, crit.temperature, crit.backend) == (5, 2.0, "reference")
    plain = fastopd.OPDLoss()
    assert (plain.k, plain.temperature, plain.backend) == (16, 1.0, "auto")
    g = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(2, 6, 9, generator=g), torch.randn(2, 6, 9, generator=g)
    y = torch.randint(0, 9, (2, 6), generator=g)
    out = crit(zs, zt, y, segment_ids=torch.zeros(2, 6, dtype=torch.long))
    # the loss's margins are those of k=5, tau=2 (the rule's), computed independently by token_stats
    want = fastopd.token_stats(zs, zt, y, k=5, temperature=2.0, backend="reference")
    torch.testing.assert_close(out.stats.margins, want.margins)
    assert fastopd.opd_loss(zs, zt, y, k=5).release is None  # declared: None without a rule


def test_weights_and_old_logprobs_get_no_gradient():
    """sg(.) in docs/formulas.md §5: only the student logits are differentiated."""
    zs, zt, y, w = _loss_inputs(9)
    zs.requires_grad_(True)
    w.requires_grad_(True)
    old = torch.full(y.shape, -2.0, dtype=torch.float64, requires_grad=True)
    R.opd_loss(zs, zt, y, weights=w, old_logprobs=old, k=3).loss.backward()
    assert w.grad is None and old.grad is None and zs.grad is not None


def test_auto_backend_choice():
    from fastopd._dispatch import resolve_backend

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_backend("auto", cpu, dtypes=(torch.bfloat16,)) == "reference"
    assert resolve_backend("auto", cuda, dtypes=(torch.bfloat16, torch.float32), k=16) == "triton"
    # the kernels take fp16/bf16/fp32 and k <= 256: auto hands anything else to the reference
    assert resolve_backend("auto", cuda, dtypes=(torch.float64, torch.float32)) == "reference"
    assert resolve_backend("auto", cuda, dtypes=(torch.bfloat16,), k=512) == "reference"
    assert resolve_backend("reference", cuda) == "reference"
