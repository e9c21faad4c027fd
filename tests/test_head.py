"""fastopd/head.py: ``fastopd.LMHead``, its checks, and ``LMHead.from_model`` on tiny Hugging Face models.

The oracle of ``from_model`` is the model itself: softcap(scale (h W^T + b)) written out by hand on the head's
fields and the model's last hidden states must equal the logits the model's own forward returns (Gemma-2's
final-logit soft-cap, Cohere's ``logit_scale``, Granite's ``logits_scaling`` divisor, a head with a bias).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fastopd import LMHead
from fastopd.head import as_lm_head, config_logit_scale
from helpers import plain_head

TINY = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _tiny(name: str):
    import transformers

    cls, extra = {
        "gemma2": ("Gemma2", dict(final_logit_softcapping=5.0)),
        "cohere": ("Cohere", dict(logit_scale=0.25)),
        "granite": ("Granite", dict(logits_scaling=4.0)),
    }[name]
    torch.manual_seed(0)
    config = getattr(transformers, f"{cls}Config")(**TINY, **extra)
    return getattr(transformers, f"{cls}ForCausalLM")(config).eval()


@pytest.mark.parametrize("name,scale,cap", [("gemma2", 1.0, 5.0), ("cohere", 0.25, None), ("granite", 0.25, None)])
def test_from_model_reads_scale_and_softcap_and_matches_the_models_logits(name, scale, cap):
    model = _tiny(name)
    if name == "granite":  # a head with a bias too
        model.lm_head.bias = nn.Parameter(torch.randn(TINY["vocab_size"]))
    head = LMHead.from_model(model)
    assert (head.logit_scale, head.softcap, head.vocab_size) == (scale, cap, None)
    assert head.weight is model.get_output_embeddings().weight  # the parameter itself: a gradient reaches it
    assert (head.bias is model.lm_head.bias) if name == "granite" else head.bias is None
    ids = torch.randint(3, TINY["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        z = plain_head(out.hidden_states[-1], head.weight, head.bias, TINY["vocab_size"], head.logit_scale, head.softcap)
    torch.testing.assert_close(z, out.logits, atol=1e-5, rtol=1e-5)


def test_from_model_casts_unwraps_and_refuses_a_model_without_a_head():
    model = _tiny("gemma2")

    class Wrapper(nn.Module):  # DDP-style: the model under .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    head = LMHead.from_model(Wrapper(Wrapper(model)), torch.float64)
    assert head.weight.dtype == torch.float64 and head.softcap == 5.0
    head.weight.sum().backward()  # the cast is differentiable: the parameter gets the gradient
    assert torch.equal(model.get_output_embeddings().weight.grad, torch.ones_like(head.weight, dtype=torch.float32))
    with pytest.raises(ValueError, match="has no output embedding"):
        LMHead.from_model(nn.Linear(3, 4))


def test_config_logit_scale_rules():
    from types import SimpleNamespace as C

    assert config_logit_scale(C()) == 1.0
    assert config_logit_scale(C(logit_scale=None, output_multiplier=3.0)) == 3.0
    assert config_logit_scale(C(lm_head_multiplier=0.5)) == 0.5
    assert config_logit_scale(C(logits_scaling=8.0, model_type="granite")) == 0.125
    assert config_logit_scale(C(logits_scaling=8.0, model_type="hyperclovax")) == 8.0
    assert config_logit_scale(C(logit_scale=2.0, logits_scaling=8.0)) == 2.0  # logit_scale first


def test_fields_are_normalised_and_the_head_is_frozen():
    w = torch.zeros(5, 3)
    head = LMHead(w, logit_scale=2, softcap=np.float64(3.0), vocab_size=np.int64(4))
    assert (head.logit_scale, head.softcap, head.vocab_size, head.out_features) == (2.0, 3.0, 4, 4)
    assert type(head.logit_scale) is float and type(head.softcap) is float and type(head.vocab_size) is int
    assert LMHead(w).out_features == 5
    assert "(5, 3)" in repr(head) and "softcap=3.0" in repr(head)
    with pytest.raises(AttributeError):
        head.softcap = 1.0


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(weight=[[1.0]]), TypeError, "LMHead weight must be a torch.Tensor"),
        (dict(weight=torch.zeros(4, 3, dtype=torch.long)), TypeError, "LMHead weight must be float16"),
        (dict(weight=torch.zeros(4)), ValueError, r"LMHead weight must have shape \(V', H\)"),
        (dict(weight=torch.zeros(0, 3)), ValueError, "V' >= 1"),
        (dict(bias=torch.zeros(3)), ValueError, r"LMHead bias must have shape \(V',\) = \(4,\)"),
        (dict(bias=torch.zeros(4, dtype=torch.float64)), TypeError, "LMHead bias must have the weight's dtype"),
        (dict(bias=[0.0] * 4), TypeError, "LMHead bias must be a torch.Tensor"),
        (dict(logit_scale=0.0), ValueError, "LMHead logit_scale must be a finite nonzero number"),
        (dict(logit_scale=math.inf), ValueError, "logit_scale must be a finite nonzero number"),
        (dict(logit_scale=True), ValueError, "logit_scale must be a finite nonzero number, got True"),
        (dict(logit_scale="2"), ValueError, "logit_scale"),
        (dict(softcap=0.0), ValueError, "LMHead softcap must be None or a finite number > 0"),
        (dict(softcap=-1.0), ValueError, "softcap must be None or a finite number > 0"),
        (dict(softcap=math.nan), ValueError, "softcap"),
        (dict(softcap=True), ValueError, "softcap must be None or a finite number > 0, got True"),
        (dict(vocab_size=5), ValueError, r"LMHead vocab_size must be None or an int in \[1, V'\] = \[1, 4\]"),
        (dict(vocab_size=0), ValueError, "vocab_size"),
        (dict(vocab_size=2.0), ValueError, "vocab_size"),
        (dict(vocab_size=True), ValueError, "vocab_size"),
    ],
)
def test_bad_fields_are_clear_errors(kwargs, err, match):
    args = dict(weight=torch.zeros(4, 3))
    args.update(kwargs)
    with pytest.raises(err, match=match):
        LMHead(**args)


def test_as_lm_head_wraps_a_tensor_and_names_the_argument():
    w = torch.zeros(4, 3)
    head = LMHead(w)
    assert as_lm_head(head, "student_head") is head
    wrapped = as_lm_head(w, "student_head")
    assert wrapped.weight is w and wrapped.bias is None and wrapped.logit_scale == 1.0 and wrapped.softcap is None
    with pytest.raises(ValueError, match=r"student_head: LMHead weight must have shape"):
        as_lm_head(torch.zeros(4), "student_head")
    with pytest.raises(TypeError, match="teacher_head must be a fastopd.LMHead or a"):
        as_lm_head(None, "teacher_head")
