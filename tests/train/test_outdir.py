"""Tests of the output folder (fastopd/train/outdir.py) and of resuming damaged checkpoints: what a new run,
``--overwrite`` and ``--resume`` check and touch (issue 22). Fast, except the one end-to-end run at the bottom."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from fastopd.train import outdir
from fastopd.train.config import RUN_FIELDS, TrainConfig


def _cfg(out, **kw):
    return TrainConfig(student="s", teacher="t", train_data="d", output_dir=str(out), **kw)


def _fake_run(out: Path, cfg: TrainConfig | None = None) -> None:
    """The files a run writes (logs, config, two checkpoints, final/, TensorBoard events)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "eval.jsonl", "rollouts.jsonl"):
        (out / name).write_text('{"step": 1}\n')
    (out / "config.yaml").write_text((cfg or _cfg(out)).to_yaml())
    for step in (1, 2):
        ck = out / "checkpoints" / f"step-{step:08d}"
        ck.mkdir(parents=True)
        (ck / "trainer_state.json").write_text(f'{{"step": {step}}}')
    (out / "checkpoints" / ".tmp-step-00000003").mkdir()
    (out / "final").mkdir()
    (out / "final" / "model.safetensors").write_text("w")
    (out / "fastopd" / "1700000000.1").mkdir(parents=True)
    (out / "fastopd" / "1700000000.1" / "events.out.tfevents.1.host").write_text("e")


def test_overwrite_removes_only_what_a_run_writes(tmp_path):
    out = tmp_path
    _fake_run(out)
    # the user's own files, as in `--output-dir .` of a project: a note, a data file, a folder of their own, a
    # folder named like TensorBoard's (here a package), a file of their own inside checkpoints/
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    (out / "data" / "train.jsonl").write_text("{}")
    (out / "fastopd" / "__init__.py").write_text("# a package")
    (out / "checkpoints" / "README").write_text("mine")
    outdir.prepare_output_dir(_cfg(out, overwrite=True))
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert left == ["checkpoints", "checkpoints/README", "data", "data/train.jsonl", "fastopd",
                    "fastopd/__init__.py", "notes.txt"]
    assert not outdir.holds_run(out)


def test_overwrite_of_a_folder_holding_only_a_run_leaves_it_empty(tmp_path):
    out = tmp_path / "run"
    _fake_run(out)
    removed = outdir.remove_run(out)
    assert out.is_dir() and not list(out.iterdir())
    assert out / "metrics.jsonl" in removed and out / "final" in removed


def test_a_run_folder_without_resume_or_overwrite_is_refused(tmp_path):
    _fake_run(tmp_path)
    with pytest.raises(FileExistsError, match="already holds a run"):
        outdir.prepare_output_dir(_cfg(tmp_path))
    assert (tmp_path / "metrics.jsonl").is_file()


@pytest.mark.parametrize("sub", ["", "run", "run/deeper"])
def test_an_output_path_that_is_or_is_under_a_file_is_one_line(tmp_path, sub):
    f = tmp_path / "file.txt"
    f.write_text("x")
    out = f / sub if sub else f
    with pytest.raises(ValueError) as e:
        outdir.prepare_output_dir(_cfg(out))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("config field `output_dir`") and repr(str(f)) in msg
    assert f.read_text() == "x"


@pytest.mark.parametrize("change", [dict(lr=2e-6), dict(mode="full"), dict(loss="reverse_kl"), dict(seed=1),
                                    dict(k=8, min_gain=5.0)])
def test_resume_refuses_a_change_of_the_settings_that_define_the_run(tmp_path, change):
    saved = _cfg(tmp_path)
    _fake_run(tmp_path, saved)
    before = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ValueError) as e:
        outdir.prepare_output_dir(dataclasses.replace(saved, resume=True, **change))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--resume with other settings")
    for name, value in change.items():
        assert f"{name} {getattr(saved, name)!r} -> {value!r}" in msg
    assert (tmp_path / "config.yaml").read_text() == before


