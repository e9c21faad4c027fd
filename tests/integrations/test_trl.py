"""fastopd.integrations.trl: real TRL (>= 1.16) training steps on CPU with the shipped tiny demo models.

- the loss TRL optimises (ReleaseDistillationTrainer._compute_loss, hidden-state path) equals fastopd's
  OPDLoss with the release rule on the same rollouts, recomputed independently from full logits;
- with opd_mode="full", opd_loss="reverse_kl" it equals TRL's own beta=1 loss (DistillationTrainer's
  _compute_loss) on the same tensors, loss and gradient; opd_loss="forward_kl" equals beta=0;
- the rule's metrics reach trainer.state.log_history; the student's weights move;
- the GKDTrainer logits path (lmbda=1) equals GKD's own beta=1 loss with opd_mode="full", "reverse_kl".
"""

from __future__ import annotations

import math

import pytest
import torch

trl = pytest.importorskip("trl", minversion="1.16")

import fastopd  # noqa: E402
from fastopd.demo.task import demo_asset_paths, read_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def assets():
    from transformers import AutoTokenizer

    paths = demo_asset_paths()
    tok = AutoTokenizer.from_pretrained(paths.tokenizer)
    tok.padding_side = "left"
    prompts = [r["prompt"] for r in read_jsonl(paths.root / "data" / "eval.jsonl")[:16]]
    return paths, tok, prompts


def _models(paths):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(paths.student), AutoModelForCausalLM.from_pretrained(paths.teacher)


def _config(tmp_path, **kw):
    from fastopd.integrations.trl import ReleaseDistillationConfig

    base = dict(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, gradient_checkpointing=False,
        per_device_train_batch_size=4, max_steps=3, max_completion_length=48, learning_rate=5e-4,
        logging_steps=1, report_to=[], save_strategy="no", seed=0, dataloader_num_workers=0,
    )
    base.update(kw)
    return ReleaseDistillationConfig(**base)


def _trainer(assets, tmp_path, **kw):
    from datasets import Dataset

    from fastopd.integrations.trl import ReleaseDistillationTrainer

    paths, tok, prompts = assets
    student, teacher = _models(paths)
    return ReleaseDistillationTrainer(
        model=student, teacher_model=teacher, args=_config(tmp_path, **kw),
        train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok,
    )


def _independent_fastopd_loss(trainer, inputs, num_items_in_batch):
    """fastopd's OPDLoss + ReleaseRule on full logits of the same rollouts, segments by fastopd.token_segments."""
    tok = trainer.processing_class
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    c = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        zs = trainer.model(input_ids=ids, attention_mask=am).logits[:, -c - 1:-1]
        zt = trainer.teacher_model(input_ids=ids, attention_mask=am).logits[:, -c - 1:-1]
    mask = inputs["completion_mask"].bool()
    targets = inputs["completion_ids"].masked_fill(~mask, -100)
    seg = torch.full_like(targets, -1)
    for b in range(targets.shape[0]):
        n = int(mask[b].sum())
        seg[b, :n] = torch.as_tensor(fastopd.token_segments(tok, inputs["completion_ids"][b, :n].tolist()))
    a = trainer.args
    rule = fastopd.ReleaseRule(a.opd_mode, k=a.opd_k, min_gain=a.opd_min_gain, temperature=a.temperature)
    crit = fastopd.OPDLoss(a.opd_loss, k=a.opd_k, temperature=a.temperature, rule=rule)
    return crit(zs, zt, targets, segment_ids=seg, normalizer=num_items_in_batch)


