"""Sampler online (docs/formulas.md §8, fastopd/train/online_sampler.py, fastopd/integrations/hf_stopping.py):
rollouts that stop at the rule's point.

The sampler samples as HF generate does (token for token, same seed); its sampled tokens' log-probs and margins
equal a full forward pass's; its decisions replay exactly with fastopd.online_release; a rollout that never
stops is trained exactly as by the offline rule; a trainer run in mode online logs decisions that replay and the
costs it saved; the HF StoppingCriteria decides as the sampler does. The shipped demo models (trained, so their
rollouts have sentences and the rule stops them) and the tiny random ones (tests/tiny.py); CPU, one thread.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import fastopd
from fastopd import reference
from fastopd.loss import OPDLoss
from fastopd.release import ReleaseRule
from fastopd.integrations.hf_stopping import OnlineReleaseStopping
from fastopd.train.online_sampler import online_weights, sample_online
from fastopd.train.rollouts import completion_logits, eos_ids_of, generate_completions, kept_rollouts
from fastopd.train.trainer import completion_loss
from fastopd.train.runlog import read_log
from fastopd.train.trainer import train
from tiny import load_models, tiny_config

ASSETS = Path(fastopd.__file__).parent / "assets" / "demo"



@pytest.fixture(scope="module")
def demo():
    """The shipped demo tokenizer, student and teacher (fp32, eval) and eight long-task prompts."""
    from fastopd.train.models import load_model, load_tokenizer

    tok = load_tokenizer(str(ASSETS / "tokenizer"))
    student = load_model(str(ASSETS / "student"), dtype=torch.float32, attn="sdpa").eval()
    teacher = load_model(str(ASSETS / "teacher"), dtype=torch.float32, attn="sdpa").eval()
    rows = [json.loads(line) for line in (ASSETS / "data" / "long_train.jsonl").read_text().splitlines()[:8]]
    return SimpleNamespace(tok=tok, student=student, teacher=teacher, prompts=[r["prompt"] for r in rows],
                           eos=eos_ids_of(tok, student))


def sample(d, seed=0, **kw):
    torch.manual_seed(seed)
    opts = dict(eos_ids=d.eos, max_new_tokens=320, chunk_size=16, stats=fastopd.StatsOptions(vocab_size=len(d.tok)))
    opts.update(kw)
    return sample_online(d.student, d.teacher, d.tok, d.prompts, **opts)


@pytest.fixture(scope="module")
def stopped(demo):
    """Online rollouts of the demo models with the default rule: most stop."""
    return sample(demo, seed=1)


# ------------------------------------------------------------------------------------------ sampling as HF does
@pytest.mark.parametrize("opts", [dict(), dict(temperature=0.7, top_k=7, top_p=0.9)])
def test_sampler_without_stop_is_generate_token_for_token(tiny, opts):
    tok, student, _ = load_models(tiny)
    _, _, teacher = load_models(tiny)
    prompts = ["Q: 12 + 7 = ?\nA:", "Add 3 and 4.", "Compute 5 + 9 + 1, then check it.", "2 + 2"]
    eos = eos_ids_of(tok, student)
    torch.manual_seed(3)
    sampling = {("sampling_temperature" if k == "temperature" else k): v for k, v in opts.items()}
    got = sample_online(student, teacher, tok, prompts, eos_ids=eos, max_new_tokens=40, chunk_size=7,
                        stats=fastopd.StatsOptions(vocab_size=len(tok)), confirm_segments=10**9, compact=False,
                        **sampling)
    torch.manual_seed(3)
    want = generate_completions(student, tok, prompts, eos_ids=eos, max_new_tokens=40, do_sample=True, **opts)
    c = got.targets.shape[1]
    assert torch.equal(got.targets, want.targets[:, :c]) and bool((want.targets[:, c:] == -100).all())
    assert torch.equal(got.lengths, want.lengths) and torch.equal(got.stopped, want.stopped)
    assert got.texts == want.texts
    assert not got.online.decision.stopped.any()
    assert got.counts["generated"] == want.counts["generated"] == int(want.lengths.sum())


def test_sampler_refuses_a_processor_it_does_not_apply(tiny):
    tok, student, teacher = load_models(tiny)
    student.generation_config.min_p = 0.1
    with pytest.raises(ValueError, match="min_p=0.1"):
        sample_online(student, teacher, tok, ["1 + 1"], eos_ids=[tok.eos_token_id], max_new_tokens=4)
    with pytest.raises(ValueError, match="chunk_size"):
        sample_online(student, teacher, tok, ["1 + 1"], eos_ids=[tok.eos_token_id], max_new_tokens=4, chunk_size=0)


def test_sampled_logprobs_and_margins_equal_a_forward_pass(demo, stopped):
    """What the rule read while sampling (KV caches, chunks, rows dropped from the batch) is what a full forward
    over the kept tokens gives: the sampled tokens' s_t to 1e-5; u_t to 1e-5 plus fp32's relative 1e-5 (the
    teacher's log-probs reach -10 and below); m_t to 1e-4."""
    r = stopped
    assert r.online.decision.stopped.sum() >= 4  # rows left the batch mid-way
    with torch.no_grad():
        zs, zt = completion_logits(demo.student, r), completion_logits(demo.teacher, r)
    st = reference.token_stats(zs, zt, r.targets, k=16, vocab_size=len(demo.tok))
    v = r.valid
    torch.testing.assert_close(r.online.student_logprobs[v], st.student_logprobs[v], atol=1e-5, rtol=0)
    torch.testing.assert_close(r.online.teacher_logprobs[v], st.teacher_logprobs[v], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r.online.margins[v], st.margins[v], atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------ decisions
def test_stopped_rollouts_replay_and_end_after_their_stopping_segment(demo, stopped):
    r, dec = stopped, stopped.online.decision
    series = r.online.series
    replay = fastopd.online_release(series.values, series.offsets, confirm_segments=2)
    for f in ("stop_index", "release_index", "accepted", "stopped"):
        np.testing.assert_array_equal(getattr(replay, f), getattr(dec, f), err_msg=f)
    np.testing.assert_array_equal(replay.gain, dec.gain)
    # the series is the segment means of the kept tokens' margins (one implementation)
    again = fastopd.segment_means(r.online.margins, r.segment_ids, r.valid)
    np.testing.assert_array_equal(again.values, series.values)
    np.testing.assert_array_equal(again.offsets, series.offsets)
    seg = r.segment_ids
    for b in range(len(r.texts)):
        n_kept = int(r.lengths[b])
        if dec.stopped[b]:  # cut after segment stop_index - 1, no EOS; c segments after the release point
            assert int(seg[b, n_kept - 1]) == int(dec.stop_index[b]) - 1
            assert int(dec.stop_index[b] - dec.release_index[b]) >= 2 and not bool(r.stopped[b])
            assert int(r.targets[b, n_kept - 1]) not in demo.eos
            assert r.online.generated[b] >= n_kept
        else:
            assert r.online.generated[b] == n_kept
        assert bool((r.targets[b, n_kept:] == -100).all()) and bool((seg[b, n_kept:] == -1).all())


def test_confirm_beyond_every_series_is_the_offline_rule(demo):
    r = sample(demo, seed=1, confirm_segments=10**9)
    dec = r.online.decision
    assert not dec.stopped.any()
    offline = fastopd.bic_release(r.online.series.values, r.online.series.offsets)
    np.testing.assert_array_equal(dec.release_index, offline.release_index)
    np.testing.assert_array_equal(dec.gain, offline.gain)
    assert dec.accepted.sum() >= 4  # the offline rule releases these rollouts: the online one would stop them


def fake_run(d, mode="release", loss_from="logits"):
    cfg = SimpleNamespace(loss="pg", loss_from=loss_from, loss_chunk_size=0, mode=mode)
    rule = ReleaseRule(mode="release", backend="reference")
    # sampler online: the weights were decided while sampling, so the loss has no rule
    crit = OPDLoss("pg", ignore_index=-100, vocab_size=len(d.tok), backend="reference",
                   rule=None if mode == "online" else rule)
    return SimpleNamespace(cfg=cfg, accelerator=SimpleNamespace(autocast=contextlib.nullcontext), rule=rule,
                           criterion=crit, student=d.student,
                           teacher=d.teacher)


@pytest.mark.parametrize("loss_from", ["logits", "hidden"])
def test_a_rollout_that_never_stops_is_trained_as_by_the_offline_rule(demo, loss_from):
    """Stop disabled: the online decision's weights are the offline rule's on the same margins and segments,
    and the loss of the kept prefixes (a forward over them only) is the release mode's loss over the whole
    rollouts with those weights, its gradient too."""
    r = sample(demo, seed=2, confirm_segments=10**9)
    dec, w = online_weights(r)
    offline = ReleaseRule(mode="release", backend="reference").from_margins(r.online.margins, r.segment_ids, r.valid)
    assert torch.equal(w, offline.weights)
    np.testing.assert_array_equal(dec.release_segment, offline.release_segment)
    assert dec.scan.accepted.sum() >= 4 and 0 < dec.metrics["kept_fraction"] < 1

    run = fake_run(demo, mode="online", loss_from=loss_from)
    demo.student.zero_grad(set_to_none=True)
    out = completion_loss(run, r, r.online.weights)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in demo.student.named_parameters() if p.grad is not None}
    assert r.counts["student_forwarded"] < r.targets.numel()  # the released suffixes were not forwarded
    demo.student.zero_grad(set_to_none=True)
    plain = OPDLoss("pg", ignore_index=-100, vocab_size=len(demo.tok), backend="reference")
    with torch.no_grad():
        zt = completion_logits(demo.teacher, r)
    want = plain(completion_logits(demo.student, r), zt, r.targets, weights=offline.weights)
    want.loss.backward()
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-7)
    for n, p in demo.student.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    demo.student.zero_grad(set_to_none=True)
    assert out.metrics["num_valid"] == int(r.valid.sum())
    np.testing.assert_array_equal(out.release.release_segment, dec.release_segment)
    assert out.metrics["accept_rate"] == dec.metrics["accept_rate"]


