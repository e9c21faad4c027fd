"""Tests of fastopd/stats.py: the public ``token_stats`` against a fp64 hand computation of docs/formulas.md §1
(torch.log_softmax, topk and gathers written out here; not the reference oracle, which is tests/test_reference.py's
subject), and its dispatch, shapes and dtypes. The Triton backend is tests/kernels/test_token_stats.py's."""

from __future__ import annotations

import pytest
import torch

import fastopd


def by_hand(zs, zt, y, *, k, tau, v):
    """Per-token s_t, u_t, A_t, m_t, KL_t in fp64 (formulas.md §1); no tie handling (random logits)."""
    zs, zt = zs[..., :v].double() / tau, zt[..., :v].double() / tau
    ls, lt = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    yy = y.clamp(min=0).unsqueeze(-1)
    s, u = ls.gather(-1, yy).squeeze(-1), lt.gather(-1, yy).squeeze(-1)
    cand = zs.topk(k, dim=-1).indices
    top2 = zt.gather(-1, cand).topk(2, dim=-1).values  # already divided by tau
    kl = (ls.exp() * (ls - lt)).sum(-1)
    return s, u, u - s, top2[..., 0] - top2[..., 1], kl, cand


@pytest.mark.parametrize("k, tau", [(3, 1.0), (5, 0.7), (2, 2.0)])
def test_token_stats_equals_the_hand_computation(k, tau):
    g = torch.Generator().manual_seed(k)
    b, t, v = 3, 5, 11
    zs = torch.randn(t, b, v + 2, generator=g).transpose(0, 1)  # non-contiguous leading dims, padded width
    zt = torch.randn(b, t, v + 4, generator=g) * 2
    y = torch.randint(0, v, (b, t), generator=g)
    y[0, 3:] = -100
    y[2, 0] = -100
    st = fastopd.token_stats(zs, zt, y, k=k, temperature=tau, vocab_size=v, full_kl=True, return_topk=True)
    s, u, a, m, kl, cand = by_hand(zs, zt, y, k=k, tau=tau, v=v)
    valid = y != -100
    assert torch.equal(st.valid, valid)
    for got, want in ((st.student_logprobs, s), (st.teacher_logprobs, u), (st.advantages, a), (st.margins, m),
                      (st.reverse_kl, kl)):
        assert got.dtype == torch.float32 and got.shape == y.shape
        torch.testing.assert_close(got[valid].double(), want[valid], atol=2e-6, rtol=1e-5)
        assert torch.all(got[~valid] == 0)
    assert st.topk_ids.shape == (b, t, k) and torch.equal(st.topk_ids[valid], cand[valid])
    assert torch.all(st.topk_ids[~valid] == -1)


def test_optional_fields_are_absent_unless_asked_and_half_inputs_give_fp32():
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(2, 4, 9, generator=g), torch.randn(2, 4, 9, generator=g)
    y = torch.randint(0, 9, (2, 4), generator=g)
    st = fastopd.token_stats(zs, zt, y, k=4)
    assert st.reverse_kl is None and st.topk_ids is None
    half = fastopd.token_stats(zs.bfloat16(), zt.bfloat16(), y, k=4)
    assert half.margins.dtype == torch.float32
    _, _, a, m, _, _ = by_hand(zs.bfloat16(), zt.bfloat16(), y, k=4, tau=1.0, v=9)
    torch.testing.assert_close(half.advantages.double(), a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(half.margins.double(), m, atol=1e-5, rtol=1e-5)


def test_backends_agree_on_cpu_and_bad_input_names_the_argument():
    g = torch.Generator().manual_seed(2)
    zs, zt = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    y = torch.randint(0, 8, (2, 3), generator=g)
    auto, ref = fastopd.token_stats(zs, zt, y, k=3), fastopd.token_stats(zs, zt, y, k=3, backend="reference")
    assert torch.equal(auto.margins, ref.margins) and torch.equal(auto.advantages, ref.advantages)
    with pytest.raises(ValueError, match="backend"):
        fastopd.token_stats(zs, zt, y, k=3, backend="cuda")
    with pytest.raises(ValueError, match="vocab_size"):
        fastopd.token_stats(zs, zt[..., :7], y, k=3)
    with pytest.raises(ValueError, match=r"k must be <= the vocabulary size V=8"):
        fastopd.token_stats(zs, zt, y, k=9)
