"""The profiled RSS-BIC release scan (docs/formulas.md §3): the Python reference against an independent
brute force, and the C++ scan (``fastopd._C.bic_scan`` behind ``fastopd.bic_release``) against the reference,
bit for bit.

The C++ scan follows the reference's floating-point operation order exactly (see csrc/bic_scan.cpp), so the
comparisons between the two use exact equality: ``np.testing.assert_array_equal`` (NaN == NaN, -inf == -inf)
and, for the gains, equality of the bit patterns (so 0.0 and -0.0 would differ too).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastopd
from fastopd import reference

try:
    from fastopd import _C
except ImportError as exc:  # pragma: no cover - the extension must be built for this file
    raise ImportError(
        "fastopd._C is not built: run `pip install -e . --no-build-isolation` "
        "(or `python setup.py build_ext --inplace`) first"
    ) from exc

EPS = 1e-12
MIN_SEGMENTS = (1, 2, 3, 5)
MIN_GAINS = (-math.inf, 0.0, 10.0, 1e6)


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def ragged(series: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate a list of 1-D series into (values float64, offsets int64 of length B+1)."""
    lengths = [len(s) for s in series]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.concatenate([np.asarray(s, dtype=np.float64) for s in series]) if series else np.zeros(0)
    return values.astype(np.float64), offsets


def assert_same(got, want) -> None:
    """Exact equality of two scan results ((release, gain, accepted) tuples or ReleaseResults)."""
    g_rel, g_gain, g_acc = (got.release_index, got.gain, got.accepted) if hasattr(got, "gain") else got
    w_rel, w_gain, w_acc = (want.release_index, want.gain, want.accepted) if hasattr(want, "gain") else want
    assert g_rel.dtype == np.int64 and g_gain.dtype == np.float64 and g_acc.dtype == np.bool_
    np.testing.assert_array_equal(g_rel, w_rel)
    np.testing.assert_array_equal(g_acc, w_acc)
    np.testing.assert_array_equal(g_gain, w_gain)  # NaN == NaN, -inf == -inf
    both = ~np.isnan(w_gain)
    np.testing.assert_array_equal(g_gain[both].view(np.uint64), w_gain[both].view(np.uint64))


KINDS = (
    "normal", "ties", "near_ties", "constant", "step", "down_ramp", "huge", "huge_same", "tiny", "mixed",
    "negative", "nonfinite",
)


def make_series(rng: np.random.Generator, kind: str, n: int) -> np.ndarray:
    """One series of length n of the given kind (see KINDS)."""
    if kind == "normal":
        return rng.normal(size=n) * 10.0 ** rng.uniform(-3, 3) + rng.normal() * 10.0
    if kind == "ties":  # values from a tiny set: many exactly equal means and RSS values
        return rng.integers(0, 3, size=n).astype(np.float64)
    if kind == "near_ties":  # a tiny set plus perturbations of 1e-15..1e-9: BIC1 values a few ulp apart
        jitter = rng.choice([0.0, 1e-15, 1e-13, 1e-11, 1e-9], size=n) * rng.integers(-1, 2, size=n)
        return (rng.integers(0, 3, size=n) + jitter) * rng.choice([1.0, 1e-5, 1e5, 3.3])
    if kind == "constant":
        return np.full(n, rng.choice([0.1, -3.7, 1.0 / 3.0, 0.0, 7.0, 1e300, -1e-300, 2.5e-8]))
    if kind == "step":  # some are accepted, some not, some step upwards
        cut = int(rng.integers(0, n + 1))
        hi, lo = rng.normal() * 3.0, rng.normal() * 3.0 - rng.uniform(-2.0, 8.0)
        return np.where(np.arange(n) < cut, hi, lo) + rng.normal(size=n) * rng.choice([1e-3, 0.1, 1.0, 3.0])
    if kind == "down_ramp":
        return np.linspace(5.0, 0.0, n) + rng.normal(size=n) * 0.05
    if kind == "huge":  # 1e150..1e300 with both signs: squares and sums overflow
        return rng.choice([-1.0, 1.0], size=n) * 10.0 ** rng.uniform(150, 300, size=n)
    if kind == "huge_same":  # all ~1e300: the total itself overflows to inf
        return 1e300 * (1.0 + rng.uniform(0, 0.5, size=n))
    if kind == "tiny":  # 1e-300 and below (subnormal squares)
        return rng.normal(size=n) * 10.0 ** rng.uniform(-320, -290, size=n)
    if kind == "mixed":
        return rng.normal(size=n) * 10.0 ** rng.uniform(-300, 300, size=n)
    if kind == "negative":
        return -np.abs(rng.normal(size=n)) * 10.0 - 100.0
    if kind == "nonfinite":
        x = rng.normal(size=n)
        if n:
            x[rng.integers(0, n)] = rng.choice([np.nan, np.inf, -np.inf])
        return x
    raise AssertionError(kind)


