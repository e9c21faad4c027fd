"""Tests of fastopd.common: the release index -> segment id map and the rule's diagnostics, against values
worked out by hand (the loss pieces are tested through the oracle's brute-force gradients in
tests/test_reference.py and the kernels in tests/kernels/)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fastopd.common import release_fractions, release_means, release_segment_ids, release_sums, series_from_sums
from fastopd.types import ReleaseResult, SegmentMeans


def test_release_index_maps_to_the_segment_id_of_that_entry():
    # rollout 0 has segments 0, 2, 5 (1, 3, 4 had no valid token); rollout 1 segments 0, 1; rollout 2 none
    series = SegmentMeans(np.zeros(5), np.array([0, 3, 5, 5]), np.array([0, 2, 5, 0, 1]))
    scan = ReleaseResult(np.array([1, 2, 0]), np.array([12.0, -math.inf, -math.inf]), np.array([True, False, False]))
    # entry 1 of rollout 0 is segment 2; r = n (not accepted) is one past the last id; an empty series gives 0
    assert release_segment_ids(series, scan).tolist() == [2, 2, 0]


def test_series_from_sums_drops_empty_segments():
    sums = np.array([[2.0, 0.0, 9.0], [0.0, 0.0, 0.0]])
    counts = np.array([[2, 0, 3], [0, 0, 0]])
    s = series_from_sums(sums, counts)
    assert s.values.tolist() == [1.0, 3.0] and s.offsets.tolist() == [0, 2, 2] and s.segment_ids.tolist() == [0, 2]


def test_release_fractions_and_diagnostics_by_hand():
    seg = np.array([[0, 0, 1, 1, 2, 2], [0, 1, 2, 3, -1, -1], [0, 0, 0, 0, 0, 0]])
    valid = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=bool)
    frac = release_fractions(seg, valid, [1, 4, 0])
    assert frac[:2].tolist() == [2 / 6, 1.0] and math.isnan(frac[2])
    sums = release_sums([20.0, -math.inf, math.nan], [True, False, False], frac, n_valid=10, n_kept=6)
    more = release_sums([14.0], [True], [0.5], n_valid=4, n_kept=2)
    total = {k: sums[k] + more[k] for k in sums}
    m = release_means(total)
    assert m["accept_rate"] == pytest.approx(2 / 4)
    assert m["gain_mean"] == pytest.approx((20.0 + 14.0) / 2)  # -inf (no candidate) and NaN are left out
    assert m["kept_fraction"] == pytest.approx(8 / 14)
    assert m["release_position"] == pytest.approx((2 / 6 + 0.5) / 2)
    none = release_means(release_sums([], [], [], 0, 0))
    assert none["accept_rate"] == 0.0 and math.isnan(none["gain_mean"]) and math.isnan(none["release_position"])
