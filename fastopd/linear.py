"""The OPD statistics and loss from hidden states (docs/formulas.md §6): no (N, V) logits on any backend.

Every quantity of §1 and §5 is computed on z = head(h) per model, where

    head(h) = softcap(scale * (h @ W[:V].T + b[:V])),   softcap(x) = c * tanh(x / c)  (or x when c is None),

W is the (V', H) LM-head weight (V' >= V: padded heads are cut to the shared vocabulary V), ``scale`` the
model's logit scale (Cohere-style; 1.0 by default) and ``c`` its final-logit soft-cap (Gemma-style; none by
default), in that order, as TRL's ``_chunked_divergence_loss`` takes them; the temperature divides after.
Each model's head is a :class:`fastopd.LMHead` (or a bare weight tensor, read as ``LMHead(weight)``).

How (peak extra memory O(chunk * V), independent of N):

- forward: per token chunk of ``chunk_size`` rows, the two logits tiles z_S, z_T (chunk, V) by a matmul, then
  the existing per-chunk statistics and per-token loss on them -- :func:`fastopd.reference.opd_loss` on the
  reference (CPU) backend, the fused stats kernel (:mod:`fastopd.kernels.linear`) on the Triton backend -- keeping
  only per-token vectors (s, u, A, m, KL, and for the kernel the row statistics M, log Z and the
  coefficient c_t); the tiles are freed before the next chunk.
- the loss's weights w_t enter as a per-token factor: the forward returns the *unit* per-token loss l0_t
  (w = valid) and l_t = w_t * l0_t, because every l_t of §5 is linear in w_t. So a release rule can decide
  w from the margins of this same forward (:meth:`fastopd.OPDLoss.linear`) and no second statistics pass
  is needed: the gradient arriving at l0_t already carries w_t.
- gradient, two ways. Eager (:func:`linear_opd_loss`, whose weights are known at the forward): while a
  chunk's tiles are live, dl/dz_S for g_t = w_t is computed from them, the head's chain rule applied
  (dz_raw = dz * scale * (1 - (z / c)^2)), and grad_h[chunk] = dz_raw @ W[:V], grad_W[:V] += dz_raw^T
  @ h[chunk], grad_b[:V] += sum_rows dz_raw accumulated; the backward only checks that the incoming
  gradient is sigma * w (what ``out.loss`` sends back: sigma = upstream / normaliser) and scales.
  Recompute (with a release rule, whose weights exist only after the whole forward, or when ``per_token``
  is reduced some other way): the backward recomputes per chunk the student tile (and the teacher's for
  ``reverse_kl`` / ``forward_kl``, whose gradients read log p_T -- ``pg`` needs only the saved u_t) and does
  the same.
  Either way dl/dz_S comes from the single loss definition (reference: autograd of
  :func:`fastopd.reference.opd_loss` / :func:`fastopd.common.per_token_loss` on the tile; Triton: the
  loss-backward kernel with the coefficient of :func:`fastopd.common.per_token_loss`, written in
  place into the tile). Rows of W and b beyond V get a zero gradient; teacher tensors get none.

Cost: eager, 4 matmuls of N x H x V (two head forwards, grad_h, grad_W) like the logits path. Recompute,
5 (``pg``) or 6 (``reverse_kl``, ``forward_kl``): the student's head matmul runs again in the backward (and
the teacher's for the divergences), plus the loss's elementwise work on the tile again. Chunks whose rows are all ignored
(or whose incoming gradient is zero) skip the backward matmuls. The weight gradient is accumulated in the
weight's dtype (one rounding per chunk in bf16).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from fastopd._dispatch import cpu_ops, resolve_backend
from fastopd._validate import check_token_inputs
from fastopd.common import DIVERGENCES, check_loss_options, per_token_loss, reduce_loss, weight_mask
from fastopd.head import LMHead, as_lm_head
from fastopd.options import StatsOptions
from fastopd.stats import token_stats
from fastopd.types import OPDOutput, TokenStats

# Default rows per chunk off CUDA: this many logits elements per tile. The reference holds ~8 fp32 (chunk, V)
# temporaries at once (log-softmax, top-K masks, ...); the kernels hold the two tiles and nothing else.
REFERENCE_TILE_ELEMENTS = 1 << 23
TRITON_TILE_ELEMENTS = 1 << 26

# Default rows per chunk on CUDA (cuda_chunk_rows): as many as the tensor cores want (CUDA_TARGET_ROWS), but
# the two (chunk, V) tiles at most CUDA_TILE_SHARE of the logits path's extra memory at N = CUDA_REFERENCE_N
# (that path holds LOGITS_PATH_TENSORS (N, V) tensors: z_S, z_T and dl/dz_S), and at most CUDA_FREE_SHARE of
# the device's free memory; a multiple of CUDA_ROW_MULTIPLE rows. Both tiles and the logits path's tensors
# scale with V * itemsize, so the first cap is V- and dtype-free: 0.045 * 3 * 16384 / 2 = 1105 -> 1024 rows
# (4.5 % for the tiles leaves room under the 5 % goal for the per-token vectors).
CUDA_TARGET_ROWS = 4096
CUDA_ROW_MULTIPLE = 128
CUDA_REFERENCE_N = 16384
CUDA_TILE_SHARE = 0.045
CUDA_FREE_SHARE = 0.25
LOGITS_PATH_TENSORS = 3

# Experimental, off by default: compute the next chunk's teacher tile on a side CUDA stream while the
# current chunk's statistics, loss backward and gradient matmuls run (one more (chunk, V) tile of memory).
# Read at every call; no effect off CUDA. benchmarks/bench_linear.py measures it (method ``linear_overlap``).
OVERLAP_TEACHER = False


# ----------------------------------------------------------------------------------------------------------
# The LM head of one model
# ----------------------------------------------------------------------------------------------------------


def head_logits(h: torch.Tensor, weight: torch.Tensor, bias, scale: float, softcap) -> torch.Tensor:
    """(rows, v) logits softcap(scale * (h W^T + b)) of ``h`` (rows, H) for a head cut to its first v rows
    (``weight`` (v, H), ``bias`` (v,) or None), in ``h``'s dtype. In-place ops: not for autograd."""
    if bias is None:
        z = h @ weight.T
    else:
        z = torch.addmm(bias, h, weight.T)
    if scale != 1.0:
        z.mul_(scale)
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


