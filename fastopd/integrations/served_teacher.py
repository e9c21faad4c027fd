"""The teacher on an OpenAI-compatible inference server (vLLM): its log-probs for the student's rollouts.

At scale the teacher sits behind a server and answers with log-probs (docs/formulas.md §7, §9 of the design
notes): ``/v1/completions`` with the rollout's token ids as the prompt (nothing is re-tokenised),
``prompt_logprobs=k`` and ``max_tokens=1`` (vLLM refuses 0; the one sampled token is ignored) returns, for
every prompt position j >= 1, log p_T(ids[j] | ids[:j]) and the teacher's top-k there. The completion token
t of a rollout whose (unpadded) prompt has P_b tokens is position P_b + t.

- :class:`ServedTeacher` (``url``, the model name, ``k``, timeouts, retries, concurrency): checks once that the
  server answers, serves the expected model (``/v1/models``) and the student's vocabulary (``/detokenize`` of
  probe ids against the student's tokenizer), then :meth:`ServedTeacher.score` asks for every rollout on a
  thread pool and returns dense tensors, :class:`ServedLogprobs`.
- :func:`parse_prompt_logprobs`: one response's ``prompt_logprobs`` (a list with ``None`` first, then per
  position a dict keyed by the token id as a string: ``{"logprob", "rank", "decoded_token"}``, the top-k
  *plus* the prompt's own token when it is not among them) -> (u_t, top-k ids, top-k log-probs).
- :func:`served_completion_loss`: what a trainer calls with its :class:`fastopd.train.rollouts.Rollouts`:
  the student's logits, the server's log-probs, :func:`fastopd.served.served_opd_loss`.

Every failure a user meets is one :class:`TeacherServerError` line: the server is down (connection refused,
after ``retries`` tries with exponential backoff), it timed out, it serves another model or vocabulary, or it
refused a request (its own message). Standard library only (``urllib``, ``concurrent.futures``).

Start a server (its own environment: vLLM pins its own torch/transformers; docs/integrations.md)::

    python -m vllm.entrypoints.openai.api_server --model fastopd/assets/demo/teacher --max-model-len 320 \\
        --max-logprobs 20 --enforce-eager --dtype float32 --host 127.0.0.1 --port 8000
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

__all__ = [
    "TeacherServerError", "ServedLogprobs", "ServedTeacher", "parse_prompt_logprobs", "rollout_sequences",
    "served_completion_loss",
]


class TeacherServerError(RuntimeError, ValueError):
    """A teacher server that cannot be used: down, too slow, another model or vocabulary, or a refused request.
    The message is one line that names the server and what to do (a ValueError too, so the CLI prints it as
    one line, like any bad setting)."""


@dataclass
class ServedLogprobs:
    """The server's answer for B rollouts, dense over the completion width L.

    Attributes:
        token_logprobs: float32 (B, L) u_t = log p_T(y_t) at temperature 1; 0 at invalid positions.
        topk_ids: int64 (B, L, k) the teacher's top-k ids, by decreasing log-prob; -1 (padding, docs/formulas.md
            §7) at invalid positions and where the server returned fewer than k.
        topk_logprobs: float32 (B, L, k) their log-probs; -inf at padding.
        valid: bool (B, L) the positions scored (the rollout's completion tokens).
        latency_s: wall seconds of :meth:`ServedTeacher.score` (all requests, parsing included).
        requests: HTTP requests sent (retries included).
    """

    token_logprobs: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    valid: torch.Tensor
    latency_s: float = 0.0
    requests: int = 0
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# Parsing vLLM's prompt_logprobs
# ----------------------------------------------------------------------------------------------------------


def _logprob_of(entry: Any, where: str) -> float:
    """The log-prob of one entry: vLLM writes ``{"logprob": x, "rank": r, "decoded_token": s}``; a bare number
    is accepted too. JSON's -Infinity (and vLLM's -9999 clamp) are kept as they are."""
    value = entry.get("logprob") if isinstance(entry, dict) else entry
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TeacherServerError(f"the server's prompt_logprobs {where} holds no number: {entry!r}")
    return float(value)


def parse_prompt_logprobs(
    prompt_logprobs: Sequence, token_ids: Sequence[int], start: int, k: int
) -> tuple[list[float], list[list[int]], list[list[float]]]:
    """u_t and the top-k of positions ``start .. len(token_ids) - 1`` from one vLLM ``prompt_logprobs`` list.

    ``prompt_logprobs[j]`` scores ``token_ids[j]`` given ``token_ids[:j]`` (entry 0 is ``None``: nothing
    predicts the first token). Each entry maps a token id *string* to its log-prob record; it holds the
    teacher's top-k and, when the prompt's own token is not among them, that token too (k + 1 entries). So the
    top-k is every entry except the prompt's token when there are k + 1 of them (not "rank <= k": tied
    log-probs share a rank, and the prompt's token may tie with the k-th). Returned top-k lists are sorted
    by decreasing log-prob (ties by id) and may hold fewer than k entries (a vocabulary smaller than k).

    Raises :class:`TeacherServerError` when the list is shorter than the sequence, a position scored is
    ``None``, or the prompt's token is missing from its position (the server did not score these ids).
    """
    if start < 1:
        raise ValueError(f"start must be >= 1 (position 0 has no log-prob), got {start}")
    if len(prompt_logprobs) < len(token_ids):
        raise TeacherServerError(
            f"the server returned prompt_logprobs for {len(prompt_logprobs)} positions, expected {len(token_ids)} "
            "(one per prompt token): is it an OpenAI-compatible vLLM server?"
        )
    u, ids, lps = [], [], []
    for j in range(start, len(token_ids)):
        pos = prompt_logprobs[j]
        if not isinstance(pos, dict):
            raise TeacherServerError(f"the server's prompt_logprobs[{j}] is {pos!r}, expected a dict of token id -> log-prob")
        tok = int(token_ids[j])
        own = pos.get(str(tok), pos.get(tok))  # JSON keys are strings; accept ints from an in-process dict
        if own is None:
            raise TeacherServerError(
                f"the server's prompt_logprobs[{j}] does not hold the prompt's token {tok} (it holds "
                f"{sorted(pos)[:8]}...): it did not score these token ids"
            )
        u.append(_logprob_of(own, f"[{j}][{tok}]"))
        entries = [(int(key), _logprob_of(val, f"[{j}][{key}]")) for key, val in pos.items()]
        if len(entries) > k:  # the top-k plus the prompt's own token
            entries = [e for e in entries if e[0] != tok]
        entries.sort(key=lambda e: (-e[1], e[0]))
        entries = entries[:k]
        ids.append([e[0] for e in entries])
        lps.append([e[1] for e in entries])
    return u, ids, lps


# ----------------------------------------------------------------------------------------------------------
# The client
# ----------------------------------------------------------------------------------------------------------

_DROPPED = (ConnectionError, http.client.RemoteDisconnected, http.client.IncompleteRead, http.client.BadStatusLine)
_RETRY_STATUS = (502, 503, 504)


def _reason(err: BaseException) -> str:
    inner = getattr(err, "reason", None)
    return f"{type(inner).__name__}: {inner}" if isinstance(inner, BaseException) else f"{type(err).__name__}: {err}"


class ServedTeacher:
    """A client of an OpenAI-compatible vLLM server that holds the teacher.

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:8000`` (a trailing ``/v1`` is accepted).
        model: the served model name the client expects (``--served-model-name``, default the path given to
            ``--model``); None: the server's only model.
        k: teacher top-k per position (vLLM caps it at its ``--max-logprobs``, default 20).
        tokenizer: the student's tokenizer (or None to skip the vocabulary check): probe ids are detokenised
            by the server and by it, and must agree.
        vocab_size: the student's vocabulary size V; the probe includes id V - 1 and the returned top-k ids
            must lie in [0, V).
        timeout: seconds per HTTP request before it fails.
        retries: tries after the first on a dropped or refused connection, or a 502/503/504 (exponential
            backoff from ``backoff`` seconds); a timeout or another HTTP error is not retried.
        concurrency: requests in flight at once (one rollout per request; vLLM batches them).
        check: run :meth:`check` now (else at the first :meth:`score`).
    """

    def __init__(self, url: str, *, model: str | None = None, k: int = 20, tokenizer=None,
                 vocab_size: int | None = None, timeout: float = 60.0, retries: int = 3, backoff: float = 0.5,
                 concurrency: int = 16, check: bool = True) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url must be an http(s) URL such as 'http://127.0.0.1:8000', got {url!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1 (the teacher's top-k per position), got {k!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be an int >= 1, got {concurrency!r}")
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1):
            raise ValueError(f"vocab_size must be an int >= 1 or None, got {vocab_size!r}")
        base = url.rstrip("/")
        self.url = base[: -len("/v1")] if base.endswith("/v1") else base
        self.model = model
        self.k = k
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size if vocab_size is not None else (len(tokenizer) if tokenizer is not None else None)
        self.timeout = float(timeout)
        self.retries = retries
        self.backoff = float(backoff)
        self.concurrency = concurrency
        self.max_model_len: int | None = None
        self._checked = False
        if check:
            self.check()

    def __repr__(self) -> str:
        return f"ServedTeacher({self.url!r}, model={self.model!r}, k={self.k})"

    # -- HTTP ------------------------------------------------------------------------------------------------

    def _request(self, path: str, body: dict | None = None, counter: list | None = None) -> Any:
        """GET (body None) or POST JSON; returns the decoded JSON. Retries dropped connections and 502/503/504."""
        url = self.url + path
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            if counter is not None:
                counter.append(1)
            req = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                detail = _http_detail(e)
                if e.code in _RETRY_STATUS:
                    last = f"HTTP {e.code}: {detail}"
                    continue
                raise TeacherServerError(f"teacher server {url} refused the request: HTTP {e.code}: {detail}") from None
            except (socket.timeout, TimeoutError) as e:
                raise TeacherServerError(
                    f"teacher server {url} did not answer within timeout={self.timeout:g} s ({type(e).__name__}); "
                    "raise ServedTeacher(timeout=...) or check the server's load"
                ) from None
            except urllib.error.URLError as e:
                if isinstance(e.reason, (socket.timeout, TimeoutError)):
                    raise TeacherServerError(
                        f"teacher server {url} did not answer within timeout={self.timeout:g} s; raise "
                        "ServedTeacher(timeout=...) or check the server's load"
                    ) from None
                last = _reason(e)
            except _DROPPED as e:
                last = _reason(e)
            except json.JSONDecodeError as e:
                raise TeacherServerError(f"teacher server {url} answered with no JSON ({e})") from None
        raise TeacherServerError(
            f"cannot reach the teacher server at {url} after {self.retries + 1} tries ({last}): is it running? "
            "(docs/integrations.md: start it with python -m vllm.entrypoints.openai.api_server ...)"
        )

    # -- checks ----------------------------------------------------------------------------------------------

    def check(self) -> None:
        """The server answers, serves ``model`` (``/v1/models``) and the student's vocabulary (``/detokenize``)."""
        listing = self._request("/v1/models")
        served = [m.get("id") for m in listing.get("data", []) if isinstance(m, dict)]
        if self.model is None:
            if len(served) != 1:
                raise TeacherServerError(
                    f"teacher server {self.url} serves {served}; pass model= to choose one"
                )
            self.model = served[0]
        elif self.model not in served:
            raise TeacherServerError(
                f"teacher server {self.url} serves {served}, not the expected model {self.model!r}"
            )
        card = next(m for m in listing["data"] if m.get("id") == self.model)
        self.max_model_len = card.get("max_model_len")
        if self.tokenizer is not None:
            self._check_vocabulary()
        self._checked = True

    def probe_ids(self) -> list[int]:
        """Token ids whose text the vocabulary check compares: 64 spread over [0, V), V - 1 included."""
        v = int(self.vocab_size)
        return sorted({min(v - 1, (i * v) // 64) for i in range(64)} | {v - 1})

    def _check_vocabulary(self) -> None:
        """The server knows every id of the student's vocabulary (a prompt ending in id V - 1 is accepted) and
        detokenises the probe ids as the student's tokenizer decodes them (ids that decode to an incomplete
        UTF-8 byte, U+FFFD in the tokenizer, are skipped: the server's detokeniser drops those)."""
        v = int(self.vocab_size)
        try:
            self._request("/v1/completions", {"model": self.model, "prompt": [0, v - 1], "max_tokens": 1})
        except TeacherServerError as e:
            if "HTTP 400" in str(e):
                raise TeacherServerError(
                    f"teacher server {self.url} (model {self.model!r}) refuses token id {v - 1} of the student's "
                    f"vocabulary of {v}: another vocabulary ({str(e).split(': ', 2)[-1]})"
                ) from None
            raise
        for i in self.probe_ids():
            mine = self.tokenizer.decode([i])
            if "\ufffd" in mine:
                continue
            try:
                theirs = self._request("/detokenize", {"model": self.model, "tokens": [i]}).get("prompt")
            except TeacherServerError as e:
                if "HTTP 404" in str(e):
                    raise TeacherServerError(
                        f"teacher server {self.url} has no /detokenize endpoint, so its vocabulary cannot be "
                        "checked; pass tokenizer=None to skip the check"
                    ) from None
                raise
            if mine != theirs:
                raise TeacherServerError(
                    f"teacher server {self.url} (model {self.model!r}) has another vocabulary: token id {i} is "
                    f"{theirs!r} there and {mine!r} in the student's tokenizer"
                )

    # -- scoring ---------------------------------------------------------------------------------------------

    def _score_one(self, ids: list[int], start: int, counter: list) -> tuple:
        body = {"model": self.model, "prompt": ids, "max_tokens": 1, "prompt_logprobs": self.k, "temperature": 0.0}
        out = self._request("/v1/completions", body, counter)
        try:
            plp = out["choices"][0]["prompt_logprobs"]
        except (KeyError, IndexError, TypeError):
            raise TeacherServerError(
                f"teacher server {self.url} answered without choices[0].prompt_logprobs: is it vLLM?"
            ) from None
        if plp is None:
            raise TeacherServerError(f"teacher server {self.url} ignored prompt_logprobs: is it vLLM?")
        return parse_prompt_logprobs(plp, ids, start, self.k)

    def score(self, sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int], *,
              width: int | None = None) -> ServedLogprobs:
        """The teacher's log-probs of every completion token of B rollouts.

        Args:
            sequences: B lists of token ids, each its (unpadded) prompt then its completion tokens.
            prompt_lengths: B ints, each rollout's prompt length P_b >= 1; completion token t is sequence
                position P_b + t.
            width: L of the returned tensors (default: the longest completion).
        """
        if len(sequences) != len(prompt_lengths):
            raise ValueError(
                f"sequences and prompt_lengths must have one entry per rollout, got {len(sequences)} and {len(prompt_lengths)}"
            )
        if not self._checked:  # the server's model and max_model_len, before the inputs are checked against them
            self.check()
        seqs = [[int(t) for t in s] for s in sequences]
        for b, (s, p) in enumerate(zip(seqs, prompt_lengths)):
            if not 1 <= int(p) <= len(s):
                raise ValueError(f"prompt_lengths[{b}] must lie in [1, {len(s)}] (sequence {b}'s length), got {p}")
            if self.vocab_size is not None and s and not 0 <= min(s) <= max(s) < self.vocab_size:
                raise ValueError(f"sequences[{b}] holds ids outside [0, {self.vocab_size}) (the student's vocabulary)")
            if self.max_model_len is not None and len(s) >= self.max_model_len:
                raise TeacherServerError(
                    f"rollout {b} has {len(s)} tokens, the teacher server's max_model_len is {self.max_model_len} "
                    "(it needs one more for the token it samples): start it with a larger --max-model-len"
                )
        t0 = time.perf_counter()
        counter: list = []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, max(len(seqs), 1))) as pool:
            results = list(pool.map(lambda a: self._score_one(a[0], int(a[1]), counter), zip(seqs, prompt_lengths)))
        lengths = [len(s) - int(p) for s, p in zip(seqs, prompt_lengths)]
        width = max(lengths, default=0) if width is None else int(width)
        if lengths and width < max(lengths):
            raise ValueError(f"width must be >= the longest completion ({max(lengths)}), got {width}")
        b, k = len(seqs), self.k
        u = torch.zeros(b, width, dtype=torch.float32)
        ids = torch.full((b, width, k), -1, dtype=torch.long)
        lps = torch.full((b, width, k), -math.inf, dtype=torch.float32)
        valid = torch.zeros(b, width, dtype=torch.bool)
        for row, (ur, ir, lr) in enumerate(results):
            n = len(ur)
            valid[row, :n] = True
            u[row, :n] = torch.tensor(ur, dtype=torch.float32)
            for t in range(n):
                m = len(ir[t])
                ids[row, t, :m] = torch.tensor(ir[t], dtype=torch.long)
                lps[row, t, :m] = torch.tensor(lr[t], dtype=torch.float32)
        if self.vocab_size is not None and bool((ids >= self.vocab_size).any()):
            bad = int(ids.max())
            raise TeacherServerError(
                f"teacher server {self.url} (model {self.model!r}) returned token id {bad}, outside the student's "
                f"vocabulary of {self.vocab_size}: another vocabulary"
            )
        return ServedLogprobs(u, ids, lps, valid, latency_s=time.perf_counter() - t0, requests=len(counter))


