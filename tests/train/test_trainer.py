"""Tests of the Hugging Face OPD trainer (fastopd/train/trainer.py): the step's wiring, learning, logs, resume.

Tiny random Qwen3 models (tests/tiny.py), CPU, one torch thread. About a minute on a 2-core CPU; the
kill-and-resume and the two-process tests start subprocesses.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import ROOT, strict_jsonl

from fastopd import reference
from fastopd.loss import OPDLoss
from fastopd.release import ReleaseRule
from fastopd.segment import token_segments
from fastopd.train.checkpoint import list_checkpoints
from fastopd.train.models import load_model
from fastopd.train.rollouts import add_segments, completion_logits, generate_completions
from fastopd.train.runlog import read_log
from fastopd.train.trainer import train
from tiny import load_models as models, text_rollouts, tiny_config

DETERMINISTIC_KEYS = ("loss", "adv_mean", "margin_mean", "kept_fraction", "accept_rate", "tokens",
                      "tokens_supervised", "completion_length", "grad_norm")



# ------------------------------------------------------------------------------------------ logits, weights
def test_trainer_weights_equal_release_weights(tiny):
    """The weights the trainer's loss applies == the oracle (fastopd.reference) on each unpadded rollout.

    The oracle path is the reference's token_stats / segment_means / bic_release / release_weights on one
    rollout at a time (no padding, no batching, no C++ scan); the segments come from token_segments, whose
    own oracle is tests/test_segment.py. So this checks the trainer's batching and wiring of the rule."""
    from fastopd.demo.task import format_prompt, make_problems

    tok, student, teacher = models(tiny)
    probs = make_problems(6, 11, min_steps=3, max_steps=5)
    cut = [None, -10, None, -25, None, None]  # some truncated completions (different lengths)
    r = text_rollouts(tok, [format_prompt(p["prompt"]) for p in probs],
                      [(" " + p["solution"])[:c] for p, c in zip(probs, cut)])
    add_segments(r, tok)
    rule = ReleaseRule(min_gain=0.0, min_segments=1)  # loose thresholds so that several rollouts release
    crit = OPDLoss("pg", vocab_size=len(tok), rule=rule)
    with torch.no_grad():
        t_logits = completion_logits(teacher, r)
    out = crit(completion_logits(student, r), t_logits, r.targets, segment_ids=r.segment_ids)

    # the oracle, one unpadded rollout at a time
    v = len(tok)
    for i in range(len(probs)):
        p = tok(format_prompt(probs[i]["prompt"]))["input_ids"]
        c = r.targets[i][r.valid[i]]
        seq = torch.tensor([p + c.tolist()])
        with torch.no_grad():
            zs = student(seq).logits[0, len(p) - 1:-1, :v]
            zt = teacher(seq).logits[0, len(p) - 1:-1, :v]
        st = reference.token_stats(zs, zt, c, k=16)
        seg = token_segments(tok, c.numpy())
        ones = np.ones((1, len(c)), dtype=bool)
        series = reference.segment_means(st.margins[None].numpy(), seg[None], ones)
        scan = reference.bic_release(series.values, series.offsets, min_segments=1, min_gain=0.0)
        r_idx = int(scan.release_index[0])
        r_seg = series.segment_ids[r_idx] if r_idx < len(series.values) else seg.max() + 1
        w = reference.release_weights(seg[None], ones, [r_seg])[0]
        n = len(c)
        torch.testing.assert_close(out.release.weights[i, :n].cpu(), w, atol=1e-6, rtol=1e-6)
        assert torch.all(out.release.weights[i, n:] == 0)
        # and the loss uses exactly these weights: l_t = -w_t A_t (on-policy, rho = 1)
        torch.testing.assert_close(out.per_token[i, :n].detach(), -w * st.advantages, atol=1e-5, rtol=1e-4)
        assert np.array_equal(r.segment_ids[i, :n].numpy(), seg)
    assert out.release.scan.accepted.any(), "the test needs at least one released rollout"
    assert (out.release.weights[out.release.scan.accepted] == 0).any()


