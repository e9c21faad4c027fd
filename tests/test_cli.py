"""Tests of the ``fastopd`` command line (fastopd/cli.py, fastopd/__main__.py). Fast: a few seconds."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import pytest
import yaml

from helpers import ROOT

from fastopd import cli
from fastopd.train.config import TrainConfig, field_docs



def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of ``fastopd argv`` run in this process."""
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's --help / errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_python_dash_m_fastopd_help_lists_every_command():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-m", "fastopd", "--help"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    for command in ("demo", "example", "train", "report", "bench"):
        assert f"\n    {command} " in res.stdout
    assert "fastopd demo --quick" in res.stdout  # the newcomer's first command is in the help


def test_no_arguments_prints_help(capsys):
    code, out, _ = run_cli([], capsys)
    assert code == 0 and "usage: fastopd" in out


def test_train_help_documents_every_config_field(capsys):
    code, out, _ = run_cli(["train", "--help"], capsys)
    assert code == 0
    flat = " ".join(out.split())
    for name, _, help_text in field_docs():
        assert f"--{name.replace('_', '-')}" in out, name
        assert " ".join(help_text.split()[:4]) in flat, name  # its documentation is shown
    assert "accelerate launch" in out


def test_config_file_then_flags_override(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"student": "s", "teacher": "t", "train_data": "d.jsonl", "lr": 0.1,
                                   "steps": 5, "eval_data": "e.jsonl", "mode": "full"}))
    code, out, err = run_cli(["train", "--config", str(cfg), "--lr", "0.5", "--max_new_tokens=7",
                              "--no-eval-at-start", "--eval-data", "none", "--mode", "release",
                              "--print-config"], capsys)
    assert code == 0, err
    got = yaml.safe_load(out)
    assert got["lr"] == 0.5  # flag beats file
    assert got["steps"] == 5  # file beats default
    assert got["max_new_tokens"] == 7  # the field's own spelling works too
    assert got["eval_at_start"] is False and got["eval_data"] is None and got["mode"] == "release"
    assert got["top_p"] == TrainConfig().top_p  # untouched fields keep their defaults
    assert set(got) == {f.name for f in dataclasses.fields(TrainConfig)}


