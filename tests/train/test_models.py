"""Tests of model and tokenizer loading (fastopd/train/models.py): the vocabulary check, what "auto" means."""

from __future__ import annotations

import pytest
import torch

from fastopd.train.models import (
    attention_implementation, check_same_vocabulary, choose_dtype, load_model, load_tokenizer, output_width,
)
from fastopd.train.trainer import train
from tiny import tiny_config


def test_vocabulary_check_allows_padded_heads_and_rejects_other_tokenizers(tiny, tmp_path):
    from tiny import make_model, make_tokenizer

    tok = load_tokenizer(tiny["tokenizer"])
    assert check_same_vocabulary(tok, tok, len(tok), len(tok) + 8) == len(tok)
    with pytest.raises(ValueError, match="outputs 10 logits"):
        check_same_vocabulary(tok, tok, len(tok), 10)
    other = make_tokenizer(vocab_size=300)  # same specials, different merges -> a different vocabulary
    with pytest.raises(ValueError, match="do not share a vocabulary"):
        check_same_vocabulary(tok, other, len(tok), len(other))
    # end to end: the trainer refuses a teacher of another tokenizer before any training
    bad = tmp_path / "bad_teacher"
    make_model(other, hidden=32, seed=5).save_pretrained(bad)
    other.save_pretrained(bad)
    with pytest.raises(ValueError, match="do not share a vocabulary"):
        train(tiny_config(tiny, tmp_path / "run", teacher=str(bad)))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_output_width_is_the_head_rows_and_the_tokenizer_gets_a_pad(tiny):
    tok = load_tokenizer(tiny["tokenizer"])
    assert tok.pad_token_id is not None and tok.truncation_side == "left"
    teacher = load_model(tiny["teacher"], dtype=torch.float32, attn="sdpa")
    assert output_width(teacher) == len(tok) + 8  # make_tiny_run pads the teacher's head by 8 rows


def test_auto_dtype_and_attention():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_dtype("auto", "teacher", cpu) is torch.float32
    assert choose_dtype("auto", "teacher", cuda) is torch.bfloat16
    assert choose_dtype("auto", "student", cuda) is torch.float32  # fp32 master weights
    assert choose_dtype("float16", "student", cpu) is torch.float16
    assert attention_implementation("auto", cpu) == "sdpa"
    assert attention_implementation("eager", cuda) == "eager"
