"""fastopd/sparse.py: sparse_margins against the reference's exact margins (docs/formulas.md §7)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastopd
from fastopd import reference


def _server_topk(teacher_logits: torch.Tensor, k: int, *, shuffle_seed: int | None = None):
    """What a vLLM/SGLang server returns: the ids and temperature-1 log-probs of the teacher's top-k."""
    lp = torch.log_softmax(teacher_logits, dim=-1)
    vals, ids = torch.topk(lp, k, dim=-1)
    if shuffle_seed is not None:  # servers need not sort; sparse_margins must not assume an order
        g = torch.Generator().manual_seed(shuffle_seed)
        perm = torch.argsort(torch.rand(ids.shape, generator=g), dim=-1)
        vals, ids = vals.gather(-1, perm), ids.gather(-1, perm)
    return ids, vals


def _n_inside(cand: torch.Tensor, tids: torch.Tensor) -> torch.Tensor:
    """Count, by plain Python sets, how many of each row's candidates are among the teacher's ids."""
    c, t = cand.reshape(-1, cand.shape[-1]).tolist(), tids.reshape(-1, tids.shape[-1]).tolist()
    return torch.tensor([len(set(a) & set(b)) for a, b in zip(c, t)]).reshape(cand.shape[:-1])


def _check_against_reference(zs, zt, *, k_student, k_teacher, temperature, shuffle_seed=None, atol=1e-9):
    b, l, _ = zs.shape
    targets = torch.zeros(b, l, dtype=torch.long)
    ref = reference.token_stats(zs, zt, targets, k=k_student, temperature=temperature, return_topk=True)
    tids, tlp = _server_topk(zt, k_teacher, shuffle_seed=shuffle_seed)
    out = fastopd.sparse_margins(ref.topk_ids, tids, tlp, temperature=temperature)
    n_in = _n_inside(ref.topk_ids, tids)
    assert torch.equal(out.exact, n_in >= 2)
    assert out.margins.shape == (b, l)
    ex = out.exact
    torch.testing.assert_close(out.margins[ex], ref.margins[ex], rtol=0, atol=atol)
    # elsewhere a lower bound, never above the truth
    assert bool((out.margins[~ex] <= ref.margins[~ex] + atol).all())
    assert bool((out.margins >= 0).all())
    # none inside -> 0
    assert bool((out.margins[n_in == 0] == 0).all())
    # one inside -> (lp(c) - lp_k) / tau exactly
    one = n_in == 1
    if one.any():
        lp_full = torch.log_softmax(zt, -1)
        cand_lp = lp_full.gather(-1, ref.topk_ids)
        inside = (ref.topk_ids.unsqueeze(-1) == tids.unsqueeze(-2)).any(-1)
        lp_c = torch.where(inside, cand_lp, torch.full_like(cand_lp, -math.inf)).amax(-1)
        bound = (lp_c - tlp.amin(-1)) / temperature
        torch.testing.assert_close(out.margins[one], bound[one].clamp_min(0), rtol=0, atol=atol)
    return out, n_in


@pytest.mark.parametrize("k_teacher", [1, 2, 5, 20, 64])
def test_exact_entries_equal_reference_and_bounds_hold(k_teacher):
    g = torch.Generator().manual_seed(k_teacher)
    v = 97
    zs = torch.randn(3, 40, v, generator=g, dtype=torch.float64) * 3
    # a teacher correlated with the student, so all three cases (>=2, 1, 0 inside) occur
    zt = 0.3 * zs + torch.randn(3, 40, v, generator=g, dtype=torch.float64) * 3
    out, n_in = _check_against_reference(zs, zt, k_student=8, k_teacher=k_teacher, temperature=1.0, shuffle_seed=1)
    if k_teacher == 5:  # the three cases (>= 2, 1, 0 candidates inside) all occur here
        assert (n_in >= 2).any() and (n_in == 1).any() and (n_in == 0).any()
    if k_teacher == 1:
        assert not out.exact.any()  # with k = 1 at most one candidate can be inside


def test_all_exact_when_teacher_k_is_the_vocabulary():
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(2, 30, 50, generator=g, dtype=torch.float64)
    zt = torch.randn(2, 30, 50, generator=g, dtype=torch.float64)
    out, _ = _check_against_reference(zs, zt, k_student=16, k_teacher=50, temperature=0.7)
    assert bool(out.exact.all())


def test_float32_server_logprobs_match_within_float_rounding():
    g = torch.Generator().manual_seed(3)
    zs = torch.randn(4, 25, 300, generator=g) * 4
    zt = zs + torch.randn(4, 25, 300, generator=g)
    _check_against_reference(zs, zt, k_student=16, k_teacher=20, temperature=1.0, atol=2e-5)


