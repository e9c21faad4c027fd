"""The matched-length control ``shuffled`` (docs/formulas.md §4) and the trainer's per-phase timings.

The rule's kept fractions of a batch are permuted among its rollouts and each rollout is cut at the segment
boundary nearest its borrowed fraction: same supervised-length distribution, other cut places.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastopd import reference
from fastopd.release import ReleaseRule


def _batch(b: int = 24, seed: int = 0):
    """Margins that step down at a rollout-specific segment, many short segments (1-3 tokens each)."""
    rng = np.random.default_rng(seed)
    length = 90
    seg = np.full((b, length), -1, dtype=np.int64)
    valid = np.zeros((b, length), dtype=bool)
    margins = np.zeros((b, length), dtype=np.float32)
    for i in range(b):
        n = int(rng.integers(50, length + 1))
        sizes = []
        while sum(sizes) < n:
            sizes.append(int(rng.integers(1, 4)))
        ids = np.repeat(np.arange(len(sizes)), sizes)[:n]
        seg[i, :n] = ids
        valid[i, :n] = True
        drop = int(rng.integers(4, ids.max() - 3))  # the segment where the teacher's margin falls
        margins[i, :n] = np.where(ids < drop, 6.0, 0.5) + rng.normal(0, 0.3, n)
    return torch.from_numpy(margins), torch.from_numpy(seg), torch.from_numpy(valid)


def _kept_lengths(w: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
    return ((w > 0) & valid).sum(-1).numpy()


def test_shuffled_weights_keep_the_loss_mass_and_a_prefix():
    margins, seg, valid = _batch()
    dec = ReleaseRule(mode="shuffled", seed=3).from_margins(margins, seg, valid)
    w = dec.weights
    torch.testing.assert_close(w.sum(-1), valid.sum(-1).float(), rtol=1e-5, atol=1e-4)
    kept = (w > 0) & valid
    for i in range(w.shape[0]):  # a prefix of whole segments: kept tokens come first, no segment is split
        k = int(kept[i].sum())
        assert kept[i, :k].all() and not kept[i, k:].any()
        g = seg[i][valid[i]].numpy()
        assert k == len(g) or g[k] != g[k - 1]


def test_shuffled_kept_lengths_match_the_rules_within_boundary_rounding():
    margins, seg, valid = _batch(seed=1)
    rule = ReleaseRule(mode="release").from_margins(margins, seg, valid)
    assert rule.scan.accepted.mean() > 0.9  # the batch is built so that the rule releases almost everywhere
    rng_seed = 11
    shuf = ReleaseRule(mode="shuffled", seed=rng_seed).from_margins(margins, seg, valid)
    n = valid.sum(-1).numpy()
    f_rule = _kept_lengths(rule.weights, valid) / n
    f_shuf = _kept_lengths(shuf.weights, valid) / n
    # the permutation the control drew (same generator, same first call)
    perm = np.random.default_rng(rng_seed).permutation(len(n))
    borrowed = f_rule[perm]
    for i in range(len(n)):  # each rollout within one segment of its borrowed fraction
        largest = np.bincount(seg[i][valid[i]].numpy()).max() / n[i]
        assert abs(f_shuf[i] - borrowed[i]) <= largest / 2 + 1e-9, (i, f_shuf[i], borrowed[i])
    # so the multisets agree up to that rounding (at most 3 tokens of ~50-90 here)
    assert np.abs(np.sort(f_shuf) - np.sort(f_rule)).max() <= 1.5 * 3 / 50
    assert abs(f_shuf.mean() - f_rule.mean()) < 0.03


def test_shuffled_cuts_at_other_places_than_the_rule():
    margins, seg, valid = _batch(seed=2)
    rule = ReleaseRule(mode="release").from_margins(margins, seg, valid)
    shuf = ReleaseRule(mode="shuffled", seed=5).from_margins(margins, seg, valid)
    same = (_kept_lengths(rule.weights, valid) == _kept_lengths(shuf.weights, valid)).mean()
    assert same < 0.5, same
    # the diagnostics are the rule's in every mode
    np.testing.assert_array_equal(rule.scan.accepted, shuf.scan.accepted)
    np.testing.assert_array_equal(rule.release_segment, shuf.release_segment)


def test_cut_nearest_fraction_by_hand():
    seg = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3], [0, 1, 2, 3, 4, 5, 6, 7], [0, 0, 0, 0, 1, 1, 1, 1]])
    valid = torch.ones_like(seg, dtype=torch.bool)
    valid[2, 6:] = False  # row 2: segment 0 has 4 tokens, segment 1 has 2
    r = reference.cut_nearest_fraction(seg, valid, [0.5, 0.3, 0.1])
    assert r[0] == 2  # keep segments 0-1: 4/8
    assert r[1] == 2  # 2/8 = 0.25 is nearer 0.3 than 3/8
    assert r[2] == 1  # at least the first segment is kept (4/6)
    full = reference.cut_nearest_fraction(seg, valid, [1.0, float("nan"), 0.95])
    w = reference.release_weights(seg, valid, full)
    torch.testing.assert_close(w, valid.float())  # fraction 1 and NaN keep everything; 0.95 -> the end (1.0)
    # a tie goes to the earlier cut: 0.375 is between 2/8 and 4/8 in row 0 -> 0.25 vs 0.5, |.125| vs |.125|
    assert reference.cut_nearest_fraction(seg[:1], valid[:1], [0.375])[0] == 1


def test_shuffled_errors_name_the_argument():
    seg = torch.zeros(2, 4, dtype=torch.long)
    valid = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="kept_fractions"):
        reference.control_weights("shuffled", seg, valid)
    with pytest.raises(ValueError, match=r"kept_fractions must have shape \(B,\)"):
        reference.control_weights("shuffled", seg, valid, kept_fractions=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="fractions must have shape"):
        reference.cut_nearest_fraction(seg, valid, [0.5])


def test_trainer_runs_the_shuffled_control_and_logs_phase_timings(tmp_path):
    from fastopd.train.runlog import read_jsonl
    from fastopd.train.config import TrainConfig
    from tiny import make_tiny_run
    from fastopd.train.trainer import PHASES, train

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tiny = make_tiny_run(tmp_path / "tiny", n_train=8, n_eval=2)
        cfg = TrainConfig(student=tiny["student"], teacher=tiny["teacher"], train_data=tiny["train"],
                          output_dir=str(tmp_path / "run"), steps=2, prompts_per_step=2, num_samples=2,
                          max_new_tokens=16, lr=1e-3, progress=False, log_with="none", num_threads=1,
                          eval_at_start=False, mode="shuffled", log_rollouts=True)
        train(cfg)
    finally:
        torch.set_num_threads(old)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        parts = [r[k] for k in PHASES] + [r["time_generate"]]
        assert all(p >= 0 for p in parts), parts
        assert r["time_teacher"] > 0 and r["time_backward"] > 0 and r["time_rule"] > 0
        assert sum(parts) <= r["time_step"] * 1.01 + 1e-3  # the phases are disjoint parts of the step
        assert r["tokens_supervised"] <= r["tokens"]