def random_length(rng: np.random.Generator, m: int) -> int:
    """Lengths around the interesting boundaries (0, 1, 2m-1, 2m, 2m+1) or anything up to 60."""
    if rng.random() < 0.5:
        return int(rng.choice([0, 1, max(2 * m - 1, 0), 2 * m, 2 * m + 1]))
    return int(rng.integers(0, 61))


def random_batch(rng: np.random.Generator, m: int) -> tuple[np.ndarray, np.ndarray]:
    b = int(rng.integers(0, 9))
    return ragged([make_series(rng, str(rng.choice(KINDS)), random_length(rng, m)) for _ in range(b)])


# ----------------------------------------------------------------------------------------------------------
# reference vs an independent brute force (straight from the definition, numpy, no prefix sums)
# ----------------------------------------------------------------------------------------------------------


def brute_force(x: np.ndarray, m: int, min_gain: float):
    """(release, gain, accepted, bic1 by tau, ambiguous) straight from docs/formulas.md §3.

    ``ambiguous`` is True when some split's two means are so close that the downward test may go either way
    between two correct implementations (the piece means of this brute force and the reference's centred
    prefix-sum means can differ in the last bits).
    """
    n = len(x)
    if not np.all(np.isfinite(x)):
        return n, math.nan, False, {}, False
    if n < 2 * m:
        return n, -math.inf, False, {}, False

    def rss(piece):
        return float(np.sum((piece - piece.mean()) ** 2))

    bic0 = n * math.log(rss(x) / n + EPS) + 2 * math.log(n)
    bic1 = {}
    ambiguous = False
    for tau in range(m, n - m + 1):
        left, right = x[:tau].mean(), x[tau:].mean()
        if abs(left - right) <= 1e-12 * (1.0 + abs(left) + abs(right)):
            ambiguous = True
        if right < left:
            bic1[tau] = n * math.log((rss(x[:tau]) + rss(x[tau:])) / n + EPS) + 4 * math.log(n)
    if not bic1:
        return n, -math.inf, False, bic1, ambiguous
    tau = min(bic1, key=lambda t: (bic1[t], t))
    gain = bic0 - bic1[tau]
    accepted = gain > min_gain
    return (tau if accepted else n), gain, accepted, bic1, ambiguous


def test_reference_matches_brute_force():
    """Same tau / accepted, gain within the rounding error of the prefix-sum RSS.

    The reference gets RSS(a,b) from prefix sums of the centred series, so its RSS carries an absolute error
    of a few ulp of the total sum of squares S = sum (x - mean)^2; through n ln(RSS/n + eps) that is a gain
    error of about n * err / (RSS + n eps), which is not small when the best split's RSS is ~0 (pieces of
    one value). The tolerance below is that bound with a generous err = 1e-13 S, plus 1e-9 relative.
    """
    rng = np.random.default_rng(1234)
    compared = accepted_seen = 0
    for case in range(400):
        m = int(rng.choice(MIN_SEGMENTS))
        n = int(rng.integers(2 * m, 31))
        kind = ("normal", "step", "down_ramp", "negative")[case % 4]
        x = make_series(rng, kind, n)
        min_gain = float(rng.choice([10.0, -math.inf, 0.0]))
        b_rel, b_gain, b_acc, bic1, ambiguous = brute_force(x, m, min_gain)
        r_rel, r_gain, r_acc = reference._scan_one(x.tolist(), m, min_gain)
        if ambiguous:
            continue
        compared += 1
        if math.isinf(b_gain):
            assert r_gain == b_gain and r_rel == n and not r_acc, (case, x)
            continue
        err = 1e-13 * float(np.sum((x - x.mean()) ** 2))
        rss_best = n * (math.exp((min(bic1.values()) - 4 * math.log(n)) / n) - EPS)
        rss_all = n * (math.exp((b_gain + min(bic1.values()) - 2 * math.log(n)) / n) - EPS)
        tol = n * err / (max(rss_best, 0.0) + n * EPS) + n * err / (max(rss_all, 0.0) + n * EPS)
        tol += 1e-9 * max(1.0, abs(b_gain))
        assert abs(r_gain - b_gain) <= tol, (case, x, r_gain, b_gain, tol)
        near_threshold = abs(b_gain - min_gain) <= tol
        if not near_threshold:
            assert r_acc == b_acc, (case, x)
        accepted_seen += bool(r_acc)
        if r_rel != b_rel and r_acc and b_acc:
            # Only a near tie of the two BIC1 values may pick another tau.
            assert abs(bic1[r_rel] - bic1[b_rel]) <= tol, (case, x)
        elif not near_threshold:
            assert r_rel == b_rel, (case, x)
    assert compared >= 350
    assert 50 <= accepted_seen <= compared - 50  # both outcomes are exercised


