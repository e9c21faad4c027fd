"""Rollouts: prompts -> sampled completions, their sentence segments and logits, greedy evaluation, records.

- :func:`generate_completions` (HF ``generate``) packs a batch as :class:`Rollouts`; :func:`add_segments`
  adds the sentence segment ids (docs/formulas.md §2); :func:`completion_logits` scores the completions;
  :func:`kept_rollouts` cuts them to their weighted prefix;
- :func:`generation_model`: the unwrapped model in eval mode (FSDP parameters gathered) for generation;
- :func:`evaluate`: greedy accuracy graded by a verifier (:mod:`fastopd.train.verify`);
- :func:`rollout_records`: the per-rollout lines of ``rollouts.jsonl``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from fastopd.train.models import forward_accepts

IGNORE_INDEX = -100


def eos_ids_of(tokenizer, model) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = {int(tokenizer.eos_token_id)}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(i) for i in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]))
    return sorted(ids)



# ----------------------------------------------------------------------------------------------------------
# Rollouts: prompts -> sampled completions
# ----------------------------------------------------------------------------------------------------------


def format_prompts(tokenizer, prompts: list[str], chat_template: bool) -> list[str]:
    if not chat_template:
        return list(prompts)
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True) for p in prompts]


@dataclass
class Rollouts:
    """A batch of N = prompts x samples completions, as the forward passes need it.

    ``input_ids`` is the left-padded prompt (width P) followed by the completion (width C); ``targets`` is the
    completion with ``IGNORE_INDEX`` after the first EOS (the EOS itself is trained); ``segment_ids`` has -1
    there. ``position_ids`` count only real tokens, as ``generate`` did when sampling.
    """

    input_ids: torch.Tensor  # (N, P + C)
    attention_mask: torch.Tensor  # (N, P + C)
    position_ids: torch.Tensor  # (N, P + C)
    prompt_width: int  # P
    targets: torch.Tensor  # (N, C)
    lengths: torch.Tensor  # (N,) valid completion tokens (up to and including EOS)
    stopped: torch.Tensor  # (N,) bool: the completion ended with EOS
    texts: list  # decoded completions (special tokens skipped)
    segment_ids: torch.Tensor | None = None  # (N, C), -1 at ignored positions
    # what producing and scoring this batch cost, for the step's metrics: "generated" (tokens the sampler drew,
    # EOS included, pads after it not), "decode_rows" (rows x decode steps the sampler's forwards ran),
    # "teacher_scored" (completion tokens the teacher scored while sampling), "teacher_forwarded" and
    # "student_forwarded" (completion positions of the training forwards, padding included)
    counts: dict = field(default_factory=dict)
    online: object = None  # fastopd.train.online_sampler.OnlineDecisions of sampler online (docs/formulas.md §8)

    @property
    def valid(self) -> torch.Tensor:
        return self.targets != IGNORE_INDEX


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: list[str], *, eos_ids: list[int], max_new_tokens: int,
                         do_sample: bool, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                         chat_template: bool = False, max_prompt_tokens: int = 512,
                         synced_gpus: bool = False) -> Rollouts:
    """Run ``model.generate`` on the prompts (left-padded) and package the result as :class:`Rollouts`.

    Sampling settings are passed explicitly (``top_k=0`` disables top-k even when the model's generation
    config sets one), so the rollouts come from the policy that the loss trains.
    """
    enc = encode_prompts(tokenizer, prompts, chat_template=chat_template, max_prompt_tokens=max_prompt_tokens,
                         device=next(model.parameters()).device)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else \
        dict(do_sample=False)
    out = model.generate(
        input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=max_new_tokens,
        eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id, repetition_penalty=1.0, num_beams=1,
        synced_gpus=synced_gpus, **sampling)
    p = enc["input_ids"].shape[1]
    completion = out[:, p:]
    is_eos = torch.isin(completion, torch.tensor(eos_ids, device=completion.device))
    upto_eos = (is_eos.long().cumsum(-1) - is_eos.long()) == 0  # tokens before the first EOS, and the EOS
    targets = completion.masked_fill(~upto_eos, IGNORE_INDEX)
    attention_mask = torch.cat([enc["attention_mask"], upto_eos.long()], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    lengths = upto_eos.sum(-1)
    texts = tokenizer.batch_decode([c[:n].tolist() for c, n in zip(completion, lengths)], skip_special_tokens=True)
    counts = {"generated": int(lengths.sum()), "decode_rows": int(completion.numel())}
    return Rollouts(out, attention_mask, position_ids, p, targets, lengths, is_eos.any(-1), texts, counts=counts)


def encode_prompts(tokenizer, prompts: list[str], *, chat_template: bool, max_prompt_tokens: int, device):
    """The prompts as the sampler reads them: formatted, left-padded, cut from the left to ``max_prompt_tokens``."""
    return tokenizer(format_prompts(tokenizer, prompts, chat_template), return_tensors="pt", padding=True,
                     padding_side="left", truncation=True, max_length=max_prompt_tokens,
                     add_special_tokens=not chat_template).to(device)


def add_segments(rollouts: Rollouts, tokenizer) -> Rollouts:
    """Sentence segment id of every completion token (docs/formulas.md §2), -1 at ignored positions.

    Rollouts of the online sampler (``rollouts.online`` set) keep the segments it finalised while sampling
    (docs/formulas.md §8): the rule decided on those."""
    from fastopd.segment import completion_segments

    if rollouts.online is not None and rollouts.segment_ids is not None:
        return rollouts
    p = rollouts.prompt_width
    rollouts.segment_ids = completion_segments(tokenizer, rollouts.input_ids[:, p:], rollouts.attention_mask[:, p:]).to(
        rollouts.targets.device)
    return rollouts


def completion_logits(model, rollouts: Rollouts) -> torch.Tensor:
    """(N, C, V) logits that predict the completion tokens: positions P-1 .. P+C-2 of the full sequence.

    Only the last C+1 positions go through the LM head (``logits_to_keep``) when the model supports it.
    """
    c = rollouts.targets.shape[1]
    kwargs = dict(input_ids=rollouts.input_ids, attention_mask=rollouts.attention_mask,
                  position_ids=rollouts.position_ids, use_cache=False)
    if forward_accepts(model, "logits_to_keep"):
        logits = model(**kwargs, logits_to_keep=c + 1).logits
    else:
        logits = model(**kwargs).logits[:, -(c + 1):]
    return logits[:, :-1]


def kept_rollouts(rollouts: Rollouts, weights: torch.Tensor) -> Rollouts:
    """The rollouts cut to their supervised prefix (w_t > 0): what the training forwards read.

    Tokens past it have w_t = 0, so the loss and its gradient are those of the whole rollouts (a causal LM's
    outputs at a position do not depend on later tokens); the completion width is the longest kept prefix.
    """
    keep = (weights > 0) & rollouts.valid.to(weights.device)
    keep = keep.to(rollouts.targets.device)
    kept_len = keep.long().sum(-1)
    width = max(int(kept_len.max()) if kept_len.numel() else 0, 1)
    p = rollouts.prompt_width
    inside = torch.arange(width, device=keep.device)[None] < kept_len[:, None]
    mask = torch.cat([rollouts.attention_mask[:, :p], inside.to(rollouts.attention_mask.dtype)], dim=1)
    return Rollouts(rollouts.input_ids[:, :p + width], mask, rollouts.position_ids[:, :p + width], p,
                    rollouts.targets[:, :width].masked_fill(~inside, IGNORE_INDEX), kept_len, rollouts.stopped,
                    rollouts.texts, rollouts.segment_ids[:, :width].masked_fill(~inside, -1))



@contextlib.contextmanager
def generation_model(accelerator, model):
    """The unwrapped model in eval mode, with FSDP parameters gathered; back to train mode afterwards."""
    from accelerate.utils import DistributedType

    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    gather = contextlib.nullcontext()
    if accelerator.distributed_type == DistributedType.FSDP and not getattr(accelerator, "is_fsdp2", False):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        gather = FSDP.summon_full_params(model, writeback=False, recurse=False)
    try:
        with gather, accelerator.autocast():
            yield unwrapped
    finally:
        unwrapped.train(was_training)


def needs_synced_generation(accelerator) -> bool:
    """Sharded models must run the same number of forward passes on every process while generating."""
    from accelerate.utils import DistributedType

    return accelerator.num_processes > 1 and accelerator.distributed_type in (
        DistributedType.FSDP, DistributedType.DEEPSPEED)


# ----------------------------------------------------------------------------------------------------------
# Evaluation: greedy decoding graded by a verifier
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, tokenizer, rows: list[dict], *, verifier, eos_ids: list[int], max_new_tokens: int,
             batch_size: int = 32, chat_template: bool = False, max_prompt_tokens: int = 512,
             accelerator=None) -> dict:
    """Greedy accuracy of ``model`` on ``rows`` (``{"prompt", "answer"}``), summed over processes.

    ``model`` is a plain (unwrapped) model; with an ``accelerator`` each process takes every
    ``num_processes``-th row and the counts are reduced. Returns ``accuracy``, ``correct``, ``total``,
    ``mean_length`` (tokens) and ``stop_rate`` (fraction that ended with EOS), and ``samples`` (the first
    three completions of this process). Only rows with an answer are graded; with none, ``total`` is 0 and
    ``accuracy``, ``mean_length`` and ``stop_rate`` are NaN ("not graded", never 0 %).
    """
    from fastopd.train.verify import get_verifier

    check = get_verifier(verifier) if isinstance(verifier, str) else verifier
    rows = [r for r in rows if r.get("answer") is not None]
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    mine = rows[rank::world]
    n_batches = math.ceil(math.ceil(len(rows) / world) / batch_size) if rows else 0  # same on every process
    synced = accelerator is not None and needs_synced_generation(accelerator)
    was_training = model.training
    model.eval()
    correct = total = length = stopped = 0
    samples = []
    for i in range(n_batches):
        chunk = mine[i * batch_size:(i + 1) * batch_size]
        real = len(chunk)
        if real == 0:
            if not synced:
                break
            chunk = rows[:1]  # keep the collective generate calls in step; not counted
        out = generate_completions(
            model, tokenizer, [r["prompt"] for r in chunk], eos_ids=eos_ids, max_new_tokens=max_new_tokens,
            do_sample=False, chat_template=chat_template, max_prompt_tokens=max_prompt_tokens, synced_gpus=synced)
        for r, text in zip(chunk[:real], out.texts[:real]):
            correct += bool(check(text, r["answer"]))
        total += real
        length += int(out.lengths[:real].sum())
        stopped += int(out.stopped[:real].sum())
        samples.extend(out.texts[:max(0, 3 - len(samples))][:real])
    model.train(was_training)
    counts = torch.tensor([correct, total, length, stopped], dtype=torch.float64)
    if accelerator is not None and world > 1:
        counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum").cpu()
    correct, total, length, stopped = counts.tolist()
    nan = float("nan")  # no row with an answer: not graded, never 0 %
    return {"accuracy": correct / total if total else nan, "correct": int(correct), "total": int(total),
            "mean_length": length / total if total else nan, "stop_rate": stopped / total if total else nan,
            "samples": samples}



def rollout_records(step: int, out, rollouts: Rollouts, correct: list) -> list[dict]:
    """Per-rollout diagnostics for ``rollouts.jsonl`` (the plots of fastopd.train.report)."""
    dec = out.release
    online = rollouts.online
    # sampler online: the margins the rule read while sampling (the training forward covers the kept prefix only)
    margins = (online.margins if online is not None else out.stats.margins).float().cpu().numpy()
    valid = rollouts.valid.cpu().numpy()
    seg = rollouts.segment_ids.cpu().numpy()
    offs = dec.series.offsets
    recs = []
    for b in range(len(rollouts.texts)):
        n = int(valid[b].sum())
        recs.append({
            "step": step,
            "length": n,
            "margins": np.round(margins[b][valid[b]].astype(np.float64), 5).tolist(),
            "segments": seg[b][valid[b]].tolist(),
            "series": dec.series.values[offs[b]:offs[b + 1]].tolist(),  # exact: replayable by fastopd.online_release
            "gain": float(dec.scan.gain[b]),
            "accepted": bool(dec.scan.accepted[b]),
            "release_segment": int(dec.release_segment[b]),
            "release_fraction": float(dec.release_fraction[b]),
            "kept_fraction": float(dec.kept_fraction[b]),
            "correct": correct[b],
            "text": rollouts.texts[b],
        })
        if online is not None:
            recs[-1].update(online.record(b))
    return recs

