"""Tests of fastopd.release: ReleaseRule (weights, diagnostics) against the reference functions."""

from __future__ import annotations

import numpy as np
import torch

import fastopd


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