# ------------------------------------------------------------------------------------------ learning
def test_repeated_steps_on_a_fixed_batch_lower_the_loss(tiny):
    """Fixed rollouts, repeated updates through the trainer's pieces: the objective goes down.

    ``reverse_kl`` is a true loss, so its value must fall. The ``pg`` surrogate's value (-mean A_t) is not
    what its gradient descends: -w A_t grad s_t moves each sampled token's log-ratio s_t - u_t towards 0,
    so for ``pg`` the mean squared advantage on the batch must fall.
    """
    tok, student, teacher = models(tiny)
    torch.manual_seed(0)
    student.eval()
    r = generate_completions(student, tok, ["Q: Start with 3. Add 4. What is the result?\nA:"] * 4,
                             eos_ids=[tok.eos_token_id], max_new_tokens=12, do_sample=True)
    add_segments(r, tok)
    with torch.no_grad():
        t_logits = completion_logits(teacher, r)
    for loss_name, lr in (("reverse_kl", 3e-3), ("pg", 1e-3)):
        student = load_model(tiny["student"], dtype=torch.float32, attn="sdpa").train()
        before = {k: v.clone() for k, v in student.state_dict().items()}
        crit = OPDLoss(loss_name, vocab_size=len(tok), rule=ReleaseRule(mode="full"))
        opt = torch.optim.AdamW(student.parameters(), lr=lr)
        losses, sq_adv = [], []
        for _ in range(6):
            out = crit(completion_logits(student, r), t_logits, r.targets, segment_ids=r.segment_ids)
            losses.append(float(out.loss.detach()))
            sq_adv.append(float((out.stats.advantages[r.valid] ** 2).mean()))
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
        if loss_name == "reverse_kl":
            assert losses[-1] < 0.7 * losses[0], losses
        else:
            assert sq_adv[3] < 0.5 * sq_adv[0], sq_adv


def test_one_training_step_changes_the_student_and_logs(tiny, tmp_path):
    from safetensors.torch import load_file

    cfg = tiny_config(tiny, tmp_path / "run", steps=1, eval_data=tiny["eval"], eval_at_start=True,
                      log_rollouts=True, max_new_tokens=8)
    summary = train(cfg)
    assert summary["step"] == 1 and summary["tokens"] > 0
    init = load_file(Path(tiny["student"]) / "model.safetensors")
    final = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert set(init) == set(final)
    assert any(not torch.equal(init[k], final[k]) for k in init)
    rows = read_log(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1]
    assert rows[0]["rollouts"] == 4 and rows[0]["tokens_supervised"] <= rows[0]["tokens"]
    assert [e["step"] for e in read_log(tmp_path / "run" / "eval.jsonl")] == [0, 1]
    recs = read_log(tmp_path / "run" / "rollouts.jsonl")
    assert len(recs) == 4
    for name in ("metrics.jsonl", "eval.jsonl", "rollouts.jsonl"):  # every log line is strict JSON
        assert strict_jsonl(tmp_path / "run" / name) == read_log(tmp_path / "run" / name)
    # the logged per-rollout decisions add up to the step's supervised tokens
    kept = sum(round(r["kept_fraction"] * r["length"]) for r in recs)
    assert kept == rows[0]["tokens_supervised"]
    assert sum(r["length"] for r in recs) == rows[0]["tokens"]
    with pytest.raises(FileExistsError, match="--resume"):  # an existing run is never silently overwritten
        train(cfg)


def test_fixed_prefix_control_and_accumulation(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path / "run", steps=2, mode="fixed_prefix", fraction=0.5, grad_accum_steps=2,
                      max_new_tokens=10)
    train(cfg)
    rows = read_log(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["rollouts"] == 2 * 2 * 2  # prompts x samples x micro-batches
        assert 0.45 <= r["kept_fraction"] <= 0.65  # ceil(0.5 L) of every rollout


# ------------------------------------------------------------------------------------------ kill and resume
def _train_cmd(tiny, out, steps, *extra):
    return [sys.executable, "-m", "fastopd", "train", "--student", tiny["student"], "--teacher", tiny["teacher"],
            "--train-data", tiny["train"], "--output-dir", str(out), "--steps", str(steps),
            "--prompts-per-step", "2", "--num-samples", "2", "--max-new-tokens", "12", "--lr", "1e-3",
            "--lr-scheduler", "constant", "--seed", "3", "--save-every", "2", "--keep-last", "2",
            "--no-progress", "--log-with", "none", "--num-threads", "1", "--no-eval-at-start",
            "--mode", "random", *extra]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_kill_and_resume_has_no_gap_no_duplicate_and_matches_uninterrupted(tiny, tmp_path):
    """SIGKILL a training process after a checkpoint, resume it, and compare with an uninterrupted run.

    The killed run was asked for 10_000 steps; with a constant LR the schedule does not depend on the total,
    so resuming with --steps s+3 must reproduce an uninterrupted run of s+3 steps exactly. The ``random``
    control is used so that the release rule's generator is part of the restored state.
    """
    run = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(tiny, run, 10_000), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"training exited early: {proc.stderr.read().decode()[-2000:]}")
            if any(s >= 4 for s, _ in list_checkpoints(run)):
                break
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint within 120 s")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    last = list_checkpoints(run)[-1][0]
    total = last + 3
    before = [r["step"] for r in read_log(run / "metrics.jsonl")]
    assert before[:last] == list(range(1, last + 1))  # a step's row is written before its checkpoint

    res = subprocess.run(_train_cmd(tiny, run, total, "--resume"), env=_env(), capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout + res.stderr
    resumed = read_log(run / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, total + 1))  # no gap, no duplicate
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert len(list_checkpoints(run)) == 2  # keep_last

    # the uninterrupted run, same seed and settings, in this process
    cfg = tiny_config(tiny, tmp_path / "straight", steps=total, max_new_tokens=12, lr_scheduler="constant",
                      seed=3, save_every=2, keep_last=2, mode="random")
    train(cfg)
    straight = read_log(tmp_path / "straight" / "metrics.jsonl")
    assert len(straight) == total
    for a, b in zip(resumed, straight):
        for key in DETERMINISTIC_KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key, a[key], b[key])


