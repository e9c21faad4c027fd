"""Tests of fastopd.loss: opd_loss / OPDLoss (with a rule, options, gradients) against the reference."""

from __future__ import annotations

import math

import pytest
import torch

import fastopd
from fastopd import reference as R
from helpers import loss_inputs


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


def test_bad_options_raise_clear_errors():
    zs, zt, y = torch.randn(3, 8), torch.randn(3, 8), torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="backend must be one of"):
        fastopd.token_stats(zs, zt, y, k=2, backend="cuda")
    with pytest.raises(ValueError, match="loss must be one of"):
        fastopd.opd_loss(zs, zt, y, k=2, loss="jsd")
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
    # the loss's margins are those of k=5, tau=2 (the rule's), by hand in fp64 (docs/formulas.md §1): the
    # teacher's top-1 minus top-2 logit over the student's top-5 candidates, divided by tau. With the defaults
    # (k=16 >= V: every token a candidate; tau=1) they would differ.
    top2 = zt.double().gather(-1, zs.double().topk(5, dim=-1).indices).topk(2, dim=-1).values
    want = (top2[..., 0] - top2[..., 1]) / 2.0
    torch.testing.assert_close(out.stats.margins.double(), want, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(want, (zt.max(-1).values - zt.topk(2, dim=-1).values[..., 1]).double())
    assert fastopd.opd_loss(zs, zt, y, k=5).release is None  # declared: None without a rule


def test_weights_and_old_logprobs_get_no_gradient():
    """sg(.) in docs/formulas.md §5: only the student logits are differentiated."""
    zs, zt, y, w = loss_inputs(9)
    zs.requires_grad_(True)
    w.requires_grad_(True)
    old = torch.full(y.shape, -2.0, dtype=torch.float64, requires_grad=True)
    R.opd_loss(zs, zt, y, weights=w, old_logprobs=old, k=3).loss.backward()
    assert w.grad is None and old.grad is None and zs.grad is not None
