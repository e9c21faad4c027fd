"""The Triton kernels (fastopd.kernels) against the reference oracle (DESIGN.md sections 1, 2, 5).

On a machine without a GPU the kernels run under the Triton interpreter: this module sets
``TRITON_INTERPRET=1`` only while it imports ``fastopd.kernels`` (Triton decides "interpreted or compiled"
when a kernel is decorated) and again, through an autouse fixture, while each of its own tests runs (the
dispatcher reads it at call time); it restores the variable otherwise, so other test modules see the
environment they started with. With a GPU the same tests run on CUDA tensors with compiled kernels.

Accuracy is judged the Cut-Cross-Entropy way: the ground truth is the reference on the inputs cast to
fp64 (exact for bf16/fp16/fp32 inputs); the kernel's error against it must stay within twice the error of
the reference run in the input dtype, plus a small absolute tolerance. Top-K ids must match exactly.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

_CUDA = torch.cuda.is_available()
_PREV_INTERPRET = os.environ.get("TRITON_INTERPRET")
_WANT_INTERPRET = (not _CUDA) or _PREV_INTERPRET == "1"
if _WANT_INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    triton = pytest.importorskip("triton")
    import fastopd
    from fastopd import reference
    from fastopd.kernels import opd_loss_triton, segment_sums_triton, token_stats_triton
    from fastopd.kernels._helpers import is_interpreted
    from fastopd.kernels.token_stats import _token_stats_kernel
finally:
    if _PREV_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREV_INTERPRET

_INTERPRETED = is_interpreted(_token_stats_kernel)
if _INTERPRETED and not is_interpreted(triton.language.standard.max):
    # Triton's own jit library (tl.max, tl.topk, ...) is decorated when triton is first imported.
    pytest.skip(
        "triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py imports it under the "
        "interpreter on CPU-only machines); the interpreted kernels cannot run",
        allow_module_level=True,
    )
DEVICES = ["cpu"] if _INTERPRETED else []
if _CUDA and not _INTERPRETED:
    DEVICES.append("cuda")
if not DEVICES:  # kernels were compiled (imported earlier without the interpreter) but there is no GPU
    pytest.skip(
        "fastopd.kernels was imported without TRITON_INTERPRET=1 and no GPU is present", allow_module_level=True
    )

pytestmark = [
    # The interpreter evaluates both sides of tl.where: inf - inf in a discarded lane warns in numpy.
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION:UserWarning"),
]

STAT_FIELDS = ("student_logprobs", "teacher_logprobs", "advantages", "margins")


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    if _INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def _logits(gen, shape, dtype, device, *, scale=3.0, kind="normal"):
    if kind == "normal":
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    elif kind == "int":  # integer-valued: many exact ties
        x = torch.randint(-3, 4, shape, generator=gen).double()
    elif kind == "huge":  # +-1e4 logits
        x = (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * 1e4
    else:
        raise ValueError(kind)
    return x.to(dtype).to(device)


def _targets(gen, shape, v, device, *, ignore_frac=0.0, ignore_index=-100):
    y = torch.randint(0, v, shape, generator=gen)
    if ignore_frac > 0:
        y = torch.where(torch.rand(shape, generator=gen) < ignore_frac, torch.full_like(y, ignore_index), y)
    return y.to(device)


def _check_close(name, got, ref, truth, *, atol=1e-5, rtol=1e-6):
    """|got - truth| <= 2 |ref - truth| + atol + rtol |truth| (max over entries); non-finite entries equal."""
    got, ref, truth = (t.detach().double().cpu() for t in (got, ref, truth))
    assert got.shape == truth.shape, f"{name}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    bad = ~torch.isfinite(truth)
    assert torch.equal(~torch.isfinite(got), bad), f"{name}: non-finite pattern differs from the fp64 truth"
    assert torch.equal(got[bad].nan_to_num(0.0), truth[bad].nan_to_num(0.0)), f"{name}: inf signs differ"
    ok = ~bad
    if not bool(ok.any()):
        return
    err = (got - truth)[ok].abs().max().item()
    ref_err = (ref - truth)[ok].abs().max().item()
    bound = 2 * ref_err + atol + rtol * truth[ok].abs().max().item()
    assert err <= bound, f"{name}: kernel error {err:.3g} > bound {bound:.3g} (reference-in-dtype error {ref_err:.3g})"


def _check_stats(got, ref, truth, *, full_kl, return_topk, atol=1e-5):
    assert torch.equal(got.valid.cpu(), ref.valid.cpu())
    for f in STAT_FIELDS:
        _check_close(f, getattr(got, f), getattr(ref, f), getattr(truth, f), atol=atol)
        assert getattr(got, f).dtype == torch.float32
    invalid = ~got.valid
    for f in STAT_FIELDS:
        assert torch.all(getattr(got, f)[invalid] == 0), f"{f} must be 0 at ignored positions"
    if full_kl:
        _check_close("reverse_kl", got.reverse_kl, ref.reverse_kl, truth.reverse_kl, atol=atol)
        assert torch.all(got.reverse_kl[invalid] == 0)
    else:
        assert got.reverse_kl is None
    if return_topk:
        assert got.topk_ids.dtype == torch.int64
        assert torch.equal(got.topk_ids.cpu(), ref.topk_ids.cpu()), "top-K ids differ from the reference"
    else:
        assert got.topk_ids is None


def _stats_three_ways(zs, zt, y, **kw):
    """(kernel, reference in the input dtype, reference on fp64 inputs = truth)."""
    knobs = {key: kw.pop(key) for key in ("block_v", "group", "topk_impl") if key in kw}
    got = token_stats_triton(zs, zt, y, **kw, **knobs)
    ref = reference.token_stats(zs, zt, y, **kw)
    truth = reference.token_stats(zs.double(), zt.double(), y, **kw)
    return got, ref, truth


# ----------------------------------------------------------------------------------------------------------
# 1. token statistics
# ----------------------------------------------------------------------------------------------------------

# (N, V, k, dtype, temperature, block_v, kind): V from 2 to ~4k incl. non-powers of two and V < block;
# N = 1 and odd N; k in {2, 4, 16, 64} capped at V; several chunks per row where block_v < V.
STATS_CASES = [
    (1, 2, 2, torch.float32, 1.0, None, "normal"),
    (5, 3, 2, torch.bfloat16, 1.0, None, "normal"),
    (7, 17, 4, torch.float16, 0.7, None, "normal"),
    (3, 100, 16, torch.float32, 1.0, 64, "normal"),
    (6, 257, 16, torch.bfloat16, 2.0, 64, "normal"),
    (4, 1000, 64, torch.float32, 1.0, 256, "normal"),
    (9, 1531, 4, torch.bfloat16, 1.0, 256, "int"),
    (3, 4099, 16, torch.float16, 1.0, 1024, "normal"),
    (5, 640, 16, torch.float32, 1.0, 128, "huge"),
    (4, 300, 64, torch.bfloat16, 0.5, 64, "int"),
    (4, 512, 16, torch.float32, 1.0, 128, "normal"),  # V a multiple of the chunk: no masked tail
]


@pytest.mark.parametrize("n,v,k,dtype,tau,block_v,kind", STATS_CASES)
def test_token_stats_matches_reference(device, n, v, k, dtype, tau, block_v, kind):
    gen = torch.Generator().manual_seed(n * 1000 + v)
    zs = _logits(gen, (n, v), dtype, device, kind=kind)
    zt = _logits(gen, (n, v), dtype, device, kind=kind)
    y = _targets(gen, (n,), v, device, ignore_frac=0.3 if n > 2 else 0.0)
    kw = dict(k=k, temperature=tau, full_kl=True, return_topk=True, block_v=block_v)
    got, ref, truth = _stats_three_ways(zs, zt, y, **kw)
    _check_stats(got, ref, truth, full_kl=True, return_topk=True, atol=1e-5 if kind != "huge" else 1e-3)


def _sweep(count, seed):
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        v = rng.choice([2, 5, 31, 64, 129, 500, 1023, 2048, 3001])
        cases.append(dict(
            n=rng.choice([1, 2, 3, 7, 11]), v=v, k=min(rng.choice([2, 4, 16, 64]), v),
            dtype=rng.choice([torch.float32, torch.bfloat16, torch.float16]), tau=rng.choice([1.0, 0.6, 1.7]),
            block_v=rng.choice([None, 32, 128, 512]), kind=rng.choice(["normal", "normal", "int"]),
            ignore=rng.choice([0.0, 0.3]), seed=rng.randrange(10**6),
        ))
    return cases


@pytest.mark.parametrize("case", _sweep(14, seed=2024), ids=lambda c: f"n{c['n']}-v{c['v']}-k{c['k']}-{c['dtype']}")
def test_token_stats_random_sweep(device, case):
    gen = torch.Generator().manual_seed(case["seed"])
    shape = (case["n"], case["v"])
    zs = _logits(gen, shape, case["dtype"], device, kind=case["kind"])
    zt = _logits(gen, shape, case["dtype"], device, kind=case["kind"])
    y = _targets(gen, (case["n"],), case["v"], device, ignore_frac=case["ignore"])
    kw = dict(k=case["k"], temperature=case["tau"], full_kl=True, return_topk=True, block_v=case["block_v"])
    got, ref, truth = _stats_three_ways(zs, zt, y, **kw)
    _check_stats(got, ref, truth, full_kl=True, return_topk=True)


def test_ties_to_lower_index(device):
    """All-equal rows and bf16-rounded near-ties: candidates (and so margins) follow the lower index."""
    v, k = 200, 16
    zs = torch.zeros(3, v)
    zs[1] = torch.arange(v) % 5  # five tie classes
    zs[2] = 1.0 + torch.arange(v) * 1e-4  # distinct in fp32, tied after bf16 rounding
    zs = zs.to(torch.bfloat16).to(device)
    zt = torch.arange(v, dtype=torch.float32).flip(0).repeat(3, 1).to(torch.bfloat16).to(device)
    y = torch.tensor([0, 5, 199], device=device)
    got, ref, truth = _stats_three_ways(zs, zt, y, k=k, full_kl=True, return_topk=True, block_v=64)
    _check_stats(got, ref, truth, full_kl=True, return_topk=True)
    assert torch.equal(got.topk_ids[0].cpu(), torch.arange(k))  # all tied: the k lowest indices


def test_signed_zero_and_one_ulp_steps(device):
    """-0.0 ties with +0.0 (as in torch); chunk maxima 1 ulp apart must still enter the running top-K, and
    later values equal to the running K-th must lose the tie."""
    v, k = 600, 16
    rows = torch.zeros(4, v, dtype=torch.float32)
    rows[0, 1::2] = -0.0  # alternating +0.0 / -0.0: all tied, lowest indices win
    rows[0, 300:] = -1.0
    rows[1] = 1.0 + torch.arange(v, dtype=torch.float32) * 2.0**-23  # strictly increasing by 1 ulp
    rows[2] = rows[1].flip(0)  # strictly decreasing
    rows[3] = torch.arange(v, dtype=torch.float32) % 7  # every later chunk repeats the running K-th value
    zs = rows.to(device)
    zt = _logits(torch.Generator().manual_seed(6), (4, v), torch.float32, device)
    y = torch.tensor([0, 1, 2, 3], device=device)
    got, ref, truth = _stats_three_ways(zs, zt, y, k=k, full_kl=True, return_topk=True, block_v=32)
    _check_stats(got, ref, truth, full_kl=True, return_topk=True)
    assert torch.equal(got.topk_ids[0].cpu(), torch.arange(k))
    assert torch.equal(got.topk_ids[1].cpu(), torch.arange(v - 1, v - 1 - k, -1))


def test_minus_inf_logits(device):
    """-inf columns: p = 0 terms drop out of the KL, a -inf teacher under p_S > 0 gives KL = +inf, -inf
    candidates tie by index, and a1 == a2 == -inf gives a zero margin."""
    v = 90
    gen = torch.Generator().manual_seed(3)
    zs = torch.randn(4, v, generator=gen) * 2
    zt = torch.randn(4, v, generator=gen) * 2
    zs[0, 10:] = -float("inf")  # only 10 finite student logits; k = 16 reaches into the -inf ties
    zt[1, ::3] = -float("inf")  # teacher -inf where the student has mass: KL = inf
    zs[2, ::2] = -float("inf")
    zt[2, ::2] = -float("inf")  # both -inf: no contribution
    zt[3, :] = -float("inf")
    zt[3, 60] = 0.0  # teacher finite only at column 60, which is no candidate
    zs[3, :] = -float("inf")
    zs[3, 40:44] = 1.0  # candidates: 40..43 and the 12 lowest -inf columns; teacher -inf on all: margin 0
    y = torch.tensor([3, 4, 1, 41])  # row 3: u = -inf, A = -inf
    for dtype in (torch.float32, torch.bfloat16):
        a, b = zs.to(dtype).to(device), zt.to(dtype).to(device)
        got, ref, truth = _stats_three_ways(a, b, y.to(device), k=16, full_kl=True, return_topk=True, block_v=32)
        _check_stats(got, ref, truth, full_kl=True, return_topk=True)
        assert got.reverse_kl[1].item() == float("inf")
        assert got.margins[3].item() == 0.0


@pytest.mark.parametrize("frac", [0.0, 0.5, 1.0])
def test_ignore_index_sweep(device, frac):
    gen = torch.Generator().manual_seed(11)
    zs = _logits(gen, (2, 7, 130), torch.bfloat16, device)
    zt = _logits(gen, (2, 7, 130), torch.bfloat16, device)
    y = _targets(gen, (2, 7), 130, device, ignore_frac=frac, ignore_index=-1)
    if frac == 0.0:
        assert bool((y != -1).all())
    got, ref, truth = _stats_three_ways(zs, zt, y, k=4, ignore_index=-1, full_kl=True, return_topk=True, block_v=64)
    _check_stats(got, ref, truth, full_kl=True, return_topk=True)
    assert torch.all(got.topk_ids[y == -1] == 0)
    if frac == 1.0:
        assert not bool(got.valid.any())


@pytest.mark.parametrize("v", [150, 160])
def test_non_contiguous_inputs(device, v):
    """Transposed (L, B, V) views (row offset table; 16-aligned offsets when V = 160), row-strided slices
    and a strided last dim (copied)."""
    gen = torch.Generator().manual_seed(5)
    length, batch = 5, 3
    zs_lbv = _logits(gen, (length, batch, v), torch.bfloat16, device)
    zt_wide = _logits(gen, (batch, length, v + 9), torch.bfloat16, device)
    zs = zs_lbv.transpose(0, 1)  # (B, L, V), leading dims not mergeable
    zt = zt_wide[..., 3:3 + v]  # (B, L, V) with row stride V + 9 and a storage offset
    assert not zs.is_contiguous() and not zt.is_contiguous()
    y = _targets(gen, (batch, length), v, device, ignore_frac=0.2)
    kw = dict(k=16, full_kl=True, return_topk=True)
    got = token_stats_triton(zs, zt, y, block_v=64, **kw)
    ref = reference.token_stats(zs.contiguous(), zt.contiguous(), y, **kw)
    truth = reference.token_stats(zs.double(), zt.double(), y, **kw)
    _check_stats(got, ref, truth, full_kl=True, return_topk=True)
    # last dim with stride != 1: copied once, same answer
    zs_t = zs.contiguous().transpose(-1, -2).contiguous().transpose(-1, -2)
    assert zs_t.stride(-1) != 1
    got2 = token_stats_triton(zs_t, zt, y, block_v=64, **kw)
    for f in STAT_FIELDS + ("reverse_kl", "topk_ids"):
        assert torch.equal(getattr(got2, f), getattr(got, f)), f


def test_vocab_size_cut_with_different_widths(device):
    """Only the first vocab_size columns are read: huge junk beyond them must not change anything."""
    gen = torch.Generator().manual_seed(9)
    v = 211
    zs = _logits(gen, (6, v + 5), torch.float16, device)
    zt = _logits(gen, (6, v + 37), torch.float16, device)
    zs[:, v:] = 6e4
    zt[:, v:] = 6e4
    y = _targets(gen, (6,), v, device)
    got, ref, truth = _stats_three_ways(zs, zt, y, k=16, vocab_size=v, full_kl=True, return_topk=True, block_v=64)
    _check_stats(got, ref, truth, full_kl=True, return_topk=True)
    assert int(got.topk_ids.max()) < v


def test_optional_outputs_off(device):
    gen = torch.Generator().manual_seed(1)
    zs, zt = _logits(gen, (4, 50), torch.float32, device), _logits(gen, (4, 50), torch.float32, device)
    y = _targets(gen, (4,), 50, device)
    got, ref, truth = _stats_three_ways(zs, zt, y, k=8)
    _check_stats(got, ref, truth, full_kl=False, return_topk=False)


def test_gpu_topk_path_and_group_size(device):
    """The compiled path's tl.topk (bitonic) and its default GROUP = 64, here forced in any mode."""
    gen = torch.Generator().manual_seed(21)
    zs = _logits(gen, (3, 700), torch.bfloat16, device, kind="int")
    zt = _logits(gen, (3, 700), torch.bfloat16, device)
    y = _targets(gen, (3,), 700, device)
    kw = dict(k=4, full_kl=True, return_topk=True)
    ref = reference.token_stats(zs, zt, y, **kw)
    truth = reference.token_stats(zs.double(), zt.double(), y, **kw)
    for impl, group in (("bitonic", 16), ("select", 64)):
        got = token_stats_triton(zs, zt, y, block_v=256, group=group, topk_impl=impl, **kw)
        _check_stats(got, ref, truth, full_kl=True, return_topk=True)


