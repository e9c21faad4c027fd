"""Issue 22, the library's part: wrong numbers that used to come back in silence, and errors a user can act on
(one line naming the argument and what was expected)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import fastopd
from fastopd import reference

SERIES = np.array([5.0, 5.2, 4.9, 5.1, 0.1, -0.2, 0.0, 0.2])


def test_scan_still_takes_non_finite_values_as_no_decision():
    res = fastopd.bic_release(np.array([1.0, math.inf, 0.0, 0.0]), np.array([0, 4]))
    assert math.isnan(res.gain[0]) and not res.accepted[0]


# ------------------------------------------------------------------------------------------------ item 9
@pytest.mark.parametrize("bad, err, msg", [
    ([math.nan], TypeError, "release_segment must hold integer segment ids"),
    ([1.7], TypeError, "release_segment must hold integer segment ids"),
    ([True], TypeError, "release_segment must hold integer segment ids"),
    (torch.tensor([1.0]), TypeError, "release_segment must hold integer segment ids"),
    (torch.tensor([True]), TypeError, "release_segment must hold integer segment ids"),
    ([-5], ValueError, "release_segment must hold segment ids >= 0"),
    ([2**63], ValueError, r"release_segment must hold ints in \[0, 2\*\*63\)"),
    ([2**70], TypeError, "release_segment must hold integer segment ids"),
    ([1, 2], ValueError, r"release_segment must have shape \(B,\) = \(1,\)"),
])
def test_release_weights_refuses_what_is_no_segment_id(bad, err, msg):
    seg, valid = torch.tensor([[0, 0, 1, 1]]), torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(err, match=msg):
        fastopd.release_weights(seg, valid, bad)


def test_release_weights_takes_every_integer_kind():
    seg, valid = torch.tensor([[0, 0, 1, 1]]), torch.ones(1, 4, dtype=torch.bool)
    want = torch.tensor([[2.0, 2.0, 0.0, 0.0]])
    for r in ([1], np.array([1], dtype=np.uint8), np.array([1], dtype=np.int32), torch.tensor([1]), (1,)):
        assert torch.equal(fastopd.release_weights(seg, valid, r), want)
    assert torch.equal(fastopd.release_weights(seg, valid, [2**62]), torch.ones(1, 4))  # past the last: keep all


@pytest.mark.parametrize("values", [np.array([[1 + 2j, 3.0]]), torch.tensor([[1 + 2j, 3.0]])])
def test_segment_means_refuses_complex_values(values):
    """The imaginary part used to be dropped (with at most a NumPy warning)."""
    with pytest.raises(TypeError, match="values must be real numbers"):
        fastopd.segment_means(values, np.array([[0, 1]]), np.array([[True, True]]))


def test_opdloss_without_a_rule_refuses_segment_ids():
    """They used to be accepted and ignored (w = valid), so a forgotten rule trained on every token in silence."""
    zs = torch.randn(1, 4, 6)
    y = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match=r"segment_ids= is read only by a release rule"):
        fastopd.OPDLoss(k=2)(zs, zs, y, segment_ids=torch.tensor([[0, 0, 1, 1]]))
    with pytest.raises(ValueError, match=r"segment_ids= is read only by a release rule"):
        fastopd.OPDLoss(k=2).linear(zs, torch.randn(6, 6), zs, torch.randn(6, 6), y,
                                    segment_ids=torch.tensor([[0, 0, 1, 1]]))


# --------------------------------------------------------------------------------- errors a user can act on
@pytest.mark.parametrize("scan", [fastopd.bic_release, fastopd.online_release])
@pytest.mark.parametrize("threads", [2**40, None, 1.7, "2", True, -1])
def test_scans_refuse_bad_num_threads_in_one_line(scan, threads):
    with pytest.raises(ValueError, match=r"num_threads must be an int >= 0 \(0: OpenMP's default\) and <= 65536"):
        scan(SERIES, np.array([0, 8]), num_threads=threads)


@pytest.mark.parametrize("scan, ref", [(fastopd.bic_release, reference.bic_release),
                                       (fastopd.online_release, reference.online_release)])
def test_huge_min_segments_is_no_candidate_not_an_overflow(scan, ref):
    kw = {"confirm_segments": 2**64} if scan is fastopd.online_release else {}
    got = scan(SERIES, np.array([0, 8]), min_segments=2**63, **kw)
    want = ref(SERIES, np.array([0, 8]), min_segments=2**63, **kw)
    assert got.release_index.tolist() == want.release_index.tolist() == [8]
    assert got.gain.tolist() == want.gain.tolist() == [-math.inf]


@pytest.mark.parametrize("scan", [fastopd.bic_release, reference.bic_release, fastopd.online_release])
def test_min_gain_beyond_a_float_is_refused_in_one_line(scan):
    with pytest.raises(ValueError, match=r"min_gain must be a number a float can hold .* \(401 characters\)"):
        scan(SERIES, np.array([0, 8]), min_gain=10**400)
    with pytest.raises(ValueError, match="min_gain must be a number a float can hold"):
        fastopd.ReleaseRule(min_gain=-(10**400))
    assert scan(SERIES, np.array([0, 8]), min_gain=math.inf).accepted.tolist() == [False]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scan_takes_low_precision_tensors(dtype):
    """bf16 values used to end in NumPy's 'unsupported ScalarType BFloat16' traceback."""
    t = torch.tensor(SERIES, dtype=dtype)
    got = fastopd.bic_release(t, torch.tensor([0, 8]), min_gain=1.0)
    want = fastopd.bic_release(t.double().numpy(), np.array([0, 8]), min_gain=1.0)
    assert got.release_index.tolist() == want.release_index.tolist() == [4]
    assert got.gain.tolist() == want.gain.tolist()
    with pytest.raises(TypeError, match="values must be real segment means"):
        fastopd.bic_release(torch.tensor(SERIES, dtype=torch.complex64), [0, 8])


@pytest.mark.parametrize("value", [0, 0.0, "2", float("inf")])
def test_lmhead_from_model_refuses_a_zero_logits_scaling(value):
    from fastopd.head import config_logit_scale

    with pytest.raises(ValueError, match=r"logits_scaling=.* must be a finite nonzero number"):
        config_logit_scale(SimpleNamespace(logits_scaling=value))
    assert config_logit_scale(SimpleNamespace(logits_scaling=4.0)) == 0.25