def test_kept_rollouts_cut_to_the_supervised_prefix(stopped):
    dec, w = online_weights(stopped)
    kept = kept_rollouts(stopped, w)
    keep = (w > 0) & stopped.valid
    assert torch.equal(kept.lengths, keep.sum(-1))
    assert kept.targets.shape[1] == int(keep.sum(-1).max())
    assert torch.equal(kept.valid, keep[:, :kept.targets.shape[1]])
    # stopped rollouts keep exactly segments [0, r)
    s = dec.scan.stopped
    assert np.array_equal(dec.release_segment[s], dec.scan.release_index[s])


# ------------------------------------------------------------------------------------------ the trainer
@pytest.fixture(scope="module")
def online_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("online") / "run"
    assets = {"student": str(ASSETS / "student"), "teacher": str(ASSETS / "teacher"),
              "train": str(ASSETS / "data" / "long_train.jsonl")}
    cfg = tiny_config(assets, out, mode="online", tokenizer=str(ASSETS / "tokenizer"), max_new_tokens=200, steps=2,
                      prompts_per_step=2, num_samples=2, log_rollouts=True, lr=1e-4)
    summary = train(cfg)
    return out, summary


def test_trainer_online_logs_decisions_that_replay(online_run):
    out, _ = online_run
    recs = read_log(out / "rollouts.jsonl")
    assert len(recs) == 8 and sum(r["online_stopped"] for r in recs) >= 2
    values = np.concatenate([np.asarray(r["series"], dtype=np.float64) for r in recs])
    offsets = np.concatenate([[0], np.cumsum([len(r["series"]) for r in recs])]).astype(np.int64)
    replay = fastopd.online_release(values, offsets, confirm_segments=2)
    assert replay.stop_index.tolist() == [r["stop_index"] for r in recs]
    assert replay.release_index.tolist() == [r["release_index"] for r in recs]
    assert replay.stopped.tolist() == [r["online_stopped"] for r in recs]
    for r, rel in zip(recs, replay.release_index.tolist()):
        assert r["accepted"] == (rel < len(r["series"]))
        assert r["release_segment"] == (rel if r["accepted"] else max(r["segments"]) + 1)
        # the logged margins and segments give the logged series (segment means of §2)
        seg = np.asarray(r["segments"])
        means = [float(np.mean(np.asarray(r["margins"])[seg == j])) for j in range(len(r["series"]))]
        np.testing.assert_allclose(means, r["series"], rtol=1e-5, atol=1e-5)
        assert r["tokens_generated"] >= r["length"]


