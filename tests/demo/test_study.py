"""Tests of ``fastopd study``'s statistics, table and plots on a tiny fake study (fastopd/demo/study.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fastopd.demo.study import ARMS, ROW_KEYS, aggregate, format_study, paired_bootstrap, plot_study


def _row(seed, acc, ood, sup=500):
    return {"seed": seed, "accuracy": acc, "ood_accuracy": ood, "tokens": 1000, "tokens_supervised": sup,
            "accept_rate": 0.6, "gain_mean": 20.0, "time_per_step": 1.0}


def _fake():
    return {
        "release": [_row(0, 0.50, 0.80), _row(1, 0.60, 0.70), _row(2, 0.55, 0.75)],
        "full": [_row(2, 0.45, 0.70, 1000), _row(0, 0.40, 0.80, 1000), _row(1, 0.50, 0.60, 1000)],  # other order
        "fixed_prefix": [{**_row(0, 0.5, 0.8), "fraction": 0.6}, {**_row(1, 0.6, 0.7), "fraction": 0.55},
                         {**_row(2, 0.55, 0.75), "fraction": 0.5}],
    }


def test_aggregate_means_stds_and_paired_differences_by_seed():
    s = aggregate(_fake(), n_boot=2000)
    acc = s["arms"]["release"]["accuracy"]
    assert acc["mean"] == pytest.approx(0.55) and acc["std"] == pytest.approx(0.05) and acc["n"] == 3
    assert s["arms"]["full"]["tokens_supervised"]["mean"] == 1000
    # paired by seed, not by list position: release - full = 0.10, 0.10, 0.10 (accuracy)
    p = s["paired"]["full"]["accuracy"]
    assert p["mean"] == pytest.approx(0.10) and p["lo"] == pytest.approx(0.10) and p["hi"] == pytest.approx(0.10)
    q = s["paired"]["full"]["ood_accuracy"]  # 0.0, 0.10, 0.05
    assert q["mean"] == pytest.approx(0.05) and 0.0 <= q["lo"] < 0.05 < q["hi"] <= 0.10
    assert s["paired"]["fixed_prefix"]["accuracy"]["mean"] == pytest.approx(0.0)
    assert "release" not in s["paired"]


def test_paired_bootstrap_interval_covers_the_mean_and_narrows_with_more_seeds():
    rng = np.random.default_rng(0)
    few = paired_bootstrap(rng.normal(0.05, 0.1, 3), n_boot=4000)
    many = paired_bootstrap(rng.normal(0.05, 0.1, 300), n_boot=4000)
    for b in (few, many):
        assert b["lo"] <= b["mean"] <= b["hi"]
    assert many["hi"] - many["lo"] < few["hi"] - few["lo"]
    assert many["lo"] < 0.05 < many["hi"]
    assert paired_bootstrap([0.2], n_boot=10) == {"mean": 0.2, "lo": 0.2, "hi": 0.2, "n": 1}
    with pytest.raises(ValueError, match="diffs"):
        paired_bootstrap([])
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap([0.1, 0.2], level=1.5)
    with pytest.raises(ValueError, match="reference arm"):
        aggregate({"full": [_row(0, 0.1, 0.1)]})


def test_format_study_and_plots(tmp_path):
    arms = _fake()
    study = {"arms": arms, "student_before": {"accuracy": 0.3, "ood_accuracy": 0.8},
             "setting": {"task": "long", "ood_task": "arithmetic", "steps": 10, "rollouts_per_step": 32,
                         "loss": "reverse_kl", "lr": 5e-4, "seeds": [0, 1, 2], "eval_problems": 200}}
    s = aggregate(arms, n_boot=500)
    md = format_study(study, s)
    assert "| release | 3 | 55.0% ± 5.0% |" in md
    assert "| full | +10.0% [+10.0%, +10.0%] (n=3) | +5.0% [" in md
    assert md.count(" | - |") >= 2  # no OOD NLL in the fake rows: a dash, not a made-up number
    assert "0.600, 0.550, 0.500" in md  # the fixed_prefix fractions
    json.dumps(study)  # serialisable as study.json
    assert {"seed", "accuracy", "ood_accuracy", "tokens", "tokens_supervised", "accept_rate", "gain_mean",
            "time_per_step"} <= set(ROW_KEYS)  # the layout study.json promises
    paths = plot_study(study, tmp_path)
    assert [p.name for p in paths] == ["accuracy.png"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # with each run's accuracy curve: the mean curves per arm in study.md and curves.png
    for mode, rows in arms.items():
        for r in rows:
            r["curve"] = [[0, 0.3], [5, 0.3 + r["seed"] * 0.01], [10, r["accuracy"]]]
    md = format_study(study, aggregate(arms, n_boot=500))
    assert "- release: 0: 30.0%, 5: 31.0%, 10: 55.0%" in md
    assert [p.name for p in plot_study(study, tmp_path)] == ["accuracy.png", "curves.png"]
    # a study resumed where the runs' rollouts are not on disk (a clone: they are not committed) leaves the
    # margin profile and gain histogram already there as they are, instead of drawing them from nothing
    for name in ("margin_profile.png", "bic_gains.png"):
        (tmp_path / name).write_bytes(b"drawn from the rollouts")
    run_dirs = {mode: [tmp_path / "runs" / f"{mode}-s{r['seed']}" for r in rows] for mode, rows in arms.items()}
    assert [p.name for p in plot_study(study, tmp_path, run_dirs)] == ["accuracy.png", "curves.png"]
    for name in ("margin_profile.png", "bic_gains.png"):
        assert (tmp_path / name).read_bytes() == b"drawn from the rollouts"


def test_study_rejects_bad_arms(tmp_path):
    from fastopd.demo.study import run_study

    with pytest.raises(ValueError, match="arms"):
        run_study(tmp_path, arms=("full",))
    with pytest.raises(ValueError, match="arms"):
        run_study(tmp_path, arms=("release", "suffix"))
    assert set(ARMS) == {"release", "full", "fixed_prefix", "random", "shuffled", "sft", "online", "truncate"}


def test_a_finished_run_is_not_rerun(tmp_path, monkeypatch):
    """Resumable: runs with a result.json are read back; only the missing ones train (fake training here)."""
    import fastopd.demo.demo as demo
    import fastopd.demo.study as st

    calls = []

    def fake_run(cfg, sched, run_dir, progress):
        calls.append((cfg.mode, cfg.seed, cfg.fraction))
        row = {**_row(cfg.seed, 0.5 + 0.01 * cfg.seed, 0.7), "kept_fraction": 0.6 + 0.01 * cfg.seed, "mode": cfg.mode}
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "result.json").write_text(json.dumps(row))
        return row

    monkeypatch.setattr(st, "_run_one", fake_run)
    monkeypatch.setattr(st, "plot_study", lambda *a, **k: [])
    monkeypatch.setattr(demo, "baseline_accuracy", lambda cfg, sched: {
        "student": {"accuracy": 0.2, "total": 4, "ood": {"accuracy": 0.3}}, "teacher": {"accuracy": 0.9}})
    kw = dict(seeds=2, task="arithmetic", arms=("release", "fixed_prefix"), progress=False, precondition=False)
    study = st.run_study(tmp_path, **kw)
    # every seed's release run first (fixed_prefix takes its kept fraction), then the runs that depend on it
    assert calls == [("release", 0, 0.5), ("release", 1, 0.5), ("fixed_prefix", 0, 0.6), ("fixed_prefix", 1, 0.61)]
    assert [r["seed"] for r in study["arms"]["fixed_prefix"]] == [0, 1]
    gain = study["summary"]["arms"]["release"]["gain_vs_start"]
    assert gain["mean"] == pytest.approx(0.5 + 0.005 - 0.2) and gain["n"] == 2
    assert study["summary"]["above_start"]["release"] == {"seeds": 2, "of": 2}
    with pytest.raises(ValueError, match="jobs"):
        st.run_study(tmp_path, **{**kw, "arms": ("release",)}, jobs=0)
    (tmp_path / "runs" / "release-s1" / "result.json").unlink()  # an interrupted run
    calls.clear()
    st.run_study(tmp_path, **kw)
    assert calls == [("release", 1, 0.5)]
    saved = json.loads((tmp_path / "study.json").read_text())
    assert set(saved["arms"]) == {"release", "fixed_prefix"} and (tmp_path / "study.md").is_file()


def _check_row(seed, correct, sup, gen, t):
    c = np.array(correct, dtype=float)
    return {"seed": seed, "accuracy": float(c.mean()), "accuracy_check": float(c[:2].mean()),
            "accuracy_nocheck": float(c[2:].mean()), "correct": list(correct), "tokens": 1000,
            "tokens_supervised": sup, "tokens_generated": gen, "time_per_step": t, "ood_accuracy": 0.5,
            "accept_rate": 0.7, "gain_mean": 20.0, "decisions": {"on time": 3, "late": 1}}


def test_check_task_pairs_paired_by_seed_and_by_problem():
    """Issue 24's pairs: a - b over the seeds both arms have (paired by seed, not list order), in accuracy (also
    split by the problems with / without a check), tokens and time; per-problem intervals from the grades."""
    from fastopd.demo.study import PAIRS, paired_pairs, problem_bootstrap

    with_check = [True, True, False, False]
    arms = {
        "release": [_check_row(0, [1, 1, 1, 0], 500, 3000, 1.0), _check_row(1, [1, 0, 1, 1], 520, 3000, 1.2)],
        "fixed_prefix": [_check_row(1, [0, 0, 1, 1], 510, 3000, 1.1), _check_row(0, [0, 1, 1, 0], 500, 3000, 1.0)],
        "online": [_check_row(0, [1, 1, 0, 0], 400, 2000, 0.8)],
        "truncate": [_check_row(0, [1, 0, 0, 0], 450, 2100, 0.9), _check_row(1, [1, 0, 0, 0], 450, 2100, 0.9)],
    }
    p = paired_pairs(arms, with_check=with_check, n_boot=2000)
    assert set(p) == {"release - fixed_prefix", "online - truncate"}  # pairs with a missing arm are left out
    rf = p["release - fixed_prefix"]
    assert rf["accuracy"]["seeds"]["mean"] == pytest.approx((0.25 + 0.25) / 2) and rf["accuracy"]["seeds"]["n"] == 2
    assert rf["accuracy_check"]["seeds"]["mean"] == pytest.approx((0.5 + 0.5) / 2)
    assert rf["accuracy_nocheck"]["seeds"]["mean"] == pytest.approx(0.0)
    assert rf["tokens_supervised"]["seeds"]["mean"] == pytest.approx(5.0)
    assert rf["time_per_step"]["seeds"]["mean"] == pytest.approx(0.05)
    # per problem: differences averaged over the two seeds = [1, 0, 0, 0]
    q = rf["accuracy"]["problems"]
    assert q["mean"] == pytest.approx(0.25) and q["n"] == 4 and q["lo"] <= 0.25 <= q["hi"] and q["hi"] > q["lo"]
    assert rf["accuracy_check"]["problems"]["mean"] == pytest.approx(0.5) and rf["accuracy_check"]["problems"]["n"] == 2
    ot = p["online - truncate"]  # only seed 0 is in both
    assert ot["accuracy"]["seeds"]["n"] == 1 and ot["tokens_generated"]["seeds"]["mean"] == pytest.approx(-100)
    assert ("online", "truncate") in PAIRS
    same = problem_bootstrap([[1, 0, 1]], [[1, 0, 1]], n_boot=100)
    assert same == {"mean": 0.0, "lo": 0.0, "hi": 0.0, "n": 3}
    with pytest.raises(ValueError, match="correct_a"):
        problem_bootstrap([[1, 0]], [[1, 0, 1]])


def test_format_study_of_the_check_task_shows_the_split_pairs_and_decisions():
    from fastopd.demo.study import CHECK_METRICS, paired_pairs

    arms = {"release": [_check_row(0, [1, 1, 1, 0], 500, 3000, 1.0)],
            "full": [_check_row(0, [1, 0, 1, 0], 1000, 3000, 1.3)]}
    summary = aggregate(arms, metrics=CHECK_METRICS, n_boot=100)
    summary["pairs"] = paired_pairs(arms, with_check=[True, True, False, False], n_boot=100)
    study = {"arms": arms, "student_before": {"accuracy": 0.3}, "setting": {"task": "check", "seeds": [0]}}
    md = format_study(study, summary)
    assert "accuracy, problems with a check" in md and "| release - full |" in md
    assert "+25.0 pts [+25.0, +25.0]" in md  # accuracy 0.75 - 0.50, one seed
    assert "| release | 4 | 75.0% | 0.0% | 25.0% |" in md  # decisions: on time 3, early 0, late 1 of 4


# ---- a study folder records its settings; torn files are redone (issue 22)

@pytest.fixture
def fake_study(monkeypatch):
    """run_study with fake training, baseline and plots; returns the list of (mode, seed, steps) trained and the
    number of baseline calls."""
    import fastopd.demo.demo as demo
    import fastopd.demo.study as st

    calls, baselines = [], []

    def fake_run(cfg, sched, run_dir, progress):
        calls.append((cfg.mode, cfg.seed, cfg.steps))
        row = {**_row(cfg.seed, 0.5, 0.7), "kept_fraction": 0.6, "mode": cfg.mode}
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "result.json").write_text(json.dumps(row))
        return row

    def fake_baseline(cfg, sched):
        baselines.append(cfg.steps)
        return {"student": {"accuracy": 0.2, "total": 4, "ood": {"accuracy": 0.3}}, "teacher": {"accuracy": 0.9}}

    monkeypatch.setattr(st, "_run_one", fake_run)
    monkeypatch.setattr(st, "plot_study", lambda *a, **k: [])
    monkeypatch.setattr(demo, "baseline_accuracy", fake_baseline)
    kw = dict(seeds=1, task="arithmetic", arms=("release",), progress=False, precondition=False)
    return st, kw, calls, baselines


def test_a_study_folder_of_other_steps_or_task_is_refused_before_any_work(tmp_path, fake_study):
    st, kw, calls, baselines = fake_study
    st.run_study(tmp_path, **kw, steps=2)
    assert calls == [("release", 0, 2)] and json.loads((tmp_path / "settings.json").read_text())["steps"] == 2
    calls.clear()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError) as e:
        st.run_study(tmp_path, **kw, steps=3)
    msg = str(e.value)
    assert "\n" not in msg and "holds a study of other settings (steps 2 -> 3)" in msg
    with pytest.raises(ValueError, match=r"other settings \(task 'arithmetic' -> 'long'\)"):
        st.run_study(tmp_path, **{**kw, "task": "long"}, steps=2)
    every = json.loads((tmp_path / "settings.json").read_text())["eval_every"]
    with pytest.raises(ValueError, match=f"eval_every {every} -> {every + 1}"):
        st.run_study(tmp_path, **kw, steps=2, eval_every=every + 1)
    assert calls == [] and len(baselines) == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written
    # the same settings, another seed and arm: the finished run is read back, only the new ones train
    st.run_study(tmp_path, **{**kw, "seeds": 2, "arms": ("release", "full")}, steps=2)
    assert sorted(calls) == [("full", 0, 2), ("full", 1, 2), ("release", 1, 2)]


def test_a_study_folder_without_a_record_of_its_settings_is_refused(tmp_path, fake_study):
    st, kw, calls, _ = fake_study
    (tmp_path / "runs" / "release-s0").mkdir(parents=True)
    (tmp_path / "runs" / "release-s0" / "result.json").write_text(json.dumps(_row(0, 0.9, 0.9)))
    with pytest.raises(ValueError, match="without a record of its settings"):
        st.run_study(tmp_path, **kw, steps=2)
    assert calls == []


@pytest.mark.parametrize("args, message", [
    (dict(steps=0), "steps must be an int >= 1, got 0"),
    (dict(steps=2.5), "steps must be an int >= 1"),
    (dict(eval_every=-1), "eval_every must be an int >= 0"),
    (dict(seeds=0), "seeds must be"),
    (dict(num_threads=-2), "num_threads must be an int >= 0"),
    (dict(task="nope"), "task must be one of"),
])
def test_study_arguments_are_checked_before_any_folder_is_made(tmp_path, fake_study, args, message):
    st, kw, calls, baselines = fake_study
    out = tmp_path / "study"
    with pytest.raises(ValueError, match=message):
        st.run_study(out, **{**kw, **args})
    assert not out.exists() and calls == [] and baselines == []


def test_study_cli_with_steps_0_is_one_line_and_makes_nothing(tmp_path, capsys):
    from fastopd import cli

    out = tmp_path / "study"
    assert cli.main(["study", "--steps", "0", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == "fastopd study: error: steps must be an int >= 1, got 0\n" and not out.exists()


def test_torn_result_and_baseline_are_redone_and_said(tmp_path, fake_study, capsys):
    st, kw, calls, baselines = fake_study
    st.run_study(tmp_path, **kw, steps=2)
    result = tmp_path / "runs" / "release-s0" / "result.json"
    result.write_text(result.read_text()[:10])  # torn, as a kill mid-write left it before writes were atomic
    (tmp_path / "baseline.json").write_text('{"student_bef')
    calls.clear()
    capsys.readouterr()
    study = st.run_study(tmp_path, **kw, steps=2)
    out = capsys.readouterr().out
    assert calls == [("release", 0, 2)] and len(baselines) == 2
    assert f"{result}: not valid JSON" in out and "run release-s0 is redone" in out
    assert "baseline.json: not valid JSON" in out and "the baseline is redone" in out
    assert json.loads(result.read_text())["seed"] == 0 and study["student_before"]["accuracy"] == 0.2
    assert not list(tmp_path.rglob(".*.tmp"))  # every JSON written whole, no temporary left
