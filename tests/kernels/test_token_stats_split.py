"""fastopd.kernels.token_stats_split (the split-V stats pass) against the reference, an fp64 ground truth and
the single-pass kernel (docs/formulas.md §1, docs/kernels.md "The split-V pass"); the shared setup is
tests/kernels/kernel_setup.py. Small V (a few hundred to ~2k columns) and small chunks (block_v 32-256) so
that every row has several chunks to split while the interpreter stays fast."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel_setup import *  # noqa: F401,F403  (the interpreter setup, fixtures and helpers)
from fastopd.kernels import token_stats_split as split_mod
from fastopd.kernels.token_stats import stats_launch_config

pytestmark = KERNEL_MARKS

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _run(zs, zt, y, *, splits, **kw):
    return token_stats_triton(zs, zt, y, splits=splits, **kw)


def _chunk(v, k, block_v):
    """(K_PAD, chunk width) of a launch (the interpreter's or the GPU's launch configuration)."""
    cfg = stats_launch_config(v, k, block_v, None, not is_interpreted(_token_stats_kernel))
    return cfg["K_PAD"], cfg["BLOCK_G"] * cfg["GROUP_SIZE"]


def _n_splits(v, k, block_v, splits, device, n=4):
    """The slice count a launch resolves to."""
    return split_mod.resolve_splits(splits, n, v, *_chunk(v, k, block_v), device)


def _check_split_vs_single(split, single, *, full_kl, return_topk, tol=1e-5):
    """Margins and ids exactly equal (the same candidate groups); log-probs and KL to fp32 rounding."""
    assert torch.equal(split.valid, single.valid)
    m1, m2 = split.margins, single.margins
    assert torch.equal(torch.isnan(m1), torch.isnan(m2)), "NaN margins differ"
    assert torch.equal(m1.nan_to_num(0.0), m2.nan_to_num(0.0)), "margins differ from the single pass"
    if return_topk:
        assert torch.equal(split.topk_ids, single.topk_ids), "top-K ids differ from the single pass"
    fields = ["student_logprobs", "teacher_logprobs", "advantages"] + (["reverse_kl"] if full_kl else [])
    for f in fields:
        a, b = getattr(split, f).double(), getattr(single, f).double()
        fin = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), fin), f"{f}: non-finite pattern differs"
        assert torch.equal(a[~fin].nan_to_num(0.0), b[~fin].nan_to_num(0.0)), f"{f}: inf signs differ"
        if bool(fin.any()):
            err = (a - b)[fin].abs().max().item()
            assert err <= tol * (1 + b[fin].abs().max().item()), f"{f}: split vs single {err:.3g}"


# ----------------------------------------------------------------------------------------------------------
# random cases (hypothesis): reference, fp64 truth and the single pass
# ----------------------------------------------------------------------------------------------------------


@st.composite
def _cases(draw):
    block_v = draw(st.sampled_from([64, 128, 256]))
    k = draw(st.sampled_from([2, 5, 16]))
    v = draw(st.integers(max(130, _chunk(2000, k, block_v)[1] + 1), 2000))  # at least two chunks
    return dict(
        n=draw(st.integers(1, 3)), v=v, block_v=block_v, k=k,
        splits=draw(st.sampled_from([2, 3, 4, 7])),
        dtype=draw(st.sampled_from(DTYPES)),
        tau=draw(st.sampled_from([1.0, 0.6, 1.7])),
        kind=draw(st.sampled_from(["normal", "normal", "int", "huge"])),
        ignore=draw(st.sampled_from([0.0, 0.4])),
        full_kl=draw(st.booleans()), return_topk=draw(st.booleans()),
        seed=draw(st.integers(0, 10**6)),
    )


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=_cases())
def test_split_random_cases(device, case):
    gen = torch.Generator().manual_seed(case["seed"])
    shape = (case["n"], case["v"])
    zs = _logits(gen, shape, case["dtype"], device, kind=case["kind"])
    zt = _logits(gen, shape, case["dtype"], device, kind=case["kind"])
    y = _targets(gen, (case["n"],), case["v"], device, ignore_frac=case["ignore"])
    kw = dict(k=case["k"], temperature=case["tau"], full_kl=case["full_kl"], return_topk=case["return_topk"])
    assert _n_splits(case["v"], case["k"], case["block_v"], case["splits"], device) >= 2  # the split pass ran
    got = _run(zs, zt, y, splits=case["splits"], block_v=case["block_v"], **kw)
    ref = reference.token_stats(zs, zt, y, **kw)
    truth = reference.token_stats(zs.double(), zt.double(), y, **kw)
    huge = case["kind"] == "huge"
    _check_stats(got, ref, truth, full_kl=case["full_kl"], return_topk=case["return_topk"],
                 atol=1e-3 if huge else 1e-5)
    single = _run(zs, zt, y, splits=None, block_v=case["block_v"], **kw)
    _check_split_vs_single(got, single, full_kl=case["full_kl"], return_topk=case["return_topk"],
                           tol=1e-4 if huge else 1e-5)


# ----------------------------------------------------------------------------------------------------------
# fixed cases: every feature named once, whatever hypothesis draws
# ----------------------------------------------------------------------------------------------------------

# (n, v, k, dtype, splits, block_v, kind): odd V (not a multiple of the chunk or of the group), K in
# {2, 5, 16}, every dtype, splits in {2, 3, 4, 7}, more splits than chunks, 1e4 logits.
FIXED = [
    (3, 777, 5, torch.float32, 3, 128, "normal"),
    (2, 1999, 16, torch.bfloat16, 7, 256, "normal"),
    (3, 513, 2, torch.float16, 4, 64, "int"),
    (2, 640, 16, torch.float32, 2, 128, "huge"),
    (2, 300, 2, torch.bfloat16, 16, 64, "normal"),  # 16 splits, 5 chunks: clamped to 5
]


@pytest.mark.parametrize("n,v,k,dtype,splits,block_v,kind", FIXED)
def test_split_fixed_cases(device, n, v, k, dtype, splits, block_v, kind):
    gen = torch.Generator().manual_seed(v * 7 + k)
    zs = _logits(gen, (n, v), dtype, device, kind=kind)
    zt = _logits(gen, (n, v), dtype, device, kind=kind)
    y = _targets(gen, (n,), v, device)
    y[-1] = -100  # one ignored row
    kw = dict(k=k, full_kl=True, return_topk=True)
    used = _n_splits(v, k, block_v, splits, device, n)
    chunks = -(-v // _chunk(v, k, block_v)[1])
    assert used == min(splits, chunks) >= 2
    got = _run(zs, zt, y, splits=splits, block_v=block_v, **kw)
    ref = reference.token_stats(zs, zt, y, **kw)
    truth = reference.token_stats(zs.double(), zt.double(), y, **kw)
    _check_stats(got, ref, truth, full_kl=True, return_topk=True, atol=1e-3 if kind == "huge" else 1e-5)
    assert torch.all(got.topk_ids[-1] == -1)
    single = _run(zs, zt, y, splits=1, block_v=block_v, **kw)
    _check_split_vs_single(got, single, full_kl=True, return_topk=True, tol=1e-4 if kind == "huge" else 1e-5)
    # The forward KL through the same merge (acc = sum_i alpha_T,i (acc_i + shift_i sum_T,i)).
    fk, fr, ft, _ = _forward_kl_three_ways(zs, zt, y, k=k, splits=splits, block_v=block_v)
    _check_close("forward_kl", fk, fr, ft, atol=1e-3 if kind == "huge" else 1e-5)
    assert fk[-1].item() == 0.0
    f1 = _forward_kl_three_ways(zs, zt, y, k=k, splits=1, block_v=block_v)[0].double()
    assert (fk.double() - f1).abs().max().item() <= (1e-4 if kind == "huge" else 1e-5) * (1 + f1.abs().max().item())


def test_split_ties_go_to_the_lower_index(device):
    """All-equal rows, five tie classes and bf16-rounded near-ties: the ids follow the lower index across
    slice boundaries (the K-th group of one slice ties with a group of another)."""
    v, k = 300, 16
    zs = torch.zeros(3, v)
    zs[1] = torch.arange(v) % 5
    zs[2] = 1.0 + torch.arange(v) * 1e-4
    zs = zs.to(torch.bfloat16).to(device)
    zt = torch.arange(v, dtype=torch.float32).flip(0).repeat(3, 1).to(torch.bfloat16).to(device)
    y = torch.tensor([0, 5, 299], device=device)
    kw = dict(k=k, full_kl=True, return_topk=True)
    for splits in (3, 7):
        got = _run(zs, zt, y, splits=splits, block_v=32, **kw)
        ref = reference.token_stats(zs, zt, y, **kw)
        truth = reference.token_stats(zs.double(), zt.double(), y, **kw)
        _check_stats(got, ref, truth, full_kl=True, return_topk=True)
        assert torch.equal(got.topk_ids[0].cpu(), torch.arange(k))
        assert torch.equal(got.topk_ids[1].cpu(), torch.tensor([0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55,
                                                                60, 65, 70, 75]) + 4)
        _check_split_vs_single(got, _run(zs, zt, y, splits=1, block_v=32, **kw), full_kl=True, return_topk=True)


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
def test_split_non_finite_rows(device):
    """NaN / +inf logits give a NaN margin as the reference; -inf teacher columns under student mass give
    KL = +inf; -inf student columns drop out; an ignored row with NaN logits is 0."""
    v = 400
    gen = torch.Generator().manual_seed(5)
    zs = torch.randn(6, v, generator=gen) * 2
    zt = torch.randn(6, v, generator=gen) * 2
    zs[0, 333] = float("nan")  # in the last slice
    zt[1, 5] = float("inf")  # in the first slice
    zt[2, ::3] = -float("inf")  # KL = inf
    zs[3, :200] = -float("inf")  # the first slices see only -inf student logits
    zt[3, :200] = -float("inf")
    zs[4, 100] = float("nan")  # ignored row
    y = torch.tensor([1, 2, 3, 250, -100, 7], device=device)
    kw = dict(k=5, full_kl=True, return_topk=False)
    for dtype in (torch.float32, torch.bfloat16):
        a, b = zs.to(dtype).to(device), zt.to(dtype).to(device)
        got = _run(a, b, y, splits=4, block_v=64, **kw)
        ref = reference.token_stats(a, b, y, **kw)
        assert torch.isnan(got.margins[:2]).all() and torch.isnan(ref.margins[:2]).all()
        assert got.reverse_kl[2].item() == float("inf")
        assert got.margins[4].item() == 0.0 and got.student_logprobs[4].item() == 0.0
        finite = [2, 3, 5]
        truth = reference.token_stats(a.double(), b.double(), y, **kw)
        for f in ("student_logprobs", "teacher_logprobs", "margins", "reverse_kl"):
            _check_close(f, getattr(got, f)[finite], getattr(ref, f)[finite], getattr(truth, f)[finite])
        _check_split_vs_single(got, _run(a, b, y, splits=1, block_v=64, **kw), full_kl=True, return_topk=False)


@pytest.mark.parametrize("splits", [1, 2, 3])
def test_forward_kl_edges(device, splits):
    """The forward KL's edge terms, single pass and split: a z_S = -inf column under teacher mass gives +inf
    (row 0, in the last chunk; row 1, in the first, before the teacher's maximum); a -inf teacher column
    under student mass drops out (row 2); and a +inf term whose teacher weight later underflows to 0 (row 3:
    z_S = -inf at column 5 in the first chunk, then a teacher logit 1e4 higher, so p_T(5) = 0 even in fp64)
    gives the finite value, not NaN (0 * inf). 1e4-magnitude logits elsewhere (row 4)."""
    v = 320
    gen = torch.Generator().manual_seed(77)
    zs = torch.randn(5, v, generator=gen, dtype=torch.float64) * 2
    zt = torch.randn(5, v, generator=gen, dtype=torch.float64) * 2
    zs[0, 300] = -float("inf")
    zs[1, 3] = -float("inf")
    zt[1, 250] = 9.0
    zt[2, ::4] = -float("inf")
    zs[3, 5] = -float("inf")
    zt[3, 200] = 1e4
    zs[4] = (torch.rand(v, generator=gen, dtype=torch.float64) * 2 - 1) * 1e4
    zt[4] = (torch.rand(v, generator=gen, dtype=torch.float64) * 2 - 1) * 1e4
    y = torch.tensor([1, 2, 3, 4, 5], device=device)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        a, b = zs.to(dtype).to(device), zt.to(dtype).to(device)
        fk, fr, ft, _ = _forward_kl_three_ways(a, b, y, k=4, splits=splits, block_v=64)
        _check_close("forward_kl", fk, fr, ft, atol=1e-3)
        assert fk[0].item() == fk[1].item() == float("inf"), fk
        assert bool(torch.isfinite(fk[2:]).all()), fk
        if splits > 1:
            assert _n_splits(v, 4, 64, splits, device) == splits


def test_split_all_rows_ignored(device):
    zs = _logits(torch.Generator().manual_seed(1), (2, 3, 200), torch.bfloat16, device)
    y = torch.full((2, 3), -1, device=device)
    got = _run(zs, zs, y, splits=3, block_v=64, k=4, ignore_index=-1, full_kl=True, return_topk=True)
    assert not bool(got.valid.any())
    for f in STAT_FIELDS + ("reverse_kl",):
        assert torch.all(getattr(got, f) == 0), f
    assert torch.all(got.topk_ids == -1) and got.topk_ids.shape == (2, 3, 4)


@pytest.mark.parametrize("loss", ["reverse_kl", "forward_kl"])
def test_split_loss_equals_single_pass(device, loss):
    """opd_loss_triton(splits=...) threads the switch into the forward: same loss and gradient."""
    gen = torch.Generator().manual_seed(9)
    zs = _logits(gen, (3, 300), torch.float32, device)
    zt = _logits(gen, (3, 300), torch.float32, device)
    y = _targets(gen, (3,), 300, device)
    outs = []
    for splits in (None, 3):
        leaf = zs.clone().requires_grad_(True)
        out = opd_loss_triton(leaf, zt, y, loss=loss, k=4, block_v=64, splits=splits)
        out.loss.backward()
        outs.append((out.loss.detach(), leaf.grad, out.stats.margins))
        assert getattr(out.stats, loss) is not None and bool((getattr(out.stats, loss) > 0).all())
    (l1, g1, m1), (l2, g2, m2) = outs
    assert torch.equal(m1, m2)
    assert abs(l1.item() - l2.item()) <= 1e-5 * (1 + abs(l1.item()))
    assert (g1 - g2).abs().max().item() <= 1e-6


# ----------------------------------------------------------------------------------------------------------
# the switch: arguments, the environment variable, the auto heuristic
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -2, 2.0, "fast", True, "4"])
def test_bad_splits_is_a_value_error(device, bad):
    zs = torch.zeros(2, 64, device=device)
    y = torch.zeros(2, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="splits must be None, 'auto' or an int >= 1"):
        token_stats_triton(zs, zs, y, k=4, splits=bad)
    with pytest.raises(ValueError, match="splits"):
        opd_loss_triton(zs.clone().requires_grad_(True), zs, y, k=4, splits=bad)


def test_k_below_two_is_rejected_either_way(device):
    zs = torch.zeros(2, 64, device=device)
    y = torch.zeros(2, dtype=torch.long, device=device)
    for splits in (None, 2):
        with pytest.raises(ValueError, match="k must be >= 2"):
            token_stats_triton(zs, zs, y, k=1, splits=splits)


def test_env_var_sets_the_default(device, monkeypatch):
    monkeypatch.delenv(split_mod.ENV_SPLITS, raising=False)
    assert split_mod.stats_splits_default() == 1
    monkeypatch.setenv(split_mod.ENV_SPLITS, "3")
    assert split_mod.stats_splits_default() == 3
    assert _n_splits(600, 4, 64, None, device) == 3  # splits=None follows the variable
    assert _n_splits(600, 4, 64, 1, device) == 1  # an explicit argument wins
    monkeypatch.setenv(split_mod.ENV_SPLITS, "AUTO")
    assert split_mod.stats_splits_default() == "auto"
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(split_mod.ENV_SPLITS, bad)
        with pytest.raises(ValueError, match=split_mod.ENV_SPLITS):
            split_mod.stats_splits_default()
    zs = torch.zeros(2, 64, device=device)
    with pytest.raises(ValueError, match=split_mod.ENV_SPLITS):
        token_stats_triton(zs, zs, torch.zeros(2, dtype=torch.long, device=device), k=4)


def test_env_var_runs_the_split_pass(device, monkeypatch):
    gen = torch.Generator().manual_seed(4)
    zs = _logits(gen, (2, 500), torch.float32, device)
    zt = _logits(gen, (2, 500), torch.float32, device)
    y = _targets(gen, (2,), 500, device)
    kw = dict(k=4, full_kl=True, return_topk=True, block_v=64)
    monkeypatch.setenv(split_mod.ENV_SPLITS, "4")
    calls = []
    real = split_mod.launch_token_stats_split
    monkeypatch.setattr(split_mod, "launch_token_stats_split",
                        lambda *a, **k: calls.append(k["splits"]) or real(*a, **k))
    got = token_stats_triton(zs, zt, y, **kw)
    assert calls == [4]
    monkeypatch.delenv(split_mod.ENV_SPLITS)
    single = token_stats_triton(zs, zt, y, **kw)
    assert calls == [4]  # the default is the single pass
    _check_split_vs_single(got, single, full_kl=True, return_topk=True)


def test_auto_and_clamps(monkeypatch):
    cpu = torch.device("cpu")
    assert split_mod.auto_splits(5, cpu) == split_mod.AUTO_SPLITS_CPU

    class _Props:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: _Props())
    cuda = torch.device("cuda")
    want = split_mod.AUTO_WAVES * 132 * split_mod.AUTO_CTAS_PER_SM  # 1584 programs
    assert split_mod.auto_splits(16384, cuda) == 1  # the rows alone are enough
    assert split_mod.auto_splits(1024, cuda) == 2
    assert split_mod.auto_splits(100, cuda) == 16
    for n in (1, 7, 333, 1584, 1585):
        s = split_mod.auto_splits(n, cuda)
        assert n * s >= want and (s == 1 or n * (s - 1) < want)
    # clamps: the chunks of the row, MAX_SPLITS, MAX_SPLIT_KEYS // K_PAD
    assert split_mod.resolve_splits(16, 4, 151936, 16, 4096, cuda) == 16
    assert split_mod.resolve_splits("auto", 100, 151936, 16, 4096, cuda) == 16
    assert split_mod.resolve_splits("auto", 100, 20000, 16, 4096, cuda) == 5  # 5 chunks
    assert split_mod.resolve_splits(1000, 4, 10**7, 16, 4096, cuda) == split_mod.MAX_SPLITS
    assert split_mod.resolve_splits(64, 4, 10**7, 256, 4096, cuda) == split_mod.MAX_SPLIT_KEYS // 256
    assert split_mod.resolve_splits(8, 4, 100, 16, 4096, cuda) == 1  # one chunk: the single pass
