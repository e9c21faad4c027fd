"""Tests of fastopd/_validate.py, the argument checks every entry point shares: each bad value is refused with a
message naming the argument and what was expected; good values pass (and come back converted where the check
converts). The entry points' own use of them is tested with each entry (test_reference, test_release, ...)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastopd import _validate as V


def test_bools_are_not_numbers():
    for x in (1, -3, np.int64(2), 0.5, np.float32(1.5)):
        assert V.is_real(x)
    assert V.is_int(3) and V.is_int(np.int32(3)) and not V.is_int(3.0)
    for b in (True, False, np.bool_(True)):
        assert not V.is_real(b) and not V.is_int(b)
    assert not V.is_real("1") and not V.is_real(None)


@pytest.mark.parametrize("bad", [True, 0, -1.0, math.nan, math.inf, "1", None])
def test_temperature(bad):
    V.check_temperature(0.5)
    V.check_temperature(np.float64(2))
    with pytest.raises(ValueError, match=r"tau must be a finite number > 0, got"):
        V.check_temperature(bad, name="tau")


def test_k_and_seed():
    V.check_k(2)
    V.check_k(np.int64(16))
    with pytest.raises(TypeError, match="k must be an int, got bool"):
        V.check_k(True)
    with pytest.raises(TypeError, match="k must be an int, got float"):
        V.check_k(4.0)
    with pytest.raises(ValueError, match="k must be >= 2"):
        V.check_k(1)
    for ok in (None, 0, 7):
        V.check_seed(ok)
    for bad in (-1, True, 1.5, "3"):
        with pytest.raises(ValueError, match="seed must be None or an int >= 0"):
            V.check_seed(bad)


def _inputs(b=2, t=3, v=6):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, t, v, generator=g), torch.randn(b, t, v, generator=g), torch.randint(0, v, (b, t), generator=g)


def test_token_inputs_return_v_and_name_what_is_wrong():
    zs, zt, y = _inputs()
    opts = dict(k=2, temperature=1.0, ignore_index=-100, vocab_size=None)
    assert V.check_token_inputs(zs, zt, y, **opts) == 6
    wide = torch.randn(2, 3, 9)
    assert V.check_token_inputs(zs, wide, y.clamp(max=4), **{**opts, "vocab_size": 5}) == 5
    cases = [
        ((zs.numpy(), zt, y), {}, TypeError, "student_logits must be a torch.Tensor"),
        ((zs.long(), zt, y), {}, TypeError, "student_logits must be float16, bfloat16, float32 or float64"),
        ((zs, zt, y.float()), {}, TypeError, "target_ids must be an integer tensor"),
        ((zs, zt[:, :2], y), {}, ValueError, r"teacher_logits must have shape target_ids.shape \+ \(V,\)"),
        ((zs, wide, y), {}, ValueError, "pass vocab_size="),
        ((zs, wide, y), {"vocab_size": 7}, ValueError, r"vocab_size=7 exceeds the logits' widths \(student 6"),
        ((zs, wide, y), {"vocab_size": True}, ValueError, "vocab_size must be a positive int or None"),
        ((zs, zt, y), {"k": 7}, ValueError, "k must be <= the vocabulary size V=6"),
        ((zs, zt, y), {"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
        ((zs, zt, y.masked_fill(y == y[0, 0], 6)), {}, ValueError, r"target_ids must lie in \[0, 6\) .* found 6"),
    ]
    for args, extra, err, msg in cases:
        with pytest.raises(err, match=msg):
            V.check_token_inputs(*args, **{**opts, **extra})
    # ignored positions may hold anything (-100 here, or a big padding id with another ignore_index)
    assert V.check_token_inputs(zs, zt, y.masked_fill(y == y[0, 0], 99), **{**opts, "ignore_index": 99}) == 6


def test_per_token_tensors():
    _, _, y = _inputs()
    V.check_per_token("weights", None, y)
    V.check_per_token("weights", torch.ones(2, 3), y)
    with pytest.raises(ValueError, match=r"weights must have shape \(2, 3\) \(target_ids.shape\), got \(3, 2\)"):
        V.check_per_token("weights", torch.ones(3, 2), y)
    with pytest.raises(TypeError, match="old_logprobs must be a floating-point tensor"):
        V.check_per_token("old_logprobs", torch.ones(2, 3, dtype=torch.long), y)


def test_ragged_batches_are_converted_or_refused():
    values, offsets = V.check_ragged(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float32), [0, 1, 3])
    assert values.dtype == np.float64 and offsets.dtype == np.int64 and offsets.tolist() == [0, 1, 3]
    with pytest.raises(ValueError, match=r"offsets must be non-decreasing, but offsets\[2\]=1 < offsets\[1\]=2"):
        V.check_ragged([1.0, 2.0], [0, 2, 1])
    with pytest.raises(ValueError, match=r"offsets must lie in \[0, len\(values\)=2\]"):
        V.check_ragged([1.0, 2.0], [0, 3])
    with pytest.raises(TypeError, match="values must be a float array"):
        V.check_ragged(np.array([1, 2]), [0, 2])
    with pytest.raises(ValueError, match="values must be a 1-D array"):
        V.check_ragged(np.zeros((2, 2)), [0, 4])


def test_scan_options_and_fraction():
    V.check_scan_options(1, -math.inf)
    V.check_fraction(1.0)
    with pytest.raises(ValueError, match="min_segments must be an int >= 1, got True"):
        V.check_scan_options(True, 10.0)
    with pytest.raises(ValueError, match="min_gain must be a number"):
        V.check_scan_options(2, math.nan)
    for bad in (0, 1.5, True, math.nan):
        with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
            V.check_fraction(bad)
