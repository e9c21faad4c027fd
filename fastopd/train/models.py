"""Model and tokenizer loading for the trainer: attention implementation, dtype, pad/EOS, the vocabulary check.

- :func:`load_tokenizer`, :func:`load_teacher_tokenizer`, :func:`load_model` (``AutoModelForCausalLM``);
- :func:`attention_implementation` and :func:`choose_dtype`: what ``"auto"`` means on this device;
- :func:`output_width` and :func:`check_same_vocabulary`: the shared vocabulary size V of student and teacher;
- :func:`quiet_transformers`: transformers' own progress bars off while loading and saving.
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch

from fastopd.train.config import TrainConfig


def attention_implementation(requested: str, device: torch.device) -> str:
    """flash_attention_2 on CUDA when flash-attn is installed, sdpa otherwise (or what was asked for)."""
    if requested != "auto":
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def choose_dtype(name: str, role: str, device: torch.device) -> torch.dtype:
    """``"auto"``: bf16 for the teacher on CUDA, fp32 otherwise; else ``torch.<name>``."""
    if name == "auto":
        return torch.bfloat16 if (role == "teacher" and device.type == "cuda") else torch.float32
    return getattr(torch, name)


def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    """AutoTokenizer with a pad token (EOS when it has none) and left truncation for long prompts."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {name} has no EOS token; generation could not stop")
    tok.truncation_side = "left"
    return tok


def load_teacher_tokenizer(cfg: TrainConfig, student_tokenizer):
    """The teacher's own tokenizer for the vocabulary check: ``teacher_tokenizer``, else the teacher's folder
    or hub repo; the shared ``tokenizer`` only when the teacher ships none (nothing to compare then)."""
    if cfg.teacher_tokenizer:
        return load_tokenizer(cfg.teacher_tokenizer, trust_remote_code=cfg.trust_remote_code)
    try:
        return load_tokenizer(cfg.teacher, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, TypeError):
        print(f"note: no tokenizer found with the teacher {cfg.teacher}; assuming it uses the student's "
              "(set teacher_tokenizer to check)")
        return student_tokenizer


def load_model(name: str, *, dtype: torch.dtype, attn: str, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        name, dtype=dtype, attn_implementation=attn, trust_remote_code=trust_remote_code)


def output_width(model) -> int:
    """Number of logits the model outputs (its LM head's rows; may exceed the tokenizer by padding)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def check_same_vocabulary(student_tokenizer, teacher_tokenizer, student_width: int, teacher_width: int) -> int:
    """The shared vocabulary size V, or a ValueError saying how the two vocabularies differ.

    OPD compares the two models' probabilities of the same token ids, so the tokenizers must map every token
    to the same id. The models' output widths may be larger than V (embedding padding); the loss then uses
    the first V columns of both (``vocab_size=V``).
    """
    sv, tv = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if sv != tv:
        only_s = sorted(set(sv) - set(tv))
        only_t = sorted(set(tv) - set(sv))
        moved = sorted(t for t in set(sv) & set(tv) if sv[t] != tv[t])
        parts = [f"student has {len(sv)} tokens, teacher {len(tv)}"]
        if only_s:
            parts.append(f"{len(only_s)} only in the student (e.g. {only_s[:3]})")
        if only_t:
            parts.append(f"{len(only_t)} only in the teacher (e.g. {only_t[:3]})")
        if moved:
            parts.append(f"{len(moved)} with different ids (e.g. {moved[0]!r}: {sv[moved[0]]} vs {tv[moved[0]]})")
        raise ValueError(
            "the student and the teacher do not share a vocabulary (" + "; ".join(parts) + "). On-policy "
            "distillation compares the two models token id by token id, so pick a teacher and a student of the "
            "same tokenizer family (e.g. two Qwen3 models).")
    v = len(student_tokenizer)
    for role, width in (("student", student_width), ("teacher", teacher_width)):
        if width < v:
            raise ValueError(f"the {role} outputs {width} logits but the tokenizer has {v} tokens; "
                             "they do not belong together")
    return v



@contextlib.contextmanager
def quiet_transformers():
    """Hide transformers' own progress bars (weight loading/saving) so that the training bar stays readable."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()



def forward_accepts(model, arg: str) -> bool:
    """Whether the model's ``forward`` (inside DDP / FSDP / compiled wrappers) takes the keyword ``arg``."""
    import inspect

    from fastopd.head import unwrap_model

    return arg in inspect.signature(unwrap_model(model).forward).parameters
