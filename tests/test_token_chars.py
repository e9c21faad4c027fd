"""Tests of fastopd/token_chars.py: ``decode_with_anchors`` (the decoded text and each token's anchor character)
against an oracle that decodes token prefixes with the tokenizer itself (no byte table).

The tokenizer is the tests' byte-level BPE (tests/tiny.py); the segmentation built on top, and the
SentencePiece and generic families, are tests/test_segment.py's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastopd.token_chars import decode_with_anchors

DECODE = dict(skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def tok():
    from tiny import make_tokenizer

    return make_tokenizer()


def prefix_anchors(tok, ids):
    """Token t adds the characters decode(ids[:t+1])[len(decode(ids[:t])):]; its anchor is the first of them
    that is not whitespace (the first one if all are), -1 if it adds none. Valid for text whose tokens
    end on character boundaries (ASCII here)."""
    out = []
    for t in range(len(ids)):
        before, after = tok.decode(ids[:t], **DECODE), tok.decode(ids[:t + 1], **DECODE)
        assert after.startswith(before)
        added = after[len(before):]
        if not added:
            out.append(-1)
            continue
        solid = [i for i, c in enumerate(added) if not c.isspace()]
        out.append(len(before) + (solid[0] if solid else 0))
    return out


@pytest.mark.parametrize("text", ["Start with 7. Add 5. Multiply by 2.", "  We start with 3.\n\nThe answer is 21.  ",
                                  "Q: Start with 12.\nA: We start with 12. The answer is \\boxed{12}."])
def test_anchors_match_prefix_decoding(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    got_text, anchors = decode_with_anchors(tok, ids)
    assert got_text == tok.decode(ids, **DECODE) == text
    assert anchors.dtype == np.int64 and anchors.tolist() == prefix_anchors(tok, ids)


def test_special_tokens_anchor_nowhere_and_do_not_shift_the_text(tok):
    body = tok.encode("We start with 3. Adding 4 gives 7.", add_special_tokens=False)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    ids = [eos] + body + [eos, pad]
    text, anchors = decode_with_anchors(tok, ids)
    assert text == tok.decode(body, **DECODE)
    assert anchors[0] == -1 and anchors[-2:].tolist() == [-1, -1]
    assert anchors[1:-2].tolist() == decode_with_anchors(tok, body)[1].tolist()


def test_a_character_split_over_byte_tokens_anchors_every_piece_on_it(tok):
    # "é" is two UTF-8 bytes; the tokenizer was trained on ASCII, so each byte is its own token
    ids = tok.encode("We got é. Yes.", add_special_tokens=False)
    text, anchors = decode_with_anchors(tok, ids)
    assert text == "We got é. Yes."
    at = text.index("é")
    pieces = [i for i, a in enumerate(anchors) if a == at]
    assert len(pieces) == 2 and pieces[1] == pieces[0] + 1
    assert all(text[a] != "é" for i, a in enumerate(anchors) if i not in pieces)


def test_input_forms_empty_and_bad_ids(tok):
    ids = tok.encode("Add 5. Subtract 3.", add_special_tokens=False)
    want = decode_with_anchors(tok, ids)
    for form in (np.asarray(ids, dtype=np.int32), torch.tensor(ids), tuple(ids)):
        got = decode_with_anchors(tok, form)
        assert got[0] == want[0] and got[1].tolist() == want[1].tolist()
    for empty in ([], np.zeros(0, np.int64), torch.zeros(0, dtype=torch.long)):
        text, anchors = decode_with_anchors(tok, empty)
        assert text == "" and anchors.dtype == np.int64 and anchors.shape == (0,)
    with pytest.raises(ValueError, match="token_ids must be >= 0"):
        decode_with_anchors(tok, [3, -100])
    with pytest.raises(TypeError, match="token_ids must hold integer"):
        decode_with_anchors(tok, [1.0, 2.0])
    with pytest.raises(ValueError, match="token_ids must be 1-D"):
        decode_with_anchors(tok, [[1, 2]])
