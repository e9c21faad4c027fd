"""Tests of fastopd.release: ReleaseRule (weights, diagnostics) against the reference functions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastopd
from fastopd import reference


def test_release_rule_cuts_a_fading_rollout():
    # 10 sentences of 3 tokens: the teacher's margin is large for 5 sentences and then fades to ~0.
    rng = np.random.default_rng(1)
    seg = np.repeat(np.arange(10), 3)[None].repeat(2, 0)
    margins = np.where(seg < 5, 4.0, 0.05) + rng.normal(0, 0.01, seg.shape)
    margins[1] = 1.0 + rng.normal(0, 0.01, 30)  # flat: no release
    valid = np.ones_like(seg, dtype=bool)
    dec = fastopd.ReleaseRule().from_margins(torch.tensor(margins), torch.tensor(seg), torch.tensor(valid))
    assert dec.scan.accepted.tolist() == [True, False]
    assert dec.release_segment.tolist() == [5, 10]
    assert torch.all(dec.weights[0, 15:] == 0)
    torch.testing.assert_close(dec.weights.sum(-1), torch.tensor([30.0, 30.0]))
    assert dec.kept_fraction.tolist() == [0.5, 1.0]
    assert dec.metrics["accept_rate"] == 0.5
    full = fastopd.ReleaseRule("full").from_margins(torch.tensor(margins), torch.tensor(seg), torch.tensor(valid))
    assert torch.all(full.weights == 1) and full.scan.accepted.tolist() == [True, False]
    # a control keeps its own tokens, but the release position is the release point's, in every mode
    assert full.kept_fraction.tolist() == [1.0, 1.0] and full.release_fraction.tolist() == [0.5, 1.0]
    assert full.metrics["release_position"] == 0.5 and full.metrics["kept_fraction"] == 1.0
    assert dec.metrics["release_position"] == 0.5 and dec.metrics["kept_fraction"] == 0.75


# ------------------------------------------------------------------------------------------------------
# construction-time checks (issue 14): a bad rule fails where it is built, not at its first batch
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(k=1), ValueError, "k must be >= 2"),
        (dict(k=True), TypeError, "k must be an int"),
        (dict(k=4.0), TypeError, "k must be an int"),
        (dict(temperature=0), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature=-1.0), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature=math.inf), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature=math.nan), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature=True), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature="1"), ValueError, "temperature must be a finite number > 0"),
        (dict(backend="bogus"), ValueError, "backend must be one of"),
        (dict(backend=None), ValueError, "backend must be one of"),
        (dict(mode="bogus"), ValueError, "mode must be one of"),
        (dict(mode=["release"]), ValueError, "mode must be one of"),
        (dict(min_segments=0), ValueError, "min_segments must be an int >= 1"),
        (dict(min_segments=True), ValueError, "min_segments must be an int >= 1"),
        (dict(min_gain=math.nan), ValueError, "min_gain must be a number"),
        (dict(min_gain=False), ValueError, "min_gain must be a number"),
        (dict(fraction=0.0), ValueError, r"fraction must be in \(0, 1\]"),
        (dict(fraction=1.5), ValueError, r"fraction must be in \(0, 1\]"),
        (dict(fraction=True), ValueError, r"fraction must be in \(0, 1\]"),
        (dict(seed=1.5), ValueError, "seed must be None or an int >= 0"),
        (dict(seed=-1), ValueError, "seed must be None or an int >= 0"),
        (dict(seed=True), ValueError, "seed must be None or an int >= 0"),
    ],
)
def test_release_rule_checks_every_option_at_construction(kwargs, err, match):
    with pytest.raises(err, match=match):
        fastopd.ReleaseRule(**kwargs)


def test_release_rule_issue_example_and_good_options_construct():
    with pytest.raises(ValueError):
        fastopd.ReleaseRule(k=1, temperature=0, backend="bogus")
    # numbers of other types than int/float are still numbers; -inf min_gain means "take the best split"
    rule = fastopd.ReleaseRule(
        "fixed_prefix", k=np.int64(4), temperature=np.float32(0.5), min_segments=np.int32(1), min_gain=-math.inf,
        fraction=1, seed=np.uint8(3), backend="reference",
    )
    assert rule.k == 4 and type(rule.k) is int and rule.temperature == 0.5 and rule.min_gain == -math.inf


# ------------------------------------------------------------------------------------------------------
# a NaN margin (non-finite logits or hidden states) never lets the rule release that rollout (issue 14)
# ------------------------------------------------------------------------------------------------------


def _fading(b: int = 3):
    rng = np.random.default_rng(2)
    seg = np.repeat(np.arange(10), 3)[None].repeat(b, 0)
    margins = np.where(seg < 5, 4.0, 0.05) + rng.normal(0, 0.01, seg.shape)
    return torch.tensor(margins), torch.tensor(seg), torch.ones(seg.shape, dtype=torch.bool)


@pytest.mark.parametrize("where", [0, 20])
def test_nan_margin_keeps_the_rollout_whole(where):
    margins, seg, valid = _fading()
    assert fastopd.ReleaseRule().from_margins(margins, seg, valid).scan.accepted.tolist() == [True] * 3
    margins[1, where] = math.nan
    valid[2, where] = False
    margins[2, where] = math.nan  # at an invalid position: ignored
    dec = fastopd.ReleaseRule().from_margins(margins, seg, valid)
    assert dec.scan.accepted.tolist() == [True, False, True]
    assert math.isnan(dec.scan.gain[1])  # the flag: gain NaN (docs/formulas.md §3)
    assert torch.equal(dec.weights[1], torch.ones(30))  # w = valid
    assert dec.release_segment.tolist() == [5, 10, 5]
    assert dec.metrics["accept_rate"] == 2 / 3


@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_nan_hidden_state_gives_nan_margin_and_no_release(path):
    """NaN in one valid token's hidden state: NaN loss, NaN margin at that token, and the rule keeps that
    rollout whole (before: margin 0 there, and the rule released as if nothing had happened)."""
    g = torch.Generator().manual_seed(0)
    b, length, h, v = 2, 12, 6, 16
    sh, th = torch.randn(b, length, h, generator=g), torch.randn(b, length, h, generator=g)
    sw, tw = torch.randn(v, h, generator=g), torch.randn(v, h, generator=g)
    y = torch.randint(0, v, (b, length), generator=g)
    seg = torch.arange(length).repeat(b, 1) // 2
    crit = fastopd.OPDLoss(rule=fastopd.ReleaseRule(k=4, min_gain=-math.inf, min_segments=1, backend="reference"))

    def run():
        if path == "logits":
            return crit(sh @ sw.T, th @ tw.T, y, segment_ids=seg)
        return crit.linear(sh, sw, th, tw, y, segment_ids=seg)

    clean = run()
    assert clean.release.scan.accepted[1]  # min_gain=-inf: the best downward split is taken
    sh[1, 7, 3] = math.nan
    out = run()
    assert math.isnan(out.loss.item())
    m = out.stats.margins
    assert math.isnan(m[1, 7].item()) and int(torch.isnan(m).sum()) == 1
    assert torch.equal(m[0], clean.stats.margins[0])
    assert not out.release.scan.accepted[1] and math.isnan(out.release.scan.gain[1])
    assert torch.equal(out.release.weights[1], torch.ones(length))
    assert torch.equal(out.release.weights[0], clean.release.weights[0])


# ------------------------------------------------------------------------------------------------------
# segment ids: in [0, L) and non-decreasing along a row's valid tokens, at every entry (issue 14)
# ------------------------------------------------------------------------------------------------------


def _entries(margins, seg, valid):
    """Every public function that reads segment ids, each as a thunk."""
    r = torch.full((seg.shape[0],), 3)
    return {
        "segment_means": lambda: fastopd.segment_means(margins, seg, valid),
        "release_weights": lambda: fastopd.release_weights(seg, valid, r),
        "control_weights": lambda: fastopd.control_weights("random", seg, valid, generator=0),
        "cut_nearest_fraction": lambda: reference.cut_nearest_fraction(seg, valid, np.full(seg.shape[0], 0.5)),
        "ReleaseRule": lambda: fastopd.ReleaseRule().from_margins(margins, seg, valid),
        "OPDLoss": lambda: fastopd.OPDLoss(rule=fastopd.ReleaseRule(k=2)).forward(
            torch.randn(*seg.shape, 5), torch.randn(*seg.shape, 5),
            torch.where(valid, 1, -100), segment_ids=seg),
    }


@pytest.mark.parametrize("entry", ["segment_means", "release_weights", "control_weights", "cut_nearest_fraction",
                                   "ReleaseRule", "OPDLoss"])
@pytest.mark.parametrize("bad, match", [
    ("reversed", "non-decreasing along each row's valid tokens.*row 0 goes back from 9 to 8 at position 3"),
    ("huge", r"segment_ids must be < 30 \(the row length L.*found 1099511627776 at row 1, position 29"),
    ("negative", "segment_ids must be >= 0 at every valid position.*found -1 at row 1, position 0"),
    ("float", "segment_ids must be an integer"),
])
def test_bad_segment_ids_are_refused_at_every_entry(entry, bad, match):
    margins, seg, valid = _fading(2)
    if bad == "reversed":  # the rule used to keep the end of the rollout instead of a prefix
        seg[0] = seg[0].flip(0)
    elif bad == "huge":  # used to end in "MemoryError: Unable to allocate 8.00 TiB"
        seg[1, -1] = 2**40
    elif bad == "negative":
        seg[1, 0] = -1
    else:
        seg = seg.double()
    with pytest.raises(ValueError if bad != "float" else TypeError, match=match):
        _entries(margins, seg, valid)[entry]()


def test_segment_ids_at_invalid_positions_are_not_read():
    margins, seg, valid = _fading(2)
    seg[:, -6:] = torch.tensor([-1, 2**40, 0, 7, -5, 3])  # any value where not valid
    valid[:, -6:] = False
    for run in _entries(margins, seg, valid).values():
        run()  # no error
    got = fastopd.ReleaseRule().from_margins(margins, seg, valid)
    base = fastopd.ReleaseRule().from_margins(margins, torch.where(valid, seg, -1), valid)
    assert torch.equal(got.weights, base.weights) and got.release_segment.tolist() == base.release_segment.tolist()


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 3), length=st.integers(1, 12), seed=st.integers(0, 2**31 - 1), break_it=st.booleans())
def test_hypothesis_segment_id_rule(b, length, seed, break_it):
    """Sorted ids in [0, L) with any invalid positions pass; one decrease between two valid tokens fails."""
    rng = np.random.default_rng(seed)
    seg = np.sort(rng.integers(0, length, size=(b, length)), axis=1)
    valid = rng.random((b, length)) < 0.8
    seg = np.where(valid, seg, rng.integers(-3, 3 * length + 3, size=(b, length)))  # invalid: anything
    margins = torch.tensor(rng.normal(size=(b, length)))
    row = int(rng.integers(b))
    where = np.nonzero(valid[row])[0]
    if break_it and len(where) >= 2:
        i, j = sorted(rng.choice(where, 2, replace=False))  # two valid positions, i before j
        if seg[row, i] >= 1:
            seg[row, j] = seg[row, i] - 1
        else:
            seg[row, i], seg[row, j] = 1, 0
        with pytest.raises(ValueError, match="non-decreasing"):
            fastopd.segment_means(margins, torch.tensor(seg), torch.tensor(valid))
        with pytest.raises(ValueError, match="non-decreasing"):
            fastopd.release_weights(torch.tensor(seg), torch.tensor(valid), np.zeros(b, dtype=np.int64))
    else:
        fastopd.segment_means(margins, torch.tensor(seg), torch.tensor(valid))
        fastopd.ReleaseRule().from_margins(margins, torch.tensor(seg), torch.tensor(valid))