# ------------------------------------------------------------------------------------------ two processes
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_cpu_run(tiny, tmp_path):
    """The unchanged trainer in two CPU processes (torchrun + ACCELERATE_USE_CPU: MULTI_CPU, gloo).

    ``accelerate launch --cpu`` starts several CPU processes only through MPI, so torchrun starts them here;
    on GPUs ``accelerate launch --num_processes N`` runs the very same entry point.
    """
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "fastopd", "train", "--student", tiny["student"], "--teacher", tiny["teacher"],
           "--train-data", tiny["train"], "--eval-data", tiny["eval"], "--output-dir", str(out), "--steps", "2",
           "--prompts-per-step", "2", "--num-samples", "2", "--max-new-tokens", "10", "--no-progress",
           "--log-with", "none", "--num-threads", "1", "--save-every", "1"]
    env = {**_env(), "ACCELERATE_USE_CPU": "true"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    rows = read_log(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]  # written once, by the main process
    assert all(r["rollouts"] == 2 * 2 * 2 for r in rows)  # summed over the two processes
    ckpt = list_checkpoints(out)[-1][1]
    assert (ckpt / "rng-rank0.pt").is_file() and (ckpt / "rng-rank1.pt").is_file()
    ev = read_log(out / "eval.jsonl")
    assert ev[-1]["total"] == 4  # the eval set split over the processes and summed back


# ------------------------------------------------------------------------------------------ the sft baseline
def test_sft_loss_is_the_students_token_mean_cross_entropy(tiny):
    """sft_loss == the mean over all completion tokens of -log p_S(y_t), computed here in fp64 one unpadded
    rollout at a time (prompt + completion, no batching)."""
    from types import SimpleNamespace

    from fastopd.demo.task import format_prompt, make_problems
    from fastopd.train.trainer import cross_entropy_loss as sft_loss

    tok, student, _ = models(tiny)
    probs = make_problems(4, 5, min_steps=2, max_steps=4)
    prompts = [format_prompt(p["prompt"]) for p in probs]
    texts = [(" " + p["solution"])[:c] for p, c in zip(probs, (None, -7, None, -15))]
    r = text_rollouts(tok, prompts, texts)
    out = sft_loss(SimpleNamespace(student=student), r)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(prompts)):
            n = int(r.lengths[i])
            ids = r.input_ids[i][r.attention_mask[i].bool()][None]  # prompt + completion, no padding
            logp = student(input_ids=ids).logits.double().log_softmax(-1)[0]
            comp = ids[0, -n:]
            total -= float(logp[-n - 1:-1].gather(-1, comp[:, None]).sum())
            count += n
    assert out.metrics["num_valid"] == out.metrics["num_kept"] == count
    assert float(out.loss.detach()) == pytest.approx(total / count, rel=1e-5)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_sft_mode_samples_from_the_teacher_and_trains_the_student(tiny, tmp_path, monkeypatch):
    import fastopd.train.trainer as tr
    from safetensors.torch import load_file

    seen = []
    real = tr.generate_completions

    def spy(model, *a, **k):
        seen.append(model.config.hidden_size)
        return real(model, *a, **k)

    monkeypatch.setattr(tr, "generate_completions", spy)
    cfg = tiny_config(tiny, tmp_path / "run", steps=2, mode="sft", max_new_tokens=8, log_rollouts=True)
    train(cfg)
    _, student, teacher = models(tiny)
    assert seen == [teacher.config.hidden_size] * 2 and teacher.config.hidden_size != student.config.hidden_size
    rows = read_log(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["tokens_supervised"] == r["tokens"] > 0 and r["adv_mean"] is None for r in rows)
    assert not (tmp_path / "run" / "rollouts.jsonl").exists()  # no rule decisions to log
    init = load_file(Path(tiny["student"]) / "model.safetensors")
    final = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert any(not torch.equal(init[k], final[k]) for k in init)
