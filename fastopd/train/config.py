"""The trainer's configuration: one flat dataclass, every field documented, loadable from YAML.

``fastopd train --config cfg.yaml --lr 1e-5`` reads the YAML file into :class:`TrainConfig` and then applies
the command-line flags on top (flags win). Every field is also a flag: ``--max-new-tokens 128`` (or
``--max_new_tokens 128``); booleans are ``--flag`` / ``--no-flag``.

Sizes are per process: one optimizer step consumes ``prompts_per_step * num_samples`` rollouts per process
per micro-batch, times ``grad_accum_steps`` micro-batches, times the number of processes.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fastopd.train.choices import (  # noqa: F401 -- the choices' names, re-exported
    MODE_SHORTHANDS, SAMPLERS, TOPK_LOSSES, TRAIN_LOSSES, WEIGHTS, check_served, is_served, step_choices,
)

SCHEDULERS = (
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
    "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay",
)
DTYPES = ("auto", "float32", "bfloat16", "float16")
PRECISIONS = ("auto", "no", "bf16", "fp16")
ATTENTION = ("auto", "flash_attention_2", "sdpa", "eager")
LOG_WITH = ("auto", "none", "tensorboard")
BACKENDS = ("auto", "triton", "reference")
LOSS_FROM = ("hidden", "logits")
RUN_FIELDS = (
    "student", "teacher", "tokenizer", "student_dtype", "teacher_dtype", "mixed_precision",
    "train_data", "train_split", "prompt_field", "answer_field", "chat_template", "max_prompt_tokens",
    "prompts_per_step", "num_samples", "max_new_tokens", "temperature", "top_p", "top_k",
    "sampler", "weights", "loss", "mode", "teacher_topk", "k", "loss_temperature", "min_segments", "min_gain", "fraction", "confirm_segments",
    "online_chunk_size",
    "grad_accum_steps", "lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "lr_scheduler",
    "warmup_steps", "max_grad_norm", "seed",
)
"""The fields that define a run: each changes what a training step computes (the models and their dtypes, the
prompts, the sampling, the loss and the rule, the optimizer and its schedule, the seed). ``--resume`` refuses a
change of any of them (:func:`fastopd.train.outdir.check_resume`). Not here: ``steps`` (may grow on resume),
how the same numbers are computed (``backend``, ``loss_from``, ``loss_chunk_size``, ``attn_implementation``,
``gradient_checkpointing``), evaluation, logging, checkpointing, progress and thread settings."""

MAY_BE_INFINITE = ("min_gain",)
"""The float fields that may be infinite (``min_gain=-inf`` accepts every split, ``inf`` none, as in
:func:`fastopd.bic_release`); NaN is refused there too, and every other float field must be finite."""

# Names used by other trainers (TRL, HF Trainer) -> the field here; only used to suggest the right name.
ALIASES = {
    "learning_rate": "lr", "max_steps": "steps", "num_train_steps": "steps", "batch_size": "prompts_per_step",
    "per_device_train_batch_size": "prompts_per_step", "gradient_accumulation_steps": "grad_accum_steps",
    "num_generations": "num_samples", "max_completion_length": "max_new_tokens", "model": "student",
    "teacher_model": "teacher", "dataset": "train_data", "max_prompt_length": "max_prompt_tokens",
    "warmup": "warmup_steps", "save_steps": "save_every", "eval_steps": "eval_every",
    "save_total_limit": "keep_last", "report_to": "log_with", "lr_scheduler_type": "lr_scheduler",
}


def _f(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A dataclass field with its help text (and allowed values) in the metadata, for docs and ``--help``."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything ``fastopd train`` needs. Defaults suit a real model on one GPU; see docs/training.md."""

    # ---- models
    student: str = _f("", "Student model: a local folder or a Hugging Face hub name (AutoModelForCausalLM). Required.")
    teacher: str = _f("", "Teacher model: a local folder or a hub name, or the URL of an OpenAI-compatible vLLM server "
                      "that serves it (http://host:port: the teacher's log-probs come from prompt_logprobs, "
                      "docs/integrations.md). Must share the student's vocabulary. Required.")
    teacher_topk: int = _f(20, "Served teacher only: the top-k log-probs per position asked of the server (vLLM's "
                           "--max-logprobs caps it); the margins are exact where two of the student's top-K lie in it.")
    teacher_timeout: float = _f(120.0, "Served teacher only: seconds per request before it fails.")
    tokenizer: str | None = _f(None, "Tokenizer to use for both models (default: the student's).")
    teacher_tokenizer: str | None = _f(
        None, "The teacher's tokenizer, only for the vocabulary check (default: the teacher's own, or `tokenizer`).")
    trust_remote_code: bool = _f(False, "Pass trust_remote_code=True to from_pretrained (models with custom code).")
    student_dtype: str = _f(
        "auto", "Dtype of the student's weights. auto: float32 master weights (bf16 autocast on GPU).", DTYPES)
    teacher_dtype: str = _f("auto", "Dtype of the teacher's weights. auto: bfloat16 on CUDA, float32 on CPU.", DTYPES)
    attn_implementation: str = _f(
        "auto", "Attention kernel. auto: flash_attention_2 on CUDA when flash-attn is installed, else sdpa.", ATTENTION)
    gradient_checkpointing: bool = _f(False, "Recompute the student's activations in backward to save memory.")

    # ---- data
    train_data: str = _f(
        "", "Training prompts: a JSONL file with a `prompt` (and optional `answer`) per line, a local datasets "
        "folder (save_to_disk), a .json/.csv/.parquet file, or a hub dataset name. Required.")
    eval_data: str | None = _f(None, "Evaluation prompts (same formats); rows need an `answer`. None: no evaluation.")
    train_split: str = _f("train", "Split to use when train_data is a DatasetDict or a hub dataset.")
    eval_split: str = _f("test", "Split to use when eval_data is a DatasetDict or a hub dataset.")
    prompt_field: str = _f("prompt", "Column / JSON key holding the prompt text.")
    answer_field: str = _f("answer", "Column / JSON key holding the reference answer (for the verifier).")
    chat_template: bool = _f(
        False, "Wrap each prompt as a user message with the tokenizer's chat template (instruct models).")
    max_prompt_tokens: int = _f(512, "Prompts longer than this are cut from the left.")
    verifier: str = _f("boxed", "Answer checker for accuracy: boxed (last \\boxed{...}) or exact (whole text).")

    # ---- rollouts (the student samples them with HF generate)
    prompts_per_step: int = _f(8, "Prompts per process per micro-batch.")
    num_samples: int = _f(4, "Completions the student samples per prompt.")
    max_new_tokens: int = _f(256, "Longest completion; generation also stops at EOS.")
    temperature: float = _f(1.0, "Sampling temperature of the rollouts.")
    top_p: float = _f(1.0, "Nucleus sampling of the rollouts (1.0: off).")
    top_k: int = _f(0, "Top-k sampling of the rollouts (0: off).")

    # ---- loss and release rule (docs/formulas.md §1-5)
    sampler: str | None = _f(
        None, "Who samples the rollouts: student (HF generate), online (the student, each rollout stopping where "
        "the release rule releases it: the teacher scores each chunk as it is sampled, so the released suffix is "
        "never generated, scored or trained; docs/formulas.md §8) or teacher (sequence-level KD; with loss "
        "cross_entropy, SFT). Default: from `mode`, else student.", SAMPLERS + (None,))
    weights: str | None = _f(
        None, "Which tokens count: release (the Prefix-Teach/Suffix-Fade rule), or a control: full (every token), "
        "fixed_prefix (first `fraction` of the tokens), random (cut at a random sentence boundary), shuffled (the "
        "rule's kept fractions of the batch permuted among its rollouts: same lengths, other places). Default: from "
        "`mode`, else release.", WEIGHTS + (None,))
    loss: str = _f("pg", "Which loss: pg (policy gradient with the reverse-KL advantage, Thinking Machines recipe); "
                   "reverse_kl (exact dense reverse KL); forward_kl (exact dense forward KL(teacher || student) on the "
                   "sampled rollouts, GKD's beta = 0); cross_entropy (the student's cross-entropy on the sampled "
                   "tokens: with sampler teacher, SFT).", TRAIN_LOSSES)
    mode: str | None = _f(
        None, "Shorthand for sampler, weights (and loss): release / full / fixed_prefix / random / shuffled = the "
        "student samples and those weights; online = sampler online, weights release; sft = sampler teacher, "
        "weights full, loss cross_entropy (the baseline: supervised fine-tuning on as many teacher completions per "
        "step as OPD has rollouts). A field set beside it must agree with it.", tuple(MODE_SHORTHANDS) + (None,))
    k: int = _f(16, "Student top-K candidates for the teacher margin m_t.")
    loss_temperature: float = _f(1.0, "tau of the loss and the margin: log-probs are log softmax(z / tau).")
    min_segments: int = _f(2, "Fewest sentence segments on each side of a release point.")
    min_gain: float = _f(10.0, "Release only when the BIC gain exceeds this (10: very strong evidence).")
    fraction: float = _f(0.5, "Kept fraction of the fixed_prefix control.")
    confirm_segments: int = _f(2, "Sampler online: stop a rollout once the rule accepts a release point with at least this "
                               "many segments after it (>= min_segments).")
    online_chunk_size: int = _f(16, "Sampler online: tokens sampled between two scorings by the teacher (and two looks "
                                "at the rollout's finished sentences).")
    backend: str = _f("auto", "Loss backend: auto (Triton on CUDA, reference on CPU), triton, reference.", BACKENDS)
    loss_from: str = _f("hidden", "hidden: the loss from both models' final hidden states and LM heads in token "
                        "chunks, no (N, C, V) logits (docs/formulas.md §6); logits: materialise both models' "
                        "completion logits (FSDP1, or models without logits_to_keep).", LOSS_FROM)
    loss_chunk_size: int = _f(0, "Token rows per logits tile of the hidden-state loss; 0: its default (on a GPU "
                              "from the device, 1024 rows when memory allows: fastopd.linear.cuda_chunk_rows; "
                              "2^23 / V on the CPU reference).")

    # ---- optimisation
    steps: int = _f(100, "Optimizer steps to train for (may be raised when resuming).")
    grad_accum_steps: int = _f(1, "Micro-batches (each freshly sampled) per optimizer step.")
    lr: float = _f(1e-6, "Peak learning rate of AdamW.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_eps: float = _f(1e-8, "AdamW epsilon.")
    lr_scheduler: str = _f("constant_with_warmup", "transformers.get_scheduler name.", SCHEDULERS)
    warmup_steps: int = _f(0, "Linear warmup steps of the schedule.")
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm to this (0: no clipping).")
    mixed_precision: str = _f("auto", "auto: bf16 autocast on a CUDA GPU that supports it, else none.", PRECISIONS)
    seed: int = _f(0, "Seed of prompts order, sampling, and the random control (each process adds its rank).")

    # ---- evaluation (greedy decoding, graded by `verifier`)
    eval_every: int = _f(0, "Evaluate every this many steps (0: only at the end). Needs eval_data.")
    eval_at_start: bool = _f(True, "Evaluate the student before the first step.")
    eval_size: int = _f(0, "Use the first this many eval rows (0: all).")
    eval_batch_size: int = _f(32, "Prompts per greedy generate call (per process).")
    eval_max_new_tokens: int = _f(0, "Longest eval completion (0: max_new_tokens).")

    # ---- outputs, logging, checkpoints
    output_dir: str = _f("runs/opd", "Run folder: metrics.jsonl, eval.jsonl, checkpoints/, final/.")
    overwrite: bool = _f(False, "Delete an existing run in output_dir first: only the files a run writes (logs, "
                         "config.yaml, checkpoints/, final/), never others (otherwise an existing run is an error "
                         "unless resume is set).")
    resume: bool = _f(False, "Continue from the latest whole checkpoint in output_dir (no lost or repeated step); "
                      "refused when a field of RUN_FIELDS differs from the run's config.yaml.")
    save_every: int = _f(0, "Write a checkpoint every this many steps (0: only at the end).")
    keep_last: int = _f(2, "Checkpoints to keep (older ones are deleted).")
    log_with: str = _f("auto", "Trackers: auto (TensorBoard when installed), tensorboard, none.", LOG_WITH)
    log_rollouts: bool = _f(
        False, "Also write per-rollout margins, segments and release decisions to rollouts.jsonl (for plots).")
    progress: bool = _f(True, "Show a tqdm progress bar.")
    num_threads: int = _f(0, "torch CPU threads (0: leave torch's default).")

    # ------------------------------------------------------------------------------------------------------
    @property
    def choices(self) -> tuple[str, str, str]:
        """(sampler, weights, loss) of a training step: :func:`step_choices` of the fields."""
        return step_choices(self.mode, self.sampler, self.weights, self.loss)

    @property
    def label(self) -> str:
        """The run's name in progress bars and tables: its mode, else sampler/weights/loss."""
        return self.mode or "/".join(self.choices)

    def validate(self) -> "TrainConfig":
        """Raise a ValueError naming the field for every bad value; return self."""
        hints = _field_types()
        for f in dataclasses.fields(self):  # every value of the field's type (a number where a number goes)
            check_type(f.name, hints[f.name], getattr(self, f.name))
        for f in dataclasses.fields(self):  # every float setting is finite (NaN and inf would train a NaN model)
            value = getattr(self, f.name)
            if _base_type(hints[f.name]) is not float or value is None or math.isfinite(value):
                continue
            if f.name in MAY_BE_INFINITE and not math.isnan(value):
                continue
            what = "a number (not NaN)" if f.name in MAY_BE_INFINITE else "a finite number"
            raise ValueError(f"config field `{f.name}` must be {what}, got {value!r}")
        for name in ("student", "teacher", "train_data", "output_dir"):
            if not getattr(self, name):
                raise ValueError(f"config field `{name}` is required (set it in the YAML file or with --{name})")
        for name in ("student", "tokenizer", "teacher_tokenizer") + (() if is_served(self.teacher) else ("teacher",)):
            check_model_path(name, getattr(self, name))
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise ValueError(f"config field `{f.name}` must be one of {choices}, got {getattr(self, f.name)!r}")
        positive = ("prompts_per_step", "num_samples", "max_new_tokens", "steps", "grad_accum_steps",
                    "eval_batch_size", "max_prompt_tokens", "keep_last")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"config field `{name}` must be >= 1, got {getattr(self, name)!r}")
        if self.num_threads > 2**31 - 1:
            raise ValueError(f"config field `num_threads` must be at most 2**31 - 1 (torch's int), got "
                             f"{self.num_threads!r}")
        for name in ("warmup_steps", "eval_every", "eval_size", "save_every", "num_threads", "top_k",
                     "eval_max_new_tokens", "loss_chunk_size"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"config field `{name}` must be >= 0, got {getattr(self, name)!r}")
        if self.k < 2:
            raise ValueError(f"config field `k` must be >= 2, got {self.k}")
        if not self.temperature > 0 or not self.loss_temperature > 0:
            raise ValueError("config fields `temperature` and `loss_temperature` must be > 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"config field `top_p` must be in (0, 1], got {self.top_p}")
        if self.online_chunk_size < 1:
            raise ValueError(f"config field `online_chunk_size` must be >= 1, got {self.online_chunk_size!r}")
        if self.confirm_segments < self.min_segments:
            raise ValueError(f"config field `confirm_segments` must be >= min_segments={self.min_segments}, got "
                             f"{self.confirm_segments!r}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"config field `fraction` must be in (0, 1], got {self.fraction}")
        if self.lr <= 0 or self.max_grad_norm < 0 or self.weight_decay < 0:
            raise ValueError("config fields `lr` must be > 0, `max_grad_norm` and `weight_decay` >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"config field `{name}` must be in [0, 1), got {getattr(self, name)!r}")
        if not self.adam_eps >= 0:
            raise ValueError(f"config field `adam_eps` must be >= 0, got {self.adam_eps!r}")
        if self.resume and self.overwrite:
            raise ValueError("config fields `resume` and `overwrite` exclude each other: resume continues the run "
                             "in output_dir, overwrite removes its files")
        sampler, _, loss = self.choices  # raises for a bad or contradictory sampler / weights / loss / mode
        check_served(is_served(self.teacher), sampler, loss, self.loss_temperature)
        if self.teacher_topk < 1 or not self.teacher_timeout > 0:
            raise ValueError("config fields `teacher_topk` must be >= 1 and `teacher_timeout` > 0")
        if self.verifier not in ("boxed", "exact"):
            from fastopd.train.verify import get_verifier

            get_verifier(self.verifier)  # raises with the list of names
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict, *, source: str = "config") -> "TrainConfig":
        """Build from a plain dict; unknown keys are an error that suggests the closest field name.

        Each value is read as its field's type (:func:`coerce`): YAML reads ``5e-4`` as a string, which is
        the float it means here; ``'2'`` for an int field is 2; a value that is not of the type (``k: 16.5``,
        ``lr: fast``) is a ValueError naming the field, ``source`` and the type expected."""
        names = cls.field_names()
        for key in values:
            if key not in names:
                close = [ALIASES[key]] if key in ALIASES else difflib.get_close_matches(str(key), names, n=1)
                hint = f" (did you mean `{close[0]}`?)" if close else ""
                raise ValueError(f"unknown field `{key}` in {source}{hint}; fields: {', '.join(names)}")
        hints = _field_types()
        return cls(**{key: coerce(key, hints[key], value, source) for key, value in values.items()})

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict | None = None) -> "TrainConfig":
        """Read a YAML mapping of field names, then apply ``overrides`` (e.g. parsed command-line flags)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or type(e).__name__
            raise ValueError(f"{path} is not valid YAML{where}: {problem}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a YAML mapping of config fields, got {type(data).__name__}")
        merged = dict(data)
        merged.update(overrides or {})
        return cls.from_dict(merged, source=str(path))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _field_types() -> dict:
    """Field name -> its annotation (``int``, ``float``, ``str | None``, ...), resolved."""
    return typing.get_type_hints(TrainConfig)


def _base_type(hint):
    """``int`` of ``int`` and of ``int | None``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
_BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def check_type(name: str, hint, value, source: str | None = None) -> None:
    """A ValueError naming the field (and ``source``) unless ``value`` is of the field's type exactly."""
    base = _base_type(hint)
    if value is None and type(None) in typing.get_args(hint):
        return
    boolean = isinstance(value, (bool, np.bool_))
    ok = {bool: boolean,
          int: isinstance(value, numbers.Integral) and not boolean,  # numpy integers too
          float: isinstance(value, numbers.Real) and not boolean,
          str: isinstance(value, str)}.get(base, True)
    if not ok:
        where = f" in {source}" if source else ""
        none = " (or null)" if type(None) in typing.get_args(hint) else ""
        raise ValueError(f"config field `{name}`{where} must be {_TYPE_NAMES[base]}{none}, got {value!r}")


def coerce(name: str, hint, value, source: str = "config"):
    """``value`` read as the field's type where it means one unambiguously, else a ValueError (one line naming
    the field, ``source`` and the type expected): a float field takes numbers and numeric strings (YAML 1.1
    reads ``5e-4`` as a string); an int field takes integers, whole floats (``16.0``) and integer strings
    (``'2'``), not ``16.5``; a bool field takes booleans and true/false/yes/no/on/off/1/0; a string field takes
    strings and numbers (a split named ``2024``); an optional field takes null (``None``, and ``none``/``null``
    as text)."""
    base = _base_type(hint)
    optional = type(None) in typing.get_args(hint)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
        if optional:
            return None
    elif base is float and isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    elif base is int and isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    elif base is int and isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    elif base is bool and isinstance(value, str) and value.strip().lower() in _BOOLS:
        return _BOOLS[value.strip().lower()]
    elif base is bool and isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    elif base is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    check_type(name, hint, value, source)
    return value


def field_docs() -> list[tuple[str, Any, str]]:
    """(name, default, help) of every field, in order: the source of docs/training.md's table and ``--help``."""
    out = []
    for f in dataclasses.fields(TrainConfig):
        help_text = f.metadata.get("help", "")
        if "choices" in f.metadata:
            help_text += f" One of: {', '.join(str(c) for c in f.metadata['choices'] if c is not None)}."
        out.append((f.name, f.default, help_text))
    return out


def check_model_path(field_name: str, value) -> None:
    """A model or tokenizer location must be an existing local folder or a Hugging Face Hub id (``name`` or
    ``org/name``, the form ``from_pretrained`` accepts); anything else (a mistyped local path such as
    ``runs/a/studnet`` or ``./student``, a file) is one clear ValueError naming the field, before any model is
    loaded or any output folder made. ``None`` / ``""`` (an optional field left unset) pass."""
    if value is None or value == "":
        return
    if not isinstance(value, str):
        raise ValueError(f"config field `{field_name}` must be a folder or a Hub id (a string), got {value!r}")
    path = Path(value).expanduser()
    if path.is_dir():
        if field_name in ("student", "teacher") and not any(
                (path / name).is_file() for name in ("config.json", "adapter_config.json")):
            raise ValueError(f"config field `{field_name}`: the folder {value!r} holds no saved model (no "
                             "config.json); give the folder save_pretrained wrote, or a Hugging Face Hub id")
        return
    if path.exists():
        raise ValueError(f"config field `{field_name}`: {value!r} is a file; give the model's folder (with "
                         "config.json) or a Hugging Face Hub id")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        raise ValueError(f"config field `{field_name}`: {value!r} is neither an existing folder nor a Hugging Face "
                         "Hub id (`name` or `org/name`); check the path") from None