@settings(max_examples=60, deadline=None)
@given(
    v=st.integers(4, 60),
    k_student=st.integers(2, 12),
    k_teacher=st.integers(1, 30),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
    integer_logits=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_hypothesis_random_logits(v, k_student, k_teacher, temperature, integer_logits, seed):
    k_student, k_teacher = min(k_student, v), min(k_teacher, v)
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(2, 9, v, generator=g, dtype=torch.float64) * 3
    zt = torch.randn(2, 9, v, generator=g, dtype=torch.float64) * 3
    if integer_logits:  # many exact ties in both models
        zs, zt = zs.round(), zt.round()
    _check_against_reference(zs, zt, k_student=k_student, k_teacher=k_teacher, temperature=temperature, shuffle_seed=seed)


def test_hand_example():
    # teacher log-probs at temperature 1 over 6 tokens; the server returns its top-3: ids 4, 0, 2
    lp = torch.log_softmax(torch.tensor([2.0, -1.0, 1.0, -3.0, 3.0, 0.0], dtype=torch.float64), -1)
    tids = torch.tensor([[4, 0, 2]])
    tlp = lp[tids]
    cases = {  # student candidates -> (margin, exact)
        (0, 2): (1.0, True),  # both inside: z[0] - z[2] = 2 - 1
        (2, 5): (1.0 - 1.0, False),  # 2 is inside and is the k-th itself: bound 0 (truth 1 - 0 = 1)
        (0, 5): (2.0 - 1.0, False),  # 0 inside, 5 outside: bound lp(0) - lp_k = 2 - 1 (truth 2)
        (1, 3): (0.0, False),  # none inside: 0 (truth 2)
    }
    for cand, (m, exact) in cases.items():
        out = fastopd.sparse_margins(torch.tensor([cand]), tids, tlp)
        assert bool(out.exact[0]) is exact, cand
        assert math.isclose(float(out.margins[0]), m, abs_tol=1e-12), (cand, float(out.margins[0]))
    out = fastopd.sparse_margins(torch.tensor([[0, 2]]), tids, tlp, temperature=2.0)
    assert math.isclose(float(out.margins[0]), 0.5, abs_tol=1e-12)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(student_topk_ids=torch.zeros(3, 2)), TypeError, "student_topk_ids must be an integer"),
        (dict(student_topk_ids=torch.zeros(3, 1, dtype=torch.long)), ValueError, "K >= 2"),
        (dict(student_topk_ids=torch.tensor([[0, 1], [4, 4], [2, 3]])), ValueError,
         r"student_topk_ids must hold distinct ids at each position .*position \(1,\) holds 4 more than once"),
        (dict(teacher_topk_ids=torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3], [7, -1, 7, -1]])), ValueError,
         r"teacher_topk_ids must hold distinct ids .*position \(2,\) holds 7 more than once: \[7, -1, 7, -1\]"),
        (dict(teacher_topk_ids=[1, 2]), TypeError, "teacher_topk_ids must be a torch.Tensor"),
        (dict(teacher_topk_logprobs=torch.zeros(3, 4, dtype=torch.long)), TypeError, "teacher_topk_logprobs must be a float"),
        (dict(teacher_topk_logprobs=torch.zeros(3, 5)), ValueError, "shape of teacher_topk_ids"),
        (dict(student_topk_ids=torch.zeros(2, 2, dtype=torch.long)), ValueError, "leading shape"),
        (dict(temperature=0.0), ValueError, "temperature must be"),
        (dict(temperature=float("nan")), ValueError, "temperature must be"),
    ],
)
def test_bad_input_names_the_argument(kwargs, err, match):
    args = dict(
        student_topk_ids=torch.tensor([[0, 1]] * 3),
        teacher_topk_ids=torch.tensor([[0, 1, 2, 3]] * 3),
        teacher_topk_logprobs=torch.zeros(3, 4),
    )
    temperature = kwargs.pop("temperature", 1.0)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        fastopd.sparse_margins(**args, temperature=temperature)


# ------------------------------------------------------------------------------------------------------
# padding, duplicates and non-finite log-probs (issue 14, docs/formulas.md §7)
# ------------------------------------------------------------------------------------------------------


