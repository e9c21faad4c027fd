"""The CPU path against its own truth (issue 22): every public entry on CPU tensors against the float64
formulas of tests/truth.py, which does not import fastopd -- not against fastopd.reference, which is what the
CPU path runs. The cases hold masked (-inf) vocabulary entries, NaN rows at ignored positions, ties and 1e4
logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastopd
import truth

LOSSES = ("pg", "reverse_kl", "forward_kl")
KINDS = ("plain", "masked", "nan_ignored", "ties", "big")


def make_case(kind: str, seed: int, loss: str = "reverse_kl", b: int = 2, t: int = 5, v: int = 9):
    """(zs, zt, y) float64, with the feature ``kind``:

    - masked: vocabulary entries at -inf in both models (padding of the vocabulary), and for the losses that
      allow it (``pg``, ``reverse_kl``: p_S = 0 there costs nothing) one more entry masked in the student only;
    - nan_ignored: NaN (and +inf) in the rows of both models at ignored positions;
    - ties: small integer logits (many equal values: the top-K and the margins' ties);
    - big: logits of magnitude 1e4.
    Targets never point at a masked entry; some positions are ignored (-100) in every kind.
    """
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        zs = torch.randint(-2, 3, (b, t, v), generator=g).double()
        zt = torch.randint(-2, 3, (b, t, v), generator=g).double()
    else:
        zs, zt = torch.randn(b, t, v, generator=g, dtype=torch.float64), torch.randn(b, t, v, generator=g, dtype=torch.float64)
    if kind == "big":
        zs, zt = zs * 1e4, zt * 1e4
    y = torch.randint(0, v - 2, (b, t), generator=g)
    y[0, 1] = -100
    y[-1, -1] = -100
    if kind == "masked":
        zs[..., v - 1] = -math.inf
        zt[..., v - 1] = -math.inf
        if loss != "forward_kl":
            zs[..., v - 2] = -math.inf  # the student rules out one more entry (item 1 of issue 22)
    if kind == "nan_ignored":
        zs[0, 1] = math.nan
        zt[0, 1, ::2] = math.nan
        zt[-1, -1, 0] = math.inf
    return zs, zt, y


def _close(got, want, name, rtol=1e-9, atol=1e-9):
    got = np.asarray(got.detach().double() if isinstance(got, torch.Tensor) else got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=name, equal_nan=True)


# ------------------------------------------------------------------------------------------------ §1 statistics
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [2, 4])
def test_token_stats_against_truth(kind, k):
    zs, zt, y = make_case(kind, 10 + k)
    got = fastopd.token_stats(zs, zt, y, k=k, temperature=0.7, full_kl=True)
    want = truth.token_stats(zs, zt, y, k=k, tau=0.7)
    for field, key in (("student_logprobs", "s"), ("teacher_logprobs", "u"), ("advantages", "A"),
                       ("margins", "m"), ("reverse_kl", "reverse_kl")):
        _close(getattr(got, field), want[key], f"{kind} {field}")


@pytest.mark.parametrize("kind", KINDS)
def test_token_stats_fp32_against_truth(kind):
    zs, zt, y = make_case(kind, 3)
    got = fastopd.token_stats(zs.float(), zt.float(), y, k=3)
    want = truth.token_stats(zs.float(), zt.float(), y, k=3)
    scale = 1e4 if kind == "big" else 1.0
    _close(got.student_logprobs, want["s"], "s", rtol=1e-5, atol=1e-4 * scale)
    _close(got.margins, want["m"], "m", rtol=1e-5, atol=1e-4 * scale)


# ------------------------------------------------------------------------------------------------ §5 the loss
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_opd_loss_and_gradient_against_truth(kind, loss):
    zs, zt, y = make_case(kind, 20, loss)
    g = torch.Generator().manual_seed(1)
    w = torch.rand(y.shape, generator=g, dtype=torch.float64) * 2
    old = (torch.randn(y.shape, generator=g, dtype=torch.float64) - 2) if loss == "pg" else None
    a = zs.clone().requires_grad_(True)
    out = fastopd.opd_loss(a, zt, y, loss=loss, k=3, temperature=0.8, weights=w, old_logprobs=old)
    out.loss.backward()
    b = zs.clone().requires_grad_(True)
    want, per_token = truth.loss(b, zt, y, loss_name=loss, k=3, tau=0.8, weights=w, old_logprobs=old)
    want.backward()
    _close(out.loss, want.item(), f"{kind} {loss} loss", rtol=1e-9, atol=1e-9 * (1e4 if kind == "big" else 1))
    _close(out.per_token.reshape(-1), [float(p) for p in per_token], f"{kind} {loss} per_token",
           atol=1e-9 * (1e4 if kind == "big" else 1))
    assert not torch.isnan(a.grad).any(), f"{kind} {loss}: NaN in the gradient"
    _close(a.grad, b.grad.nan_to_num(0.0), f"{kind} {loss} gradient", atol=1e-9)
    # ignored rows receive nothing
    ignored = y == -100
    assert torch.equal(a.grad[ignored], torch.zeros_like(a.grad[ignored]))


def test_reverse_kl_with_a_masked_student_logit_has_a_finite_gradient():
    """Issue 22 item 1, verbatim: a -inf student logit gave the right loss and an all-NaN gradient."""
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(1, 2, 8, generator=g)
    zs[..., 0] = -math.inf
    zt = torch.randn(1, 2, 8, generator=g)
    a = zs.clone().requires_grad_(True)
    fastopd.opd_loss(a, zt, torch.tensor([[3, 4]]), loss="reverse_kl", k=2).loss.backward()
    b = zs.double().requires_grad_(True)
    truth.loss(b, zt, torch.tensor([[3, 4]]), loss_name="reverse_kl", k=2)[0].backward()
    assert torch.isfinite(a.grad).all()
    _close(a.grad, b.grad, "gradient", rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------- §6 from hidden states
def _hidden_case(kind: str, seed: int, loss: str):
    g = torch.Generator().manual_seed(seed)
    b, t, h, v = 2, 5, 4, 9
    hs = torch.randn(b, t, h, generator=g, dtype=torch.float64)
    ht = torch.randn(b, t, h, generator=g, dtype=torch.float64)
    ws, bs = torch.randn(v, h, generator=g, dtype=torch.float64), torch.randn(v, generator=g, dtype=torch.float64)
    wt = torch.randn(v, h, generator=g, dtype=torch.float64)
    y = torch.randint(0, v, (b, t), generator=g)
    y[0, 1] = -100
    y[1, 3] = -100
    if kind == "nan_ignored":  # issue 22 item 2: NaN hidden states at ignored rows, both models
        hs[1, 3] = math.nan
        ht[0, 1] = math.nan
    if kind == "big":
        ws = ws * 2e3
    return hs, ht, ws, bs, wt, y


@pytest.mark.parametrize("kind", ["plain", "nan_ignored", "big"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("with_rule", [False, True])
def test_linear_loss_and_gradients_against_truth(kind, loss, with_rule):
    hs, ht, ws, bs, wt, y = _hidden_case(kind, 30, loss)
    leaves = [x.clone().requires_grad_(True) for x in (hs, ws, bs)]
    head = fastopd.LMHead(leaves[1], leaves[2], logit_scale=0.9, softcap=30.0)
    if with_rule:
        seg = torch.tensor([[0, 0, 1, 1, 2], [0, 1, 1, 2, 2]])
        crit = fastopd.OPDLoss(loss, rule=fastopd.ReleaseRule(k=3, min_gain=-math.inf))
        out = crit.linear(leaves[0], head, ht, wt, y, segment_ids=seg, chunk_size=3)
        w = out.release.weights.double()
    else:
        out = fastopd.linear_opd_loss(leaves[0], head, ht, wt, y, loss=loss, k=3, chunk_size=3)
        w = None
    out.loss.backward()
    mine = [x.clone().requires_grad_(True) for x in (hs, ws, bs)]
    keep = y != -100
    zs = truth.head(truth.valid_rows(mine[0], y), mine[1], mine[2], 0.9, 30.0)
    zt = truth.head(truth.valid_rows(ht, y), wt)
    want, _ = truth.loss(zs, zt, y[keep], loss_name=loss, k=3, weights=None if w is None else w[keep])
    want.backward()
    atol = 1e-8 * (1e4 if kind == "big" else 1)
    _close(out.loss, want.item(), f"{kind} {loss} loss", atol=atol)
    for name, got, ref in zip(("h", "W", "b"), leaves, mine):
        assert not torch.isnan(got.grad).any(), f"{kind} {loss}: NaN in grad {name}"
        _close(got.grad, ref.grad if ref.grad is not None else torch.zeros_like(got), f"{kind} {loss} grad {name}",
               atol=atol)


@pytest.mark.parametrize("kind", ["plain", "nan_ignored"])
def test_linear_token_stats_against_truth(kind):
    hs, ht, ws, bs, wt, y = _hidden_case(kind, 31, "pg")
    got = fastopd.linear_token_stats(hs, fastopd.LMHead(ws, bs), ht, wt, y, k=3, chunk_size=4, full_kl=True)
    zs = truth.head(hs.nan_to_num(0.0), ws, bs)  # ignored rows: their values are not read
    zt = truth.head(ht.nan_to_num(0.0), wt)
    want = truth.token_stats(zs, zt, y, k=3)
    for field, key in (("student_logprobs", "s"), ("margins", "m"), ("reverse_kl", "reverse_kl")):
        _close(getattr(got, field), want[key], f"{kind} {field}")


# ------------------------------------------------------------------------------------------------- §2-4 the rule
@pytest.mark.parametrize("kind", ["plain", "masked", "ties", "big"])
@pytest.mark.parametrize("seed", [0, 1])
def test_release_rule_against_truth(kind, seed):
    g = torch.Generator().manual_seed(seed)
    b, t, v = 3, 24, 11
    zs, zt, _ = make_case(kind, 40 + seed, b=b, t=t, v=v)
    # a prefix the teacher is sure about (big margins), then a suffix it is not: the rule has something to find
    zt[:, : t // 2, 0] += 6.0 if kind != "big" else 6e4
    zs[:, : t // 2, 0] += 6.0 if kind != "big" else 6e4
    y = torch.randint(0, v - 2, (b, t), generator=g)
    y[:, -2:] = -100
    seg = torch.arange(t).div(3, rounding_mode="floor").expand(b, t).contiguous()
    dec = fastopd.ReleaseRule(k=4, min_gain=2.0)(zs, zt, y, seg)
    m = truth.token_stats(zs, zt, y, k=4)["m"]
    w, release, gains = truth.rule(m, seg.numpy(), (y != -100).numpy(), min_gain=2.0)
    assert dec.release_segment.tolist() == release.tolist()
    _close(dec.scan.gain, gains, "gain", rtol=1e-9, atol=1e-6)
    _close(dec.weights, w, "weights", rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_bic_release_and_online_release_against_truth(seed):
    rng = np.random.default_rng(seed)
    series = []
    for _ in range(6):
        n = int(rng.integers(0, 14))
        cut = int(rng.integers(0, n + 1))
        x = np.concatenate([rng.normal(3.0, 0.3, cut), rng.normal(0.0, 0.3, n - cut)])
        if rng.random() < 0.2 and n:
            x[int(rng.integers(0, n))] = math.nan
        series.append(x)
    series.append(np.array([2.0, 2.0, 2.0, 0.0, 0.0, 0.0]))  # exactly constant pieces: RSS 0
    values = np.concatenate(series)
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in series])])
    res = fastopd.bic_release(values, offsets, min_segments=2, min_gain=1.0)
    onl = fastopd.online_release(values, offsets, min_segments=2, min_gain=1.0, confirm_segments=2)
    for i, x in enumerate(series):
        r, g, acc = truth.scan(x.tolist(), 2, 1.0)
        assert (int(res.release_index[i]), bool(res.accepted[i])) == (r, acc), (i, x)
        _close(res.gain[i], g, f"gain {i}", rtol=1e-9, atol=1e-6)
        stop, r, g, acc, stopped = truth.online(x.tolist(), 2, 1.0, 2)
        assert (int(onl.stop_index[i]), int(onl.release_index[i]), bool(onl.accepted[i]), bool(onl.stopped[i])) == (
            stop, r, acc, stopped), (i, x)


def test_sparse_margins_against_truth():
    g = torch.Generator().manual_seed(5)
    n, k, kt = 40, 4, 5
    cands = torch.stack([torch.randperm(12, generator=g)[:k] for _ in range(n)])
    top = torch.stack([torch.randperm(12, generator=g)[:kt] for _ in range(n)])
    lp = torch.log_softmax(torch.randn(n, kt, generator=g, dtype=torch.float64), -1)
    lp[3, 0] = lp[3, 1]  # a tie
    lp[7, 2] = -math.inf
    top[9, 1] = -1  # padding
    got = fastopd.sparse_margins(cands, top, lp, temperature=0.5)
    for i in range(n):
        m, exact = truth.sparse_margin(cands[i].tolist(), top[i].tolist(), lp[i].tolist(), 0.5)
        assert bool(got.exact[i]) == exact, i
        _close(got.margins[i], m, f"position {i}")
