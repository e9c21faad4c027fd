"""``fastopd.token_stats``: per-token statistics of docs/formulas.md §1, dispatched to a backend."""

from __future__ import annotations

import torch

from fastopd._dispatch import _device, _dtypes, cpu_ops, resolve_backend
from fastopd.options import StatsOptions
from fastopd.types import TokenStats


def token_stats(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    k: int = 16,
    temperature: float = 1.0,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    full_kl: bool = False,
    return_topk: bool = False,
    backend: str = "auto",
    options: StatsOptions | None = None,
) -> TokenStats:
    """Per-token OPD statistics straight from logits (docs/formulas.md §1).

    Args:
        student_logits, teacher_logits: (..., V) logits that predict ``target_ids`` (already shifted);
            fp16, bf16, fp32 (fp64 on the reference backend). Leading dims need not be contiguous.
        target_ids: (...) int sampled tokens y_t; ``ignore_index`` marks positions to skip.
        k: number of student candidates C_t for the margin, 2 <= k <= V.
        temperature: tau; log-probs are log softmax(z / tau) and the margin is divided by tau.
        vocab_size: shared vocabulary size when the two widths differ (both are cut to it).
        full_kl: also compute the exact full-vocabulary reverse KL_t.
        return_topk: also return the (..., K) candidate ids, by decreasing student logit (-1 at invalid positions).
        backend: ``"auto"`` (Triton on CUDA, reference on CPU), ``"triton"`` or ``"reference"``.
        options: a :class:`fastopd.StatsOptions` holding k, temperature, ignore_index, vocab_size and backend
            instead of the keywords (a keyword that is not at its default must then agree with it).

    Returns:
        :class:`fastopd.TokenStats` of float32 tensors shaped like ``target_ids`` (0 where ignored).

    Example:
        >>> st = fastopd.token_stats(student_logits, teacher_logits, completion_ids, k=16)
        >>> st.advantages.shape == completion_ids.shape
        True
    """
    opts = StatsOptions.of(options, k=k, temperature=temperature, ignore_index=ignore_index,
                           vocab_size=vocab_size, backend=backend)
    # Each backend validates the tensors itself (once): here only what the choice needs.
    chosen = resolve_backend(opts.backend, _device(student_logits), dtypes=_dtypes(student_logits, teacher_logits),
                             k=opts.k)
    if chosen == "triton":
        from fastopd.kernels import token_stats_triton

        return token_stats_triton(student_logits, teacher_logits, target_ids, options=opts, full_kl=full_kl,
                                  return_topk=return_topk)
    return cpu_ops().token_stats(student_logits, teacher_logits, target_ids, options=opts, full_kl=full_kl,
                                 return_topk=return_topk)
