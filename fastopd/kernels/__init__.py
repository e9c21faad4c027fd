"""Triton kernels behind ``fastopd.token_stats`` and ``fastopd.opd_loss`` (docs/formulas.md §1, §2, §5).

- :func:`token_stats_triton`: one fused streaming pass per row over the student and teacher logits (online
  log-sum-exp, streaming top-K with ties to the lower index, teacher gathers, optional exact reverse KL, or
  the forward KL for the ``forward_kl`` loss).
- the opt-in split-V variant of that pass (:mod:`fastopd.kernels.token_stats_split`, ``splits=`` or
  ``FASTOPD_STATS_SPLITS``): per-(row, V-slice) partials, then an exact per-row merge.
- :func:`opd_loss_triton`: the loss as a ``torch.autograd.Function`` (stats kernel forward, per-row
  gradient kernel backward, optional in-place gradient).
- :func:`segment_sums_triton`: per-(rollout, segment) sums and counts of a per-token value by atomics
  (:class:`fastopd.ReleaseRule` builds its segment means from them on CUDA tensors).

They run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before ``triton`` and this
package were imported (Triton decides "interpreted or compiled" when a function is decorated; that is how
CPU CI tests them). fp16/bf16/fp32 logits only (fp64 is the reference's job). Design: the docstrings of
:mod:`fastopd.kernels.token_stats` and :mod:`fastopd.kernels.loss_backward`; ``python -m fastopd.kernels._aot``
compiles every variant for sm_90 without a GPU and prints its registers. Registers per Triton version and the
GPU measurements: docs/kernels.md and the README's Benchmarks.
"""

from fastopd.kernels.autograd import opd_loss_triton
from fastopd.kernels.token_stats import segment_sums_triton, token_stats_triton

__all__ = ["opd_loss_triton", "segment_sums_triton", "token_stats_triton"]
