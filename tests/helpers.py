"""Helpers shared by the test files (``tests/conftest.py`` puts this folder on ``sys.path``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastopd import reference

ROOT = Path(__file__).resolve().parent.parent  # the repository root


def loss_inputs(seed, b=2, t=4, v=9, dtype=torch.float64):
    """Random float64 (B, T, V) student/teacher logits, targets (one ignored) and weights in [0, 2)."""
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(b, t, v, generator=g, dtype=dtype)
    zt = torch.randn(b, t, v, generator=g, dtype=dtype)
    y = torch.randint(0, v, (b, t), generator=g)
    y[1, -1] = -100
    w = torch.rand(b, t, generator=g, dtype=dtype) * 2
    return zs, zt, y, w


# ----------------------------------------------------------------------------------------------------------
# The hidden-state path (tests/test_linear.py, tests/kernels/test_linear_chunks.py)
# ----------------------------------------------------------------------------------------------------------


def plain_head(h, w, b, v, scale=1.0, cap=None):
    """The head written out directly (test oracle): softcap(scale (h W[:v]^T + b[:v]))."""
    z = h @ w[:v].T
    if b is not None:
        z = z + b[:v]
    z = z * scale
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    return z


def make_case(seed, *, lead=(3, 7), v=40, vp=None, hs=8, ht=6, ignore_frac=0.2, bias=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    vp = v if vp is None else vp
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    case = dict(
        sh=r(*lead, hs), sw=r(vp, hs) * 0.7, sb=r(vp) if bias else None,
        th=r(*lead, ht), tw=r(vp, ht) * 0.7, tb=r(vp) if bias else None,
    )
    case = {k: (x.to(dtype) if x is not None else None) for k, x in case.items()}
    y = torch.randint(0, v, lead, generator=g)
    y = torch.where(torch.rand(lead, generator=g) < ignore_frac, torch.full_like(y, -100), y)
    case["y"] = y
    case["old"] = (-torch.rand(lead, generator=g, dtype=torch.float64) * 5).to(torch.float32)
    case["w"] = torch.rand(lead, generator=g, dtype=torch.float64).to(torch.float32) * 2
    return case


def leaves(c):
    """Fresh leaves requiring grad: student hidden, weight, (bias)."""
    out = [c["sh"].detach().clone().requires_grad_(), c["sw"].detach().clone().requires_grad_()]
    out.append(None if c["sb"] is None else c["sb"].detach().clone().requires_grad_())
    return out


def grads(loss, ts):
    ts_ = [t for t in ts if t is not None]
    gs = iter(torch.autograd.grad(loss, ts_))
    return [None if t is None else next(gs) for t in ts]


def truth(c, *, v, loss, scale=1.0, cap=None, t_scale=1.0, t_cap=None, weights=None, old=None, normalizer=None, k=4):
    """fp64 loss and grads wrt (h, W, b) by autograd of the reference on plain fp64 logits."""
    h, w, b = (None if t is None else t.detach().double().requires_grad_() for t in (c["sh"], c["sw"], c["sb"]))
    zs = plain_head(h, w, b, v, scale, cap)
    zt = plain_head(c["th"].double(), c["tw"].double(), None if c["tb"] is None else c["tb"].double(), v, t_scale, t_cap)
    out = reference.opd_loss(zs, zt, c["y"], loss=loss, weights=weights, old_logprobs=old, normalizer=normalizer, k=k)
    return out, grads(out.loss, [h, w, b])


def assert_close(name, got, want, *, atol, rtol):
    if want is None:
        assert got is None, name
        return
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{name}: {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs().max().item() if want.numel() else 0.0
    tol = atol + rtol * (want.abs().max().item() if want.numel() else 0.0)
    assert err <= tol, f"{name}: max |error| {err:.3g} > {tol:.3g}"


def linear_segments(shape, seed):
    g = torch.Generator().manual_seed(seed)
    b, l = shape
    steps = (torch.rand(b, l, generator=g) < 0.35).long()
    steps[:, 0] = 0
    return torch.cumsum(steps, dim=1)



class LargestTensor(TorchDispatchMode):
    """Records the largest storage, in elements, behind any tensor an op returns (views count their base,
    zero-storage expanded stand-ins count 1); with ``last_dim``, only tensors whose last dimension has that
    size count."""

    def __init__(self, last_dim: int | None = None):
        super().__init__()
        self.last_dim = last_dim
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and (self.last_dim is None or (t.dim() >= 1 and t.shape[-1] == self.last_dim)):
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


def strict_jsonl(path) -> list:
    """The rows of a JSONL file parsed as strict JSON (RFC 8259): the bare words NaN, Infinity and -Infinity
    that Python's json writes by default raise ValueError (jq, JavaScript and Go refuse them too)."""
    import json

    def refuse(word):
        raise ValueError(f"{path}: not JSON: {word}")

    return [json.loads(line, parse_constant=refuse) for line in Path(path).read_text().splitlines() if line.strip()]