def _http_detail(e: urllib.error.HTTPError) -> str:
    try:
        body = e.read().decode(errors="replace")
    except Exception:  # noqa: BLE001 - the status line is enough then
        return e.reason if isinstance(e.reason, str) else str(e)
    try:
        msg = json.loads(body)
        msg = msg.get("error", msg) if isinstance(msg, dict) else msg
        msg = msg.get("message", msg) if isinstance(msg, dict) else msg
    except json.JSONDecodeError:
        msg = body
    return " ".join(str(msg).split())[:300]


# ----------------------------------------------------------------------------------------------------------
# Rollouts -> requests -> the loss
# ----------------------------------------------------------------------------------------------------------


def rollout_sequences(rollouts) -> tuple[list[list[int]], list[int]]:
    """Each rollout's unpadded prompt + valid completion ids, and its prompt length, from a ``Rollouts``-like
    object (``input_ids`` (B, P + C) left-padded prompts then completions, ``attention_mask``, ``prompt_width``
    P, ``lengths`` (B,) valid completion tokens)."""
    p = int(rollouts.prompt_width)
    ids = rollouts.input_ids.detach().cpu()
    mask = rollouts.attention_mask.detach().cpu().bool()
    lengths = rollouts.lengths.detach().cpu().tolist()
    seqs, plens = [], []
    for b in range(ids.shape[0]):
        prompt = ids[b, :p][mask[b, :p]].tolist()
        if not prompt:
            raise ValueError(f"rollout {b} has an empty prompt: the teacher server scores a token only after another")
        seqs.append(prompt + ids[b, p:p + int(lengths[b])].tolist())
        plens.append(len(prompt))
    return seqs, plens


