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