def test_train_errors_name_the_problem(tmp_path, capsys):
    code, _, err = run_cli(["train", "--teacher", "t", "--train-data", "d"], capsys)
    assert code == 2 and "`student` is required" in err
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("student: s\nteacher: t\ntrain_data: d\nmax_steps: 3\n")
    code, _, err = run_cli(["train", "--config", str(cfg)], capsys)
    assert code == 2 and "unknown field `max_steps`" in err and "`steps`" in err
    code, _, err = run_cli(["train", "--mode", "suffix"], capsys)
    assert code == 2 and "invalid choice" in err
    code, _, err = run_cli(["train", "--config", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2 and "not found" in err


def test_example_passes_its_arguments_through(monkeypatch, capsys):
    import fastopd.example

    seen = []
    monkeypatch.setattr(fastopd.example, "main", lambda argv: seen.append(argv) or 0)
    code, _, _ = run_cli(["example", "--seed", "3", "--help"], capsys)
    assert code == 0 and seen == [["--seed", "3", "--help"]]


def test_bench_lists_scripts(capsys):
    code, out, _ = run_cli(["bench", "--help"], capsys)
    assert code == 0 and "usage: fastopd bench" in out
    # every benchmark is listed with the first line of its docstring (one source): what it measures, and
    # where it runs, a closing "(CPU...)", "(GPU...)" or "(no GPU)"
    scripts = sorted(p for p in cli.benchmarks_dir().glob("*.py") if not p.name.startswith("_"))
    assert len(scripts) >= 5
    for path in scripts:
        line = cli.benchmark_summary(path)
        assert re.fullmatch(r".{20,}\((CPU|GPU|no GPU)[^()]*\)\.", line), f"{path.name}: {line!r}"
        assert re.search(rf"^  {path.stem} +{re.escape(line)}$", out, flags=re.M), path.stem
    code, _, err = run_cli(["bench", "no_such_benchmark"], capsys)
    assert code == 2 and "unknown benchmark" in err


def test_every_yaml_in_configs_is_a_valid_config():
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    train_configs = [p for p in configs if not p.name.startswith("accelerate")]
    assert train_configs, "configs/ should hold example training configs"
    for path in train_configs:
        cfg = TrainConfig.from_yaml(path)
        cfg.validate()


def test_docs_document_every_config_field():
    doc = (ROOT / "docs" / "training.md").read_text()
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f"`{f.name}`" not in doc]
    assert not missing, f"docs/training.md does not document: {missing}"


def test_demo_and_study_pass_their_flags_through(monkeypatch, capsys):
    import fastopd.demo.demo
    import fastopd.demo.study

    seen = {}
    monkeypatch.setattr(fastopd.demo.demo, "run_demo", lambda out, **kw: seen.update(demo=(out, kw)))
    monkeypatch.setattr(fastopd.demo.study, "run_study", lambda out, **kw: seen.update(study=(out, kw)))
    code, _, _ = run_cli(["demo", "--task", "arithmetic", "--quick", "--out", "d", "--jobs", "3"], capsys)
    assert code == 0 and seen["demo"][0] == "d"
    assert seen["demo"][1]["task"] == "arithmetic" and seen["demo"][1]["quick"] is True
    assert seen["demo"][1]["jobs"] == 3
    code, _, _ = run_cli(["study", "--seeds", "2", "--steps", "5", "--arms", "release", "shuffled", "--out", "s",
                          "--jobs", "2", "--eval-every", "5"], capsys)
    assert code == 0 and seen["study"][0] == "s"
    kw = seen["study"][1]
    assert (kw["seeds"], kw["steps"], kw["task"], kw["arms"]) == (2, 5, "long", ("release", "shuffled"))
    assert (kw["jobs"], kw["eval_every"]) == (2, 5)
    code, _, _ = run_cli(["study", "--out", "s"], capsys)
    assert (seen["study"][1]["jobs"], seen["study"][1]["eval_every"]) == (1, None)  # defaults: one job, the schedule's
    code, _, err = run_cli(["demo", "--task", "nope"], capsys)
    assert code == 2 and "--task" in err


def test_demo_help_states_the_defaults_the_demo_runs(tmp_path, monkeypatch, capsys):
    """Every number in ``fastopd demo --help`` is the one the demo uses (read from the config it builds), and the
    help states no run times."""
    import re

    from fastopd.demo import long_task, task
    from fastopd.demo.demo import DEFAULT_THREADS, SCHEDULES, demo_config

    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside a number
    code, out, _ = run_cli(["demo", "--help"], capsys)
    assert code == 0
    flat = " ".join(out.split())
    for name in SCHEDULES:
        full, _ = demo_config(tmp_path / name, quick=False, task=name)
        quick, _ = demo_config(tmp_path / name, quick=True, task=name)
        for field in ("steps", "lr", "loss"):
            a, b = (v if isinstance(v, str) else format(v, "g") for v in (getattr(full, field), getattr(quick, field)))
            assert f"{name} {a}" + ("" if a == b else f" (quick {b})") in flat, (field, name, flat)
    assert "%d-%d-sentence answers" % long_task.SENTENCES in flat and "%d-%d-sentence task" % task.SENTENCES in flat
    assert re.search(rf"--threads THREADS torch CPU threads[\w ]* \(default {DEFAULT_THREADS}\b", flat), flat
    code, top, _ = run_cli(["--help"], capsys)
    for text in (out, top):
        assert not re.search(r"\d\s*(s|sec|seconds|min|minutes)\b|-second|-minute", text), text


# ---- errors a user can act on, never a traceback (issue 22)

def test_an_output_dir_under_a_file_is_one_line(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    code, _, err = run_cli(["train", "--student", "gpt2", "--teacher", "gpt2", "--train-data", "d",
                            "--output-dir", str(f / "run"), "--log-with", "none"], capsys)
    assert code == 2 and err.count("\n") == 1 and "`output_dir`" in err and "which is a file" in err, err
    assert f.read_text() == "mine"


def test_train_prints_not_graded_when_no_eval_row_has_an_answer(tmp_path, monkeypatch, capsys):
    import fastopd.train.trainer

    ev = {"accuracy": float("nan"), "correct": 0, "total": 0}
    monkeypatch.setattr(fastopd.train.trainer, "train", lambda cfg: {"step": 3, "eval": ev, "output_dir": "o"})
    code, out, err = run_cli(["train", "--student", "gpt2", "--teacher", "gpt2", "--train-data", "d"], capsys)
    assert code == 0, err
    assert "step 3: eval not graded (no row of eval_data has an `answer`)" in out
    assert "%" not in out and "0/0" not in out
    ev.update(accuracy=0.25, correct=1, total=4)
    code, out, _ = run_cli(["train", "--student", "gpt2", "--teacher", "gpt2", "--train-data", "d"], capsys)
    assert "step 3: eval accuracy 25.0% (1/4)" in out


def test_report_on_a_missing_or_empty_folder_is_an_error_and_draws_nothing(tmp_path, capsys):
    plots = tmp_path / "plots"
    code, out, err = run_cli(["report", str(tmp_path / "no-such-run"), "--out", str(plots)], capsys)
    assert code == 2 and err.count("\n") == 1 and "run folder not found" in err and str(tmp_path) in err
    assert not plots.exists() and out == ""
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["report", str(tmp_path / "empty"), "--out", str(plots)], capsys)
    assert code == 2 and "is not a run folder" in err and not plots.exists()


def test_report_on_a_log_with_a_row_that_is_not_a_step_record_names_the_file(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n[1, 2]\n')
    code, _, err = run_cli(["report", str(run), "--out", str(tmp_path / "plots")], capsys)
    assert code == 2 and err.count("\n") == 1 and "metrics.jsonl: row 2 is not a step record" in err, err
    assert "Traceback" not in err


def test_real_bugs_keep_their_traceback(monkeypatch, capsys):
    import fastopd.train.report

    def bug(*a, **k):
        raise KeyError("a bug")

    monkeypatch.setattr(fastopd.train.report, "make_report", bug)
    with pytest.raises(KeyError):
        cli.main(["report", "r", "--out", "o"])


def test_demo_refuses_bad_settings_before_making_its_folder(tmp_path, capsys):
    from fastopd.cli import main

    for args in (["--steps", "0"], ["--lr", "nan"], ["--lr", "-1"], ["--jobs", "-2"]):
        out = tmp_path / "demo"
        assert main(["demo", "--out", str(out), *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "error" in err[0], (args, err)
        assert not out.exists(), args
