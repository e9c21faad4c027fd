"""A training step's three choices (docs/formulas.md §8, docs/training.md): who samples, which tokens count, which
loss -- each set named once here, with the ``mode`` shorthands that expand to them and the combinations refused.
:class:`fastopd.train.config.TrainConfig` holds the fields; :mod:`fastopd.train.trainer` acts on them."""

from __future__ import annotations

from fastopd.common import LOSSES, WEIGHTS as WEIGHT_CHOICES

SAMPLERS = ("student", "online", "teacher")
"""Who samples (docs/formulas.md §8): the student with HF ``generate``; the student stopping at the online release
(:mod:`fastopd.train.online_sampler`); the teacher (sequence-level KD, and the ``sft`` baseline)."""
WEIGHTS = WEIGHT_CHOICES
"""Which tokens count (docs/formulas.md §4): the release rule or one of its controls (fastopd.common.WEIGHTS)."""
TOPK_LOSSES = ("forward_kl_topk", "reverse_kl_topk")
"""The divergences' top-k approximations (docs/formulas.md §7a): the only divergences a served teacher gives."""
TRAIN_LOSSES = LOSSES + ("cross_entropy",) + TOPK_LOSSES
"""Which loss (docs/formulas.md §5): the OPD losses, the student's cross-entropy on the sampled tokens (SFT), or,
with a teacher on a server, the top-k approximations of the divergences."""


def is_served(teacher) -> bool:
    """Whether the teacher field names an inference server (``http://...``) rather than a model."""
    return isinstance(teacher, str) and teacher.startswith(("http://", "https://"))


def check_served(served: bool, sampler: str, loss: str, loss_temperature: float = 1.0) -> None:
    """A step's choices against where the teacher is: a served teacher answers with its top-k log-probs, so the
    exact divergences and samplers that run the teacher in-process are refused with one line; an in-process
    teacher has no top-k approximation to take."""
    if served:
        if loss in ("reverse_kl", "forward_kl"):
            raise ValueError(f"a served teacher returns its top-k log-probs only, so the exact {loss} is unknown: use "
                             f"loss {loss}_topk (its top-k approximation, docs/formulas.md §7a) or pg (exact)")
        if sampler != "student":
            raise ValueError(f"sampler {sampler} runs the teacher in this process; with a served teacher "
                             "(teacher: http://...) the student samples (sampler student)")
        if loss_temperature != 1.0:
            raise ValueError(f"a served teacher's log-probs are at temperature 1, so loss_temperature must be 1, "
                             f"got {loss_temperature!r}")
    elif loss in TOPK_LOSSES:
        raise ValueError(f"loss {loss} is the top-k approximation for a served teacher (teacher: http://...); with "
                         f"the teacher in this process use the exact {loss[:-len('_topk')]}")
MODE_SHORTHANDS = {
    "release": ("student", "release", None),
    "full": ("student", "full", None),
    "fixed_prefix": ("student", "fixed_prefix", None),
    "random": ("student", "random", None),
    "shuffled": ("student", "shuffled", None),
    "online": ("online", "release", None),
    "sft": ("teacher", "full", "cross_entropy"),
}
"""``mode``: a shorthand for (sampler, weights, loss); None in the loss keeps the ``loss`` field. ``sft`` sets the
loss to cross_entropy whatever ``loss`` says (as the ``sft`` mode always trained). A fixed length budget
(the study's ``truncate``) is ``mode: full`` with a smaller ``max_new_tokens``."""


def step_choices(mode: str | None, sampler: str | None, weights: str | None, loss: str) -> tuple[str, str, str]:
    """(sampler, weights, loss) of a step: ``mode`` expanded (:data:`MODE_SHORTHANDS`), then the explicit fields (a field that
    contradicts the mode is an error), then the defaults (student, release); a combination that makes no sense
    is refused with one line naming it."""
    if mode is not None and mode not in MODE_SHORTHANDS:
        raise ValueError(f"config field `mode` must be one of {tuple(MODE_SHORTHANDS)} (a shorthand for sampler, weights and "
                         f"loss), got {mode!r}")
    implied = MODE_SHORTHANDS.get(mode, (None, None, None))
    for name, value, want in (("sampler", sampler, implied[0]), ("weights", weights, implied[1])):
        if value is not None and want is not None and value != want:
            raise ValueError(f"config field `{name}: {value}` contradicts `mode: {mode}` (which means {name}: {want}); "
                             f"set one of them")
    sampler = sampler or implied[0] or "student"
    weights = weights or implied[1] or "release"
    loss = implied[2] or loss
    for name, value, choices in (("sampler", sampler, SAMPLERS), ("weights", weights, WEIGHTS),
                                 ("loss", loss, TRAIN_LOSSES)):
        if value not in choices:
            raise ValueError(f"config field `{name}` must be one of {choices}, got {value!r}")
    if sampler == "online" and weights != "release":
        raise ValueError(f"sampler online stops each rollout at the release rule's point, so its weights are the "
                         f"rule's: weights must be release, got {weights!r}")
    if loss == "cross_entropy" and sampler != "teacher":
        raise ValueError(f"loss cross_entropy trains the student on the sampled tokens themselves (no teacher "
                         f"scores): it needs sampler teacher, got sampler {sampler!r}")
    if loss == "cross_entropy" and weights != "full":
        raise ValueError(f"loss cross_entropy reads no teacher margins, so only weights full apply, got {weights!r}")
    return sampler, weights, loss
