"""Tests of fastopd.segment (docs/formulas.md §2): Punkt spans and the token -> segment rule.

The expected segment of every token is computed here independently of the module: each token's characters
are found by decoding the prefixes ``ids[:i+1]`` with the tokenizer itself (no byte tables), and the
anchor rule is applied with plain loops.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fastopd import segment, token_chars
from fastopd.segment import (
    PunktFallbackWarning,
    batch_token_segments,
    decode_with_anchors,
    sentence_spans,
    token_segments,
)

DECODE = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}

CORPUS = [
    "Dr. Smith went home. He was tired.",
    "Café über naïve résumé. Müller aß Äpfel.",
    "中文文本很好。我们 学习 中文。",
    "I like 😀 and 🎉 a lot! Really? Yes.",
    "The answer is \\boxed{8}. Next sentence.",
    "Pay 3.5 dollars, e.g. for tea.\nNew line here.\n\nAnother paragraph.",
] * 10

FRAGMENTS = [
    "Dr. Smith went home.", "He was tired.", "e.g. this one", "i.e. that", "It costs 3.5 dollars.",
    "The answer is \\boxed{8}.", "Next sentence.", "Café über naïve.", "中文文本很好。", "😀🎉",
    "🦜 parrot.",
    "Really?", "Yes!", "x = 2.", "Mr. Brown left", "U.S. army", "(see above.)", "\"Quoted.\"", "ŝ ŭ ǅ",
]
SEPARATORS = [" ", " ", "  ", "\n", "\n\n", " \n ", "\t", "\u3000", "\xa0", "\r\n", ""]


# --------------------------------------------------------------------------------------------------------
# Tokenizers, built locally
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def byte_bpe():
    """GPT-2 style byte-level BPE with a vocabulary small enough that multi-byte characters get split."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _sentencepiece(decoder):
    trained = Tokenizer(models.Unigram())
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=150, special_tokens=["<unk>", "</s>"], unk_token="<unk>",
                                      show_progress=False)
    trained.train_from_iterator(CORPUS, trainer)
    vocab = _unigram_vocab(trained)
    have = {p for p, _ in vocab}
    vocab += [(f"<0x{b:02X}>", -30.0) for b in range(256) if f"<0x{b:02X}>" not in have]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoder
    tok.add_special_tokens([AddedToken("</s>", special=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def _unigram_vocab(tok):
    import json

    return [(p, s) for p, s in json.loads(tok.to_str())["model"]["vocab"]]


@pytest.fixture(scope="module")
def sp_llama():
    """SentencePiece-style Unigram with byte fallback and Llama-2's decoder chain."""
    return _sentencepiece(decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                             decoders.Fuse(), decoders.Strip(" ", 1, 0)]))


@pytest.fixture(scope="module")
def sp_metaspace():
    """SentencePiece-style Unigram with byte fallback pieces and a plain Metaspace decoder (T5 style)."""
    return _sentencepiece(decoders.Metaspace())


@pytest.fixture(scope="module")
def wordpiece():
    """A BERT-style WordPiece tokenizer: an 'unknown family' that must take the generic path."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]", "[SEP]"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]",
                                   eos_token="[SEP]")


@pytest.fixture(params=["byte_bpe", "sp_llama", "sp_metaspace"])
def any_tok(request):
    return request.getfixturevalue(request.param)


class _NoBackend:
    """A tokenizer exposing only decode/batch_decode (like a slow tokenizer): forces the generic path."""

    def __init__(self, tok):
        self._tok = tok

    def __len__(self):
        return len(self._tok)

    def decode(self, ids, **kw):
        return self._tok.decode(ids, **kw)

    def batch_decode(self, seqs, **kw):
        return self._tok.batch_decode(seqs, **kw)


# --------------------------------------------------------------------------------------------------------
# Independent brute force of docs/formulas.md §2
# --------------------------------------------------------------------------------------------------------


def held_chars(tok, ids):
    """Decoded text and, per token, the characters that hold at least one of its bytes (prefix decoding)."""
    text = tok.decode(list(ids), **DECODE)
    held, done = [], 0
    for i in range(len(ids)):
        prefix = tok.decode(list(ids[: i + 1]), **DECODE)
        lcp = 0
        while lcp < min(len(prefix), len(text)) and prefix[lcp] == text[lcp]:
            lcp += 1
        # ByteFallback can turn already confirmed bytes of a run back into U+FFFD (an invalid run is
        # replaced whole), so what is confirmed never shrinks below what earlier tokens confirmed
        lcp = max(lcp, done)
        chars = list(range(done, lcp))
        if len(prefix) > lcp and lcp < len(text):  # the end of the prefix is a partly decoded character
            chars.append(lcp)
        held.append(chars)
        done = lcp
    return text, held


def brute_segments(tok, ids):
    text, held = held_chars(tok, ids)
    starts = [s for s, _ in sentence_spans(text)]
    raw = []
    for chars in held:
        if not chars:  # zero bytes: previous token's segment, or 0
            raw.append(raw[-1] if raw else 0)
            continue
        anchor = next((c for c in chars if not text[c].isspace()), chars[0])
        raw.append(max([j for j, s in enumerate(starts) if s <= anchor], default=0))
    renumber = {}
    for r in raw:
        renumber.setdefault(r, len(renumber))
    return [renumber[r] for r in raw]


def check_invariants(seg, n):
    assert seg.dtype == np.int64 and seg.shape == (n,)
    if n:
        assert seg[0] == 0
        d = np.diff(seg)
        assert np.all((d == 0) | (d == 1)), "ids must be dense 0..n-1 and non-decreasing"


texts = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.sampled_from(SEPARATORS)), min_size=0, max_size=14).map(
    "".join)


# --------------------------------------------------------------------------------------------------------
# sentence_spans
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Dr. Smith went home.", ["Dr. Smith went home."]),
        ("Dr. Smith went home. He was tired.", ["Dr. Smith went home.", "He was tired."]),
        ("I like fruit, e.g. this one.", ["I like fruit, e.g. this one."]),
        ("That is, i.e. this one.", ["That is, i.e. this one."]),
        ("The answer is \\boxed{8}. Next sentence.", ["The answer is \\boxed{8}.", "Next sentence."]),
        ("Dr. Smith paid 3.5 dollars, e.g. for tea.", ["Dr. Smith paid 3.5 dollars, e.g. for tea."]),
        ("Line one\nline two. Three?\n\n  Four  ", ["Line one", "line two.", "Three?", "Four"]),
        ("Dr.\nSmith", ["Dr.", "Smith"]),
        ("", []),
        (" \n\t \n", []),
    ],
)
def test_sentence_spans_cases(text, expected):
    assert [text[a:b] for a, b in sentence_spans(text)] == expected


@settings(max_examples=150, deadline=None)
@given(texts)
def test_sentence_spans_properties(text):
    spans = sentence_spans(text)
    covered = np.zeros(len(text), dtype=bool)
    prev_end = 0
    for a, b in spans:
        piece = text[a:b]
        assert prev_end <= a < b <= len(text)
        assert "\n" not in piece and piece == piece.strip()
        covered[a:b] = True
        prev_end = b
    # every non-whitespace character lies in a span; whatever is outside the spans is whitespace
    assert all(covered[i] or c.isspace() for i, c in enumerate(text))


def test_sentence_spans_rejects_non_str():
    with pytest.raises(TypeError, match="text"):
        sentence_spans(b"Dr. Smith.")


@pytest.fixture
def broken_punkt_params(monkeypatch):
    def fail():
        raise ImportError("no punkt data here")

    monkeypatch.setattr(segment, "_load_english_parameters", fail)
    segment._punkt_tokenizer.cache_clear()
    yield
    monkeypatch.undo()
    segment._punkt_tokenizer.cache_clear()


def test_fallback_warns_and_still_splits(broken_punkt_params):
    text = "Dr. Smith went home. He was tired."
    with pytest.warns(PunktFallbackWarning, match="falling back"):
        spans = sentence_spans(text)
    pieces = [text[a:b] for a, b in spans]
    # the untrained model knows no abbreviations: it also splits after "Dr."
    assert pieces == ["Dr.", "Smith went home.", "He was tired."]


def test_bundled_params_are_nltk_english():
    params = segment._load_english_parameters()
    assert {"dr", "mr", "u.s", "e.g", "i.e"} <= params.abbrev_types
    assert "etc" not in params.abbrev_types
    assert len(params.ortho_context) > 10000 and "the" in params.sent_starters


# --------------------------------------------------------------------------------------------------------
# token_segments
# --------------------------------------------------------------------------------------------------------


def test_test_tokenizers_split_multibyte_chars(byte_bpe, sp_llama):
    # precondition of the tests below: some token holds only part of a character
    ids = byte_bpe.encode("I like 😀 and 🦜. 中文", add_special_tokens=False)
    pieces = [byte_bpe.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces)
    assert "<0xF0>" in sp_llama.convert_ids_to_tokens(sp_llama.encode("a 🦜", add_special_tokens=False))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts, eos=st.booleans(), mid_special=st.integers(min_value=-1, max_value=40))
def test_token_segments_match_brute_force(any_tok, text, eos, mid_special):
    ids = any_tok.encode(text, add_special_tokens=False)
    if 0 <= mid_special < len(ids):
        ids = ids[:mid_special] + [any_tok.eos_token_id] + ids[mid_special:]
    if eos:
        ids = ids + [any_tok.eos_token_id]
    seg = token_segments(any_tok, ids)
    check_invariants(seg, len(ids))
    assert seg.tolist() == brute_segments(any_tok, ids)
    decoded = any_tok.decode(ids, **DECODE)
    text_out, anchors = decode_with_anchors(any_tok, ids)
    assert text_out in (decoded, " " + decoded)  # SentencePiece keeps the leading space, see docstring
    assert anchors.shape == (len(ids),)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 60))
def test_random_ids_decode_like_the_tokenizer(any_tok, seed, n):
    # arbitrary ids give invalid UTF-8; the text must still be exactly what the decoder makes of them
    ids = np.random.default_rng(seed).integers(0, len(any_tok), n)
    text, anchors = decode_with_anchors(any_tok, ids)
    decoded = any_tok.decode(ids.tolist(), **DECODE)
    assert text in (decoded, " " + decoded)
    assert np.all(anchors[anchors >= 0] < len(text)) and np.all(np.diff(anchors[anchors >= 0]) >= 0)
    check_invariants(token_segments(any_tok, ids), n)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts)
def test_generic_path_equals_fast_path(any_tok, text):
    ids = any_tok.encode(text, add_special_tokens=False) + [any_tok.eos_token_id]
    assert token_segments(_NoBackend(any_tok), ids).tolist() == token_segments(any_tok, ids).tolist()


def test_generic_prefix_fallback_is_exact(sp_llama, monkeypatch):
    # with no context window, single-token decodes drop SentencePiece's leading space, the windowed
    # characters do not reproduce the text, and the O(L^2) prefix path must take over
    monkeypatch.setattr(token_chars, "_GENERIC_WINDOW", 0)
    ids = sp_llama.encode("Dr. Smith went home. He was 😀 tired.\nNew line.", add_special_tokens=False)
    wrapped = _NoBackend(sp_llama)
    assert token_chars._held_windowed(wrapped, ids, sp_llama.decode(ids, **DECODE)) is None
    # oracle: the byte-table path (a different algorithm: per-vocabulary byte tables, no prefix decoding)
    assert token_chars._table_for(sp_llama).family == "sentencepiece"
    assert token_segments(wrapped, ids).tolist() == token_segments(sp_llama, ids).tolist()


def test_unknown_family_wordpiece_is_exact(wordpiece):
    assert token_chars._table_for(wordpiece).family == "generic"
    text = "Dr. Smith went home. He was tired.\nNew line here. Another paragraph."
    enc = wordpiece(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"] + [wordpiece.eos_token_id]
    seg = token_segments(wordpiece, ids)
    check_invariants(seg, len(ids))
    # oracle independent of any decoding: the tokenizer's own offsets into the *input* text, and the four
    # sentences of that text written out by hand; the EOS joins the last sentence
    starts = [0, text.index("He was"), text.index("New line"), text.index("Another")]
    want = [max(j for j, s0 in enumerate(starts) if s0 <= a) for a, _ in enc["offset_mapping"]] + [3]
    assert seg.tolist() == want


def test_families_detected(byte_bpe, sp_llama, sp_metaspace):
    assert token_chars._table_for(byte_bpe).family == "byte_level"
    assert token_chars._table_for(sp_llama).family == "sentencepiece"
    assert token_chars._table_for(sp_metaspace).family == "sentencepiece"


def test_eos_and_other_special_tokens_join_previous_segment(any_tok):
    eos = any_tok.eos_token_id
    body = any_tok.encode("Dr. Smith went home. He was tired.", add_special_tokens=False)
    seg = token_segments(any_tok, body + [eos])
    assert seg[-1] == seg[-2] == 1
    seg = token_segments(any_tok, [eos] + body + [eos, eos])
    assert seg[0] == 0 and seg[-1] == seg[-3] == 1
    first = any_tok.encode("Dr. Smith went home.", add_special_tokens=False)
    second = any_tok.encode(" He was tired.", add_special_tokens=False)
    seg = token_segments(any_tok, first + [eos] + second)
    assert seg[len(first)] == 0 and seg[-1] == 1
    assert seg.tolist() == brute_segments(any_tok, first + [eos] + second)
    assert token_segments(any_tok, [eos, eos]).tolist() == [0, 0]


def _byte_level_bytes(token: str) -> bytes:
    """GPT-2's unicode -> byte table, written out here independently of the module."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {chr(b): b for b in printable}
    extra = [b for b in range(256) if b not in printable]
    table.update({chr(256 + k): b for k, b in enumerate(extra)})
    return bytes(table[c] for c in token)


def test_split_multibyte_char_anchors_every_piece(byte_bpe):
    text = "First one. 😀🎉 are fun."
    ids = byte_bpe.encode(text, add_special_tokens=False)
    toks = byte_bpe.convert_ids_to_tokens(ids)
    emoji = "😀".encode()
    starts = np.cumsum([0] + [len(_byte_level_bytes(t)) for t in toks])
    e0 = text.encode().index(emoji)
    holders = [i for i in range(len(ids)) if starts[i] < e0 + len(emoji) and starts[i + 1] > e0]
    assert len(holders) >= 2, "the emoji must be split over tokens for this test"
    seg = token_segments(byte_bpe, ids)
    # the emoji opens the second sentence; every token holding one of its bytes is in that segment, even
    # the one that starts with the space before it (its first non-whitespace byte is the emoji's)
    assert {int(seg[i]) for i in holders} == {1}
    assert seg[: holders[0]].tolist() == [0] * holders[0]


def test_split_multibyte_char_sentencepiece_byte_fallback(sp_llama):
    text = "First one.\n🦜 is a parrot."
    ids = sp_llama.encode(text, add_special_tokens=False)
    toks = sp_llama.convert_ids_to_tokens(ids)
    holders = [i for i, t in enumerate(toks) if t in ("<0xF0>", "<0x9F>", "<0xA6>", "<0x9C>")]
    assert len(holders) == 4
    seg = token_segments(sp_llama, ids)
    assert {int(seg[i]) for i in holders} == {1} and seg[holders[0] - 1] == 0


def test_whitespace_tokens_join_the_segment_before(byte_bpe):
    text = "One.\n\n\nTwo.   \n"
    ids = byte_bpe.encode(text, add_special_tokens=False)
    pieces = [byte_bpe.decode([i]) for i in ids]
    two = next(i for i, p in enumerate(pieces) if "T" in p)
    assert pieces[two - 1].isspace() and pieces[-1].isspace()  # newline runs are tokens of their own
    seg = token_segments(byte_bpe, ids)
    # the newlines between the sentences stay with "One.", the trailing whitespace with "Two."
    assert seg.tolist() == [0] * two + [1] * (len(ids) - two)


def test_input_types_and_empty(byte_bpe):
    ids = byte_bpe.encode("Dr. Smith went home. He was tired.", add_special_tokens=False)
    ref = token_segments(byte_bpe, ids)
    assert np.array_equal(token_segments(byte_bpe, np.asarray(ids, dtype=np.int32)), ref)
    assert np.array_equal(token_segments(byte_bpe, torch.tensor(ids)), ref)
    for empty in ([], np.zeros(0, np.int64), torch.zeros(0, dtype=torch.long)):
        out = token_segments(byte_bpe, empty)
        assert out.dtype == np.int64 and out.shape == (0,)


def test_bad_token_ids(byte_bpe):
    with pytest.raises(ValueError, match="token_ids must be 1-D"):
        token_segments(byte_bpe, [[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="token_ids must be >= 0"):
        token_segments(byte_bpe, [5, -100])
    with pytest.raises(TypeError, match="token_ids must hold integer"):
        token_segments(byte_bpe, [1.0, 2.0])


def test_byte_fallback_run_spanning_a_sentence_start(sp_llama):
    # "<0x09>" (tab) and the four byte tokens of the parrot form one ByteFallback run; the tab stays with
    # the first sentence, every byte of the parrot opens the second
    text = "Dr. Smith went home.\t🦜 parrot."
    ids = sp_llama.encode(text, add_special_tokens=False)
    toks = sp_llama.convert_ids_to_tokens(ids)
    tab = toks.index("<0x09>")
    assert toks[tab + 1 : tab + 5] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x9C>"]
    seg = token_segments(sp_llama, ids)
    assert seg.tolist() == [0] * (tab + 1) + [1] * (len(ids) - tab - 1)
    assert seg.tolist() == brute_segments(sp_llama, ids)


def _first_solid_char(s: str) -> str:
    return next(c for c in s if not c.isspace())


def test_invalid_utf8_byte_level_maps_a_maximal_subpart_to_one_char(byte_bpe):
    # E4 B8 is the start of a 3-byte character cut short: lossy UTF-8 gives one U+FFFD for both bytes
    head = byte_bpe.convert_tokens_to_ids(["ä", "¸"])  # the byte-level characters of 0xE4 and 0xB8
    tail = byte_bpe.encode(" x. Yes now.", add_special_tokens=False)
    ids = head + tail
    text, anchors = decode_with_anchors(byte_bpe, ids)
    assert text == byte_bpe.decode(ids, **DECODE) == "\ufffd x. Yes now."
    assert anchors[:2].tolist() == [0, 0]
    for i, t in zip(anchors[2:], tail):
        piece = byte_bpe.decode([t])
        if not piece.isspace():
            assert text[i] == _first_solid_char(piece)


def test_invalid_utf8_byte_fallback_gives_one_char_per_byte_token(sp_llama):
    # ByteFallback turns an invalid run of byte tokens into one U+FFFD per token
    head = sp_llama.convert_tokens_to_ids(["<0xE4>", "<0xB8>"])
    tail = sp_llama.encode("x. Yes now.", add_special_tokens=False)
    ids = head + tail
    text, anchors = decode_with_anchors(sp_llama, ids)
    assert text == sp_llama.decode(ids, **DECODE)
    assert text.startswith("\ufffd\ufffd") and anchors[:2].tolist() == [0, 1]
    for i, t in zip(anchors[2:], tail):
        piece = sp_llama.decode([t])
        if piece.strip():
            assert text[i] == _first_solid_char(piece)


def test_ids_beyond_vocab_decode_to_nothing(byte_bpe):
    ids = byte_bpe.encode("Hi there. Bye now.", add_special_tokens=False)
    big = len(byte_bpe) + 7
    seg = token_segments(byte_bpe, ids + [big])
    assert seg[-1] == seg[-2] and seg[:-1].tolist() == token_segments(byte_bpe, ids).tolist()


def test_added_non_special_tokens_decode_like_the_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    hf.add_tokens(["<think>", "über alles", " naïve", "\xa0Two"])
    ids = hf.encode("<think>Hi über alles. Yes naïve one.\xa0Two.<eos>", add_special_tokens=False)
    text, _ = decode_with_anchors(hf, ids)
    assert text == hf.decode(ids, **DECODE)
    seg = token_segments(hf, ids)
    assert seg.tolist() == brute_segments(hf, ids)
    # "\xa0Two" starts with a (2-byte) non-breaking space: its anchor is the "T" of the new sentence
    assert seg[hf.convert_tokens_to_ids(["\xa0Two"])[0] == np.asarray(ids)].tolist() == [2]


# --------------------------------------------------------------------------------------------------------
# batch_token_segments
# --------------------------------------------------------------------------------------------------------


def test_batch_matches_rows_and_pads(byte_bpe):
    rows = [byte_bpe.encode(t, add_special_tokens=False) for t in
            ["Dr. Smith went home. He was tired.", "One.\nTwo. Three!", ""]]
    out = batch_token_segments(byte_bpe, rows)
    width = max(map(len, rows))
    assert out.shape == (3, width) and out.dtype == np.int64
    for b, r in enumerate(rows):
        assert out[b, : len(r)].tolist() == token_segments(byte_bpe, r).tolist()
        assert np.all(out[b, len(r):] == -1)
    # 2-D padded tensor + valid lengths: the padding is never decoded
    pad = byte_bpe.eos_token_id
    mat = torch.full((3, width + 2), pad, dtype=torch.long)
    for b, r in enumerate(rows):
        mat[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    out2 = batch_token_segments(byte_bpe, mat, valid_lengths=torch.tensor([len(r) for r in rows]))
    assert out2.shape == (3, width + 2)
    assert np.array_equal(out2[:, :width], out)
    assert np.all(out2[:, width:] == -1)


def test_batch_bad_valid_lengths(byte_bpe):
    with pytest.raises(ValueError, match="valid_lengths"):
        batch_token_segments(byte_bpe, [[1, 2, 3]], valid_lengths=[4])
    with pytest.raises(ValueError, match="valid_lengths"):
        batch_token_segments(byte_bpe, [[1, 2, 3], [1]], valid_lengths=[1])
    with pytest.raises(ValueError, match="batch_token_ids must be 2-D"):
        batch_token_segments(byte_bpe, np.zeros((2, 2, 2), dtype=np.int64))
