"""Token ids -> decoded text and the character each token anchors on (docs/formulas.md §2).

:func:`decode_with_anchors` is the half of :func:`fastopd.token_segments` that knows tokenizers: it decodes
a completion exactly as the tokenizer does and tells, for every token, which character of that text holds
its first non-whitespace byte. Byte-level BPE and SentencePiece-style vocabularies go through a byte table
built once per tokenizer (vectorised NumPy); any other tokenizer through ``batch_decode`` only. The
sentence splitting itself is :mod:`fastopd.segment`.

Decisions made here where docs/formulas.md §2 is silent (keep docs/ in sync with this list; they continue
the numbering of :mod:`fastopd.segment`'s list at 3):

1. **The text that is split** is ``tokenizer.decode(ids, skip_special_tokens=True,
   clean_up_tokenization_spaces=False)``, except that for SentencePiece-style tokenizers the one leading
   space the decoder strips from the first token is kept (the text is then ``" " + decoded``). Leading
   whitespace lies in no span and does not change any Punkt decision, so the segments are the same.
2. **Invalid UTF-8** is replaced exactly as the tokenizer's decoder does it: byte-level BPE (Rust
   ``from_utf8_lossy``, the same as Python's ``errors="replace"``) puts one U+FFFD per maximal invalid
   subsequence; SentencePiece byte fallback (``ByteFallback`` decoder) turns every byte token of an invalid
   run of consecutive byte tokens into its own U+FFFD. All bytes that became one U+FFFD map to that
   character.
3. **Zero-byte tokens** (special tokens such as EOS/BOS, ids the tokenizer cannot decode, ids beyond its
   vocabulary) take the previous token's segment, or 0 if there is none.
4. **Unknown tokenizer families** (WordPiece, slow Python tokenizers, decoders other than ByteLevel or the
   SentencePiece ``Replace/Metaspace [+ ByteFallback, Fuse, Strip]`` chains) take a generic path built on
   ``tokenizer.batch_decode`` only: a token holds the characters it adds to the decoded text, plus a
   character it has only partly produced (a pending U+FFFD at the end of its prefix). These are first
   found from windows of 16 tokens of context on each side (O(L), ~100x slower than the byte tables), and
   the result is used only if the characters so assigned reproduce the decoded text exactly; otherwise
   every prefix ``ids[:i+1]`` is decoded (exact, O(L^2): seconds for 8k tokens).
"""


from __future__ import annotations

import codecs
import json
import re
import threading
import weakref
from dataclasses import dataclass

import numpy as np

__all__ = ["decode_with_anchors", "stable_length"]


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
    the module docstring, point 1). Other orders change which bytes become spaces and go generic.
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
    """Anchors for tokenizers without a byte table (module docstring, point 4).

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
    tokens, undecodable ids). ``text`` is described in the module docstring, point 1.
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


def stable_length(tokenizer, token_ids, text: str, anchors: np.ndarray) -> int:
    """How many leading characters of ``text`` (``decode_with_anchors(tokenizer, token_ids)``) no later token can
    change (docs/formulas.md §8: segments of a completion that is still being sampled).

    Byte-level BPE decodes the whole byte string with ``errors="replace"``: only a trailing incomplete
    character (one U+FFFD at the end) may still change. SentencePiece byte fallback decodes each run of
    consecutive byte tokens together and turns every byte of an invalid run into U+FFFD, so the whole trailing
    run of byte tokens (zero-byte tokens in it are skipped, as the decoder skips special tokens) may still
    change, valid characters included (``)`` followed by the first byte of a two-byte character decodes as two
    U+FFFD). The generic family is taken as byte-level (trailing U+FFFD only): not checked.
    """
    n = len(text.rstrip("\ufffd")) if text.endswith("\ufffd") else len(text)
    table = _table_for(tokenizer)
    if table.family != "sentencepiece" or table.byte_tokens is None or not table.byte_tokens.any():
        return n
    ids = _as_ids(token_ids)
    inside = ids < table.size
    safe = np.where(inside, ids, 0)
    is_byte = table.byte_tokens[safe] & inside
    empty = np.where(inside, table.lengths[safe], 0) == 0
    first = None
    for t in range(ids.size - 1, -1, -1):  # the trailing run of byte tokens, through zero-byte tokens
        if is_byte[t]:
            first = t
        elif not empty[t]:
            break
    if first is not None and anchors[first] >= 0:
        n = min(n, int(anchors[first]))
    return n