def test_dispatch_triton_backend(device):
    gen = torch.Generator().manual_seed(2)
    zs, zt = _logits(gen, (2, 3, 64), torch.bfloat16, device), _logits(gen, (2, 3, 64), torch.bfloat16, device)
    y = _targets(gen, (2, 3), 64, device, ignore_frac=0.3)
    a = fastopd.token_stats(zs, zt, y, k=4, full_kl=True, return_topk=True, backend="triton")
    b = token_stats_triton(zs, zt, y, k=4, full_kl=True, return_topk=True)
    for f in STAT_FIELDS + ("reverse_kl", "topk_ids"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    out = fastopd.opd_loss(zs.float().requires_grad_(), zt, y, k=4, backend="triton")
    ref = reference.opd_loss(zs.float(), zt, y, k=4)
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * (1 + abs(ref.loss.item()))


def test_kernel_argument_errors(device):
    zs = torch.zeros(2, 40, device=device)
    y = torch.zeros(2, dtype=torch.long, device=device)
    with pytest.raises(TypeError, match="student_logits"):
        token_stats_triton(zs.double(), zs, y, k=4)
    with pytest.raises(ValueError, match="k must be <= 256"):
        token_stats_triton(torch.zeros(1, 600, device=device), torch.zeros(1, 600, device=device),
                           torch.zeros(1, dtype=torch.long, device=device), k=300)
    with pytest.raises(ValueError, match="k must be >= 2"):
        token_stats_triton(zs, zs, y, k=1)
    with pytest.raises(ValueError, match="topk_impl"):
        token_stats_triton(zs, zs, y, k=4, topk_impl="heap")


def test_triton_backend_on_cpu_needs_interpreter():
    """backend='triton' with CPU tensors and no TRITON_INTERPRET: the dispatcher's clear ValueError."""
    code = textwrap.dedent(
        """
        import torch, fastopd
        z = torch.zeros(2, 8); y = torch.zeros(2, dtype=torch.long)
        for fn in (fastopd.token_stats, fastopd.opd_loss):
            try:
                fn(z, z, y, k=2, backend="triton")
            except ValueError as e:
                assert "TRITON_INTERPRET" in str(e), str(e)
            else:
                raise SystemExit("no error for " + fn.__name__)
        print("ok")
        """
    )
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr


@pytest.mark.skipif(_CUDA, reason="with a GPU the CUDA tests compile the kernels for real")
def test_kernels_compile_for_sm90(tmp_path):
    """Every kernel variant goes through the real compiler (TTIR -> cubin for sm_90) on this machine: the
    interpreter does not catch compile-only errors (non-constexpr globals, branch type mismatches). The
    ``--check`` gate of CI: no compile error, no spill in a hot variant (scripts/ci_triton_matrix.sh runs the
    same check under the other tested Triton versions)."""
    import json

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this triton wheel ships no ptxas")
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = tmp_path / "aot.json"
    res = subprocess.run([sys.executable, "-m", "fastopd.kernels._aot", "90", "--check", "--json", str(out)],
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    hot = [r for r in rows if r["hot"]]
    assert len(hot) == 12 and len(rows) > len(hot)
    for r in hot:
        assert r["regs"] > 0 and r["stack"] == r["local"] == r["spill_stores"] == 0, r


def test_aot_check_verdicts():
    """What ``python -m fastopd.kernels._aot --check`` fails on, on made-up rows: compile errors anywhere and
    spills in hot variants fail; a spill in a non-hot variant is reported but passes."""
    from fastopd.kernels import _aot

    clean = dict(regs=160, stack=0, shared=1024, local=0, spill_stores=0, spill_loads=0, seconds=1.0)
    rows = [dict(variant="a", hot=True, **clean), dict(variant="b", hot=False, **dict(clean, stack=464,
                                                                                         spill_stores=116))]
    assert _aot.problems(rows) == []
    assert _aot.spills(rows[1]) and not _aot.spills(rows[0])
    spilled = [dict(rows[0], stack=8, spill_stores=1, spill_loads=1)]
    assert _aot.problems(spilled) == ["a: hot variant spills (stack 8 B, local 0 B, 1 STL / 1 LDL)"]
    only_stl = [dict(rows[0], spill_stores=2)]
    assert len(_aot.problems(only_stl)) == 1
    broken = [dict(variant="c", hot=False, seconds=0.1, error="AttributeError: no topk")]
    assert _aot.problems(broken) == ["c: compile error: AttributeError: no topk"]
    assert _aot.problems([dict(variant="d", hot=True, seconds=0.1)]) == ["d: no resource usage from cuobjdump"]
    assert "| a | yes |" in _aot.table(rows) and "compile error" in _aot.table(broken)
    hot = [name for name, _, _, is_hot in _aot.VARIANTS if is_hot]
    assert len(hot) == 12 and {"token_stats bf16 k=16", "token_stats fp32 k=16 full_kl",
                               "loss_backward fp16 reverse_kl"} <= set(hot)


def test_aot_rejects_a_bad_arch(capsys):
    from fastopd.kernels import _aot

    with pytest.raises(SystemExit) as exc:
        _aot.main(["7"])
    assert exc.value.code == 2 and "arch must be a CUDA compute capability" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# 2. segment sums
# ----------------------------------------------------------------------------------------------------------


def test_segment_sums_match_segment_means(device):
    gen = torch.Generator().manual_seed(4)
    b, length = 3, 37
    values = torch.randn(b, length, generator=gen).to(device)
    seg = torch.sort(torch.randint(0, 6, (b, length), generator=gen), dim=1).values.to(device)
    valid = (torch.rand(b, length, generator=gen) > 0.25).to(device)
    seg[0, -3:] = -1  # padding ids are skipped
    valid[0, -3:] = True
    sums, counts = segment_sums_triton(values, seg, valid, num_segments=6)
    assert sums.shape == (b, 6) and counts.dtype == torch.int32
    ref = reference.segment_means(values.cpu(), torch.where(seg < 0, 0, seg).cpu(), (valid & (seg >= 0)).cpu())
    present = counts.cpu() > 0
    means = (sums.cpu().double() / counts.cpu().clamp_min(1).double())[present]
    assert torch.allclose(means, torch.as_tensor(ref.values), atol=1e-6)
    expect_counts = torch.zeros(b, 6, dtype=torch.int64)
    ok = (valid & (seg >= 0)).cpu()
    for i in range(b):
        expect_counts[i] = torch.bincount(seg.cpu()[i][ok[i]], minlength=6)
    assert torch.equal(counts.cpu().long(), expect_counts)
    with pytest.raises(ValueError, match="num_segments"):
        segment_sums_triton(values, seg, valid, num_segments=2)


# ----------------------------------------------------------------------------------------------------------
# 3. loss and gradient
# ----------------------------------------------------------------------------------------------------------


def _loss_three_ways(zs, zt, y, g, *, inplace=False, **kw):
    """Run kernel / reference-in-dtype / fp64 truth; backprop loss + <per_token, g>; return outputs and grads."""
    knobs = {key: kw.pop(key) for key in ("block_v",) if key in kw}
    results = []
    for impl, s_in, t_in, o_in in (
        ("kernel", zs, zt, kw.get("old_logprobs")),
        ("ref", zs, zt, kw.get("old_logprobs")),
        ("truth", zs.double(), zt.double(), None if kw.get("old_logprobs") is None else kw["old_logprobs"].double()),
    ):
        args = dict(kw, old_logprobs=o_in)
        if impl == "truth" and args.get("weights") is not None:
            args["weights"] = args["weights"].double()
        leaf = s_in.detach().clone().requires_grad_(True)
        x = leaf * 1  # a non-leaf buffer, as logits from lm_head are
        if impl == "kernel":
            out = opd_loss_triton(x, t_in, y, inplace_backward=inplace, **args, **knobs)
        else:
            out = reference.opd_loss(x, t_in, y, **args)
        (out.loss + (out.per_token * g.to(out.per_token.dtype)).sum()).backward()
        results.append((out, leaf.grad))
    return results


LOSS_CASES = [
    # (loss, dtype, tau, with weights, with old_logprobs, normalizer)
    ("pg", torch.float32, 1.0, False, False, None),
    ("pg", torch.bfloat16, 0.7, True, True, 7.5),
    ("pg", torch.float16, 1.0, True, False, None),
    ("reverse_kl", torch.float32, 1.3, True, False, None),
    ("reverse_kl", torch.bfloat16, 1.0, False, False, 3.0),
]


@pytest.mark.parametrize("loss,dtype,tau,use_w,use_old,normalizer", LOSS_CASES)
def test_loss_and_gradient_match_reference(device, loss, dtype, tau, use_w, use_old, normalizer):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{loss}-{dtype}-{tau}".encode()))  # not hash(): salted
    n, v = 9, 300
    zs = _logits(gen, (n, v), dtype, device)
    zt = _logits(gen, (n, v), dtype, device)
    y = _targets(gen, (n,), v, device, ignore_frac=0.25)
    weights = torch.rand(n, generator=gen).to(device) * 2 if use_w else None
    if weights is not None:
        weights[0] = 0.0  # a dropped token: its row of the gradient is exactly 0
    old = (torch.randn(n, generator=gen) - 4).to(device) if use_old else None
    g = torch.randn(n, generator=gen).to(device)
    (ko, kg), (ro, rg), (to, tg) = _loss_three_ways(
        zs, zt, y, g, weights=weights, old_logprobs=old, loss=loss, temperature=tau, normalizer=normalizer,
        k=4, block_v=128,
    )
    _check_close("loss", ko.loss, ro.loss, to.loss)
    _check_close("per_token", ko.per_token, ro.per_token, to.per_token)
    _check_close("advantages", ko.stats.advantages, ro.stats.advantages, to.stats.advantages)
    _check_close("margins", ko.stats.margins, ro.stats.margins, to.stats.margins)
    assert kg.dtype == dtype and kg.shape == zs.shape
    _check_close("grad", kg, rg, tg, atol=1e-6)
    assert torch.all(kg[~ko.stats.valid] == 0)
    if weights is not None and bool(ko.stats.valid[0]):
        assert torch.all(kg[0] == 0)
    assert set(ko.metrics) == set(ro.metrics)
    for key, val in ro.metrics.items():
        assert ko.metrics[key] == pytest.approx(val, rel=1e-4, abs=1e-5), key


def _loss_sweep(count, seed):
    rng = random.Random(seed)
    return [
        dict(loss=rng.choice(["pg", "reverse_kl"]), v=rng.choice([3, 40, 257, 1100]), n=rng.choice([1, 4, 9]),
             dtype=rng.choice([torch.float32, torch.bfloat16, torch.float16]), tau=rng.choice([1.0, 0.8, 2.0]),
             weights=rng.random() < 0.5, old=rng.random() < 0.5, normalizer=rng.choice([None, 5.0]),
             block_v=rng.choice([None, 64, 256]), seed=rng.randrange(10**6))
        for _ in range(count)
    ]


@pytest.mark.parametrize("case", _loss_sweep(8, seed=7), ids=lambda c: f"{c['loss']}-v{c['v']}-n{c['n']}-{c['dtype']}")
def test_loss_random_sweep(device, case):
    gen = torch.Generator().manual_seed(case["seed"])
    n, v = case["n"], case["v"]
    zs, zt = _logits(gen, (n, v), case["dtype"], device), _logits(gen, (n, v), case["dtype"], device)
    y = _targets(gen, (n,), v, device, ignore_frac=0.2)
    weights = torch.rand(n, generator=gen).to(device) if case["weights"] else None
    old = (torch.randn(n, generator=gen) - 3).to(device) if case["old"] and case["loss"] == "pg" else None
    g = torch.randn(n, generator=gen).to(device)
    (ko, kg), (ro, rg), (to, tg) = _loss_three_ways(
        zs, zt, y, g, weights=weights, old_logprobs=old, loss=case["loss"], temperature=case["tau"],
        normalizer=case["normalizer"], k=min(4, v), block_v=case["block_v"],
    )
    _check_close("loss", ko.loss, ro.loss, to.loss)
    _check_close("per_token", ko.per_token, ro.per_token, to.per_token)
    _check_close("grad", kg, rg, tg, atol=1e-6)


@pytest.mark.parametrize("loss", ["pg", "reverse_kl"])
def test_inplace_backward_and_vocab_cut(device, loss):
    """In-place gradient equals the out-of-place one; columns >= vocab_size get exactly 0; teacher no grad."""
    gen = torch.Generator().manual_seed(8)
    v = 180
    zs = _logits(gen, (2, 4, v + 12), torch.bfloat16, device)
    zt = _logits(gen, (2, 4, v + 3), torch.bfloat16, device)
    y = _targets(gen, (2, 4), v, device, ignore_frac=0.2)
    grads = []
    for inplace in (False, True):
        leaf = zs.detach().clone().requires_grad_(True)
        teacher = zt.detach().clone().requires_grad_(True)
        x = leaf * 1
        out = opd_loss_triton(x, teacher, y, loss=loss, k=4, vocab_size=v, inplace_backward=inplace, block_v=64)
        per_token_before = out.per_token.detach().clone()
        out.loss.backward()
        assert teacher.grad is None
        assert torch.equal(out.per_token.detach(), per_token_before)
        if inplace:
            assert torch.equal(x.detach(), leaf.grad)  # the logits buffer now holds the gradient
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])
    assert torch.all(grads[0][..., v:] == 0)
    ref_leaf = zs.detach().clone().requires_grad_(True)
    ref = reference.opd_loss(ref_leaf * 1, zt, y, loss=loss, k=4, vocab_size=v)
    ref.loss.backward()
    truth_leaf = zs.detach().double().requires_grad_(True)
    reference.opd_loss(truth_leaf * 1, zt.double(), y, loss=loss, k=4, vocab_size=v).loss.backward()
    _check_close("grad", grads[0], ref_leaf.grad, truth_leaf.grad, atol=1e-6)


