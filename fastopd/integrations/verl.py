"""fastopd's release rule as a verl distillation loss: ``loss_mode=fastopd_release`` (verl >= 0.9.1).

verl's on-policy distillation scores the student's rollouts with a teacher *server* (vLLM/SGLang) that
returns, per position, only its top-k ids and log-probs (``teacher_ids``, ``teacher_logprobs``); with a
top-k loss mode the student's full logits exist only inside the actor's forward, where verl's *logits
processor* turns them into per-token tensors (``compute_forward_kl_topk`` of the FSDP backend) before they are
freed. This module adds one such per-token tensor -- the release margin m_t from the student's top-K ids and the
teacher's top-k log-probs (:func:`fastopd.sparse_margins`) -- and registers a loss ``fastopd_release`` that
takes verl's own per-token top-k forward-KL loss (the registered ``forward_kl_topk``) and multiplies it by
the release rule's weights w_t (docs/formulas.md §4). Everything downstream is verl's: ``agg_loss`` with the
actor's ``loss_agg_mode``, or the policy-gradient path (``use_policy_gradient=True``, advantages = -w_t l_t).

Use (one config line plus the plugin import; the tokenizer is the student's, for the sentence segments)::

    FASTOPD_VERL_TOKENIZER=/path/to/student VERL_USE_EXTERNAL_MODULES=fastopd.integrations.verl \\
    python -m verl.trainer.main_ppo ... distillation.enabled=True \\
        distillation.distillation_loss.loss_mode=fastopd_release distillation.distillation_loss.topk=20

Options come from the environment (so that every Ray worker sees them) or :func:`configure`:
``FASTOPD_VERL_TOKENIZER`` (required), ``FASTOPD_VERL_K`` (student candidates K, default 16),
``FASTOPD_VERL_MIN_GAIN`` (default 10), ``FASTOPD_VERL_MODE`` (``release`` or a control, default ``release``),
``FASTOPD_VERL_SEED`` (default 0). Each process keeps one :class:`fastopd.ReleaseRule` for its options
(:func:`release_rule`), seeded with ``seed``, so the ``random`` and ``shuffled`` controls draw the same cuts
in two runs with the same seed (every worker starts from the same seed). Metrics are logged under
``opd/`` (:data:`fastopd.integrations.METRIC_PREFIX`, as the TRL adapter's).
Tokens whose margin is only a lower bound (fewer than two of the student's candidates in the teacher's
top-k) enter the segment means with that bound; ``benchmarks/bench_sparse_margins.py`` measured this to
agree with exact margins more often than leaving them out (table in ``docs/integrations.md``).

What verl 0.9.1 does not provide, and how this module works around it:

- The student's top-K candidates never leave the logits processor (``compute_forward_kl_topk`` computes
  ``student_topk_ids`` for its overlap diagnostics and drops them), the processor is fixed per strategy (not
  per loss mode), and the rollout engine is asked for the sampled token's log-prob only (``logprobs=0``).
  So :func:`install_margin_hook` wraps ``verl.trainer.distillation.fsdp.losses.compute_forward_kl_topk``
  (the module attribute verl looks up at every call) to also return ``fastopd_margins`` and
  ``fastopd_margin_exact``, both (bsz, seqlen) like verl's own outputs, which verl then carries into
  ``model_output`` like ``student_mass``. The hook acts only when ``loss_mode`` is one of this module's names.
  A hook argument in verl's logits-processor API (or ``student_topk_ids`` among its outputs) would remove it.
- Not covered: the Megatron backend (vocab-parallel logits: a top-K needs a cross-rank merge), verl's fused
  kernels (``use_fused_kernels=True`` skips the logits processor), and estimator loss modes (``k1``/``k3``:
  the server then returns the sampled token's log-prob only, so there is no top-k to take a margin from).
  In these cases the loss raises a ``RuntimeError`` that says so.

Importing this module registers the loss when verl is importable, and does nothing else to verl otherwise;
``import fastopd`` never imports it.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch

from fastopd.common import MODES
from fastopd.integrations import METRIC_PREFIX
from fastopd.release import ReleaseRule
from fastopd.sparse import SparseMargins, sparse_margins

LOSS_NAME = "fastopd_release"
MARGIN_KEY = "fastopd_margins"
EXACT_KEY = "fastopd_margin_exact"
BASE_LOSS = "forward_kl_topk"

__all__ = [
    "LOSS_NAME", "MARGIN_KEY", "EXACT_KEY", "VerlReleaseOptions", "configure", "options", "release_rule",
    "margins_from_logits", "release_weighted_losses", "fastopd_release_loss", "install_margin_hook", "register",
]


@dataclass
class VerlReleaseOptions:
    """Options of the ``fastopd_release`` loss (see the module docstring for the environment variables)."""

    tokenizer: Any = None
    k: int = 16
    min_gain: float = 10.0
    mode: str = "release"
    seed: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode (FASTOPD_VERL_MODE) must be one of {MODES}, got {self.mode!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 2:
            raise ValueError(f"k (FASTOPD_VERL_K) must be an int >= 2, got {self.k!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed (FASTOPD_VERL_SEED) must be an int >= 0, got {self.seed!r}")


_OPTIONS: VerlReleaseOptions | None = None
_TOKENIZERS: dict = {}
_NAMES: set[str] = set()
_RULE: tuple[tuple, ReleaseRule] | None = None  # this process's rule and the options it was built from


def configure(**kwargs) -> VerlReleaseOptions:
    """Set this process's options (``tokenizer`` may be a path or a tokenizer object); returns them."""
    global _OPTIONS, _RULE
    _OPTIONS = VerlReleaseOptions(**kwargs)
    _RULE = None  # the next loss starts a rule from the (new) seed
    return _OPTIONS