def _independent_entropy_sum(trainer, inputs):
    """The student's entropy at TRL's temperature from its full logits (torch.distributions), summed over the
    valid completion tokens: what TRL's own DistillationTrainer returns as entropy_sum."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    c = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        zs = trainer.model(input_ids=ids, attention_mask=am).logits[:, -c - 1:-1].double()
    h = torch.distributions.Categorical(logits=zs / trainer.args.temperature).entropy()
    return float(h[inputs["completion_mask"].bool()].sum())


def test_release_loss_equals_fastopd_on_the_same_rollouts_and_metrics_are_logged(assets, tmp_path):
    trainer = _trainer(assets, tmp_path, opd_mode="release", opd_loss="pg")
    seen = []
    inner = trainer._compute_loss

    def spy(unwrapped_student, inputs, num_items_in_batch):
        loss, entropy_sum, n_valid = inner(unwrapped_student, inputs, num_items_in_batch)
        ref = _independent_fastopd_loss(trainer, inputs, num_items_in_batch)
        seen.append((float(loss.detach()), float(ref.loss), int(n_valid), int(ref.stats.valid.sum()),
                     (float(entropy_sum), _independent_entropy_sum(trainer, inputs)), trainer.last_opd_output, ref))
        return loss, entropy_sum, n_valid

    trainer._compute_loss = spy
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert len(seen) == 3  # 3 optimizer steps, one micro-batch each
    for loss, ref_loss, n_valid, ref_valid, entropy_sum, out, ref in seen:
        assert n_valid == ref_valid > 0
        assert math.isclose(loss, ref_loss, rel_tol=1e-4, abs_tol=1e-6), (loss, ref_loss)
        torch.testing.assert_close(out.release.weights, ref.release.weights)
        torch.testing.assert_close(out.stats.margins, ref.stats.margins, rtol=1e-4, atol=1e-4)
        assert entropy_sum[1] > 0 and math.isclose(*entropy_sum, rel_tol=1e-4), entropy_sum
    moved = any(not torch.equal(p0, p.detach()) for p0, p in zip(before, trainer.model.parameters()))
    assert moved
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3
    for key in ("opd/accept_rate", "opd/kept_fraction", "opd/margin_mean", "opd/adv_mean"):
        assert all(key in h and h[key] is not None for h in logged), key
    assert all(0.0 <= h["opd/kept_fraction"] <= 1.0 and 0.0 <= h["opd/accept_rate"] <= 1.0 for h in logged)
    assert any(h.get("opd/gain_mean") is not None for h in logged)  # the demo's rollouts have candidate splits
    # TRL's compute_loss logs entropy_sum / n_valid per micro-batch (one per step here), as for its own loss
    for h, (_, _, n_valid, _, (_, want), _, _) in zip(logged, seen):
        assert h.get("entropy") is not None and math.isclose(h["entropy"], want / n_valid, rel_tol=1e-4)


def test_full_reverse_kl_equals_trl_beta_1(assets, tmp_path):
    trainer = _trainer(assets, tmp_path, opd_mode="full", opd_loss="reverse_kl", beta=1.0, max_steps=2)
    pairs = []
    ours = trainer._compute_loss

    def both(unwrapped_student, inputs, num_items_in_batch):
        loss, entropy_sum, n_valid = ours(unwrapped_student, inputs, num_items_in_batch)
        with torch.no_grad():
            trl_loss, trl_entropy, trl_valid = trl.DistillationTrainer._compute_loss(
                trainer, unwrapped_student, inputs, num_items_in_batch)
        pairs.append((float(loss), float(trl_loss), int(n_valid), int(trl_valid), float(entropy_sum),
                      float(trl_entropy)))
        return loss, entropy_sum, n_valid

    trainer._compute_loss = both
    trainer.train()
    assert len(pairs) == 2
    for loss, trl_loss, n, trl_n, entropy, trl_entropy in pairs:
        assert n == trl_n
        assert trl_loss > 0
        assert math.isclose(loss, trl_loss, rel_tol=1e-4, abs_tol=1e-6), (loss, trl_loss)
        assert trl_entropy > 0 and math.isclose(entropy, trl_entropy, rel_tol=1e-4), (entropy, trl_entropy)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["opd/kept_fraction"] == 1.0 for h in logged)  # the full control keeps every token
    # full needs no rule: no segments, no scan, so none of the rule's diagnostics (docs/integrations.md)
    assert trainer.opd_criterion.rule is None and trainer.last_opd_output.release is None
    assert all("opd/margin_mean" in h and "opd/reverse_kl_mean" in h for h in logged)
    assert not any("opd/accept_rate" in h or "opd/gain_mean" in h for h in logged)


@pytest.mark.parametrize("loss, beta", [("reverse_kl", 1.0), ("forward_kl", 0.0)])
def test_full_divergence_gradient_equals_trl(assets, tmp_path, monkeypatch, loss, beta):
    """The student's loss and gradient of full/reverse_kl equal TRL's beta=1 (reverse KL), and of full/forward_kl
    TRL's beta=0 (forward KL), on one sampled batch (the eager hidden-state path against TRL's recompute); full
    mode never segments the completions."""
    import fastopd.integrations.trl as ftrl

    trainer = _trainer(assets, tmp_path, opd_mode="full", opd_loss=loss, beta=beta)
    _, _, prompts = assets
    trainer.model.train()
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions([{"prompt": p} for p in prompts[:4]])
    params = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]

    def grads(fn):
        trainer.model.zero_grad(set_to_none=True)
        loss = fn(trainer, trainer.model, inputs, num_items_in_batch=inputs["num_items_in_batch"])[0]
        loss.backward()
        return float(loss.detach()), {n: p.grad.detach().clone() for n, p in params if p.grad is not None}

    def no_segments(*a, **k):
        raise AssertionError("full mode segmented the completions")

    monkeypatch.setattr(ftrl, "completion_segments", no_segments)
    ours, g_ours = grads(ftrl.ReleaseDistillationTrainer._compute_loss)
    theirs, g_trl = grads(trl.DistillationTrainer._compute_loss)
    assert math.isclose(ours, theirs, rel_tol=1e-5, abs_tol=1e-6), (ours, theirs)
    assert g_ours.keys() == g_trl.keys() and len(g_trl) > 0
    scale = max(float(g.abs().max()) for g in g_trl.values())
    for n, g in g_trl.items():
        torch.testing.assert_close(g_ours[n], g, rtol=1e-4, atol=1e-5 * scale, msg=n)


@pytest.mark.parametrize("config", ["ReleaseDistillationConfig", "ReleaseGKDConfig"])
def test_config_rejects_bad_options(tmp_path, config):
    """Every opd_* option is checked when the config is built (both configs: one set of fields and checks),
    and a bool is not a number."""
    import fastopd.integrations.trl as ft

    cls = getattr(ft, config)
    extra = dict(lmbda=1.0) if config == "ReleaseGKDConfig" else {}
    for kw, match in ((dict(opd_mode="suffix"), "opd_mode"), (dict(opd_loss="jsd"), "opd_loss"),
                      (dict(opd_k=1), "opd_k"), (dict(opd_min_gain=float("nan")), "opd_min_gain"),
                      (dict(opd_fraction=0.0), "opd_fraction"), (dict(opd_chunk_size=0), "opd_chunk_size"),
                      (dict(opd_fraction=True), r"opd_fraction must be a number in \(0, 1\] \(not a bool\), got True"),
                      (dict(opd_chunk_size=True), r"opd_chunk_size must be a positive int or None \(not a bool\)"),
                      (dict(opd_k=True), "opd_k must be an int >= 2, got True"),
                      (dict(opd_min_gain=False), "opd_min_gain must be a number"),
                      (dict(opd_k=16.0), "opd_k"), (dict(opd_chunk_size=8.0), "opd_chunk_size")):
        with pytest.raises(ValueError, match=match):
            cls(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], **extra, **kw)
    ok = cls(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], **extra, opd_fraction=1, opd_chunk_size=64)
    assert (ok.opd_fraction, ok.opd_chunk_size, ok.opd_mode) == (1, 64, "release")


def test_trl_version_check():
    from fastopd.integrations._trl_options import TRL_TESTED, check_trl_version

    lo, hi = TRL_TESTED
    check_trl_version(trl.__version__)  # the installed TRL is in the tested range (CI installs fastopd[trl])
    check_trl_version(f"{lo[0]}.{lo[1]}.0")
    with pytest.raises(ImportError, match="needs TRL >= "):
        check_trl_version(f"{lo[0]}.{lo[1] - 1}.9")
    with pytest.raises(ImportError, match="another major version"):
        check_trl_version(f"{hi[0] + 1}.0.0")
    with pytest.warns(UserWarning, match="tested with TRL"):
        check_trl_version(f"{hi[0]}.{hi[1] + 1}.0")


def test_trainer_rejects_a_plain_trl_config(assets, tmp_path):
    from datasets import Dataset

    from fastopd.integrations.trl import ReleaseDistillationTrainer

    paths, tok, prompts = assets
    student, teacher = _models(paths)
    args = trl.DistillationConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[])
    with pytest.raises(TypeError, match="ReleaseDistillationConfig"):
        ReleaseDistillationTrainer(model=student, teacher_model=teacher, args=args,
                                   train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok)


_CHAT = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}"
         "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")


def test_gkd_logits_path_full_reverse_kl_equals_gkd_beta_1(assets, tmp_path):
    from datasets import Dataset
    from trl.experimental.gkd import GKDTrainer

    from fastopd.integrations.trl import ReleaseGKDConfig, ReleaseGKDTrainer

    paths, tok, prompts = assets
    tok = tok.__class__.from_pretrained(paths.tokenizer)
    tok.padding_side = "left"
    tok.chat_template = _CHAT  # the demo tokenizer has none; GKD's collator formats messages with one
    rows = read_jsonl(paths.root / "data" / "eval.jsonl")[:8]
    data = Dataset.from_dict({"messages": [[{"role": "user", "content": r["prompt"]},
                                            {"role": "assistant", "content": f"The answer is \\boxed{{{r['answer']}}}."}]
                                           for r in rows]})
    student, teacher = _models(paths)
    args = ReleaseGKDConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[],
        save_strategy="no", per_device_train_batch_size=4, max_steps=2, max_new_tokens=40, learning_rate=5e-4,
        logging_steps=1, lmbda=1.0, beta=1.0, temperature=1.0, seed=0, opd_mode="full", opd_loss="reverse_kl",
    )
    trainer = ReleaseGKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tok)
    pairs = []
    ours = trainer.compute_loss

    def both(model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = ours(model, inputs, return_outputs, num_items_in_batch)
        with torch.no_grad():
            gkd = GKDTrainer.compute_loss(trainer, model, inputs, False, num_items_in_batch)
        pairs.append((float(loss.detach()), float(gkd), int(trainer.last_opd_output.stats.valid.sum())))
        return loss

    trainer.compute_loss = both
    trainer.train()
    assert len(pairs) == 2
    for loss, gkd, n_valid in pairs:
        assert n_valid > 0 and gkd > 0
        assert math.isclose(loss, gkd, rel_tol=1e-4, abs_tol=1e-6), (loss, gkd)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    # full has no rule (make_criterion): kept_fraction 1 and the loss's diagnostics, no accept_rate / gain_mean
    assert all(h["opd/kept_fraction"] == 1.0 and "opd/margin_mean" in h for h in logged)
    assert not any("opd/accept_rate" in h or "opd/gain_mean" in h for h in logged)
    assert trainer.last_opd_output.release is None
    with pytest.raises(ValueError, match="lmbda"):
        ReleaseGKDConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], lmbda=0.5)