def test_per_token_is_differentiable(device):
    """A caller's own reduction of per_token: only the rows it touches get a gradient."""
    gen = torch.Generator().manual_seed(12)
    zs = _logits(gen, (5, 128), torch.float32, device)
    zt = _logits(gen, (5, 128), torch.float32, device)
    y = _targets(gen, (5,), 128, device)
    leaf = zs.clone().requires_grad_(True)
    out = opd_loss_triton(leaf, zt, y, loss="reverse_kl", k=4, block_v=64)  # two full chunks, no tail
    (out.per_token[1] * 3.0).backward()
    ref_leaf = zs.clone().requires_grad_(True)
    (reference.opd_loss(ref_leaf, zt, y, loss="reverse_kl", k=4).per_token[1] * 3.0).backward()
    assert torch.all(leaf.grad[[0, 2, 3, 4]] == 0)
    assert torch.allclose(leaf.grad, ref_leaf.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not _CUDA or _INTERPRETED, reason="needs a GPU: N * V > 2**31 elements")
def test_int64_offsets_cuda():
    """Rows beyond 2**31 elements into the buffer: offsets must be int64."""
    n, v = 16400, 131072 + 16
    assert n * v > 2**31
    zs = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    zt = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(0, v, (n,), device="cuda")
    got = token_stats_triton(zs, zt, y, k=16, full_kl=True, return_topk=True)
    tail = slice(n - 3, n)
    kw = dict(k=16, full_kl=True, return_topk=True)
    ref = reference.token_stats(zs[tail], zt[tail], y[tail], **kw)
    truth = reference.token_stats(zs[tail].double(), zt[tail].double(), y[tail], **kw)
    sliced = type(got)(**{f: (getattr(got, f)[tail] if getattr(got, f) is not None else None)
                          for f in ("student_logprobs", "teacher_logprobs", "advantages", "margins", "valid",
                                    "reverse_kl", "topk_ids")})
    _check_stats(sliced, ref, truth, full_kl=True, return_topk=True)


