"""fastopd.integrations.student_entropy_sum: the student's entropy TRL logs, from hidden states in chunks (no TRL)."""

from __future__ import annotations

import pytest
import torch

import fastopd
from fastopd.integrations import student_entropy_sum


def _oracle(hidden, head, valid, temperature):
    """Categorical entropy of the full (N, V) logits softcap(scale * (h W^T + b)) / temperature, summed over valid."""
    v = head.out_features
    z = hidden.double() @ head.weight[:v].double().T
    if head.bias is not None:
        z = z + head.bias[:v].double()
    z = z * head.logit_scale
    if head.softcap is not None:
        z = head.softcap * torch.tanh(z / head.softcap)
    h = torch.distributions.Categorical(logits=z / temperature).entropy()
    return float(h[valid].sum())


@pytest.mark.parametrize("chunk_size", [None, 1, 5])
@pytest.mark.parametrize("with_bias, scale, softcap, vocab_size, temperature", [
    (False, 1.0, None, None, 1.0),
    (True, 0.5, 3.0, 37, 0.7),     # Cohere-style scale, Gemma-style soft-cap, a padded head (first 37 rows)
])
def test_entropy_sum_equals_the_full_logits_entropy(chunk_size, with_bias, scale, softcap, vocab_size, temperature):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, generator=g)
    weight = torch.randn(41, 16, generator=g)
    bias = torch.randn(41, generator=g) if with_bias else None
    head = fastopd.LMHead(weight, bias, logit_scale=scale, softcap=softcap, vocab_size=vocab_size)
    valid = torch.rand(3, 7, generator=g) > 0.3
    got = student_entropy_sum(hidden, head, valid, temperature, chunk_size)
    assert got.dtype == torch.float32 and got.dim() == 0 and not got.requires_grad
    assert float(got) == pytest.approx(_oracle(hidden, head, valid, temperature), rel=1e-5)
    # only the valid positions count
    assert float(student_entropy_sum(hidden, head, torch.zeros_like(valid), temperature, chunk_size)) == 0.0


def test_entropy_sum_takes_a_bare_weight_and_needs_no_grad():
    hidden = torch.randn(2, 4, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    valid = torch.ones(2, 4, dtype=torch.bool)
    got = student_entropy_sum(hidden, weight, valid)
    assert not got.requires_grad
    assert float(got) == pytest.approx(_oracle(hidden.detach(), fastopd.LMHead(weight.detach()), valid, 1.0), rel=1e-5)


def test_entropy_sum_rejects_a_mask_of_another_shape_and_a_bad_temperature():
    hidden, weight = torch.randn(2, 4, 8), torch.randn(11, 8)
    with pytest.raises(ValueError, match="valid must have hidden's leading shape"):
        student_entropy_sum(hidden, weight, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        student_entropy_sum(hidden, weight, torch.ones(2, 4, dtype=torch.bool), temperature=0.0)
