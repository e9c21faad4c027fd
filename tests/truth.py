"""The formulas of docs/formulas.md written out once more, in float64, for the tests only.

This module does not import fastopd: on a CPU the public functions run :mod:`fastopd.reference`, so a test that
compared them with the reference would compare a function with itself (issue 22). Here every quantity is
written from the document directly and in the plainest way -- one row at a time, Python loops over rows,
sorting for the top-K, the BIC's RSS from two-pass means instead of prefix sums -- and the gradients are
torch.autograd of these formulas in float64. Rows that are not valid are never touched (not even indexed into
a computation), which is the contract (§1: ignored rows are never read).
"""

from __future__ import annotations

import math

import numpy as np
import torch

BIC_EPS = 1e-12


# ----------------------------------------------------------------------------------------------------------
# §1 token statistics, one row at a time
# ----------------------------------------------------------------------------------------------------------


def log_softmax_row(z: torch.Tensor, tau: float) -> torch.Tensor:
    """log softmax(z / tau) of one float64 row (autograd-friendly; -inf entries give -inf)."""
    x = z / tau
    return x - torch.logsumexp(x, dim=-1)


def row_has_logsoftmax(z: torch.Tensor) -> bool:
    """§1: a row has a log-softmax when no entry is NaN or +inf and some entry is finite."""
    return not bool(torch.isnan(z).any()) and not bool((z == math.inf).any()) and bool(torch.isfinite(z).any())


def candidates(zs_row: torch.Tensor, k: int) -> list[int]:
    """C_t: the k largest student logits, ties to the lower vocabulary index (by sorting (-z, index))."""
    vals = zs_row.tolist()
    return sorted(range(len(vals)), key=lambda v: (-vals[v], v))[:k]


def margin(zs_row: torch.Tensor, zt_row: torch.Tensor, k: int, tau: float) -> float:
    """m_t = (z_T[a1] - z_T[a2]) / tau over C_t; 0 when a1 == a2 (both -inf included); NaN without a log-softmax."""
    if not (row_has_logsoftmax(zs_row) and row_has_logsoftmax(zt_row)):
        return math.nan
    t = sorted((zt_row[c].item() for c in candidates(zs_row, k)), reverse=True)
    a1, a2 = t[0], t[1]
    return 0.0 if a1 == a2 else (a1 - a2) / tau


