"""The online release rule (docs/formulas.md §8): the C++ replay (``fastopd.online_release``, ``_C.online_scan``),
the brute-force oracle (``fastopd.reference.online_release``), a brute force written here from the offline scan
alone, and the per-rollout object (``fastopd.OnlineRelease``) -- all bit for bit equal -- on many random ragged
series with planted drops; with the stop disabled the replay is ``bic_release`` exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastopd
from fastopd import reference

from test_bic import assert_same, ragged


def brute_online(series: list[np.ndarray], m: int, g: float, c: int):
    """The rule of §8 from its words: after each new segment, the offline scan (reference.bic_release) on the
    series so far; stop when accepted with n' - r >= c; otherwise the whole series' scan."""
    out = []
    for x in series:
        x = np.asarray(x, dtype=np.float64)
        n = len(x)
        result = None
        for n_prefix in range(1, n + 1):
            res = reference.bic_release(x[:n_prefix], np.array([0, n_prefix]), min_segments=m, min_gain=g)
            r = int(res.release_index[0])
            if bool(res.accepted[0]) and n_prefix - r >= c:
                result = (n_prefix, r, float(res.gain[0]), True, True)
                break
        if result is None:
            res = reference.bic_release(x, np.array([0, n]), min_segments=m, min_gain=g)
            result = (n, int(res.release_index[0]), float(res.gain[0]), bool(res.accepted[0]), False)
        out.append(result)
    return out


def assert_online_same(got, want) -> None:
    """Exact equality of two OnlineReleaseResults (gains bit for bit, NaN == NaN)."""
    assert isinstance(got, fastopd.OnlineReleaseResult) and isinstance(want, fastopd.OnlineReleaseResult)
    assert_same(got, want)
    assert got.stop_index.dtype == np.int64 and got.stopped.dtype == np.bool_
    np.testing.assert_array_equal(got.stop_index, want.stop_index)
    np.testing.assert_array_equal(got.stopped, want.stopped)


def assert_matches_brute(got, brute) -> None:
    for b, (stop, r, gain, acc, stopped) in enumerate(brute):
        assert (int(got.stop_index[b]), int(got.release_index[b]), bool(got.accepted[b]), bool(got.stopped[b])) == \
            (stop, r, acc, stopped), b
        g = float(got.gain[b])
        assert (math.isnan(g) and math.isnan(gain)) or np.float64(g).view(np.uint64) == np.float64(gain).view(np.uint64)


def planted(rng: np.random.Generator, n: int) -> np.ndarray:
    """A segment-mean series with a planted downward step (sometimes none, sometimes two), noise and ties."""
    kind = rng.integers(6)
    noise = rng.choice([0.0, 0.01, 0.1, 0.5, 1.0])
    if kind == 0:  # no change
        x = np.full(n, rng.normal(2.0, 1.0))
    elif kind == 1:  # an upward step (never a candidate)
        t = rng.integers(0, n + 1)
        x = np.where(np.arange(n) < t, 0.5, 3.0)
    elif kind == 2:  # two drops
        a, b = sorted(rng.integers(0, n + 1, size=2))
        x = np.select([np.arange(n) < a, np.arange(n) < b], [4.0, 2.0], 0.5)
    else:  # one drop at a random place
        t = rng.integers(0, n + 1)
        hi, lo = rng.uniform(1.0, 6.0), rng.uniform(0.0, 1.0)
        x = np.where(np.arange(n) < t, hi, lo)
    x = x + noise * rng.standard_normal(n)
    if rng.random() < 0.2:
        x = np.round(x, 1)  # ties
    return x.astype(np.float64)


# ----------------------------------------------------------------------------------------------------------
# the replay == the oracle == a brute force from the rule's words; the per-rollout object too
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m,c", [(1, 1), (1, 3), (2, 2), (2, 3), (2, 4), (3, 5)])
@pytest.mark.parametrize("g", [-math.inf, 0.0, 10.0])
def test_replay_equals_brute_force_on_planted_drops(m, c, g):
    rng = np.random.default_rng(1000 * m + 10 * c + (0 if g == -math.inf else int(g) + 1))
    series = [planted(rng, int(rng.integers(0, 40))) for _ in range(150)]
    values, offsets = ragged(series)
    got = fastopd.online_release(values, offsets, min_segments=m, min_gain=g, confirm_segments=c)
    want = reference.online_release(values, offsets, min_segments=m, min_gain=g, confirm_segments=c)
    assert_online_same(got, want)
    assert_matches_brute(got, brute_online(series, m, g, c))
    # planted drops do stop rollouts, and every stop has c segments past its release point
    assert got.stopped.sum() > 10
    s = got.stopped
    assert np.all(got.accepted[s]) and np.all(got.stop_index[s] - got.release_index[s] >= c)
    assert np.all(got.release_index[s] >= m)
    np.testing.assert_array_equal(got.stop_index[~s], np.diff(offsets)[~s])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    series=st.lists(
        st.lists(st.one_of(st.floats(-5, 5, allow_nan=False, width=64), st.sampled_from([0.0, 1.0, 3.0])),
                 min_size=0, max_size=24).map(lambda v: np.asarray(v, dtype=np.float64)),
        min_size=1, max_size=6),
    m=st.integers(1, 3), extra=st.integers(0, 3), g=st.sampled_from([-math.inf, 0.0, 2.0, 10.0]),
)
def test_replay_equals_brute_force_hypothesis(series, m, extra, g):
    c = m + extra
    values, offsets = ragged(series)
    got = fastopd.online_release(values, offsets, min_segments=m, min_gain=g, confirm_segments=c)
    assert_online_same(got, reference.online_release(values, offsets, min_segments=m, min_gain=g,
                                                     confirm_segments=c))
    assert_matches_brute(got, brute_online(series, m, g, c))


def test_incremental_object_equals_replay():
    rng = np.random.default_rng(7)
    for m, c in [(1, 1), (2, 2), (2, 3)]:
        series = [planted(rng, int(rng.integers(0, 30))) for _ in range(120)]
        values, offsets = ragged(series)
        want = fastopd.online_release(values, offsets, min_segments=m, min_gain=10.0, confirm_segments=c)
        for b, x in enumerate(series):
            rule = fastopd.OnlineRelease(min_segments=m, min_gain=10.0, confirm_segments=c)
            for v in x:
                if rule.push(v):
                    break
            got = rule.finish()
            assert rule.stopped == bool(want.stopped[b]) and rule.n == int(want.stop_index[b])
            np.testing.assert_array_equal(rule.values, x[:rule.n])
            one = fastopd.OnlineReleaseResult(*(np.asarray([getattr(want, f)[b]]) for f in
                                                ("release_index", "gain", "accepted", "stop_index", "stopped")))
            assert_online_same(got, one)


def test_incremental_object_refuses_push_after_the_end():
    rule = fastopd.OnlineRelease(min_segments=1, min_gain=0.0, confirm_segments=1)
    assert [rule.push(v) for v in (5.0, 5.0)] == [False, False]
    assert rule.push(0.0) is True and rule.stopped
    with pytest.raises(RuntimeError, match="ended"):
        rule.push(0.0)
    done = fastopd.OnlineRelease()
    done.push(1.0)
    done.finish()
    with pytest.raises(RuntimeError, match="ended"):
        done.push(1.0)
    with pytest.raises(TypeError, match="value must be a real number"):
        fastopd.OnlineRelease().push("1.0")


# ----------------------------------------------------------------------------------------------------------
# the stop disabled: exactly the offline rule
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 2, 3])
def test_confirm_larger_than_every_series_is_bic_release(m):
    rng = np.random.default_rng(3 + m)
    series = [planted(rng, int(rng.integers(0, 50))) for _ in range(300)]
    series[0] = np.array([1.0, np.nan, 0.0, 0.0])
    series[1] = np.array([np.inf, 1.0, 1.0, 1.0, 0.0])
    values, offsets = ragged(series)
    offline = fastopd.bic_release(values, offsets, min_segments=m, min_gain=10.0)
    for c in (51, 10**6, 2**63 - 1, 2**80):
        got = fastopd.online_release(values, offsets, min_segments=m, min_gain=10.0, confirm_segments=c)
        assert not got.stopped.any()
        np.testing.assert_array_equal(got.stop_index, np.diff(offsets))
        assert_same(got, offline)
    ref = reference.online_release(values, offsets, min_segments=m, min_gain=10.0, confirm_segments=51)
    assert_same(ref, reference.bic_release(values, offsets, min_segments=m, min_gain=10.0))


def test_stop_before_a_non_finite_segment_and_none_after():
    # a clear drop, then a NaN: the rule stops before it sees the NaN
    x = np.array([5.0] * 6 + [0.0, 0.0, np.nan, 0.0])
    res = fastopd.online_release(x, np.array([0, len(x)]), min_segments=2, min_gain=0.0, confirm_segments=2)
    assert res.stopped[0] and res.stop_index[0] == 8 and res.release_index[0] == 6
    # a NaN before the drop: no prefix past it can stop, and the whole series' gain is NaN
    y = np.array([5.0, np.nan] + [5.0] * 4 + [0.0] * 4)
    res = fastopd.online_release(y, np.array([0, len(y)]), min_segments=2, min_gain=0.0, confirm_segments=2)
    assert not res.stopped[0] and res.stop_index[0] == len(y) and math.isnan(res.gain[0])
    assert_online_same(res, reference.online_release(y, np.array([0, len(y)]), min_segments=2, min_gain=0.0,
                                                     confirm_segments=2))


def test_huge_values_stop_at_the_drop():
    """Issue 22 item 8 in the replay: every prefix of [1e200]*5 + [-1e200]*6 (and its 2^k copies, some prefixes
    scaled, some not) is scanned as bic_release scans it, so the rule stops c segments after the drop at 5,
    bit for bit the oracle and the brute force (before the fix the overflowing prefixes released at 2)."""
    base = np.array([1e200] * 5 + [-1e200] * 6)
    # the last one: +-0.7 2^505, scanned as given up to 7 segments and scaled from 8 on (505 + bit_length(8) > 508)
    series = [np.ldexp(base, k) for k in (-300, 0, 200, 359)] + [np.ldexp(np.sign(base) * 0.7, 505)]
    values, offsets = ragged(series)
    for c in (2, 3):
        got = fastopd.online_release(values, offsets, min_segments=2, min_gain=10.0, confirm_segments=c)
        assert_online_same(got, reference.online_release(values, offsets, min_segments=2, min_gain=10.0,
                                                         confirm_segments=c))
        assert_matches_brute(got, brute_online(series, 2, 10.0, c))
        np.testing.assert_array_equal(got.release_index, [5] * 5)
        np.testing.assert_array_equal(got.stop_index, [5 + c] * 5)
        assert got.stopped.all() and np.isfinite(got.gain).all()


def test_empty_batch_and_empty_series():
    got = fastopd.online_release(np.zeros(0), np.array([0]))
    assert len(got) == 0 and got.stop_index.shape == (0,)
    got = fastopd.online_release(np.zeros(0), np.array([0, 0, 0]))
    np.testing.assert_array_equal(got.stop_index, [0, 0])
    assert np.all(got.gain == -np.inf) and not got.stopped.any()


# ----------------------------------------------------------------------------------------------------------
# validation: the same errors as bic_release, and confirm_segments an int >= min_segments
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [fastopd.online_release, reference.online_release])
def test_validation(fn):
    x, off = np.array([1.0, 2.0]), np.array([0, 2])
    with pytest.raises(TypeError, match="confirm_segments must be an int"):
        fn(x, off, confirm_segments=True)
    with pytest.raises(TypeError, match="confirm_segments must be an int"):
        fn(x, off, confirm_segments=2.0)
    with pytest.raises(ValueError, match=r"confirm_segments must be >= min_segments=3"):
        fn(x, off, min_segments=3, confirm_segments=2)
    with pytest.raises(ValueError, match="min_segments"):
        fn(x, off, min_segments=True, confirm_segments=2)
    with pytest.raises(ValueError, match="min_gain"):
        fn(x, off, min_gain=float("nan"))
    with pytest.raises(ValueError, match="non-decreasing"):
        fn(np.zeros(4), np.array([0, 3, 2, 4]))
    with pytest.raises(ValueError, match="offsets must lie in"):
        fn(np.zeros(2), np.array([0, 3]))
    with pytest.raises(TypeError, match="values must be a float array"):
        fn(np.array([1, 2]), off)
    with pytest.raises(TypeError, match="offsets must be an integer array"):
        fn(x, np.array([0.0, 2.0]))
    with pytest.raises(TypeError, match="confirm_segments must be an int"):
        fastopd.OnlineRelease(confirm_segments=np.bool_(True))
    with pytest.raises(ValueError, match="confirm_segments must be >= min_segments=2"):
        fastopd.OnlineRelease(confirm_segments=1)


def test_c_extension_checks_confirm_itself():
    from fastopd import _C

    with pytest.raises(ValueError, match="confirm_segments must be >= min_segments=2"):
        _C.online_scan(np.zeros(3), np.array([0, 3]), 2, 10.0, 1)