def served_completion_loss(client: ServedTeacher, student, rollouts, *, loss: str = "pg", rule=None,
                           weights: torch.Tensor | None = None, normalizer=None, k: int = 16,
                           old_logprobs: torch.Tensor | None = None, ignore_index: int = -100,
                           vocab_size: int | None = None, times: dict | None = None):
    """One training batch's loss with the teacher on a server: what the trainer calls instead of its
    in-process teacher forward + ``OPDLoss``.

    Args:
        client: a :class:`ServedTeacher` (checked against the student's tokenizer).
        student: the student model (its forward gives the completion logits, with gradients).
        rollouts: a :class:`fastopd.train.rollouts.Rollouts` (``input_ids``, ``attention_mask``, ``position_ids``,
            ``prompt_width``, ``targets`` (B, C) with ``ignore_index``, ``segment_ids`` (B, C), ``lengths``).
        loss, rule, weights, normalizer, k, old_logprobs, ignore_index, vocab_size: as
            :func:`fastopd.served.served_opd_loss` (``segment_ids`` are the rollouts').
        times: if given, receives ``"teacher"`` (the server's wall seconds) and ``"student"`` (the forward).

    Returns:
        :class:`fastopd.served.ServedOPDOutput`; its metrics add ``teacher_latency_s`` and ``teacher_requests``.
    """
    from fastopd.served import served_opd_loss
    from fastopd.train.rollouts import completion_logits

    seqs, plens = rollout_sequences(rollouts)
    width = rollouts.targets.shape[1]
    served = client.score(seqs, plens, width=width)
    if not torch.equal(served.valid, (rollouts.targets != ignore_index).cpu()):
        raise ValueError(
            "rollouts.targets' valid positions must be the first lengths[b] completion tokens of each row "
            f"(what the server scored); check rollouts.lengths against targets != {ignore_index}"
        )
    t0 = time.perf_counter()
    logits = completion_logits(student, rollouts)
    t_student = time.perf_counter() - t0
    dev = logits.device
    out = served_opd_loss(
        logits, rollouts.targets, served.token_logprobs.to(dev), served.topk_ids.to(dev),
        served.topk_logprobs.to(dev), loss=loss, rule=rule, segment_ids=rollouts.segment_ids, weights=weights,
        old_logprobs=old_logprobs, normalizer=normalizer, k=k, ignore_index=ignore_index, vocab_size=vocab_size,
    )
    out.metrics["teacher_latency_s"] = served.latency_s
    out.metrics["teacher_requests"] = served.requests
    if times is not None:
        times["teacher"] = times.get("teacher", 0.0) + served.latency_s
        times["student"] = times.get("student", 0.0) + t_student
    return out