def kl_row(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """sum over v with p_a(v) > 0 of p_a(v) (la(v) - lb(v)) (terms with p_a = 0 are left out, not computed)."""
    p = la.exp()
    keep = p > 0
    return (p[keep] * (la[keep] - lb[keep])).sum()


def token_stats(zs, zt, y, *, k, tau=1.0, ignore_index=-100, vocab_size=None):
    """Per-token s, u, A, m, reverse KL, forward KL as float64 arrays of y's shape (0 where not valid)."""
    v = vocab_size or zs.shape[-1]
    zs = zs[..., :v].detach().double().reshape(-1, v)
    zt = zt[..., :v].detach().double().reshape(-1, v)
    yf = y.reshape(-1)
    out = {name: np.zeros(yf.numel()) for name in ("s", "u", "A", "m", "reverse_kl", "forward_kl")}
    for t in range(yf.numel()):
        if int(yf[t]) == ignore_index:
            continue
        ls, lt = log_softmax_row(zs[t], tau), log_softmax_row(zt[t], tau)
        s, u = ls[int(yf[t])].item(), lt[int(yf[t])].item()
        ok = row_has_logsoftmax(zs[t]) and row_has_logsoftmax(zt[t])
        out["s"][t], out["u"][t], out["A"][t] = s, u, u - s
        out["m"][t] = margin(zs[t], zt[t], k, tau)
        out["reverse_kl"][t] = kl_row(ls, lt).item() if ok else math.nan
        out["forward_kl"][t] = kl_row(lt, ls).item() if ok else math.nan
    return {name: a.reshape(tuple(y.shape)) for name, a in out.items()}


# ----------------------------------------------------------------------------------------------------------
# §5 the loss, by autograd in float64
# ----------------------------------------------------------------------------------------------------------


def loss(zs, zt, y, *, loss_name, k=16, tau=1.0, ignore_index=-100, weights=None, old_logprobs=None,
         normalizer=None):
    """(scalar loss, per-token list) of §5 for float64 student logits ``zs`` (the graph's leaf or a function of
    it); only valid rows are read. ``weights`` None: w = valid."""
    v = zs.shape[-1]
    zs2, zt2 = zs.reshape(-1, v), zt.detach().double().reshape(-1, v)
    yf = y.reshape(-1)
    per_token = []
    total = zs2.new_zeros(())
    n_valid = 0
    for t in range(yf.numel()):
        if int(yf[t]) == ignore_index:
            per_token.append(0.0)
            continue
        n_valid += 1
        w = 1.0 if weights is None else float(weights.reshape(-1)[t])
        ls, lt = log_softmax_row(zs2[t], tau), log_softmax_row(zt2[t], tau)
        if loss_name == "pg":
            s = ls[int(yf[t])]
            s_old = s.detach() if old_logprobs is None else torch.tensor(float(old_logprobs.reshape(-1)[t]),
                                                                         dtype=torch.float64)
            adv = lt[int(yf[t])].detach() - s_old
            term = -w * adv * torch.exp(s - s_old)
        elif loss_name == "reverse_kl":
            term = w * kl_row(ls, lt)
        else:
            term = w * kl_row(lt, ls)
        per_token.append(term.item())
        total = total + term
    denom = max(n_valid, 1) if normalizer is None else normalizer
    return total / denom, per_token


def head(h, weight, bias=None, scale=1.0, softcap=None):
    """§6: z = softcap(scale (h W^T + b)), softcap(x) = c tanh(x / c)."""
    z = h @ weight.T
    if bias is not None:
        z = z + bias
    z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def valid_rows(x: torch.Tensor, y: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The rows of ``x`` (..., D) at valid positions, (N_valid, D): what the formulas may read."""
    return x.reshape(-1, x.shape[-1])[(y.reshape(-1) != ignore_index)]


# ----------------------------------------------------------------------------------------------------------
# §2-4 segment means, the BIC scan, the weights
# ----------------------------------------------------------------------------------------------------------


def segment_means(values, segment_ids, valid):
    """Per rollout: [(segment id, mean of the values of its valid tokens)], segments in increasing id order."""
    values, seg, ok = np.asarray(values, dtype=np.float64), np.asarray(segment_ids), np.asarray(valid, dtype=bool)
    rows = []
    for b in range(values.shape[0]):
        ids = sorted(set(seg[b][ok[b]].tolist()))
        rows.append([(g, float(np.mean(values[b][ok[b] & (seg[b] == g)]))) for g in ids])
    return rows


def rss(x: list[float]) -> float:
    """Residual sum of squares around the mean, two passes."""
    if not x:
        return 0.0
    mu = sum(x) / len(x)
    return sum((v - mu) ** 2 for v in x)


def scan(x: list[float], m: int = 2, min_gain: float = 10.0) -> tuple[int, float, bool]:
    """§3 for one series: (release index r, gain, accepted)."""
    n = len(x)
    if any(not math.isfinite(v) for v in x):
        return n, math.nan, False
    if n < 2 * m:
        return n, -math.inf, False
    bic0 = n * math.log(rss(x) / n + BIC_EPS) + 2 * math.log(n)
    best = None
    for tau in range(m, n - m + 1):
        left, right = x[:tau], x[tau:]
        if sum(right) / len(right) < sum(left) / len(left):
            bic1 = n * math.log((rss(left) + rss(right)) / n + BIC_EPS) + 4 * math.log(n)
            if best is None or bic1 < best[1]:
                best = (tau, bic1)
    if best is None:
        return n, -math.inf, False
    gain = bic0 - best[1]
    return (best[0] if gain > min_gain else n), gain, bool(gain > min_gain)


def online(x: list[float], m: int = 2, min_gain: float = 10.0, c: int = 2) -> tuple[int, int, float, bool, bool]:
    """§8 for one series: (stop index, release index, gain, accepted, stopped)."""
    for n_prefix in range(1, len(x) + 1):
        r, g, acc = scan(x[:n_prefix], m, min_gain)
        if acc and n_prefix - r >= c:
            return n_prefix, r, g, acc, True
    r, g, acc = scan(x, m, min_gain)
    return len(x), r, g, acc, False


def weights(segment_ids, valid, release_segment) -> np.ndarray:
    """§4: w_t = valid_t [g_t < r] L / L_kept per rollout (0 where nothing is kept)."""
    seg, ok = np.asarray(segment_ids), np.asarray(valid, dtype=bool)
    w = np.zeros(seg.shape)
    for b in range(seg.shape[0]):
        kept = ok[b] & (seg[b] < release_segment[b])
        if kept.sum():
            w[b][kept] = ok[b].sum() / kept.sum()
    return w


def rule(margins, segment_ids, valid, m: int = 2, min_gain: float = 10.0):
    """The release rule end to end: (weights, release segment per rollout, gains)."""
    release, gains = [], []
    for entries in segment_means(margins, segment_ids, valid):
        r, g, _ = scan([mean for _, mean in entries], m, min_gain)
        release.append(entries[r][0] if r < len(entries) else (entries[-1][0] + 1 if entries else 0))
        gains.append(g)
    return weights(segment_ids, valid, release), np.array(release), np.array(gains)


# ----------------------------------------------------------------------------------------------------------
# §7 sparse margins
# ----------------------------------------------------------------------------------------------------------


def sparse_margin(cands: list[int], top: list[int], lp: list[float], tau: float = 1.0) -> tuple[float, bool]:
    """One position of §7: (m_t or its lower bound, exact)."""
    pairs = {i: p for i, p in zip(top, lp) if i >= 0}
    if any(math.isnan(p) or p == math.inf for p in pairs.values()):
        return math.nan, False
    inside = sorted((pairs[c] for c in cands if c >= 0 and c in pairs), reverse=True)
    if len(inside) >= 2:
        return (0.0 if inside[0] == inside[1] else (inside[0] - inside[1]) / tau), True
    if len(inside) == 1:
        return (inside[0] - min(pairs.values())) / tau, False
    return 0.0, False
