"""A training step's three choices (docs/formulas.md §8, docs/training.md): who samples, which tokens count, which
loss. ``mode`` expands to them; contradictions and combinations that make no sense are one line; combinations that
make sense run with no code of their own (sequence-level KD, a fixed length budget)."""

from __future__ import annotations

import pytest

from fastopd.train.choices import MODE_SHORTHANDS, SAMPLERS, TRAIN_LOSSES, WEIGHTS, step_choices
from fastopd.train.config import TrainConfig
from fastopd.train.runlog import read_log
from fastopd.train.trainer import SAMPLERS as STEP_SAMPLERS, train
from tiny import tiny_config


@pytest.mark.parametrize("mode, want", [
    ("release", ("student", "release", "pg")), ("full", ("student", "full", "pg")),
    ("fixed_prefix", ("student", "fixed_prefix", "pg")), ("random", ("student", "random", "pg")),
    ("shuffled", ("student", "shuffled", "pg")), ("online", ("online", "release", "pg")),
    ("sft", ("teacher", "full", "cross_entropy")),
])
def test_mode_expands_to_the_three_choices(mode, want):
    assert step_choices(mode, None, None, "pg") == want


def test_the_default_is_the_release_rule_on_student_samples_and_the_loss_field_is_kept():
    assert step_choices(None, None, None, "forward_kl") == ("student", "release", "forward_kl")
    assert step_choices("online", None, None, "reverse_kl") == ("online", "release", "reverse_kl")
    # sft trained by cross-entropy whatever `loss` said (old configs with loss: forward_kl keep working)
    assert step_choices("sft", None, None, "forward_kl") == ("teacher", "full", "cross_entropy")


def test_a_field_beside_mode_must_agree_with_it():
    assert step_choices("online", "online", "release", "pg") == ("online", "release", "pg")
    with pytest.raises(ValueError, match=r"`weights: full` contradicts `mode: online`"):
        step_choices("online", None, "full", "pg")
    with pytest.raises(ValueError, match=r"`sampler: student` contradicts `mode: sft`"):
        step_choices("sft", "student", None, "pg")


@pytest.mark.parametrize("sampler, weights, loss, message", [
    ("online", "full", "pg", "sampler online stops each rollout at the release rule's point"),
    ("online", "shuffled", "forward_kl", "weights must be release"),
    ("student", "full", "cross_entropy", "needs sampler teacher"),
    ("online", "release", "cross_entropy", "needs sampler teacher"),
    ("teacher", "release", "cross_entropy", "only weights full apply"),
    ("vllm", "full", "pg", "`sampler` must be one of"),
    ("student", "prefix", "pg", "`weights` must be one of"),
    ("student", "full", "kl", "`loss` must be one of"),
])
def test_combinations_that_make_no_sense_are_one_line(sampler, weights, loss, message):
    with pytest.raises(ValueError, match=message) as e:
        step_choices(None, sampler, weights, loss)
    assert "\n" not in str(e.value)


def test_every_sensible_combination_is_accepted():
    ok = [(s, w, l) for s in SAMPLERS for w in WEIGHTS for l in TRAIN_LOSSES
          if not (s == "online" and w != "release") and not (l == "cross_entropy" and (s, w) != ("teacher", "full"))]
    for s, w, l in ok:
        assert step_choices(None, s, w, l) == (s, w, l)
    # student/teacher x 5 weights x 5 OPD losses (3 exact, 2 top-k: where the teacher is decides, check_served),
    # online x 5, teacher + full + cross_entropy
    assert len(ok) == 2 * 5 * 5 + 5 + 1
    assert set(STEP_SAMPLERS) == set(SAMPLERS)  # the trainer has a sampler for every name
    assert set(MODE_SHORTHANDS) == set(WEIGHTS) | {"online", "sft"}


def test_validate_and_the_label_use_the_choices(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path, sampler="teacher", weights="full", loss="forward_kl")
    assert cfg.validate().choices == ("teacher", "full", "forward_kl") and cfg.label == "teacher/full/forward_kl"
    assert tiny_config(tiny, tmp_path, mode="online").label == "online"
    with pytest.raises(ValueError, match="weights must be release"):
        tiny_config(tiny, tmp_path, sampler="online", weights="random").validate()


def test_sequence_level_kd_and_a_length_budget_run_without_code_of_their_own(tiny, tmp_path):
    """Teacher sampling with forward_kl (sequence-level KD) and student sampling with a length budget and every
    token counted (the study's truncate) are plain combinations of the three fields."""
    kd = tiny_config(tiny, tmp_path / "kd", steps=1, sampler="teacher", weights="full", loss="forward_kl",
                     max_new_tokens=8)
    train(kd)
    rows = read_log(tmp_path / "kd" / "metrics.jsonl")
    assert rows[0]["tokens_supervised"] == rows[0]["tokens"] > 0 and rows[0]["loss"] > 0  # a KL: >= 0
    assert rows[0]["teacher_tokens"] > 0  # the teacher scored its own samples for the loss
    budget = tiny_config(tiny, tmp_path / "budget", steps=1, sampler="student", weights="full", max_new_tokens=5)
    train(budget)
    rows = read_log(tmp_path / "budget" / "metrics.jsonl")
    assert 0 < rows[0]["completion_length"] <= 5 and rows[0]["kept_fraction"] == 1.0
    saved = TrainConfig.from_yaml(tmp_path / "budget" / "config.yaml")
    assert saved.choices == ("student", "full", "pg")
