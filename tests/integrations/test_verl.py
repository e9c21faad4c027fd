"""fastopd.integrations.verl: the fastopd_release loss.

Two parts:

- without verl (fastopd's own environment; verl pins transformers < 5.11): the module imports, and its
  loss body -- top-K from the student's logits, sparse margins from a top-k "server", segments, release
  weights -- equals fastopd's rule on the full logits, on tensors shaped as verl passes them (bsz, resp_len);
- with verl installed (a separate environment, see docs/integrations.md and .ci): the real path through
  verl 0.9.1's own code -- registration, ``DistillationLossConfig(loss_mode="fastopd_release")``, the
  logits processor ``distillation_ppo_loss(student_logits=...)`` on a no-padding micro-batch built by verl's
  ``left_right_2_no_padding``, then ``distillation_loss`` -- against fastopd computed independently.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import fastopd
from fastopd.demo.task import demo_asset_paths

HAS_VERL = importlib.util.find_spec("verl") is not None
V = 516  # the demo tokenizer's vocabulary


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_asset_paths().tokenizer)


def _responses(tok, n_sentences=(12, 9, 14)):
    texts = []
    for b, n in enumerate(n_sentences):
        texts.append(" ".join(f"We add {b + i} to get {2 * i + b}." for i in range(n)) + " The answer is 7.")
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    return ids


def _fading_teacher(zs: torch.Tensor, seg: torch.Tensor, n_seg: torch.Tensor) -> torch.Tensor:
    """Teacher logits = student logits scaled by 4 in a rollout's first half of segments and by 0.05 after it,
    so the margin over the student's candidates fades halfway: the rule accepts a split there."""
    half = (n_seg.unsqueeze(-1) // 2)
    scale = torch.where(seg < half, torch.tensor(4.0, dtype=zs.dtype), torch.tensor(0.05, dtype=zs.dtype))
    return zs * scale.unsqueeze(-1)


def _fading_batch(tok, ids):
    """verl-shaped right-padded responses, their segments, student logits and a teacher that fades on them
    (and the generator, for more random numbers)."""
    from fastopd.integrations import completion_segments

    width = max(map(len, ids))
    resp = torch.full((len(ids), width), tok.pad_token_id)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for b, r in enumerate(ids):
        resp[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1
    seg = completion_segments(tok, resp, mask)
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(len(ids), width, V, generator=g) * 2
    zt = _fading_teacher(zs, seg, seg.amax(-1) + 1)
    return resp, mask, seg, zs, zt, g


def test_module_imports_and_registers_only_with_verl():
    import fastopd.integrations.verl as fv

    assert fv.LOSS_NAME == "fastopd_release"
    if not HAS_VERL:
        assert fv._NAMES == set()  # nothing registered, nothing imported from verl


def test_options_from_environment_and_bad_values(monkeypatch):
    import fastopd.integrations.verl as fv

    monkeypatch.setattr(fv, "_OPTIONS", None)
    monkeypatch.setenv("FASTOPD_VERL_K", "8")
    monkeypatch.setenv("FASTOPD_VERL_MIN_GAIN", "3.5")
    monkeypatch.setenv("FASTOPD_VERL_MODE", "full")
    o = fv.options()
    assert (o.k, o.min_gain, o.mode, o.tokenizer) == (8, 3.5, "full", None)
    monkeypatch.setenv("FASTOPD_VERL_MODE", "bogus")
    with pytest.raises(ValueError, match="FASTOPD_VERL_MODE"):
        fv.options()
    monkeypatch.setenv("FASTOPD_VERL_MODE", "release")
    monkeypatch.setenv("FASTOPD_VERL_K", "1")
    with pytest.raises(ValueError, match="FASTOPD_VERL_K"):
        fv.options()
    with pytest.raises(RuntimeError, match="FASTOPD_VERL_TOKENIZER"):
        fv._tokenizer(fv.VerlReleaseOptions())


def test_loss_body_equals_fastopd_rule_on_full_logits(tok):
    """verl-shaped (bsz, resp_len) tensors: top-K -> sparse margins (server top-k = 40) -> segments -> weights."""
    import fastopd.integrations.verl as fv

    ids = _responses(tok)
    resp, mask, seg, zs, zt, g = _fading_batch(tok, ids)
    width = resp.shape[1]
    lp_t = torch.log_softmax(zt, -1)
    t_lp, t_ids = torch.topk(lp_t, 40, dim=-1)
    sm = fv.margins_from_logits(zs, t_ids, t_lp, k=16)
    per_token = torch.rand(len(ids), width, generator=g)
    rule = fastopd.ReleaseRule(k=16)
    weighted, weights, metrics = fv.release_weighted_losses(per_token, sm.margins, resp, mask, tokenizer=tok, rule=rule)
    targets = resp.masked_fill(mask == 0, -100)
    expect = fastopd.ReleaseRule(k=16)(zs, zt, targets, seg)
    assert bool(sm.exact[mask.bool()].all())  # the teacher ranks like the student: candidates are in its top-40
    assert expect.scan.accepted.all()  # the fixture fades: every rollout releases a suffix
    torch.testing.assert_close(weights, expect.weights)
    torch.testing.assert_close(weighted, per_token * expect.weights)
    assert metrics["opd/accept_rate"] == 1.0
    assert 0 < metrics["opd/kept_fraction"] < 1
    assert metrics["opd/gain_mean"] > 10


@pytest.mark.parametrize("mode", ["random", "shuffled"])
def test_seeded_rule_makes_the_controls_reproducible(tok, mode, monkeypatch):
    """Two runs (two steps each) with the same seed give the same weights; another seed gives other weights.
    Within a run the process keeps one rule, so its generator advances from step to step."""
    import fastopd.integrations.verl as fv

    ids = _responses(tok, n_sentences=(12, 9, 14, 11, 13, 10, 12, 8))
    resp, mask, seg, zs, zt, g = _fading_batch(tok, ids)
    width = resp.shape[1]
    t_lp, t_ids = torch.topk(torch.log_softmax(zt, -1), 40, dim=-1)
    margins = fv.margins_from_logits(zs, t_ids, t_lp, k=16).margins
    per_token = torch.ones(len(ids), width)

    def run(seed, env=False):
        if env:  # the options as the Ray workers read them
            monkeypatch.setattr(fv, "_OPTIONS", None)
            monkeypatch.setenv("FASTOPD_VERL_MODE", mode)
            monkeypatch.setenv("FASTOPD_VERL_SEED", str(seed))
            monkeypatch.setattr(fv, "_RULE", None)  # a fresh process
        else:
            fv.configure(tokenizer=tok, mode=mode, seed=seed)
        assert fv.release_rule() is fv.release_rule()  # one rule per process and options
        return [fv.release_weighted_losses(per_token, margins, resp, mask, tokenizer=tok, rule=fv.release_rule())[1]
                for _ in range(2)]

    try:
        first, again, env_run, other = run(3), run(3), run(3, env=True), run(4)
    finally:
        monkeypatch.setattr(fv, "_OPTIONS", None)
        monkeypatch.setattr(fv, "_RULE", None)
    for a, b, c in zip(first, again, env_run):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert not all(torch.equal(a, b) for a, b in zip(first, other))  # the seed decides the draws
    assert not torch.equal(first[0], first[1])  # the generator advances between steps of one run
    with pytest.raises(ValueError, match="FASTOPD_VERL_SEED"):
        fv.VerlReleaseOptions(seed=-1)


# ------------------------------------------------------------------------------------------------------------
# with verl installed (separate environment)
# ------------------------------------------------------------------------------------------------------------

verl_only = pytest.mark.skipif(not HAS_VERL, reason="verl is not installed (it pins transformers < 5.11): separate CI step")


def _verl_micro_batch(tok, teacher_k):
    """A micro-batch as verl's actor sees it: left-padded prompts + right-padded responses, converted by verl's
    own left_right_2_no_padding (nested input ids and teacher top-k)."""
    from tensordict import TensorDict

    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ("Q: Start with 3.\nA:", "Q: Hi\nA:", "Q: x y z w.\nA:")]
    resps = _responses(tok)
    bsz, pw, rw = len(resps), max(map(len, prompts)), max(map(len, resps))
    input_ids = torch.full((bsz, pw + rw), tok.pad_token_id)
    attn = torch.zeros(bsz, pw + rw, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompts, resps)):
        input_ids[b, pw - len(p): pw] = torch.tensor(p)
        input_ids[b, pw: pw + len(r)] = torch.tensor(r)
        attn[b, pw - len(p): pw + len(r)] = 1
    response_mask = attn[:, pw:].clone()
    position_ids = (attn.cumsum(-1) - 1).clamp_min(0)
    g = torch.Generator().manual_seed(1)
    zs = torch.randn(bsz, pw + rw, V, generator=g) * 2  # student logits at every position (predict the next token)
    from fastopd.integrations import completion_segments

    seg_r = completion_segments(tok, input_ids[:, pw:], response_mask)
    # the logits at position i predict token i+1: the response's logits are positions pw-1 .. pw+rw-2
    seg_full = torch.full((bsz, pw + rw), -1, dtype=torch.long)
    seg_full[:, pw - 1: pw + rw - 1] = seg_r
    zt = _fading_teacher(zs, seg_full.clamp_min(0), seg_r.amax(-1) + 1)
    t_lp, t_ids = torch.topk(torch.log_softmax(zt, -1), teacher_k, dim=-1)
    data = TensorDict(
        {
            "prompts": input_ids[:, :pw], "responses": input_ids[:, pw:], "response_mask": response_mask,
            "input_ids": input_ids, "attention_mask": attn, "position_ids": position_ids,
            "teacher_logprobs": t_lp, "teacher_ids": t_ids.to(torch.int32),
        },
        batch_size=bsz,
    )
    data = left_right_2_no_padding(data)
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(response_mask.sum()), global_batch_size=bsz)
    # the no-padding logits verl's engine hands the logits processor: (1, total_nnz, V)
    logits_rmpad = torch.cat([zs[b][attn[b].bool()] for b in range(bsz)]).unsqueeze(0)
    resp_logits = zs[:, pw - 1: pw + rw - 1]
    resp_teacher = zt[:, pw - 1: pw + rw - 1]
    return data, logits_rmpad, resp_logits, resp_teacher, input_ids[:, pw:], response_mask, seg_r


