"""Incremental segmentation (docs/formulas.md §8): the segments of a growing completion that are declared final
never change. For every prefix of a text (character by character) and of a completion's ids (token by token),
every finalised sentence -- its span, and the segment id of each of its tokens -- equals what segmenting the
final text gives; the number of final segments never decreases; a complete completion is token_segments.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# the tokenizer fixtures of the offline tests (byte-level BPE, two SentencePiece styles)
from test_segment import FRAGMENTS, any_tok, byte_bpe, sp_llama, sp_metaspace  # noqa: F401, F811

from fastopd.segment import (
    final_span_count,
    resume_spans,
    segments_so_far,
    sentence_break_ids,
    sentence_spans,
    token_segments,
)

# pieces that exercise Punkt's context rules: abbreviations and initials, the word after a period (its case,
# whether it is complete), punctuation right after a period, closing quotes and brackets moved back by the
# boundary realignment, runs of ! and ?, ellipses, numbers, newlines and unusual whitespace
TRICKY = [
    "Dr.", "Mr.", "e.g.", "i.e.", "U.S.", "etc.", "A.", "J.", "3.", "3.5", "No.", "vs.", "the", "The", "Then",
    "then", "it", "It", "end.", "end.\"", "end.)", "end.'", "(Then", ")", "\"", "'", "]", "}", "!!!", "?!", "...",
    "?", "!", ".", "--", "a.m.", "Smith", "x", "Wait", "OK.", "yes.\"", "é.", "über.", "😀.", "中文。",
]
SEPS = [" ", " ", " ", "  ", "\n", "\n\n", " \n", "\t", "\xa0", "\u3000", ""]


def check_text(text: str) -> None:
    """Every prefix's final spans are the final text's; their count never decreases; Punkt resumed after the
    final spans of any shorter prefix (resume_spans) gives every prefix's spans."""
    full = sentence_spans(text)
    prev = 0
    known = []  # the final spans of each shorter prefix, one list per length where the count grew
    for i in range(len(text) + 1):
        prefix = text[:i]
        spans = sentence_spans(prefix)
        q = final_span_count(prefix, spans)
        assert q >= prev, (prefix, q, prev)
        assert spans[:q] == full[:q], (prefix, spans[:q], full[:q])
        for final in known[-3:] + known[:1]:  # the latest and the oldest: short and long resumed tails
            assert resume_spans(prefix, final) == spans, (prefix, final)
        if q > prev:
            known.append(tuple(spans[:q]))
        prev = q
    assert resume_spans(text, tuple(full[:prev])) == full


def random_text(rng: np.random.Generator, pieces: list[str], n: int) -> str:
    out = []
    for _ in range(n):
        out.append(pieces[rng.integers(len(pieces))])
        out.append(SEPS[rng.integers(len(SEPS))])
    return "".join(out)


@pytest.mark.parametrize("seed", range(40))
def test_final_spans_never_change_random_texts(seed):
    rng = np.random.default_rng(seed)
    check_text(random_text(rng, TRICKY + FRAGMENTS, int(rng.integers(3, 14))))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(TRICKY + FRAGMENTS), st.sampled_from(SEPS)), min_size=1, max_size=10))
def test_final_spans_never_change_hypothesis(parts):
    check_text("".join(a + b for a, b in parts))


@pytest.mark.parametrize("text,prefix_len,final", [
    ("Hello world. Th", None, 0),            # the word after the period is not complete
    ("Hello world. The cat", None, 1),       # it is: the break is decided
    ("Dr. Smith went", None, 0),             # one sentence so far
    ("A.\nB", None, 1),                      # a newline splits whatever Punkt decides
    ("A.\n\ufffd", None, 0),                 # ... but the next span must start with a complete character
    ("A.\n", None, 0),                       # no next span: whitespace tokens may still join segment 0
    ("One. Two. Three. Fo", None, 2),
])
def test_final_span_count_cases(text, prefix_len, final):
    assert final_span_count(text) == final


def test_final_spans_progress_on_a_long_text():
    """The rule is not vacuous: on ordinary prose almost every sentence becomes final before the text ends."""
    text = " ".join(f"Sentence number {i} is here." for i in range(30)) + " Last one"
    assert final_span_count(text) == 30
    assert final_span_count(text[:text.index("number 7")]) == 7  # "Sentence " is a complete word
    assert final_span_count(text[:text.index("number 7") - 1]) == 6