def test_trainer_online_logs_what_it_cost(online_run):
    out, summary = online_run
    rows = read_log(out / "metrics.jsonl")
    assert len(rows) == 2
    for m in rows:
        assert m["online_stop_rate"] > 0 and m["rollouts"] == 4
        assert m["tokens_generated"] >= m["tokens"] >= m["tokens_supervised"] > 0
        assert m["teacher_tokens"] == m["teacher_tokens_sampling"] + m["student_tokens_forwarded"]
        assert m["teacher_tokens_sampling"] >= m["tokens_generated"]
        assert m["student_tokens_forwarded"] >= m["tokens_supervised"]
        assert m["generate_row_steps"] >= m["tokens_generated"]
        assert 0 < m["time_generate_teacher"] + m["time_generate_rule"] < m["time_generate"]
        assert m["time_generate_teacher"] > 0 and m["time_generate_rule"] > 0
        assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])
    assert summary["tokens_supervised"] == sum(m["tokens_supervised"] for m in rows)


def test_full_mode_logs_the_same_cost_fields(tiny, tmp_path):
    train(tiny_config(tiny, tmp_path / "run", mode="full", steps=1))
    (m,) = read_log(tmp_path / "run" / "metrics.jsonl")
    assert m["tokens_generated"] == m["tokens"] and m["online_stop_rate"] == 0
    assert m["teacher_tokens"] == m["student_tokens_forwarded"] == m["generate_row_steps"]
    assert m["teacher_tokens_sampling"] == 0 and m["time_generate_teacher"] == m["time_generate_rule"] == 0