@verl_only
@pytest.mark.parametrize("use_policy_gradient", [False, True])
def test_fastopd_release_through_verl(tok, use_policy_gradient):
    import fastopd.integrations.verl as fv
    from verl.trainer.distillation.losses import (
        DISTILLATION_LOSS_REGISTRY,
        distillation_loss,
        distillation_ppo_loss,
        get_distillation_loss_settings,
    )
    from verl.workers.config import ActorConfig, DistillationConfig, DistillationLossConfig

    assert DISTILLATION_LOSS_REGISTRY["fastopd_release"] is fv.fastopd_release_loss
    assert get_distillation_loss_settings("fastopd_release").use_topk
    fv.configure(tokenizer=tok, k=16)
    try:
        teacher_k = 40
        loss_cfg = DistillationLossConfig(
            loss_mode="fastopd_release", topk=teacher_k, use_policy_gradient=use_policy_gradient,
            use_task_rewards=False, loss_max_clamp=None, log_prob_min_clamp=None,
        )
        dcfg = DistillationConfig(enabled=False, distillation_loss=loss_cfg)
        actor = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1)
        data, logits_rmpad, zs_r, zt_r, resp, mask, seg = _verl_micro_batch(tok, teacher_k)

        # 1. the logits processor, as FSDPEngine.prepare_model_outputs calls it, and its packing into model_output
        outputs = distillation_ppo_loss(actor, dcfg, data=data, student_logits=logits_rmpad)
        assert {"distillation_losses", fv.MARGIN_KEY, fv.EXACT_KEY} <= set(outputs)
        cu = data["input_ids"].offsets()
        model_output = {k: torch.nested.nested_tensor_from_jagged(v.squeeze(0), cu) for k, v in outputs.items()}
        # the PG path reads the current log-probs: equal to the old ones, so the ratio is 1
        lp_s = torch.log_softmax(logits_rmpad[0], -1)
        nxt = torch.cat([torch.roll(t, -1) for t in data["input_ids"].unbind()])
        cur = lp_s.gather(-1, nxt.long().unsqueeze(-1)).squeeze(-1)
        model_output["log_probs"] = torch.nested.nested_tensor_from_jagged(cur, cu)
        from verl.workers.utils.padding import no_padding_2_padding

        data["old_log_probs"] = no_padding_2_padding(model_output["log_probs"], data)

        # 2. the final loss
        loss, metrics = distillation_loss(actor, dcfg, model_output, data)

        # independently: verl's per-token top-k forward KL on the response, times fastopd's rule on full logits
        ls = torch.log_softmax(zs_r, -1)
        lt = torch.log_softmax(zt_r, -1)
        t_lp, t_ids = torch.topk(lt, teacher_k, dim=-1)
        fkl = (t_lp.exp() * (t_lp - ls.gather(-1, t_ids))).sum(-1).clamp_min(0)
        targets = resp.masked_fill(mask == 0, -100)
        decision = fastopd.ReleaseRule(k=16)(zs_r, zt_r, targets, seg)
        w = decision.weights
        assert w.shape == mask.shape and 0 < float((w > 0).float().sum() / mask.sum()) < 1
        expect = (fkl * w * mask).sum() / mask.sum()  # token-mean, dp_size 1
        torch.testing.assert_close(loss, expect, rtol=1e-5, atol=1e-6)
        # the plugin's accept rate is the rule's on the same rollouts (exact margins: teacher_k covers the top-16)
        assert decision.metrics["accept_rate"] > 0
        assert metrics["opd/accept_rate"] == pytest.approx(decision.metrics["accept_rate"])
        assert metrics["opd/margin_exact_fraction"] == 1.0
        assert 0 < metrics["opd/kept_fraction"] < 1
    finally:
        fv._OPTIONS = None