def test_issue_examples():
    lp = torch.tensor([[-0.1, -0.5, -3.0]])
    with pytest.raises(ValueError, match="student_topk_ids must hold distinct ids.*5 more than once"):
        fastopd.sparse_margins(torch.tensor([[5, 5, 9]]), torch.tensor([[5, 1, 7]]), lp)  # was: 0.0, exact
    out = fastopd.sparse_margins(torch.tensor([[-1, -1]]), torch.tensor([[-1, -1, 7]]), lp)  # was: inf, exact
    assert out.margins.tolist() == [0.0] and out.exact.tolist() == [False]
    lp_nan = torch.tensor([[-0.1, math.nan, -3.0]])
    out = fastopd.sparse_margins(torch.tensor([[5, 1]]), torch.tensor([[5, 1, 7]]), lp_nan)
    assert math.isnan(out.margins.item()) and out.exact.tolist() == [False]  # was: NaN, exact
    with pytest.raises(ValueError, match="teacher_topk_ids must hold distinct ids"):
        fastopd.sparse_margins(torch.tensor([[5, 1]]), torch.tensor([[5, 5, 7]]), lp)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_logprob_is_nan_never_exact_and_padding_logprobs_are_not_read(bad):
    ids, cand = torch.tensor([[4, 0, 2, -1]]), torch.tensor([[0, 2]])
    lp = torch.tensor([[-0.5, -1.0, -2.0, bad]])  # the padding entry's log-prob is garbage: not read
    out = fastopd.sparse_margins(cand, ids, lp)
    assert out.exact.tolist() == [True] and math.isclose(out.margins.item(), 1.0)
    lp[0, 2] = bad  # now a real entry: no log-prob, whatever the candidates
    for c in ([0, 2], [0, 9], [7, 9]):
        out = fastopd.sparse_margins(torch.tensor([c]), ids, lp)
        assert math.isnan(out.margins.item()) and not out.exact.item()
    lp[0, 2] = -math.inf  # -inf is a log-prob (probability 0): the one-inside bound is then +inf
    out = fastopd.sparse_margins(torch.tensor([[0, 9]]), ids, lp)
    assert out.margins.item() == math.inf and not out.exact.item()


def test_token_stats_ids_pass_as_they_are():
    """token_stats(return_topk=True) writes -1 at ignored positions (it wrote 0s: a repeated id)."""
    g = torch.Generator().manual_seed(2)
    zs, zt = torch.randn(2, 5, 30, generator=g), torch.randn(2, 5, 30, generator=g)
    y = torch.randint(0, 30, (2, 5), generator=g)
    y[0, 3:] = -100
    st_ = fastopd.token_stats(zs, zt, y, k=4, return_topk=True)
    assert bool((st_.topk_ids[0, 3:] == -1).all())
    ids, lp = _server_topk(zt, 6)
    out = fastopd.sparse_margins(st_.topk_ids, ids, lp)
    assert not out.exact[0, 3:].any() and bool((out.margins[0, 3:] == 0).all())


@settings(max_examples=80, deadline=None)
@given(
    v=st.integers(4, 40),
    k_student=st.integers(2, 10),
    k_teacher=st.integers(1, 25),
    student_pad=st.integers(0, 8),
    teacher_pad=st.integers(0, 25),
    garbage=st.sampled_from([0.0, math.nan, math.inf, -math.inf, 5.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_hypothesis_padding_is_absent(v, k_student, k_teacher, student_pad, teacher_pad, garbage, seed):
    """A server that returns k' < k entries pads the rest (any log-prob there), a student list may be padded:
    the result is that of the unpadded lists, which is checked against the dense reference."""
    k_student, k_teacher = min(k_student, v), min(k_teacher, v)
    student_pad = min(student_pad, k_student - 2)  # keep >= 2 real candidates for the dense reference
    teacher_pad = min(teacher_pad, k_teacher)
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(2, 7, v, generator=g, dtype=torch.float64) * 3
    zt = 0.5 * zs + torch.randn(2, 7, v, generator=g, dtype=torch.float64) * 3
    targets = torch.zeros(2, 7, dtype=torch.long)
    kept = k_student - student_pad
    ref = reference.token_stats(zs, zt, targets, k=kept, return_topk=True)
    cand = torch.cat([ref.topk_ids, torch.full((2, 7, student_pad), -1)], -1)
    tids, tlp = _server_topk(zt, k_teacher)  # sorted: padding replaces the lowest entries, as a shorter list
    tids, tlp = tids.clone(), tlp.clone()
    tids[..., k_teacher - teacher_pad:] = -1 - torch.arange(teacher_pad) % 2  # -1 and -2 both pad
    tlp[..., k_teacher - teacher_pad:] = garbage
    perm = torch.argsort(torch.rand(tids.shape, generator=g), dim=-1)
    cperm = torch.argsort(torch.rand(cand.shape, generator=g), dim=-1)
    out = fastopd.sparse_margins(cand.gather(-1, cperm), tids.gather(-1, perm), tlp.gather(-1, perm))
    if teacher_pad == k_teacher:  # nothing from the server: the trivial bound everywhere
        assert not out.exact.any() and bool((out.margins == 0).all())
        return
    real = k_teacher - teacher_pad
    plain = fastopd.sparse_margins(ref.topk_ids, tids[..., :real], tlp[..., :real])
    assert torch.equal(out.exact, plain.exact)
    torch.testing.assert_close(out.margins, plain.margins, rtol=0, atol=0)
    n_in = _n_inside(ref.topk_ids, tids[..., :real])
    assert torch.equal(out.exact, n_in >= 2)
    ex = out.exact
    torch.testing.assert_close(out.margins[ex], ref.margins[ex], rtol=0, atol=1e-9)
    assert bool((out.margins[~ex] <= ref.margins[~ex] + 1e-9).all())