def test_brute_force_sanity():
    """The brute force itself on a case worked out by hand: [2]*10 + [0]*30, m = 2."""
    x = np.array([2.0] * 10 + [0.0] * 30)
    rel, gain, acc, bic1, _ = brute_force(x, 2, 10.0)
    n = 40
    hand = (n * math.log(30.0 / n + EPS) + 2 * math.log(n)) - (n * math.log(EPS) + 4 * math.log(n))
    assert rel == 10 and acc and gain == pytest.approx(hand, rel=1e-12)


# ----------------------------------------------------------------------------------------------------------
# C++ == reference, bit for bit
# ----------------------------------------------------------------------------------------------------------


def test_cpp_equals_reference_seeded_batches():
    """1000 random ragged batches covering every kind of series and every option."""
    rng = np.random.default_rng(20240607)
    accepted = finite_gain = 0
    for _ in range(1000):
        m = int(rng.choice(MIN_SEGMENTS))
        min_gain = float(rng.choice(MIN_GAINS))
        values, offsets = random_batch(rng, m)
        want = reference.bic_release(values, offsets, min_segments=m, min_gain=min_gain)
        got = fastopd.bic_release(values, offsets, min_segments=m, min_gain=min_gain)
        assert_same(got, want)
        raw = _C.bic_scan(values, offsets, m, min_gain, 1)
        assert_same(raw, want)
        accepted += int(want.accepted.sum())
        finite_gain += int(np.isfinite(want.gain).sum())
    # the batches really exercised every outcome
    assert accepted > 100 and finite_gain > accepted