@verl_only
def test_hook_leaves_other_loss_modes_alone(tok):
    import fastopd.integrations.verl as fv
    from verl.trainer.distillation.losses import distillation_ppo_loss
    from verl.workers.config import ActorConfig, DistillationConfig, DistillationLossConfig

    loss_cfg = DistillationLossConfig(loss_mode="forward_kl_topk", topk=20, use_policy_gradient=False)
    dcfg = DistillationConfig(enabled=False, distillation_loss=loss_cfg)
    actor = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1)
    data, logits_rmpad, *_ = _verl_micro_batch(tok, 20)
    outputs = distillation_ppo_loss(actor, dcfg, data=data, student_logits=logits_rmpad)
    assert fv.MARGIN_KEY not in outputs and "distillation_losses" in outputs


@verl_only
def test_missing_margins_is_a_clear_error(tok):
    import fastopd.integrations.verl as fv

    with pytest.raises(RuntimeError, match="margin hook"):
        fv.fastopd_release_loss(None, None, {"distillation_losses": torch.zeros(1)}, None)


@verl_only
def test_plugin_import_through_verl_use_external_modules():
    """What a verl run does: VERL_USE_EXTERNAL_MODULES makes `import verl` import the plugin, which registers."""
    import os
    import subprocess
    import sys

    code = (
        "import verl\n"
        "from verl.trainer.distillation.losses import DISTILLATION_LOSS_REGISTRY, get_distillation_loss_settings\n"
        "import verl.trainer.distillation.fsdp.losses as f\n"
        "assert DISTILLATION_LOSS_REGISTRY['fastopd_release'].__module__ == 'fastopd.integrations.verl'\n"
        "assert get_distillation_loss_settings('fastopd_release').use_topk\n"
        "assert f.compute_forward_kl_topk._fastopd_hook\n"
        "print('registered')\n"
    )
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="fastopd.integrations.verl")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "registered" in out.stdout