def test_resume_accepts_more_steps_other_logging_and_the_same_folder_spelt_otherwise(tmp_path, monkeypatch):
    (tmp_path / "student").mkdir()
    saved = dataclasses.replace(_cfg(tmp_path), student=str(tmp_path / "student"))
    _fake_run(tmp_path, saved)
    monkeypatch.chdir(tmp_path)
    later = dataclasses.replace(saved, resume=True, steps=saved.steps + 50, eval_every=3, save_every=2,
                                progress=False, log_with="none", num_threads=1, keep_last=5, eval_data="e.jsonl",
                                student="student")  # the same folder, relative
    outdir.prepare_output_dir(later)
    with pytest.raises(ValueError, match="student"):
        outdir.check_resume(dataclasses.replace(later, student="gpt2"))


def test_resume_compares_the_yaml_as_read_back(tmp_path):
    """config.yaml's floats and ints read back equal (5e-4 written by yaml.safe_dump is read as a float)."""
    saved = _cfg(tmp_path, lr=5e-4, min_gain=12.5, temperature=0.7)
    _fake_run(tmp_path, saved)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["lr"] == 5e-4
    outdir.check_resume(dataclasses.replace(saved, resume=True))
    with pytest.raises(ValueError, match=r"temperature 0\.7 -> 0\.8"):
        outdir.check_resume(dataclasses.replace(saved, temperature=0.8))


def test_resume_of_a_run_with_a_damaged_config_names_it(tmp_path):
    _fake_run(tmp_path)
    (tmp_path / "config.yaml").write_text("lr: [1\n")
    with pytest.raises(ValueError, match="config.yaml: the run's config is not valid YAML"):
        outdir.prepare_output_dir(_cfg(tmp_path, resume=True))
    (tmp_path / "config.yaml").write_text("- a list\n")
    with pytest.raises(ValueError, match="not a YAML mapping"):
        outdir.check_resume(_cfg(tmp_path, resume=True))


def test_every_run_field_is_checked(tmp_path):
    saved = _cfg(tmp_path)
    saved_dict = saved.to_dict()
    from fastopd.train.outdir import setting_differences

    for name in RUN_FIELDS:
        value = getattr(saved, name)
        other = {bool: (not value), int: 7 if value != 7 else 8, float: 0.123, str: "other", type(None): "x"}[
            type(value)]
        assert setting_differences(saved_dict, dataclasses.replace(saved, **{name: other})) == [
            f"{name} {value!r} -> {other!r}"], name


# ---- end to end through the CLI: a damaged checkpoint, then a changed setting (one tiny run, ~15 s)

def _train_flags(tiny, out, steps, *extra):
    return ["train", "--student", tiny["student"], "--teacher", tiny["teacher"], "--train-data", tiny["train"],
            "--output-dir", str(out), "--steps", str(steps), "--prompts-per-step", "2", "--num-samples", "2",
            "--max-new-tokens", "8", "--lr", "1e-3", "--no-progress", "--log-with", "none", "--num-threads", "1",
            "--no-eval-at-start", "--save-every", "1", "--keep-last", "2", *extra]


def test_resume_through_the_cli_falls_back_past_a_truncated_optimizer_and_refuses_another_lr(tiny, tmp_path,
                                                                                             capsys):
    from fastopd.cli import main
    from fastopd.train.checkpoint import list_checkpoints
    from fastopd.train.runlog import read_log

    out = tmp_path / "run"
    assert main(_train_flags(tiny, out, 2)) == 0
    capsys.readouterr()
    steps = [s for s, _ in list_checkpoints(out)]
    assert steps == [1, 2]
    opt = out / "checkpoints" / "step-00000002" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:100])
    assert main(_train_flags(tiny, out, 3, "--resume")) == 0
    said = capsys.readouterr()
    text = said.out + said.err
    assert f"{opt}: truncated or damaged" in text and "resuming from the previous checkpoint" in text
    assert "resumed from" in text and "step-00000001" in text and "Traceback" not in text
    assert [r["step"] for r in read_log(out / "metrics.jsonl")] == [1, 2, 3]
    config = (out / "config.yaml").read_text()
    # another lr: refused in one line, nothing written
    assert main(_train_flags(tiny, out, 4, "--resume", "--lr", "5e-3")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lr 0.001 -> 0.005" in err
    assert (out / "config.yaml").read_text() == config
    assert [r["step"] for r in read_log(out / "metrics.jsonl")] == [1, 2, 3]