def test_public_inplace_backward_reaches_the_kernel(device):
    """fastopd.OPDLoss(..., inplace_backward=True) forwards the option: the logits buffer holds the gradient."""
    gen = torch.Generator().manual_seed(21)
    zs = _logits(gen, (3, 5, 96), torch.float32, device)
    zt = _logits(gen, (3, 5, 96), torch.float32, device)
    y = _targets(gen, (3, 5), 96, device, ignore_frac=0.2)
    grads = []
    for inplace in (False, True):
        leaf = zs.detach().clone().requires_grad_(True)
        x = leaf * 1
        crit = fastopd.OPDLoss(k=4, backend="triton", inplace_backward=inplace)
        crit(x, zt, y).loss.backward()
        assert torch.equal(x.detach(), leaf.grad) == inplace
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])


def test_opdloss_with_rule_on_the_kernels(device):
    """OPDLoss(rule=...) weights the kernels' per-token loss after the forward: same loss, weights and
    gradient as the reference path."""
    gen = torch.Generator().manual_seed(22)
    zs = _logits(gen, (2, 12, 70), torch.float32, device)
    zt = _logits(gen, (2, 12, 70), torch.float32, device)
    y = _targets(gen, (2, 12), 70, device, ignore_frac=0.1)
    seg = torch.arange(12, device=device).div(3, rounding_mode="floor").repeat(2, 1)
    results = []
    for backend in ("triton", "reference"):
        leaf = zs.detach().clone().requires_grad_(True)
        rule = fastopd.ReleaseRule(k=4, min_gain=-float("inf"), min_segments=1)
        out = fastopd.OPDLoss(k=4, backend=backend, rule=rule)(leaf, zt, y, segment_ids=seg)
        out.loss.backward()
        results.append((out, leaf.grad))
    (kt, gt), (kr, gr) = results
    assert torch.equal(kt.release.weights, kr.release.weights)
    torch.testing.assert_close(kt.loss, kr.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gt, gr, rtol=1e-4, atol=1e-6)