# ----------------------------------------------------------------------------------------------------------
# token level: segments_so_far on every prefix of the ids
# ----------------------------------------------------------------------------------------------------------


def check_ids(tok, ids: list[int]) -> None:
    want = token_segments(tok, ids)
    prev_tokens = prev_segments = 0
    final_spans = ()
    for k in range(len(ids) + 1):
        got = segments_so_far(tok, ids[:k])
        np.testing.assert_array_equal(got.segment_ids, token_segments(tok, ids[:k]))
        # resumed after the previous prefix's final spans (what OnlineRollout does): the same segmentation
        resumed = segments_so_far(tok, ids[:k], final_spans=final_spans)
        np.testing.assert_array_equal(resumed.segment_ids, got.segment_ids)
        assert resumed[1:] == got[1:], (k, resumed[1:], got[1:])
        final_spans = resumed.final_spans
        f = got.final_tokens
        assert f >= prev_tokens and got.final_segments >= prev_segments, (k, f, prev_tokens)
        np.testing.assert_array_equal(got.segment_ids[:f], want[:f], err_msg=f"prefix {k}")
        # the final segments are whole: every token of segment < final_segments is among the first f
        assert got.final_segments == (int(want[f - 1]) + 1 if f else 0)
        assert np.all(want[f:] >= got.final_segments)
        prev_tokens, prev_segments = f, got.final_segments
    done = segments_so_far(tok, ids, complete=True)
    np.testing.assert_array_equal(done.segment_ids, want)
    assert done.final_tokens == len(ids) and done.final_segments == (int(want[-1]) + 1 if len(ids) else 0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.tuples(st.sampled_from(TRICKY + FRAGMENTS), st.sampled_from(SEPS)), min_size=1,
                      max_size=8), eos=st.booleans())
def test_segments_so_far_final_tokens_never_change(any_tok, parts, eos):
    ids = any_tok("".join(a + b for a, b in parts), add_special_tokens=False)["input_ids"]
    if eos and any_tok.eos_token_id is not None:
        ids = ids + [any_tok.eos_token_id]
    check_ids(any_tok, ids)


def test_segments_so_far_split_multibyte_whitespace(byte_bpe):
    """A no-break space split over two byte tokens: while only its first byte is there the text ends in U+FFFD,
    which must not start a final span (the character turns out to be whitespace)."""
    text = "First one.\n\xa0Second one. Third\xa0one is here.\u3000Fourth. Fifth"
    ids = byte_bpe(text, add_special_tokens=False)["input_ids"]
    assert any(byte_bpe.decode(ids[:k]).endswith("\ufffd") for k in range(len(ids)))  # the case is exercised
    check_ids(byte_bpe, ids)
    assert segments_so_far(byte_bpe, ids).final_segments == 2  # "Fourth." waits for the word after "Fifth"


def test_segments_so_far_sentencepiece_byte_run(sp_llama):
    """SentencePiece byte fallback decodes a run of byte tokens together: ')' (a byte token) followed by the
    first byte of a no-break space decodes as two U+FFFD, so the run's characters are not final until a
    non-byte token follows (found by hypothesis: the final count went from 1 back to 0)."""
    ids = sp_llama("Dr.\n)\xa0", add_special_tokens=False)["input_ids"]
    tail = sp_llama.convert_ids_to_tokens(ids[-3:])
    assert tail == ["<0x29>", "<0xC2>", "<0xA0>"]  # the case is exercised
    assert segments_so_far(sp_llama, ids[:-2]).final_tokens == 0  # ')' may still turn into U+FFFD
    check_ids(sp_llama, ids + sp_llama(" Then more words here", add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------------------------------------
# open_break: when a growing completion need not be segmented again (fastopd.OnlineRollout's lazy advance)
# ----------------------------------------------------------------------------------------------------------


def check_open_break(tok, ids: list[int]) -> int:
    """After every prefix with ``open_break`` False, appending tokens without a break character leaves the final
    tokens and segments as they are. Returns how many such continuations were checked."""
    breaks = sentence_break_ids(tok)
    if breaks is None:
        return 0
    checked = 0
    for k in range(len(ids) + 1):
        got = segments_so_far(tok, ids[:k])
        if got.open_break:
            continue
        for k2 in range(k + 1, len(ids) + 1):
            t = ids[k2 - 1]
            if t < breaks.size and breaks[t]:
                break
            later = segments_so_far(tok, ids[:k2])
            assert (later.final_tokens, later.final_segments) == (got.final_tokens, got.final_segments), (k, k2)
            checked += 1
    return checked


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.tuples(st.sampled_from(TRICKY + FRAGMENTS), st.sampled_from(SEPS)), min_size=2,
                      max_size=8))