def options() -> VerlReleaseOptions:
    """The options in force: those of :func:`configure`, else the ``FASTOPD_VERL_*`` environment."""
    if _OPTIONS is not None:
        return _OPTIONS
    env = os.environ
    try:
        return VerlReleaseOptions(
            tokenizer=env.get("FASTOPD_VERL_TOKENIZER"),
            k=int(env.get("FASTOPD_VERL_K", "16")),
            min_gain=float(env.get("FASTOPD_VERL_MIN_GAIN", "10")),
            mode=env.get("FASTOPD_VERL_MODE", "release"),
            seed=int(env.get("FASTOPD_VERL_SEED", "0")),
        )
    except ValueError as e:
        raise ValueError(f"bad FASTOPD_VERL_* environment variable: {e}") from e


def release_rule(opts: VerlReleaseOptions | None = None) -> ReleaseRule:
    """This process's :class:`fastopd.ReleaseRule` for ``opts`` (default :func:`options`), seeded with
    ``opts.seed``; the same object on every call with the same mode, k, min_gain and seed, so the ``random``
    and ``shuffled`` controls' generator advances from step to step as in one seeded run. New options (or
    :func:`configure`) start a new rule from the seed."""
    global _RULE
    opts = options() if opts is None else opts
    key = (opts.mode, opts.k, opts.min_gain, opts.seed)
    if _RULE is None or _RULE[0] != key:
        _RULE = (key, ReleaseRule(opts.mode, k=opts.k, min_gain=opts.min_gain, seed=opts.seed))
    return _RULE[1]


def _tokenizer(opts: VerlReleaseOptions):
    tok = opts.tokenizer
    if tok is None:
        raise RuntimeError(
            "the fastopd_release loss needs the student's tokenizer for its sentence segments: set "
            "FASTOPD_VERL_TOKENIZER=<model path or name> (or call fastopd.integrations.verl.configure(tokenizer=...))"
        )
    if not isinstance(tok, (str, os.PathLike)):
        return tok
    if tok not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[tok] = AutoTokenizer.from_pretrained(tok)
    return _TOKENIZERS[tok]


def margins_from_logits(
    student_logits: torch.Tensor, teacher_topk_ids: torch.Tensor, teacher_topk_logprobs: torch.Tensor, *, k: int
) -> SparseMargins:
    """m_t from the student's logits (..., V) and the server's top-k (..., k): the student's top-K ids by
    ``torch.topk`` (ties in any order), then :func:`fastopd.sparse_margins`. No gradient."""
    with torch.no_grad():
        cand = torch.topk(student_logits.detach(), k, dim=-1).indices
        return sparse_margins(cand, teacher_topk_ids, teacher_topk_logprobs.float())