def test_config_options_of_mode_online(tiny, tmp_path):
    with pytest.raises(ValueError, match="confirm_segments"):
        tiny_config(tiny, tmp_path, mode="online", confirm_segments=1).validate()
    with pytest.raises(ValueError, match="online_chunk_size"):
        tiny_config(tiny, tmp_path, mode="online", online_chunk_size=0).validate()
    tiny_config(tiny, tmp_path, mode="online", confirm_segments=3, online_chunk_size=4).validate()


# ------------------------------------------------------------------------------------------ HF generate
def test_stopping_criteria_decides_as_the_sampler(demo):
    """generate + OnlineReleaseStopping: the same tokens (same seed; generate keeps every row, as the sampler with
    compact=False), so the same stops, kept lengths and series; stopped rows are padded after the stop, and
    generate ends once every row has stopped or ended."""
    from fastopd.train.rollouts import encode_prompts

    tok = demo.tok
    enc = encode_prompts(tok, demo.prompts, chat_template=False, max_prompt_tokens=512, device="cpu")
    stop = OnlineReleaseStopping(demo.teacher, tok, enc["attention_mask"], eos_ids=demo.eos, chunk_size=16,
                                 stats=fastopd.StatsOptions(vocab_size=len(tok)))
    torch.manual_seed(1)
    seqs = demo.student.generate(**enc, do_sample=True, max_new_tokens=320, eos_token_id=demo.eos,
                                 pad_token_id=tok.pad_token_id, top_k=0, logits_processor=[stop.logits_processor],
                                 stopping_criteria=[stop])
    res = stop.result(seqs)
    want = sample(demo, seed=1, compact=False)
    for f in ("stop_index", "release_index", "accepted", "stopped", "gain"):
        np.testing.assert_array_equal(getattr(res.decision, f), getattr(want.online.decision, f), err_msg=f)
    np.testing.assert_array_equal(res.series.values, want.online.series.values)
    np.testing.assert_array_equal(res.kept_lengths, want.lengths.numpy())
    p = enc["input_ids"].shape[1]
    for b, n in enumerate(res.kept_lengths):
        assert torch.equal(seqs[b, p:p + n], want.targets[b, :n])
    assert res.decision.stopped.sum() >= 4
    assert seqs.shape[1] - p < 320  # every row stopped or ended before the length limit
    for b in np.flatnonzero(res.decision.stopped):  # after the chunk that stopped it, a row is fed pads
        assert bool((seqs[b, p + int(want.online.generated[b]):] == tok.pad_token_id).all())
    replay = fastopd.online_release(res.series.values, res.series.offsets)
    np.testing.assert_array_equal(replay.stop_index, res.decision.stop_index)


def test_stopping_criteria_checks_its_use(demo):
    tok = demo.tok
    enc = tok(demo.prompts[:2], return_tensors="pt", padding=True, padding_side="left")
    stop = OnlineReleaseStopping(demo.teacher, tok, enc["attention_mask"], chunk_size=4)
    with pytest.raises(RuntimeError, match="logits_processor"):
        demo.student.generate(**enc, do_sample=True, max_new_tokens=3, stopping_criteria=[stop],
                              pad_token_id=tok.pad_token_id)
    with pytest.raises(ValueError, match="chunk_size"):
        OnlineReleaseStopping(demo.teacher, tok, enc["attention_mask"], chunk_size=0)