def test_open_break_false_means_no_change_without_a_break_token(any_tok, parts):
    check_open_break(any_tok, any_tok("".join(a + b for a, b in parts), add_special_tokens=False)["input_ids"])


def test_open_break_is_exercised(byte_bpe, sp_llama):
    text = "First one is here. Second one. Then a long sentence without an end for many words\nNext line is here"
    for tok in (byte_bpe, sp_llama):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert check_open_break(tok, ids) > 20  # the lazy path is taken, not only its guard
        breaks = sentence_break_ids(tok)
        assert breaks[tok.convert_tokens_to_ids(tok.tokenize("."))[-1]] and not breaks[ids[0]]


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_online_rollout_pushes_what_segmenting_every_chunk_gives(byte_bpe, chunk):
    """OnlineRollout.advance segments only when a chunk can finalise a segment; at every chunk its pushed
    segments and their means are those of segmenting the whole prefix, bit for bit."""
    from fastopd import segment_means
    from fastopd.online import OnlineRollout

    rng = np.random.default_rng(chunk)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "it", "ran", "far", "away", "from", "home"]
    text = " ".join(" ".join(rng.choice(words, int(rng.integers(6, 16)))) + rng.choice(TRICKY + [".", "\n"])
                    for _ in range(12))
    ids = byte_bpe(text, add_special_tokens=False)["input_ids"]
    margins = rng.normal(size=len(ids)).astype(np.float32)
    row = OnlineRollout(min_segments=2, min_gain=1e9, confirm_segments=2)  # never stops: every chunk is compared
    for a in range(0, len(ids), chunk):
        b = min(a + chunk, len(ids))
        row.add(ids[a:b], margins[a:b].tolist(), [0.0] * (b - a), [0.0] * (b - a), scored=b - a)
        row.advance(byte_bpe, complete=False)
        want = segments_so_far(byte_bpe, ids[:b])
        assert row.pushed == want.final_segments
        ft = want.final_tokens
        means = segment_means(margins[None, :ft], want.segment_ids[None, :ft], np.ones((1, ft), bool)).values
        np.testing.assert_array_equal(row.rule.values, means)
    assert row.segmentations < len(range(0, len(ids), chunk))  # some chunks were not segmented again
    row.advance(byte_bpe, complete=True)
    np.testing.assert_array_equal(row.seg, token_segments(byte_bpe, ids))


def test_break_characters_are_punkts():
    """The characters open_break looks for are Punkt's: its sentence-end characters and newline, and every
    character its boundary realignment moves (the whole basic plane checked against its pattern)."""
    import re

    from fastopd.segment import _break_chars, _punkt_tokenizer

    lang = _punkt_tokenizer()._lang_vars
    breaks, break_bytes, closing = _break_chars()
    assert {chr(b) for b in break_bytes} == set(lang.sent_end_chars) | {"\n"}
    assert all(breaks.fullmatch(c) for c in lang.sent_end_chars + ("\n",))
    cls = lang.re_boundary_realignment.pattern
    cls = re.compile(cls[:cls.index("]+?") + 1])
    assert closing == {c for c in map(chr, range(0x10000)) if cls.fullmatch(c)} and ")" in closing


def test_memoised_punkt_splits_as_punkt():
    """The process-wide Punkt tokenizer memoises its per-candidate decision (text_contains_sentbreak); on texts and
    their growing prefixes (warm memo) its spans are those of a plain NLTK PunktSentenceTokenizer."""
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    from fastopd.segment import _load_english_parameters, _punkt_tokenizer

    plain, memo = PunktSentenceTokenizer(_load_english_parameters()), _punkt_tokenizer()
    rng = np.random.default_rng(0)
    for _ in range(20):
        text = random_text(rng, TRICKY + FRAGMENTS, int(rng.integers(3, 20)))
        for k in range(0, len(text) + 1, 7):
            assert list(memo.span_tokenize(text[:k])) == list(plain.span_tokenize(text[:k])), text[:k]
    assert memo._sentbreak  # the memo is in use
