"""Tests of rollouts (fastopd/train/rollouts.py): completion logits line up with the completion tokens."""

from __future__ import annotations

import torch

from fastopd.train.rollouts import completion_logits
from tiny import load_models as models, text_rollouts



def test_completion_logits_are_shifted_and_padding_invariant(tiny):
    tok, student, _ = models(tiny)
    r = text_rollouts(tok, ["Q: a\nA:", "Q: longer prompt here\nA:"], [" We start with 3.", " Yes. No."])
    got = completion_logits(student, r)
    assert got.shape == (*r.targets.shape, student.config.vocab_size)
    for i in range(2):  # unpadded single-row forward: logits at position t-1 predict completion token t
        p = tok(["Q: a\nA:", "Q: longer prompt here\nA:"][i])["input_ids"]
        c = r.targets[i][r.valid[i]].tolist()
        full = student(torch.tensor([p + c])).logits[0]
        want = full[len(p) - 1:len(p) + len(c) - 1]
        torch.testing.assert_close(got[i, :len(c)], want, atol=1e-5, rtol=1e-5)


def test_evaluate_without_a_graded_row_is_not_graded_never_zero_percent(tiny):
    import math

    from fastopd.train.rollouts import evaluate

    tok, student, _ = models(tiny)
    rows = [{"prompt": "Start with 3. Add 4.", "answer": None}, {"prompt": "Start with 1.", "answer": None}]
    res = evaluate(student, tok, rows, verifier="boxed", eos_ids=[tok.eos_token_id], max_new_tokens=4)
    assert res["total"] == 0 and res["correct"] == 0
    assert math.isnan(res["accuracy"]) and math.isnan(res["mean_length"]) and math.isnan(res["stop_rate"])
    graded = evaluate(student, tok, rows[:1] + [{"prompt": "Start with 2.", "answer": "2"}], verifier="boxed",
                      eos_ids=[tok.eos_token_id], max_new_tokens=4)
    assert graded["total"] == 1 and graded["accuracy"] == graded["correct"] / 1