def release_weighted_losses(
    per_token_losses: torch.Tensor,
    margins: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    tokenizer,
    rule: ReleaseRule,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """w_t * l_t for (bsz, resp_len) per-token losses; returns (weighted losses, weights, metrics).

    The weights are ``rule.from_margins(margins, segments, response_mask)``, the segments from ``tokenizer``
    on ``response_ids`` under ``response_mask`` (:func:`fastopd.integrations.completion_segments`).
    """
    from fastopd.integrations import completion_segments

    valid = response_mask.bool()
    seg = completion_segments(tokenizer, response_ids, response_mask)
    seg = torch.where(valid, seg, torch.full_like(seg, -1))
    decision = rule.from_margins(margins.detach().float(), seg, valid)
    weights = decision.weights.to(device=per_token_losses.device, dtype=per_token_losses.dtype)
    p = METRIC_PREFIX
    metrics = {
        f"{p}accept_rate": decision.metrics["accept_rate"],
        f"{p}kept_fraction": decision.metrics["kept_fraction"],
        f"{p}margin_mean": float(margins[valid].float().mean()) if valid.any() else 0.0,
    }
    if decision.metrics["gain_mean"] == decision.metrics["gain_mean"]:  # NaN when no rollout has a split
        metrics[f"{p}gain_mean"] = decision.metrics["gain_mean"]
    return per_token_losses * weights, weights, metrics


def _padded(t: torch.Tensor, data) -> torch.Tensor:
    from verl.workers.utils.padding import no_padding_2_padding

    return no_padding_2_padding(t, data)


def fastopd_release_loss(config, distillation_config, model_output: dict, data) -> tuple[torch.Tensor, dict]:
    """The registered verl loss: verl's ``forward_kl_topk`` per-token loss times the release weights.

    Same signature and contract as verl's ``DistillationLossFn``: returns ``(losses (bsz, resp_len), metrics)``.
    """
    from verl.trainer.distillation.losses import get_distillation_loss_fn

    if MARGIN_KEY not in model_output:
        raise RuntimeError(
            f"model_output has no {MARGIN_KEY!r}: the fastopd_release loss needs the margin hook in verl's logits "
            "processor (fastopd.integrations.verl.install_margin_hook(), installed on import), the FSDP backend "
            "(actor strategy fsdp/fsdp2; not megatron) and use_fused_kernels=False"
        )
    losses, metrics = get_distillation_loss_fn(BASE_LOSS)(config, distillation_config, model_output, data)
    opts = options()
    margins = _padded(model_output[MARGIN_KEY], data)
    response_mask = data["response_mask"]
    if response_mask.is_nested:
        response_mask = response_mask.to_padded_tensor(0)
    responses = data["responses"]
    if responses.is_nested:
        responses = responses.to_padded_tensor(0)
    width = losses.shape[1]
    responses, response_mask = responses[:, :width], response_mask[:, :width]
    weighted, _, rule_metrics = release_weighted_losses(
        losses, margins, responses, response_mask, tokenizer=_tokenizer(opts), rule=release_rule(opts),
    )
    metrics.update(rule_metrics)
    if EXACT_KEY in model_output:
        exact, valid = _padded(model_output[EXACT_KEY], data) > 0.5, response_mask.bool()
        metrics[f"{METRIC_PREFIX}margin_exact_fraction"] = float(exact[valid].float().mean()) if valid.any() else 0.0
    return weighted, metrics


def install_margin_hook() -> None:
    """Wrap verl's FSDP logits-processor loss so that it also returns the release margins (idempotent)."""
    import verl.trainer.distillation.fsdp.losses as fsdp_losses

    original = fsdp_losses.compute_forward_kl_topk
    if getattr(original, "_fastopd_hook", False):
        return

    def compute_forward_kl_topk(student_logits, teacher_topk_log_probs, teacher_topk_ids, config, data_format):
        out = original(
            student_logits=student_logits, teacher_topk_log_probs=teacher_topk_log_probs,
            teacher_topk_ids=teacher_topk_ids, config=config, data_format=data_format,
        )
        if config.distillation_loss.loss_mode not in _NAMES:
            return out
        # the same layout steps as verl's function: nested -> (1, total_nnz, topk), then the sequence-parallel slice
        lps, ids = teacher_topk_log_probs, teacher_topk_ids
        if lps.is_nested:
            lps, ids = lps.values().unsqueeze(0), ids.values().unsqueeze(0)
        from verl.utils.ulysses import get_ulysses_sequence_parallel_world_size, slice_input_tensor

        if get_ulysses_sequence_parallel_world_size() > 1:
            lps, ids = slice_input_tensor(lps, dim=1), slice_input_tensor(ids, dim=1)
        sm = margins_from_logits(student_logits, ids, lps, k=options().k)
        out[MARGIN_KEY] = sm.margins.to(torch.float32)
        out[EXACT_KEY] = sm.exact.to(torch.float32)
        return out

    compute_forward_kl_topk._fastopd_hook = True
    compute_forward_kl_topk.__wrapped__ = original
    fsdp_losses.compute_forward_kl_topk = compute_forward_kl_topk


def register(name: str = LOSS_NAME) -> None:
    """Register ``fastopd_release_loss`` under ``name`` with verl (a top-k loss) and install the hook.

    Idempotent for this module's function; a *different* function already under ``name`` is verl's error.
    """
    from verl.trainer.distillation.losses import (
        DISTILLATION_LOSS_REGISTRY,
        DistillationLossSettings,
        register_distillation_loss,
    )

    install_margin_hook()
    _NAMES.add(name)
    if DISTILLATION_LOSS_REGISTRY.get(name) is fastopd_release_loss:
        return
    register_distillation_loss(DistillationLossSettings(names=[name], use_topk=True))(fastopd_release_loss)


if importlib.util.find_spec("verl") is not None:  # the plugin import (VERL_USE_EXTERNAL_MODULES) registers
    register()