def head_raw_grad(z: torch.Tensor, dz: torch.Tensor, scale: float, softcap) -> torch.Tensor:
    """dL/d(h W^T + b) from dL/dz and the head's output z: dz * scale * (1 - (z / c)^2) (in place on dz)."""
    if softcap is not None:
        # 1 - tanh^2 in at least fp32 (bf16 loses it near saturation), then one cast back.
        t = (z.to(torch.promote_types(z.dtype, torch.float32)) / softcap).square_().neg_().add_(1.0)
        dz = dz.mul_(t) if dz.dtype == t.dtype else (dz.to(t.dtype) * t).to(dz.dtype)
    if scale != 1.0:
        dz = dz.mul_(scale)
    return dz


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------


def _check_model(role: str, hidden, head, target_ids) -> LMHead:
    """``head`` (an LMHead or a bare weight) as an LMHead that fits ``hidden``: same H, dtype and device."""
    h, name = f"{role}_hidden", f"{role}_head"
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"{h} must be a torch.Tensor of shape target_ids.shape + (H,), got {type(hidden).__name__}")
    head = as_lm_head(head, name)
    if hidden.dtype != head.weight.dtype:
        raise TypeError(f"{name}.weight must have {h}'s dtype {hidden.dtype}, got {head.weight.dtype}")
    if isinstance(target_ids, torch.Tensor) and hidden.shape[:-1] != target_ids.shape:
        raise ValueError(
            f"{h} must have shape target_ids.shape + (H,) = {tuple(target_ids.shape)} + (H,), got {tuple(hidden.shape)}"
        )
    if hidden.dim() < 1:
        raise ValueError(f"{h} must have shape (..., H), got a 0-d tensor")
    if head.weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{name}.weight must have shape (V', H) with H = {h}.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(head.weight.shape)}")
    if head.weight.device != hidden.device:
        raise ValueError(f"{name}.weight must be on {h}'s device {hidden.device}, got {head.weight.device}")
    return head


def _check_inputs(sh, s_head, th, t_head, target_ids, opts: StatsOptions) -> tuple[LMHead, LMHead, int]:
    """Validate the hidden-state inputs against the call's options (checked when they were built); return both
    heads as LMHeads and the shared vocabulary size V."""
    if not isinstance(target_ids, torch.Tensor):
        raise TypeError(f"target_ids must be a torch.Tensor of integer ids, got {type(target_ids).__name__}")
    s_head = _check_model("student", sh, s_head, target_ids)
    t_head = _check_model("teacher", th, t_head, target_ids)
    vs, vt = s_head.out_features, t_head.out_features
    vocab_size = opts.vocab_size
    if vocab_size is None:
        if vs != vt:
            raise ValueError(
                f"student_head has {vs} logits (rows) but teacher_head has {vt}; pass vocab_size= the shared "
                "vocabulary size to cut both heads to their first vocab_size rows"
            )
    elif vocab_size > min(vs, vt):
        raise ValueError(f"vocab_size={vocab_size} exceeds the heads' rows (student_head {vs}, teacher_head {vt})")
    # The remaining checks (k against V, the target range, devices) are the logits path's own, run on
    # zero-storage stand-ins of the logits' shapes.
    fake_s = torch.empty((), dtype=sh.dtype, device=sh.device).expand(*target_ids.shape, vs)
    fake_t = torch.empty((), dtype=th.dtype, device=th.device).expand(*target_ids.shape, vt)
    v = check_token_inputs(fake_s, fake_t, target_ids, opts)
    return s_head, t_head, v


def cuda_chunk_rows(v: int, itemsize: int, free_bytes: int | None = None) -> int:
    """Rows per chunk on a CUDA device, a pure function of the shape and the device's free memory.

    min(CUDA_TARGET_ROWS, rows whose two (rows, V) tiles are CUDA_TILE_SHARE of the logits path's
    LOGITS_PATH_TENSORS (CUDA_REFERENCE_N, V) tensors, rows whose two tiles are CUDA_FREE_SHARE of
    ``free_bytes`` (None: no such cap)), rounded down to a multiple of CUDA_ROW_MULTIPLE (of 16 below that,
    at least 1). With the defaults: 1024 rows for any V and dtype on a device with room (at V = 151936,
    bf16: two 297 MiB tiles, 4.2 % of the logits path's 13.9 GiB at N = 16384).
    """
    tile_row = 2 * max(v, 1) * max(itemsize, 1)  # bytes of one row of both tiles
    rows = min(CUDA_TARGET_ROWS, CUDA_TILE_SHARE * LOGITS_PATH_TENSORS * CUDA_REFERENCE_N / 2)
    if free_bytes is not None:
        rows = min(rows, CUDA_FREE_SHARE * free_bytes / tile_row)
    rows = int(rows)
    if rows >= CUDA_ROW_MULTIPLE:
        return rows // CUDA_ROW_MULTIPLE * CUDA_ROW_MULTIPLE
    return max(1, rows // 16 * 16 if rows >= 16 else rows)


def default_chunk_size(backend: str, v: int, device=None, itemsize: int = 2) -> int:
    """Rows per chunk when ``chunk_size=None``.

    On a CUDA ``device``: :func:`cuda_chunk_rows` with the device's free memory (``torch.cuda.mem_get_info``)
    and the hidden states' ``itemsize``. Elsewhere (CPU tensors, the Triton interpreter): 2^23 (reference)
    or 2^26 (Triton) logits elements per tile, rounded down to a multiple of 16 rows.
    """
    if device is not None and torch.device(device).type == "cuda":
        try:
            free = torch.cuda.mem_get_info(device)[0]
        except (RuntimeError, AssertionError):  # no driver answer: the shape-only caps
            free = None
        return cuda_chunk_rows(v, itemsize, free)
    budget = REFERENCE_TILE_ELEMENTS if backend == "reference" else TRITON_TILE_ELEMENTS
    rows = max(1, budget // max(v, 1))
    return max(16, rows // 16 * 16) if rows >= 16 else rows


# ----------------------------------------------------------------------------------------------------------
# Per-chunk backends
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkPlan:
    """The settings of one call of the chunked path, as every chunk (forward and backward) reads them.

    ``options``: the call's :class:`fastopd.StatsOptions` (k, temperature, ignore_index); ``v``: the shared
    vocabulary size; ``chunk``: token rows per tile; ``dtype``: of the per-token outputs (float64 for fp64
    inputs on the reference backend, else float32); ``backend``: ``"reference"`` or ``"triton"`` (already
    resolved from ``options.backend``); ``overlap``: teacher tiles on a side CUDA stream
    (:data:`OVERLAP_TEACHER`); ``has_ignored``: some target is ``ignore_index`` (those rows are then masked,
    :func:`_read_rows`); ``loss`` as in :func:`fastopd.opd_loss`.
    """

    options: StatsOptions
    v: int
    loss: str
    backend: str
    chunk: int
    dtype: torch.dtype
    overlap: bool = False
    has_ignored: bool = False

    def chunk_options(self) -> StatsOptions:
        """The options a (chunk, V) tile is read with: the tiles are already cut to V columns."""
        return dataclasses.replace(self.options, vocab_size=None, backend=self.backend)


class _ReferenceChunks:
    """Per-chunk forward/backward on the CPU backend (the reference's own functions, no second formula)."""

    def __init__(self, plan: ChunkPlan) -> None:
        self.plan = plan
        self.ref = cpu_ops()
        self.opts = plan.chunk_options()

    def alloc(self, n: int, device) -> dict:
        return {"u": torch.zeros(n, dtype=self.plan.dtype, device=device)}

    def _loss(self, z, zt, tgt, old):
        p = self.plan
        return self.ref.opd_loss(z, zt, tgt, loss=p.loss, old_logprobs=old, normalizer=1.0, options=self.opts)

    def forward(self, zs, zt, tgt, old, saved, sl):
        out = self._loss(zs, zt, tgt, old)
        saved["u"][sl] = out.stats.teacher_logprobs
        return out.per_token, out.stats

    def forward_grad(self, zs, zt, tgt, old, saved, sl, g):
        """:meth:`forward` and, from the same graph, dl/dz for incoming gradient ``g`` (the eager path)."""
        with torch.enable_grad():
            z = zs.detach().requires_grad_(True)
            out = self._loss(z, zt, tgt, old)
            (dz,) = torch.autograd.grad(out.per_token, z, g.to(out.per_token.dtype))
        saved["u"][sl] = out.stats.teacher_logprobs
        return out.per_token.detach(), out.stats, dz.to(zs.dtype)

    def backward(self, zs, zt, tgt, old, saved, sl, g):
        """dl/dz for incoming gradient ``g`` by autograd of common.per_token_loss on the recomputed tile (the
        log-probs and KL by the reference's own functions; ``pg`` reads the saved u_t, not the teacher)."""
        p, ref = self.plan, self.ref
        valid = tgt != self.opts.ignore_index
        with torch.enable_grad():
            z = zs.detach().requires_grad_(True)
            _, ls = ref.logprobs(z, z.shape[-1], self.opts.temperature)
            w = valid.to(ls.dtype)
            if p.loss == "pg":
                y = torch.where(valid, tgt, torch.zeros_like(tgt)).long().unsqueeze(-1)
                s = ls.gather(-1, y).squeeze(-1)
                terms = per_token_loss("pg", valid, w, s=s, u=saved["u"][sl].to(ls.dtype), old_logprobs=old)
            else:
                _, lt = ref.logprobs(zt, zt.shape[-1], self.opts.temperature)
                divergence = ref.reverse_kl if p.loss == "reverse_kl" else ref.forward_kl
                terms = per_token_loss(p.loss, valid, w, kl=divergence(ls, lt))
            (dz,) = torch.autograd.grad(terms.per_token, z, g.to(ls.dtype))
        return dz.to(zs.dtype)


def _chunk_impl(plan: ChunkPlan, softcap):
    if plan.backend == "triton":
        from fastopd.kernels.linear import TritonChunks

        # the loss-backward kernel writes dl/dz into the student tile unless the soft-cap's chain rule reads it
        return TritonChunks(plan, inplace=softcap is None)
    return _ReferenceChunks(plan)


# ----------------------------------------------------------------------------------------------------------
# The autograd Function
# ----------------------------------------------------------------------------------------------------------


def _slices(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield slice(start, min(start + chunk, n))


def _teacher_tiles(th, weight, bias, scale, softcap, slices, overlap: bool):
    """(slice, teacher tile) per slice in order. With ``overlap`` on CUDA the next slice's tile is computed on a
    side stream while the caller works on the current one: the side stream first waits for the current stream
    (inputs ready), the current stream waits for the side stream before it reads a tile, and each tile is
    recorded on the current stream so the allocator does not hand its memory to the side stream too early.
    The tiles are the same matmuls on the same inputs either way."""
    slices = list(slices)
    if not (overlap and th.is_cuda and len(slices) > 1):
        for sl in slices:
            yield sl, head_logits(th[sl], weight, bias, scale, softcap)
        return
    main = torch.cuda.current_stream(th.device)
    side = torch.cuda.Stream(device=th.device)

    def launch(sl):
        side.wait_stream(main)
        with torch.cuda.stream(side):
            return head_logits(th[sl], weight, bias, scale, softcap)

    nxt = launch(slices[0])
    for i, sl in enumerate(slices):
        cur = nxt
        main.wait_stream(side)
        cur.record_stream(main)
        nxt = launch(slices[i + 1]) if i + 1 < len(slices) else None
        yield sl, cur
        del cur


class _Grads:
    """The student's gradient buffers, filled chunk by chunk: grad_h rows, grad_W[:V] and grad_b[:V] sums."""

    def __init__(self, sh, sw, sb, v, need):
        self.v = v
        self.h = torch.zeros_like(sh) if need[0] else None
        self.w = torch.zeros_like(sw) if need[1] else None
        self.b = torch.zeros_like(sb) if (need[2] and sb is not None) else None

    def add(self, sl, h, dz_raw, weight) -> None:
        """grad_h[sl] = dz_raw @ W[:V], grad_W[:V] += dz_raw^T h, grad_b[:V] += sum_rows dz_raw."""
        if self.h is not None:
            torch.mm(dz_raw, weight, out=self.h[sl])
        if self.w is not None:
            self.w[:self.v].addmm_(dz_raw.T, h)
        if self.b is not None:
            self.b[:self.v] += dz_raw.sum(0)

    def scaled(self, s: float):
        return tuple(None if t is None else t.mul_(s) for t in (self.h, self.w, self.b))


class _LinearOPDFunction(torch.autograd.Function):
    """(h_S, W_S, b_S, h_T, W_T, b_T, y, s_old, w, scale_S, cap_S, scale_T, cap_T, plan) -> unit per-token
    loss l0 (w = valid) and the statistics.

    Inputs are flat: hidden (N, H), target (N,); W and b are the whole heads (cut to ``plan.v`` rows here,
    so their gradients have the parameters' shapes); scale and cap are each head's ``logit_scale`` and
    ``softcap``. Only l0 is differentiable; the gradient reaches h_S, W_S and b_S (teacher tensors,
    targets, old log-probs and weights get none).

    Two ways to the gradient:

    - recompute (always correct; ``eager_w`` None): the backward recomputes the student's tile per chunk
      (and the teacher's for ``reverse_kl`` / ``forward_kl``) and applies the incoming gradient g_t.
    - eager (``eager_w`` = the per-token weights, when they are known at the forward, as in
      :func:`linear_opd_loss`): while each chunk's tiles are live, the forward also computes the gradient
      for g_t = w_t, which is what ``loss = sum_t w_t l0_t / normaliser`` sends back up to one scalar
      (1 / normaliser times the upstream gradient). The backward checks that the incoming g is
      sigma * w for one scalar sigma (relative tolerance 1e-6) and returns sigma times the stored gradient;
      for any other g (a custom reduction of ``per_token``) it falls back to the recompute. No extra matmul
      then: 4 N x H x V matmuls like the logits path.
    """

    @staticmethod
    def forward(ctx, sh, sw, sb, th, tw, tb, tgt, old, eager_w, s_scale, s_cap, t_scale, t_cap, plan):
        # The tiles are made in the inputs' dtype, whatever autocast region the caller is in.
        with torch.autocast(device_type=sh.device.type, enabled=False):
            return _LinearOPDFunction._forward(ctx, sh, sw, sb, th, tw, tb, tgt, old, eager_w,
                                               s_scale, s_cap, t_scale, t_cap, plan)

    @staticmethod
    def _forward(ctx, sh, sw, sb, th, tw, tb, tgt, old, eager_w, s_scale, s_cap, t_scale, t_cap, plan):
        n, dev, v = tgt.shape[0], tgt.device, plan.v
        impl = _chunk_impl(plan, s_cap)
        s_w, s_b = sw[:v], None if sb is None else sb[:v]
        t_w, t_b = tw[:v], None if tb is None else tb[:v]
        per_token = torch.zeros(n, dtype=plan.dtype, device=dev)
        fields = {f: torch.zeros(n, dtype=plan.dtype, device=dev)
                  for f in ("student_logprobs", "teacher_logprobs", "advantages", "margins")}
        if plan.loss in DIVERGENCES:  # the per-token divergence, as TokenStats.reverse_kl / .forward_kl
            fields[plan.loss] = torch.zeros(n, dtype=plan.dtype, device=dev)
        saved = impl.alloc(n, dev)
        need = ctx.needs_input_grad[:3]
        grads = _Grads(sh, sw, sb, v, need) if (eager_w is not None and any(need)) else None
        for sl, zt in _teacher_tiles(th, t_w, t_b, t_scale, t_cap, _slices(n, plan.chunk), plan.overlap):
            zs = head_logits(sh[sl], s_w, s_b, s_scale, s_cap)
            h = _read_rows(plan, sh[sl], zs, zt, tgt[sl])
            o = None if old is None else old[sl]
            if grads is not None and bool((eager_w[sl] != 0).any()):
                pt, st, dz = impl.forward_grad(zs, zt, tgt[sl], o, saved, sl, eager_w[sl])
                grads.add(sl, h, head_raw_grad(zs, dz, s_scale, s_cap), s_w)
                del dz
            else:
                pt, st = impl.forward(zs, zt, tgt[sl], o, saved, sl)
            per_token[sl] = pt
            for f in fields:
                fields[f][sl] = getattr(st, f)
            del zs, zt
        ctx.plan = plan
        ctx.heads = (s_scale, s_cap, t_scale, t_cap)
        ctx.saved = saved
        ctx.grads = grads
        ctx.save_for_backward(sh, sw, sb, th, tw, tb, tgt, old, eager_w)
        outs = tuple(fields.values())
        ctx.mark_non_differentiable(*outs)
        return (per_token, *outs)

    @staticmethod
    def backward(ctx, g, *_):
        sh, sw, sb, th, tw, tb, tgt, old, eager_w = ctx.saved_tensors
        plan, (s_scale, s_cap, t_scale, t_cap) = ctx.plan, ctx.heads
        none = (None,) * 11  # no gradient for h_T, W_T, b_T, y, s_old, w, the four head values and the plan
        need = ctx.needs_input_grad[:3]
        if not any(need):
            return (None, None, None, *none)
        g = g.detach()
        if ctx.grads is not None:
            sigma = _common_scale(g, eager_w)
            grads, ctx.grads = ctx.grads, None  # a second backward (retain_graph) recomputes
            if sigma is not None:
                return (*grads.scaled(sigma), *none)
        v = plan.v
        impl = _chunk_impl(plan, s_cap)
        s_w, s_b = sw[:v], None if sb is None else sb[:v]
        t_w, t_b = tw[:v], None if tb is None else tb[:v]
        divergence = plan.loss in DIVERGENCES  # its gradient reads the teacher's log-probs
        grads = _Grads(sh, sw, sb, v, need)
        live = (tgt != plan.options.ignore_index) & (g != 0)
        # chunks where every row's gradient is zero: no recompute, their grad_h rows stay 0 (one host sync)
        n, c = tgt.shape[0], plan.chunk
        chunks = -(-n // c)
        padded = live.new_zeros(chunks * c)
        padded[:n] = live
        keep = padded.view(chunks, c).any(1).tolist()
        todo = [slice(i * c, min((i + 1) * c, n)) for i in range(chunks) if keep[i]]
        tiles = (_teacher_tiles(th, t_w, t_b, t_scale, t_cap, todo, plan.overlap) if divergence
                 else ((sl, None) for sl in todo))
        with torch.no_grad(), torch.autocast(device_type=sh.device.type, enabled=False):
            for sl, zt in tiles:
                zs = head_logits(sh[sl], s_w, s_b, s_scale, s_cap)
                h = _read_rows(plan, sh[sl], zs, zt, tgt[sl])
                dz = impl.backward(zs, zt, tgt[sl], None if old is None else old[sl], ctx.saved, sl, g[sl])
                del zt
                grads.add(sl, h, head_raw_grad(zs, dz, s_scale, s_cap), s_w)
                del zs, dz
        return (grads.h, grads.w, grads.b, *none)


def _read_rows(plan: ChunkPlan, h: torch.Tensor, zs: torch.Tensor, zt, tgt: torch.Tensor) -> torch.Tensor:
    """Ignored rows are never read (docs/formulas.md §1, §6): when the call has any, their rows of the tiles
    are zeroed in place and the student's hidden rows that the weight gradient reads are zeros, so a NaN in an
    ignored row's hidden state (either model's) reaches no gradient (0 * NaN would). Returns those hidden rows."""
    if not plan.has_ignored:
        return h
    skip = (tgt == plan.options.ignore_index).unsqueeze(-1)
    zs.masked_fill_(skip, 0)
    if zt is not None:
        zt.masked_fill_(skip, 0)
    return h.masked_fill(skip, 0)


def _common_scale(g: torch.Tensor, w: torch.Tensor) -> float | None:
    """sigma with g = sigma * w (max deviation <= 1e-6 relative), or None if g is not a multiple of w."""
    g64, w64 = g.double(), w.double()
    ww = float((w64 * w64).sum())
    if ww == 0.0:
        return None
    sigma = float((g64 * w64).sum()) / ww
    scale = float(g64.abs().max())
    if float((g64 - sigma * w64).abs().max()) <= 1e-6 * scale:
        return sigma
    return None


def run_chunks(student_hidden, student_head, teacher_hidden, teacher_head, target_ids, opts: StatsOptions, *,
               loss, old_logprobs, weights=None, eager=False):
    """Validate, then the chunked forward: (unit per-token loss l0, TokenStats). ``eager``: compute the
    gradient for the known ``weights`` while the tiles are live (see :class:`_LinearOPDFunction`).
    :meth:`fastopd.OPDLoss.linear` is its one caller (and :func:`fastopd.linear_opd_loss` is that method)."""
    s_head, t_head, v = _check_inputs(student_hidden, student_head, teacher_hidden, teacher_head, target_ids, opts)
    check_loss_options(loss, weights, old_logprobs, target_ids)
    chosen = resolve_backend(opts.backend, student_hidden.device,
                             dtypes=(student_hidden.dtype, teacher_hidden.dtype), k=opts.k, loss=loss)
    if chosen == "triton":
        from fastopd.kernels._helpers import check_kernel_dtype

        check_kernel_dtype("student_hidden", student_hidden)
        check_kernel_dtype("teacher_hidden", teacher_hidden)
    shape = target_ids.shape
    n = target_ids.numel()
    chunk = opts.chunk_size if opts.chunk_size is not None else default_chunk_size(
        chosen, v, student_hidden.device, student_hidden.element_size())
    fp64 = student_hidden.dtype == torch.float64 and chosen == "reference"
    valid = target_ids != opts.ignore_index
    plan = ChunkPlan(
        options=opts, v=v, loss=loss, backend=chosen,
        chunk=max(1, min(chunk, max(n, 1))), dtype=torch.float64 if fp64 else torch.float32,
        overlap=bool(OVERLAP_TEACHER) and student_hidden.is_cuda, has_ignored=not bool(valid.all()),
    )
    eager_w = None
    if eager and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (student_hidden, s_head.weight, s_head.bias)):
        eager_w = weight_mask(valid.reshape(n), None if weights is None else weights.reshape(n), plan.dtype)
    sh = student_hidden.reshape(n, student_hidden.shape[-1])
    th = teacher_hidden.detach().reshape(n, teacher_hidden.shape[-1])
    old = None if old_logprobs is None else old_logprobs.detach().reshape(n)
    per0, s, u, adv, m, *kl = _LinearOPDFunction.apply(
        sh, s_head.weight, s_head.bias, th, t_head.weight.detach(),
        None if t_head.bias is None else t_head.bias.detach(), target_ids.reshape(n), old, eager_w,
        s_head.logit_scale, s_head.softcap, t_head.logit_scale, t_head.softcap, plan,
    )
    stats = TokenStats(
        student_logprobs=s.view(shape), teacher_logprobs=u.view(shape), advantages=adv.view(shape),
        margins=m.view(shape), valid=valid,
    )
    if kl:
        setattr(stats, loss, kl[0].view(shape))
    return per0.view(shape), stats


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def linear_token_stats(
    student_hidden: torch.Tensor,
    student_head: LMHead | torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: LMHead | torch.Tensor,
    target_ids: torch.Tensor,
    *,
    k: int = 16,
    temperature: float = 1.0,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
    full_kl: bool = False,
    return_topk: bool = False,
    options: StatsOptions | None = None,
) -> TokenStats:
    """:func:`fastopd.token_stats` on z = softcap(scale (h W[:V]^T + b[:V])) per model, by token chunks.

    Same result as ``token_stats(head_S(student_hidden), head_T(teacher_hidden), target_ids, ...)``: s_t, u_t,
    A_t = u_t - s_t, the margin m_t (teacher top-1 minus top-2 over the student's top-k, / tau) and optionally
    KL_t and the candidate ids (docs/formulas.md §1, §6), without ever holding more than ``chunk_size`` rows
    of logits per model.

    Args:
        student_hidden, teacher_hidden: (..., H_S), (..., H_T) final hidden states aligned with ``target_ids``
            (already shifted). fp16/bf16/fp32 (fp64 on the reference backend).
        student_head, teacher_head: each a :class:`fastopd.LMHead` (weight (V', H) in the hidden states'
            dtype, optional bias, logit scale, soft-cap, vocabulary size) or a bare (V', H) weight tensor,
            read as ``LMHead(weight)``. V' >= V (padded heads): only the first V rows are used.
        vocab_size: the shared vocabulary V both heads are cut to (None: the heads' ``out_features``, which
            must then be equal).
        chunk_size: token rows per tile (default: on CUDA from the device, :func:`cuda_chunk_rows`; off CUDA
            2^23 / V rows on the reference, 2^26 / V on Triton: :func:`default_chunk_size`).
        k, temperature, ignore_index, full_kl, return_topk, backend: as in :func:`fastopd.token_stats`.
        options: a :class:`fastopd.StatsOptions` instead of k, temperature, ignore_index, vocab_size,
            chunk_size and backend.
    """
    opts = StatsOptions.of(options, k=k, temperature=temperature, ignore_index=ignore_index,
                           vocab_size=vocab_size, chunk_size=chunk_size, backend=backend)
    s_head, t_head, v = _check_inputs(student_hidden, student_head, teacher_hidden, teacher_head, target_ids, opts)
    chosen = resolve_backend(opts.backend, student_hidden.device,
                             dtypes=(student_hidden.dtype, teacher_hidden.dtype), k=opts.k)
    n = target_ids.numel()
    chunk = opts.chunk_size if opts.chunk_size is not None else default_chunk_size(
        chosen, v, student_hidden.device, student_hidden.element_size())
    tile_opts = dataclasses.replace(opts, vocab_size=None, backend=chosen)  # the tiles are cut to V already
    s_w, t_w = s_head.weight.detach()[:v], t_head.weight.detach()[:v]
    s_b = None if s_head.bias is None else s_head.bias.detach()[:v]
    t_b = None if t_head.bias is None else t_head.bias.detach()[:v]
    sh = student_hidden.detach().reshape(n, student_hidden.shape[-1])
    th = teacher_hidden.detach().reshape(n, teacher_hidden.shape[-1])
    tgt = target_ids.reshape(n)
    parts = []
    with torch.no_grad():
        for sl in _slices(n, max(1, chunk)):
            parts.append(token_stats(
                head_logits(sh[sl], s_w, s_b, s_head.logit_scale, s_head.softcap),
                head_logits(th[sl], t_w, t_b, t_head.logit_scale, t_head.softcap),
                tgt[sl], options=tile_opts, full_kl=full_kl, return_topk=return_topk,
            ))
    shape = target_ids.shape
    if not parts:  # N = 0: the logits path on empty (0, V) stand-ins gives the empty result
        z = torch.zeros((0, v), dtype=student_hidden.dtype, device=student_hidden.device)
        parts.append(token_stats(z, z, tgt, options=tile_opts, full_kl=full_kl, return_topk=return_topk))

    def cat(f):
        vals = [getattr(p, f) for p in parts]
        return None if vals[0] is None else torch.cat(vals)

    stats = TokenStats(
        student_logprobs=cat("student_logprobs").view(shape), teacher_logprobs=cat("teacher_logprobs").view(shape),
        advantages=cat("advantages").view(shape), margins=cat("margins").view(shape), valid=target_ids != opts.ignore_index,
    )
    if full_kl:
        stats.reverse_kl = cat("reverse_kl").view(shape)
    if return_topk:
        stats.topk_ids = cat("topk_ids").view(*shape, opts.k)
    return stats


def weighted_output(per0: torch.Tensor, stats: TokenStats, weights, loss: str, normalizer) -> OPDOutput:
    """l_t = w_t * l0_t (every l_t of §5 is linear in w_t), reduced by :func:`fastopd.common.reduce_loss`."""
    w = weight_mask(stats.valid, weights, per0.dtype)
    return reduce_loss(per0 * w, stats, w, loss, normalizer)
