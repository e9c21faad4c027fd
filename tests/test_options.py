"""fastopd.StatsOptions: one frozen, validated object for the statistics' options, built once per call by the
public entry points and handed down (docs/formulas.md, Names)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fastopd
from fastopd import StatsOptions
from fastopd.options import StatsOptions as _Same


def _case(seed=0, b=2, t=5, v=12):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, t, v, generator=g), torch.randn(b, t, v, generator=g),
            torch.randint(0, v, (b, t), generator=g))


def test_defaults_are_the_public_functions_defaults():
    assert _Same is StatsOptions
    o = StatsOptions()
    assert (o.k, o.temperature, o.ignore_index, o.vocab_size, o.backend, o.chunk_size) == (16, 1.0, -100, None, "auto", None)


def test_frozen_and_replace_checks_again():
    o = StatsOptions(k=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.k = 5
    with pytest.raises(ValueError, match="k must be >= 2"):
        dataclasses.replace(o, k=1)


@pytest.mark.parametrize("field, value, err, msg", [
    ("k", True, TypeError, "k must be an int"),
    ("k", 1, ValueError, "k must be >= 2"),
    ("temperature", 0.0, ValueError, "temperature must be a finite number > 0"),
    ("temperature", float("nan"), ValueError, "temperature must be a finite number > 0"),
    ("temperature", 10**400, ValueError, "temperature must be a finite number > 0"),
    ("ignore_index", 1.5, TypeError, "ignore_index must be an int"),
    ("vocab_size", 0, ValueError, "vocab_size must be a positive int or None"),
    ("vocab_size", True, ValueError, "vocab_size must be a positive int or None"),
    ("backend", "cuda", ValueError, "backend must be one of"),
    ("chunk_size", 0, ValueError, "chunk_size must be a positive int or None"),
    ("chunk_size", 2.0, ValueError, "chunk_size must be a positive int or None"),
])
def test_each_field_is_checked_by_name(field, value, err, msg):
    with pytest.raises(err, match=msg):
        StatsOptions(**{field: value})


def test_values_are_normalised():
    import numpy as np

    o = StatsOptions(k=np.int64(4), temperature=2, chunk_size=np.int32(8))
    assert type(o.k) is int and type(o.temperature) is float and type(o.chunk_size) is int
    assert o == StatsOptions(k=4, temperature=2.0, chunk_size=8)


def test_of_takes_options_or_keywords_and_refuses_a_conflict():
    o = StatsOptions(k=4, temperature=0.5)
    assert StatsOptions.of(o) is o
    assert StatsOptions.of(o, k=16, temperature=1.0) is o  # defaults: not given
    assert StatsOptions.of(o, k=4) is o  # the same value: no conflict
    assert StatsOptions.of(None, k=4, temperature=0.5) == o
    with pytest.raises(ValueError, match=r"k=8 conflicts with options.k=4"):
        StatsOptions.of(o, k=8)
    with pytest.raises(TypeError, match="unexpected keyword argument 'kk'"):
        StatsOptions.of(None, kk=3)
    with pytest.raises(TypeError, match="options must be a fastopd.StatsOptions"):
        StatsOptions.of({"k": 4})


def test_public_functions_take_options_and_give_the_keywords_result():
    zs, zt, y = _case()
    o = StatsOptions(k=3, temperature=0.7, backend="reference")
    a = fastopd.token_stats(zs, zt, y, options=o, full_kl=True)
    b = fastopd.token_stats(zs, zt, y, k=3, temperature=0.7, backend="reference", full_kl=True)
    for f in ("student_logprobs", "teacher_logprobs", "margins", "reverse_kl"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    la = fastopd.opd_loss(zs, zt, y, loss="forward_kl", options=o)
    lb = fastopd.opd_loss(zs, zt, y, loss="forward_kl", k=3, temperature=0.7)
    assert torch.equal(la.per_token, lb.per_token)
    with pytest.raises(ValueError, match=r"temperature=2.0 conflicts with options.temperature=0.7"):
        fastopd.opd_loss(zs, zt, y, temperature=2.0, options=o)
    h = torch.randn(2, 5, 3)
    w = torch.randn(12, 3)
    oc = dataclasses.replace(o, chunk_size=3)
    ha = fastopd.linear_opd_loss(h, w, h, w, y, loss="reverse_kl", options=oc)
    hb = fastopd.linear_opd_loss(h, w, h, w, y, loss="reverse_kl", k=3, temperature=0.7, chunk_size=3)
    assert torch.equal(ha.per_token, hb.per_token)
    sa = fastopd.linear_token_stats(h, w, h, w, y, options=oc)
    assert torch.equal(sa.margins, hb.stats.margins)


def test_options_are_built_once_per_call(monkeypatch):
    """The entry point builds the object; the layers below receive it, they do not rebuild it."""
    built = []
    original = StatsOptions.__post_init__
    monkeypatch.setattr(StatsOptions, "__post_init__", lambda self: (built.append(1), original(self))[1])
    zs, zt, y = _case()
    fastopd.token_stats(zs, zt, y, k=3)
    assert len(built) == 1
    built.clear()
    fastopd.opd_loss(zs.requires_grad_(True), zt, y, k=3, loss="reverse_kl").loss.backward()
    assert len(built) == 1
    crit = fastopd.OPDLoss("pg", k=3)
    built.clear()
    crit(zs, zt, y)
    assert not built  # the module's own options, built in __init__


def test_opdloss_owns_its_options_and_agrees_with_its_rule():
    rule = fastopd.ReleaseRule(k=5, temperature=2.0, backend="reference")
    assert rule.options == StatsOptions(k=5, temperature=2.0, backend="reference")
    crit = fastopd.OPDLoss(rule=rule, ignore_index=-1)
    assert crit.options == StatsOptions(k=5, temperature=2.0, ignore_index=-1, backend="reference")
    assert crit.options is not rule.options
    # options= with a rule: the shared fields must agree with it
    with pytest.raises(ValueError, match=r"OPDLoss\(k=16\) differs from rule.k=5"):
        fastopd.OPDLoss(rule=rule, options=StatsOptions())
    same = fastopd.OPDLoss(rule=rule, options=StatsOptions(k=5, temperature=2.0, backend="reference", vocab_size=7))
    assert same.vocab_size == 7
    with pytest.raises(ValueError, match=r"vocab_size=3 conflicts with options.vocab_size=7"):
        fastopd.OPDLoss(vocab_size=3, options=same.options)
    # an attribute set on the module replaces its options, checked again
    crit.vocab_size = 9
    assert crit.options.vocab_size == 9
    with pytest.raises(ValueError, match="vocab_size must be a positive int or None"):
        crit.vocab_size = 0


def test_rule_call_uses_its_options_and_the_calls_ignore_index():
    zs, zt, y = _case(1)
    seg = torch.arange(5).div(2, rounding_mode="floor").expand(2, 5)
    rule = fastopd.ReleaseRule(k=3, min_gain=-1e9, options=None)
    y2 = y.clone()
    y2[:, -1] = 7
    a = rule(zs, zt, y2, seg, ignore_index=7)
    assert not a.series.values.size == 0
    assert torch.equal(a.weights[:, -1], torch.zeros(2))  # position 4 ignored: weight 0
    with pytest.raises(ValueError, match=r"k=4 conflicts with options.k=3"):
        fastopd.ReleaseRule(k=4, options=StatsOptions(k=3))


def test_linear_opd_loss_is_opdloss_linear(monkeypatch):
    """One hidden-state loss path: linear_opd_loss runs OPDLoss(loss, options=...).linear without a rule."""
    from fastopd import loss as loss_module

    seen = []
    original = loss_module.OPDLoss.linear

    def spy(self, *args, **kwargs):
        seen.append((self.loss, self.rule, self.options))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(loss_module.OPDLoss, "linear", spy)
    _, _, y = _case()
    h, w = torch.randn(2, 5, 3), torch.randn(12, 3)
    fastopd.linear_opd_loss(h, w, h, w, y, loss="forward_kl", k=3, chunk_size=4)
    assert seen == [("forward_kl", None, StatsOptions(k=3, chunk_size=4))]