@st.composite
def batches(draw):
    m = draw(st.sampled_from(MIN_SEGMENTS))
    min_gain = draw(st.sampled_from(MIN_GAINS))
    rollouts = draw(
        st.lists(
            st.tuples(
                st.sampled_from(KINDS),
                st.one_of(st.sampled_from([0, 1, 2 * m - 1, 2 * m, 2 * m + 1]), st.integers(0, 48)),
                st.integers(0, 2**32 - 1),
            ),
            max_size=6,
        )
    )
    series = [make_series(np.random.default_rng(seed), kind, n) for kind, n, seed in rollouts]
    values, offsets = ragged(series)
    return values, offsets, m, min_gain


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_cpp_equals_reference_hypothesis(batch):
    values, offsets, m, min_gain = batch
    want = reference.bic_release(values, offsets, min_segments=m, min_gain=min_gain)
    assert_same(fastopd.bic_release(values, offsets, min_segments=m, min_gain=min_gain), want)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=0, max_size=24),
    st.sampled_from(MIN_SEGMENTS),
    st.sampled_from(MIN_GAINS),
)
def test_cpp_equals_reference_arbitrary_floats(xs, m, min_gain):
    """Any doubles at all (hypothesis favours 0, -0, subnormals, huge values and specials)."""
    values, offsets = ragged([np.array(xs), np.array(xs[::-1]), np.array(xs[: len(xs) // 2])])
    want = reference.bic_release(values, offsets, min_segments=m, min_gain=min_gain)
    assert_same(_C.bic_scan(values, offsets, m, min_gain, 1), want)


def test_ties_pick_the_smallest_tau():
    """A series whose BIC1 has an exact tie: the smallest tau wins in both implementations.

    x = [2,2,2,1,1,0,0,0]: the centre is 1, the centred values are integers, and the prefix sums are
    S1 = 0,1,2,3,3,3,2,1,0 and S2 = 0,1,2,3,3,3,4,5,6, so RSS(0,3) + RSS(3,8) = 0 + (3 - 9/5) and
    RSS(0,5) + RSS(5,8) = (3 - 9/5) + 0, the same double; every other split is worse.
    """
    x = np.array([2.0, 2.0, 2.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    want = reference.bic_release(x, np.array([0, 8]), min_segments=2, min_gain=-math.inf)
    got = fastopd.bic_release(x, np.array([0, 8]), min_segments=2, min_gain=-math.inf)
    assert_same(got, want)
    assert got.release_index[0] == 3
    bic0 = 8 * math.log((6.0 - 0.0 * 0.0 / 8) / 8 + EPS) + 2.0 * math.log(8)
    bic1 = 8 * math.log((0.0 + (3.0 - 9.0 / 5)) / 8 + EPS) + 4.0 * math.log(8)
    assert got.gain[0] == bic0 - bic1
    # an affine copy (x 4, - 7: the centred values are still exact integers) ties the same way
    y = np.array([2.0, 2.0, 2.0, 1.0, 1.0, 0.0, 0.0, 0.0]) * 4.0 - 7.0
    assert fastopd.bic_release(y, np.array([0, 8]), min_gain=-math.inf).release_index[0] == 3


# ----------------------------------------------------------------------------------------------------------
# known cases, worked out by hand
# ----------------------------------------------------------------------------------------------------------


def naive_uncentred_candidates(x: np.ndarray, m: int) -> int:
    """Number of 'downward' splits an uncentred prefix-sum scan sees (the negative control)."""
    s1 = np.concatenate([[0.0], np.cumsum(x)])
    n = len(x)
    taus = np.arange(m, n - m + 1)
    return int(np.sum((s1[n] - s1[taus]) / (n - taus) < s1[taus] / taus))


@pytest.mark.parametrize("const", [0.1, 1.0 / 3.0, -3.7, 0.7])
def test_constant_series_has_zero_rss_and_no_split(const):
    """A constant series has RSS exactly 0 after centring, so no split is downward: gain -inf.

    Without centring, rounding noise in the prefix sums makes some splits look downward (checked below as a
    negative control); the scan would then report a finite gain n ln(eps + noise) - ... for pure noise.
    """
    x = np.full(50, const)
    got = fastopd.bic_release(x, np.array([0, 50]), min_segments=2, min_gain=10.0)
    assert got.gain[0] == -math.inf and got.release_index[0] == 50 and not got.accepted[0]
    if const == 0.1:
        assert naive_uncentred_candidates(x, 2) > 0  # the noise that the centring removes


@pytest.mark.parametrize("hi,lo,k,n", [(1.0, 0.0, 25, 50), (2.0, 0.0, 10, 40), (3.0, 1.0, 30, 40)])
def test_two_level_series_gain_by_hand(hi, lo, k, n):
    """[hi]*k + [lo]*(n-k): the split at k has RSS exactly 0 on both sides (the centred values are exact),
    so BIC1 = n ln(eps) + 4 ln n, and RSS(0,n) = k(n-k)/n (hi-lo)^2, so

        gain = n ln(k(n-k)/n^2 (hi-lo)^2 + eps) + 2 ln n - n ln(eps) - 4 ln n.
    """
    x = np.array([hi] * k + [lo] * (n - k))
    got = fastopd.bic_release(x, np.array([0, n]), min_segments=2, min_gain=10.0)
    bic0 = n * math.log(k * (n - k) / n**2 * (hi - lo) ** 2 + EPS) + 2 * math.log(n)
    bic1 = n * math.log(EPS) + 4 * math.log(n)
    hand = bic0 - bic1
    assert got.gain[0] == pytest.approx(hand, rel=1e-13)
    assert got.accepted[0] and got.release_index[0] == k


def test_clean_downward_step_is_accepted_at_the_step():
    rng = np.random.default_rng(7)
    series = []
    for cut, n in [(17, 40), (5, 12), (30, 33), (2, 64)]:
        series.append(np.where(np.arange(n) < cut, 5.0, 1.0) + rng.normal(size=n) * 0.1)
    values, offsets = ragged(series)
    got = fastopd.bic_release(values, offsets)
    np.testing.assert_array_equal(got.release_index, [17, 5, 30, 2])
    assert got.accepted.all() and (got.gain > 10.0).all()


def test_upward_step_has_no_candidate():
    x = np.array([0.0] * 20 + [5.0] * 20)
    ramp = np.linspace(0.0, 1.0, 30)
    values, offsets = ragged([x, ramp])
    got = fastopd.bic_release(values, offsets, min_gain=-math.inf)
    np.testing.assert_array_equal(got.gain, [-math.inf, -math.inf])
    np.testing.assert_array_equal(got.release_index, [40, 30])
    assert not got.accepted.any()


@pytest.mark.parametrize("m", MIN_SEGMENTS)
def test_short_series_have_no_candidate(m):
    """n < 2m: gain -inf and release n; n = 2m with a downward split has exactly one candidate (tau = m)."""
    series = [np.arange(n, 0, -1, dtype=np.float64) for n in range(0, 2 * m)]
    series.append(np.array([3.0] * m + [1.0] * m))
    values, offsets = ragged(series)
    got = fastopd.bic_release(values, offsets, min_segments=m, min_gain=-math.inf)
    np.testing.assert_array_equal(got.gain[:-1], -math.inf)
    np.testing.assert_array_equal(got.release_index[:-1], np.arange(0, 2 * m))
    assert got.accepted[-1] and got.release_index[-1] == m and np.isfinite(got.gain[-1])


def test_min_gain_threshold_is_strict():
    x = np.array([2.0] * 10 + [0.0] * 30)
    gain = fastopd.bic_release(x, np.array([0, 40]), min_gain=-math.inf).gain[0]
    at = fastopd.bic_release(x, np.array([0, 40]), min_gain=float(gain))
    below = fastopd.bic_release(x, np.array([0, 40]), min_gain=float(np.nextafter(gain, -np.inf)))
    assert not at.accepted[0] and at.release_index[0] == 40 and at.gain[0] == gain
    assert below.accepted[0] and below.release_index[0] == 10


def test_empty_batch():
    got = fastopd.bic_release(np.zeros(0), np.array([0]))
    assert len(got) == 0 and got.gain.dtype == np.float64 and got.release_index.dtype == np.int64


# ----------------------------------------------------------------------------------------------------------
# non-finite values
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rollout_is_isolated(bad):
    rng = np.random.default_rng(3)
    clean = [np.where(np.arange(30) < 12, 4.0, 0.0) + rng.normal(size=30) * 0.2 for _ in range(4)]
    series = [s.copy() for s in clean]
    series[1][7] = bad
    series[3][0] = bad
    series.append(np.array([bad]))  # also shorter than 2m: the non-finite check comes first
    values, offsets = ragged(series)
    got = fastopd.bic_release(values, offsets)
    assert np.isnan(got.gain[[1, 3, 4]]).all()
    np.testing.assert_array_equal(got.release_index[[1, 3, 4]], [30, 30, 1])
    assert not got.accepted[[1, 3, 4]].any()
    alone = fastopd.bic_release(*ragged([clean[0], clean[2]]))
    assert_same((got.release_index[[0, 2]], got.gain[[0, 2]], got.accepted[[0, 2]]), alone)
    assert alone.accepted.all()
    assert_same(got, reference.bic_release(values, offsets))


# ----------------------------------------------------------------------------------------------------------
# huge values (issue 22 item 8): a series that could overflow is scanned as x 2^-E, its logs taken back
# ----------------------------------------------------------------------------------------------------------


def exact_formula(x: np.ndarray, m: int, min_gain: float):
    """(release, gain, accepted, bic1 by tau) of docs/formulas.md §3 in exact rational arithmetic (Fractions of
    the doubles: no overflow, no rounding) with only the final logs in floating point (math.log of big ints)."""
    n = len(x)
    xs = [Fraction(float(v)) for v in x]
    eps = Fraction(EPS)

    def rss(piece):
        mu = sum(piece) / len(piece)
        return sum((v - mu) ** 2 for v in piece)

    def ln(q: Fraction) -> float:
        return math.log(q.numerator) - math.log(q.denominator)

    bic0 = n * ln(rss(xs) / n + eps) + 2 * math.log(n)
    bic1 = {}
    for tau in range(m, n - m + 1):
        if sum(xs[tau:]) / (n - tau) < sum(xs[:tau]) / tau:
            bic1[tau] = n * ln((rss(xs[:tau]) + rss(xs[tau:])) / n + eps) + 4 * math.log(n)
    if not bic1:
        return n, -math.inf, False, bic1
    tau = min(bic1, key=lambda t: (bic1[t], t))
    gain = bic0 - bic1[tau]
    return (tau if gain > min_gain else n), gain, gain > min_gain, bic1


def scan_both(x: np.ndarray, m: int = 2, min_gain: float = 10.0):
    """fastopd.bic_release of one series, asserted bit for bit equal to the reference's and the raw _C's."""
    offsets = np.array([0, len(x)])
    want = reference.bic_release(x, offsets, min_segments=m, min_gain=min_gain)
    got = fastopd.bic_release(x, offsets, min_segments=m, min_gain=min_gain)
    assert_same(got, want)
    assert_same(_C.bic_scan(np.asarray(x, dtype=np.float64), offsets, m, min_gain, 1), want)
    return int(got.release_index[0]), float(got.gain[0]), bool(got.accepted[0])


def test_huge_two_level_series_is_released_at_its_step():
    """The case of the issue: [1e200]*5 + [-1e200]*5 gave gain +inf and release 2 (overflow); the step is at 5.

    In exact arithmetic gain = 10 ln(1e400 + eps) + 2 ln 10 - 10 ln(eps) - 4 ln 10 ~ 9482. The scan's best split
    has the rounding noise of the prefix-sum RSS (~1e-16 of the total, far above eps at this scale) instead of
    0, so its gain is smaller but still finite and far above the threshold."""
    x = np.array([1e200] * 5 + [-1e200] * 5)
    rel, gain, acc = scan_both(x)
    assert rel == 5 and acc and math.isfinite(gain) and gain > 100.0
    assert exact_formula(x, 2, 10.0)[:1] == (5,)
    # the same with the signs swapped is an upward step: no candidate
    rel, gain, acc = scan_both(-x)
    assert (rel, gain, acc) == (10, -math.inf, False)


@pytest.mark.parametrize("k", [-600, -200, 0, 150, 300, 359])
def test_powers_of_two_copies_release_at_the_same_step(k):
    """x 2^k for k over most of the exponent range (1e200 2^359 ~ 1.2e308): release 5, accepted, C++ == reference."""
    x = np.ldexp(np.array([1e200] * 5 + [-1e200] * 5), k)
    assert scan_both(x)[0:3:2] == (5, True)


def test_scaled_copies_of_an_ordinary_series_release_where_it_does():
    """A noisy downward step scaled by 2^600 (values ~1e181: squares overflow unscaled) and by other powers of
    two: the release index of the original; the gain that of the exact formula of the copy as given."""
    rng = np.random.default_rng(8)
    for trial in range(20):
        n = int(rng.integers(8, 30))
        cut = int(rng.integers(2, n - 1))
        x = np.where(np.arange(n) < cut, 2.0, 0.0) + rng.normal(size=n) * 0.3
        rel, gain, acc = scan_both(x)
        if not acc:
            continue
        for k in (600, 400, 1000 - int(np.log2(np.abs(x).max())) - 5 if trial % 2 else 700):
            big = np.ldexp(x, k)
            b_rel, b_gain, b_acc = scan_both(big)
            assert b_acc and b_rel == rel, (trial, k)
            e_rel, e_gain, e_acc, _ = exact_formula(big, 2, 10.0)
            assert e_rel == b_rel and b_gain == pytest.approx(e_gain, rel=1e-9), (trial, k)


def test_huge_series_against_the_exact_formula():
    """Random series at 1e150..1e308 (mixed magnitudes, steps, near-constant ones): the scan's release and
    acceptance are the exact formula's, its gain within the rounding bound of test_reference_matches_brute_force
    (skipping splits whose two means are within 1e-12 relative: there rounding may decide the direction)."""
    rng = np.random.default_rng(22)
    compared = accepted = 0
    for case in range(300):
        m = int(rng.choice([1, 2, 3]))
        n = int(rng.integers(2 * m, 25))
        kind = case % 3
        if kind == 0:  # a step with noise, at a random huge scale
            cut = int(rng.integers(1, n))
            x = np.where(np.arange(n) < cut, 1.0, rng.uniform(-1.0, 1.0)) + rng.normal(size=n) * rng.choice([1e-6, 0.1])
        elif kind == 1:  # magnitudes spread over many decades
            x = rng.choice([-1.0, 1.0], size=n) * 10.0 ** rng.uniform(-20, 0, size=n)
        else:  # near-constant: a few ulp apart
            x = 1.0 + rng.integers(0, 4, size=n) * 2.0**-52
        x = x * 10.0 ** rng.uniform(150, 307) / max(1.0, float(np.abs(x).max()) * 2)
        min_gain = float(rng.choice([10.0, 0.0, -math.inf]))
        rel, gain, acc = scan_both(x, m, min_gain)
        e_rel, e_gain, e_acc, bic1 = exact_formula(x, m, min_gain)
        xf = [float(v) for v in x]
        means = [(sum(xf[:t]) / t, sum(xf[t:]) / (n - t)) for t in range(m, n - m + 1)]
        if any(abs(a - b) <= 1e-12 * (abs(a) + abs(b)) for a, b in means):
            continue
        compared += 1
        if math.isinf(e_gain):
            assert (rel, gain, acc) == (n, e_gain, False), case
            continue
        # the bound n err / (RSS + n eps) per log, err = 1e-13 S (S the total sum of squares), in exact
        # arithmetic (S itself may exceed the largest double)
        fx = [Fraction(v) for v in xf]

        def rss(piece):
            mu = sum(piece) / len(piece)
            return sum((v - mu) ** 2 for v in piece)

        tau = min(bic1, key=lambda t: (bic1[t], t))
        s_tot, r_best, n_eps = rss(fx), rss(fx[:tau]) + rss(fx[tau:]), n * Fraction(EPS)
        bound = Fraction(1, 10**13) * n * s_tot * (1 / (r_best + n_eps) + 1 / (s_tot + n_eps))
        tol = float(min(bound, Fraction(10**300))) + 1e-9 * max(1.0, abs(e_gain))
        assert abs(gain - e_gain) <= tol, (case, x, gain, e_gain, tol)
        if abs(e_gain - min_gain) > tol:
            assert acc == e_acc, case
            if acc and rel != e_rel:
                assert abs(bic1[rel] - bic1[e_rel]) <= tol, case  # only a near tie may pick another tau
            else:
                assert rel == e_rel, case
        accepted += acc
    assert compared >= 200 and 30 <= accepted <= compared - 30


def test_near_constant_huge_series_keeps_the_formulas_eps():
    """Two levels one ulp apart at 1e200: RSS/n ~ 1e367 dwarfs eps = 1e-12, so the formula accepts the step with
    a gain of thousands. (Had eps been applied to the scaled copy, where RSS/n ~ 1e-33 << eps, the gain would
    be ~ -2 ln n and the step rejected.)"""
    v = 1e200
    x = np.array([np.nextafter(v, np.inf)] * 5 + [v] * 5)
    rel, gain, acc = scan_both(x)
    e_rel, e_gain, e_acc, _ = exact_formula(x, 2, 10.0)
    assert (rel, acc) == (e_rel, e_acc) == (5, True)
    assert gain == pytest.approx(e_gain, rel=1e-12) and gain > 1000.0


def test_scaling_changes_nothing_below_its_limit_and_is_continuous_across_it():
    """A series is scaled only when max |x| >= 2^(E-1) with E + bit_length(n) > 508; the gains of copies just
    below and just above that limit (2^k x for consecutive k) are the formula's, so they differ only by the
    tiny change of the copies' eps relative to their RSS, never by a jump."""
    rng = np.random.default_rng(4)
    x = np.where(np.arange(20) < 8, 1.0, 0.0) + rng.normal(size=20) * 0.2
    x = x / np.abs(x).max() * 0.75  # max |x| in [0.5, 1): E = 0
    assert reference._scale_exponent(x.tolist()) == 0
    k_limit = 508 - (20).bit_length()  # 503: 2^k x is scaled for k > k_limit
    assert reference._scale_exponent(np.ldexp(x, k_limit).tolist()) == 0
    assert reference._scale_exponent(np.ldexp(x, k_limit + 1).tolist()) == k_limit + 1
    gains = [scan_both(np.ldexp(x, k))[1] for k in range(k_limit - 2, k_limit + 3)]
    e_gains = [exact_formula(np.ldexp(x, k), 2, 10.0)[1] for k in range(k_limit - 2, k_limit + 3)]
    np.testing.assert_allclose(gains, e_gains, rtol=1e-12)
    assert max(gains) - min(gains) < 1e-9 * abs(gains[0])


# ----------------------------------------------------------------------------------------------------------
# argument errors (fastopd.bic_release validates in Python; the raw _C.bic_scan validates again in C++)
# ----------------------------------------------------------------------------------------------------------

VALUES = np.arange(10, dtype=np.float64)


@pytest.mark.parametrize(
    "offsets",
    [
        np.array([0, 6, 4, 10], dtype=np.int64),  # decreasing
        np.array([0, 5, 11], dtype=np.int64),  # beyond len(values)
        np.array([-1, 5, 10], dtype=np.int64),  # negative
        np.array([0, -2, 10], dtype=np.int64),  # negative in the middle (also decreasing)
        np.zeros(0, dtype=np.int64),  # empty: not B+1 >= 1 entries
        np.zeros((2, 2), dtype=np.int64),  # 2-D
    ],
)
@pytest.mark.parametrize("entry", ["public", "raw"])
def test_bad_offsets_raise_value_error(offsets, entry):
    with pytest.raises(ValueError, match="offsets"):
        if entry == "public":
            fastopd.bic_release(VALUES, offsets)
        else:
            _C.bic_scan(VALUES, offsets, 2, 10.0, 0)


@pytest.mark.parametrize("entry", ["public", "raw"])
def test_float_offsets_raise_type_error(entry):
    offsets = np.array([0.0, 5.0, 10.0])
    with pytest.raises(TypeError, match="offsets"):
        if entry == "public":
            fastopd.bic_release(VALUES, offsets)
        else:
            _C.bic_scan(VALUES, offsets, 2, 10.0, 0)


@pytest.mark.parametrize("entry", ["public", "raw"])
def test_two_dimensional_values_raise(entry):
    with pytest.raises(ValueError, match="values"):
        if entry == "public":
            fastopd.bic_release(VALUES.reshape(2, 5), np.array([0, 5]))
        else:
            _C.bic_scan(VALUES.reshape(2, 5), np.array([0, 5]), 2, 10.0, 0)


def test_integer_values_raise_type_error_in_raw_scan():
    with pytest.raises(TypeError, match="values"):
        _C.bic_scan(np.arange(10), np.array([0, 10]), 2, 10.0, 0)
    with pytest.raises(TypeError, match="values"):
        _C.bic_scan([0.0, 1.0], np.array([0, 2]), 2, 10.0, 0)


@pytest.mark.parametrize("entry", ["public", "raw"])
def test_min_segments_zero_raises(entry):
    with pytest.raises(ValueError, match="min_segments"):
        if entry == "public":
            fastopd.bic_release(VALUES, np.array([0, 10]), min_segments=0)
        else:
            _C.bic_scan(VALUES, np.array([0, 10]), 0, 10.0, 0)


def test_raw_scan_rejects_nan_min_gain_and_negative_threads():
    with pytest.raises(ValueError, match="min_gain"):
        _C.bic_scan(VALUES, np.array([0, 10]), 2, math.nan, 0)
    with pytest.raises(ValueError, match="num_threads"):
        _C.bic_scan(VALUES, np.array([0, 10]), 2, 10.0, -1)


def test_raw_scan_converts_other_layouts():
    """float32 values, int32 offsets and a strided view give the result of the float64/int64 copies."""
    rng = np.random.default_rng(11)
    series = [np.where(np.arange(n) < n // 3, 3.0, 0.0) + rng.normal(size=n) for n in (10, 25, 40)]
    values, offsets = ragged(series)
    want = _C.bic_scan(values, offsets, 2, 10.0, 1)
    wide = np.zeros(2 * len(values))
    wide[::2] = values
    assert_same(_C.bic_scan(wide[::2], offsets.astype(np.int32), 2, 10.0, 1), want)
    v32 = values.astype(np.float32)
    assert_same(_C.bic_scan(v32, offsets, 2, 10.0, 1), _C.bic_scan(v32.astype(np.float64), offsets, 2, 10.0, 1))


# ----------------------------------------------------------------------------------------------------------
# the multi-threaded path
# ----------------------------------------------------------------------------------------------------------


def test_large_batch_threads_agree_with_single_thread_and_reference():
    rng = np.random.default_rng(99)
    b = 20000
    lengths = rng.integers(0, 65, size=b)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = rng.normal(size=int(offsets[-1]))
    # a downward step in every third rollout, a NaN in a few
    for i in range(0, b, 3):
        lo, hi = offsets[i], offsets[i + 1]
        values[lo + (hi - lo) // 2:hi] -= 3.0
    values[offsets[rng.integers(0, b, size=20)]] = np.nan  # (an empty rollout's offset hits a neighbour)
    one = _C.bic_scan(values, offsets, 2, 10.0, 1)
    for threads in (0, 2, 3):
        assert_same(_C.bic_scan(values, offsets, 2, 10.0, threads), one)
    assert_same(fastopd.bic_release(values, offsets, num_threads=2), one)
    assert 0.2 < one[2].mean() < 0.6  # both outcomes are present
    # the reference on a sample of 500 rollouts
    idx = np.sort(rng.choice(b, size=500, replace=False))
    sample_vals, sample_offs = ragged([values[offsets[i]:offsets[i + 1]] for i in idx])
    want = reference.bic_release(sample_vals, sample_offs)
    assert_same((one[0][idx], one[1][idx], one[2][idx]), want)


def test_one_long_rollout_uses_the_parallel_path_safely():
    """Few rollouts but many values in total (the other parallel trigger), mixed lengths."""
    rng = np.random.default_rng(5)
    series = [np.where(np.arange(n) < n // 2, 1.0, 0.0) + rng.normal(size=n) for n in (300000, 7, 0, 1000)]
    values, offsets = ragged(series)
    assert_same(_C.bic_scan(values, offsets, 3, 10.0, 2), _C.bic_scan(values, offsets, 3, 10.0, 1))
    small_vals, small_offs = ragged(series[1:])
    assert_same(_C.bic_scan(small_vals, small_offs, 3, 10.0, 1),
                reference.bic_release(small_vals, small_offs, min_segments=3))


def test_scan_releases_the_gil():
    """Another Python thread keeps running during a long scan (it could not if the GIL were held: the
    main thread's timestamps would then only fall at the very edges of the call's time window)."""
    import threading
    import time

    b, n = 200_000, 64
    values = np.random.default_rng(0).normal(size=b * n)
    offsets = np.arange(0, b * n + 1, n, dtype=np.int64)
    window = []

    def work():
        window.append(time.perf_counter())
        _C.bic_scan(values, offsets, 2, 10.0, 1)
        window.append(time.perf_counter())

    worker = threading.Thread(target=work)
    stamps = []
    worker.start()
    while worker.is_alive():
        stamps.append(time.perf_counter())
    worker.join()
    start, end = window
    inside = [t for t in stamps if start < t < end]
    assert inside and (max(inside) - min(inside)) > 0.5 * (end - start)


@pytest.mark.parametrize("n", [True, 1.5, -1, "2"])
def test_public_scan_rejects_bad_num_threads(n):
    """A bool or a float is not a thread count (True and 1.5 used to run as 1 thread)."""
    with pytest.raises(ValueError, match=r"num_threads must be an int >= 0"):
        fastopd.bic_release(VALUES, np.array([0, 10]), num_threads=n)
