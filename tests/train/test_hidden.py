"""The trainer's loss from hidden states (fastopd/train/hidden.py) equals the logits path on the demo models.

The shipped demo student and teacher (fastopd/assets/demo, Qwen3 with tied embeddings, different widths)
score sampled rollouts both ways: ``criterion(completion_logits(student), completion_logits(teacher), ...)``
and ``hidden_loss`` (final hidden states + LM heads, ``OPDLoss.linear``). Loss, release weights, metrics and
the gradient of every student parameter must agree within fp32 tolerance; and no (N, C, V) tensor is made.
"""

from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import pytest
import torch

from fastopd.loss import OPDLoss
from helpers import ROOT, LargestTensor
from fastopd.release import ReleaseRule
from fastopd.train.hidden import hidden_loss
from fastopd.train.models import load_model, load_tokenizer
from fastopd.train.rollouts import add_segments, completion_logits, generate_completions
from fastopd.train.trainer import completion_loss

DEMO = ROOT / "fastopd" / "assets" / "demo"


@pytest.fixture(scope="module")
def demo():
    torch.manual_seed(0)
    tok = load_tokenizer(str(DEMO / "tokenizer"))
    student = load_model(str(DEMO / "student"), dtype=torch.float32, attn="sdpa")
    teacher = load_model(str(DEMO / "teacher"), dtype=torch.float32, attn="sdpa").eval()
    rows = [json.loads(line) for line in (DEMO / "data" / "train.jsonl").read_text().splitlines()[:3]]
    prompts = [r["prompt"] for r in rows for _ in range(2)]
    rollouts = generate_completions(student, tok, prompts, eos_ids=[tok.eos_token_id], max_new_tokens=40,
                                    do_sample=True, temperature=1.0)
    add_segments(rollouts, tok)
    return tok, student, teacher, rollouts


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@torch.no_grad()
def _loss_by_hand(student, teacher, rollouts, weights, loss: str, v: int) -> float:
    """docs/formulas.md §5 on-policy, in fp64, one unpadded rollout at a time through the models' plain forward
    (no padding, position ids, logits_to_keep, OPDLoss or reference): pg sum_t -w_t (u_t - s_t) / n,
    reverse_kl sum_t w_t KL_t / n, n the valid tokens of the batch."""
    total, n_valid = 0.0, 0
    p_w = rollouts.prompt_width
    for i in range(rollouts.targets.shape[0]):
        n = int(rollouts.lengths[i])
        prompt = rollouts.input_ids[i, :p_w][rollouts.attention_mask[i, :p_w].bool()]
        c = rollouts.targets[i, :n]
        seq = torch.cat([prompt, c])[None]
        ls = torch.log_softmax(student(seq).logits[0, len(prompt) - 1:-1, :v].double(), -1)
        lt = torch.log_softmax(teacher(seq).logits[0, len(prompt) - 1:-1, :v].double(), -1)
        if loss == "pg":
            term = -(lt.gather(-1, c[:, None]) - ls.gather(-1, c[:, None])).squeeze(-1)
        else:
            term = (ls.exp() * (ls - lt)).sum(-1)
        total += float((weights[i, :n].double() * term).sum())
        n_valid += n
    return total / n_valid


@pytest.mark.parametrize("loss", ["pg", "reverse_kl"])
def test_hidden_loss_equals_logits_path(demo, loss):
    _, student, teacher, rollouts = demo
    v = student.get_output_embeddings().weight.shape[0]
    # min_gain far below zero: rollouts with a downward split are released, so the weights are not trivial
    crit = OPDLoss(loss, k=8, vocab_size=v, rule=ReleaseRule(k=8, min_gain=-1e9))

    def run(loss_from):  # what the trainer's step calls (fastopd.train.trainer.completion_loss)
        cfg = SimpleNamespace(loss_from=loss_from, loss_chunk_size=7)
        return SimpleNamespace(cfg=cfg, accelerator=SimpleNamespace(autocast=contextlib.nullcontext),
                               student=student, teacher=teacher, criterion=crit)

    student.zero_grad(set_to_none=True)
    with torch.no_grad():
        tl = completion_logits(teacher, rollouts)
    ref = crit(completion_logits(student, rollouts), tl, rollouts.targets, segment_ids=rollouts.segment_ids)
    ref.loss.backward()
    g_ref = _grads(student)

    student.zero_grad(set_to_none=True)
    out = completion_loss(run("hidden"), rollouts)
    out.loss.backward()
    g = _grads(student)

    student.zero_grad(set_to_none=True)
    logits_option = completion_loss(run("logits"), rollouts)
    # both of the trainer's options against the loss written out by hand on the rule's weights (the weights
    # themselves are checked against the oracle in tests/train/test_trainer.py)
    hand = _loss_by_hand(student, teacher, rollouts, ref.release.weights, loss, v)
    for got in (logits_option, out):
        assert abs(got.loss.item() - hand) <= 1e-5 * max(1.0, abs(hand)), (got.loss.item(), hand)
    assert torch.equal(logits_option.release.weights, ref.release.weights)

    assert torch.equal(out.release.weights, ref.release.weights)
    assert out.metrics["num_kept"] < out.metrics["num_valid"]  # the rule cut something
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * max(1.0, abs(ref.loss.item()))
    for key, val in ref.metrics.items():
        assert out.metrics[key] == pytest.approx(val, rel=1e-4, abs=1e-5, nan_ok=True), key
    assert g.keys() == g_ref.keys() and len(g) > 0
    for name in g_ref:
        err = (g[name] - g_ref[name]).abs().max().item()
        scale = g_ref[name].abs().max().item()
        assert err <= 1e-4 * scale + 1e-7, f"{name}: max |error| {err:.3g} (scale {scale:.3g})"


def test_hidden_loss_builds_no_n_c_v_tensor(demo):
    """No op of a training step's loss (forward + backward) returns a V-wide tensor backed by N*C*V elements
    (storage counted, so views of the weights count as the weights, and expanded stand-ins as 1)."""
    _, student, teacher, rollouts = demo
    n, c = rollouts.targets.shape
    v = student.get_output_embeddings().weight.shape[0]
    chunk = 8

    crit = OPDLoss("pg", k=8, vocab_size=v, rule=ReleaseRule(k=8))
    with LargestTensor(last_dim=v) as mode:
        hidden_loss(crit, student, teacher, rollouts, chunk_size=chunk).loss.backward()
    widest = max(student.get_output_embeddings().weight.numel(), teacher.get_output_embeddings().weight.numel())
    bound = max(chunk * v, n * v, widest)  # a tile, the models' own (N, 1, V) last-position logits, a head
    assert bound < n * c * v
    assert mode.largest <= bound, f"a V-wide tensor of {mode.largest} elements (N*C*V = {n * c * v})"
