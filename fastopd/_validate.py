"""Argument checks shared by every backend: bad input gets a clear error, never a wrong number.

Every public entry point that takes logits calls :func:`check_token_inputs` before dispatching, so the
reference and the Triton kernels see the same, already validated, arguments.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# the scalar checks live with StatsOptions (fastopd.options); re-exported here for the callers of fastopd._validate
from fastopd.options import BACKENDS, StatsOptions, as_float, check_k, check_temperature, is_int, is_real  # noqa: F401

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------------
# Scalar options: the checks live with :class:`fastopd.StatsOptions` in :mod:`fastopd.options` (re-exported
# here). A bool is never a number: ``True`` is refused where a temperature, a k or a gain is expected.
# ----------------------------------------------------------------------------------------------------------


def check_seed(seed, name: str = "seed") -> None:
    """A generator seed: None or an int >= 0 (not a bool)."""
    if seed is not None and (not is_int(seed) or seed < 0):
        raise ValueError(f"{name} must be None or an int >= 0, got {seed!r}")


def check_token_inputs(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target_ids: torch.Tensor,
    options: StatsOptions | None = None,
    **fields,
) -> int:
    """Validate the inputs of ``token_stats`` / ``opd_loss`` and return the effective vocabulary size V.

    ``options`` is the call's :class:`fastopd.StatsOptions` (its fields were checked when it was built); the
    fields may instead be given as keywords (:meth:`fastopd.StatsOptions.of`). Here only what needs the
    tensors: types, shapes, devices, ``vocab_size`` and ``k`` against the widths, the target range.
    Raises ``TypeError`` for wrong types/dtypes and ``ValueError`` for wrong shapes or values; the message
    names the argument and what was expected.
    """
    opts = StatsOptions.of(options, **fields)
    k, ignore_index, vocab_size = opts.k, opts.ignore_index, opts.vocab_size
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (..., V), got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.dim() < 1:
            raise ValueError(f"{name} must have shape (..., V), got a 0-d tensor")
    if not isinstance(target_ids, torch.Tensor):
        raise TypeError(f"target_ids must be a torch.Tensor of integer ids, got {type(target_ids).__name__}")
    if target_ids.dtype.is_floating_point or target_ids.dtype in (torch.bool, torch.complex64, torch.complex128):
        raise TypeError(f"target_ids must be an integer tensor (int64/int32), got {target_ids.dtype}")
    if student_logits.shape[:-1] != target_ids.shape:
        raise ValueError(
            f"student_logits must have shape target_ids.shape + (V,) = {tuple(target_ids.shape)} + (V,), "
            f"got {tuple(student_logits.shape)}"
        )
    if teacher_logits.shape[:-1] != target_ids.shape:
        raise ValueError(
            f"teacher_logits must have shape target_ids.shape + (V,) = {tuple(target_ids.shape)} + (V,), "
            f"got {tuple(teacher_logits.shape)}"
        )
    if student_logits.device != teacher_logits.device or student_logits.device != target_ids.device:
        raise ValueError(
            "student_logits, teacher_logits and target_ids must be on one device, got "
            f"{student_logits.device}, {teacher_logits.device}, {target_ids.device}"
        )
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    if vocab_size is None:
        if vs != vt:
            raise ValueError(
                f"student_logits has width {vs} but teacher_logits has width {vt}; pass vocab_size= the shared "
                "vocabulary size to cut both to their first vocab_size columns"
            )
        v = vs
    else:
        if vocab_size > min(vs, vt):
            raise ValueError(
                f"vocab_size={vocab_size} exceeds the logits' widths (student {vs}, teacher {vt})"
            )
        v = vocab_size
    if k > v:
        raise ValueError(f"k must be <= the vocabulary size V={v}, got k={k}")
    if target_ids.numel():
        valid = target_ids != ignore_index
        if valid.any():
            ids = target_ids[valid]
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= v:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"target_ids must lie in [0, {v}) or equal ignore_index={ignore_index}; found {bad}"
                )
    return v


def check_per_token(name: str, t: torch.Tensor | None, target_ids: torch.Tensor) -> None:
    """Check an optional per-token tensor (weights, old_logprobs) has ``target_ids.shape`` and a float dtype."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {tuple(target_ids.shape)}, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.shape != target_ids.shape:
        raise ValueError(f"{name} must have shape {tuple(target_ids.shape)} (target_ids.shape), got {tuple(t.shape)}")
    if t.device != target_ids.device:
        raise ValueError(f"{name} must be on {target_ids.device} like target_ids, got {t.device}")


def check_segment_ids(segment_ids: torch.Tensor, valid: torch.Tensor) -> None:
    """Segment ids g_t (B, L) where they are read, i.e. at valid positions (docs/formulas.md §2).

    Each must lie in [0, L) -- L the row length: ids are 0..n-1 over the row's segments and every segment
    holds a token, so an id >= L cannot come from a segmentation (and would size the per-segment sums) -- and
    they must never decrease along a row's valid tokens (segments are in text order; reversed ids would
    make the rule keep the end of a rollout instead of a prefix). Invalid positions are not read (padding:
    -1). One check for every entry: the segment means, the rule and the weights. ``segment_ids`` is an
    integer tensor of the shape of ``valid`` (the callers check both).
    """
    if segment_ids.dtype.is_floating_point or segment_ids.dtype.is_complex or segment_ids.dtype == torch.bool:
        raise TypeError(f"segment_ids must be an integer tensor, got {segment_ids.dtype}")
    if segment_ids.numel() == 0:
        return
    seg = segment_ids.long()
    ok = valid.to(device=seg.device, dtype=torch.bool)
    length = seg.shape[-1]
    negative = ok & (seg < 0)
    too_big = ok & (seg >= length)
    # running max of the ids seen so far along the row's valid tokens; an id below it went backwards
    running = torch.cummax(torch.where(ok, seg, torch.full_like(seg, -1)), dim=-1).values
    backwards = ok & (seg < running)
    if not bool((negative | too_big | backwards).any()):
        return

    def first(mask):
        idx = mask.reshape(-1, length).nonzero()[0].tolist()
        return idx[0], idx[1], int(seg.reshape(-1, length)[idx[0], idx[1]])

    if bool(negative.any()):
        b, t, g = first(negative)
        raise ValueError(
            f"segment_ids must be >= 0 at every valid position (-1 marks padding, which must not be valid); "
            f"found {g} at row {b}, position {t}"
        )
    if bool(too_big.any()):
        b, t, g = first(too_big)
        raise ValueError(
            f"segment_ids must be < {length} (the row length L: ids are 0..n-1 over the row's segments) at every "
            f"valid position; found {g} at row {b}, position {t}"
        )
    b, t, g = first(backwards)
    prev = int(running.reshape(-1, length)[b, t])
    raise ValueError(
        f"segment_ids must be non-decreasing along each row's valid tokens (segments in text order, as "
        f"fastopd.token_segments gives them); row {b} goes back from {prev} to {g} at position {t}"
    )


def check_release_segment(release_segment, b: int) -> torch.Tensor:
    """r of docs/formulas.md §4 for B rollouts: integers in [0, 2^63) of shape (B,) (not bools, not floats: a
    NaN or 1.7 is no segment id); returned as an int64 tensor."""
    if isinstance(release_segment, torch.Tensor):
        r = release_segment.detach()
        if r.dtype.is_floating_point or r.dtype.is_complex or r.dtype == torch.bool:
            raise TypeError(f"release_segment must hold integer segment ids, got {r.dtype}")
    else:
        arr = np.asarray(release_segment)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"release_segment must hold integer segment ids (in [0, 2**63)), got {arr.dtype} values "
                            f"{release_segment!r}"[:200])
        if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
            raise ValueError(f"release_segment must hold ints in [0, 2**63), got {int(arr.max())}")
        r = torch.from_numpy(arr.astype(np.int64))
    if tuple(r.shape) != (b,):
        raise ValueError(f"release_segment must have shape (B,) = ({b},), got {tuple(r.shape)}")
    if r.numel() and int(r.min()) < 0:
        raise ValueError(f"release_segment must hold segment ids >= 0 (segments below it are kept), got {int(r.min())}")
    return r.long()


def check_ragged(values, offsets):
    """Validate a ragged batch (values, offsets) for the BIC scan and return them as numpy arrays.

    ``values`` must be 1-D float64 (any float array is converted), ``offsets`` 1-D integer of length B+1 with
    ``0 <= offsets[0] <= offsets[1] <= ... <= offsets[-1] <= len(values)``.
    """
    if isinstance(values, torch.Tensor):
        if values.dtype.is_complex:
            raise TypeError(f"values must be real segment means (float64 expected), got {values.dtype}")
        values = values.detach().cpu()
        values = (values.double() if values.dtype.is_floating_point else values).numpy()  # bf16 has no NumPy dtype
    if isinstance(offsets, torch.Tensor):
        offsets = offsets.detach().cpu().numpy()
    values = np.asarray(values)
    offsets = np.asarray(offsets)
    if values.ndim != 1:
        raise ValueError(f"values must be a 1-D array of segment means, got shape {values.shape}")
    if values.size and not np.issubdtype(values.dtype, np.floating):
        raise TypeError(f"values must be a float array (float64 expected), got {values.dtype}")
    values = np.ascontiguousarray(values, dtype=np.float64)
    if offsets.ndim != 1 or offsets.size < 1:
        raise ValueError(f"offsets must be a 1-D array of length B+1 >= 1, got shape {offsets.shape}")
    if not np.issubdtype(offsets.dtype, np.integer):
        raise TypeError(f"offsets must be an integer array (int64 expected), got {offsets.dtype}")
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    if offsets[0] < 0 or offsets[-1] > values.size:
        raise ValueError(
            f"offsets must lie in [0, len(values)={values.size}], got first {offsets[0]} and last {offsets[-1]}"
        )
    if offsets.size > 1 and np.any(np.diff(offsets) < 0):
        i = int(np.argmax(np.diff(offsets) < 0))
        raise ValueError(f"offsets must be non-decreasing, but offsets[{i + 1}]={offsets[i + 1]} < offsets[{i}]={offsets[i]}")
    return values, offsets


def _number_repr(value) -> str:
    """``repr(value)``, shortened for an int too long to read."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:12]}...{text[-6:]} ({len(text)} characters)"


def check_scan_options(min_segments, min_gain) -> None:
    """Validate the options of the BIC scan (docs/formulas.md §3): ``min_segments`` an int >= 1 (any size: a
    value above half a series' length leaves it no candidate split), ``min_gain`` a real number that a float
    holds (±inf allowed), not NaN."""
    if not is_int(min_segments) or min_segments < 1:
        raise ValueError(f"min_segments must be an int >= 1, got {_number_repr(min_segments)}")
    gain = as_float(min_gain) if is_real(min_gain) else None
    if gain is None or math.isnan(gain):
        raise ValueError(
            f"min_gain must be a number a float can hold (not NaN; -inf/inf allowed), got {_number_repr(min_gain)}"
        )


MAX_THREADS = 1 << 16


def check_num_threads(num_threads) -> None:
    """Threads of the C++ scans: an int in [0, MAX_THREADS] (0: OpenMP's default; not a bool, not None)."""
    if not is_int(num_threads) or not 0 <= num_threads <= MAX_THREADS:
        raise ValueError(
            f"num_threads must be an int >= 0 (0: OpenMP's default) and <= {MAX_THREADS}, got "
            f"{_number_repr(num_threads)}"
        )


def scan_int(value, values) -> int:
    """An int option of the C++ scans (m, c) as the int64 it can take without changing the decision: any value
    above the batch's total length L is the same as L + 1 (no series has that many entries on a side)."""
    return int(min(int(value), len(values) + 1))


def check_confirm_segments(confirm_segments, min_segments) -> None:
    """c of the online rule (docs/formulas.md §8): an int >= ``min_segments`` (not a bool). A value larger than
    every series disables the stop (the online rule is then the offline one)."""
    if not is_int(confirm_segments):
        raise TypeError(f"confirm_segments must be an int, got {type(confirm_segments).__name__}")
    if confirm_segments < min_segments:
        raise ValueError(
            f"confirm_segments must be >= min_segments={min_segments} (a stop needs at least min_segments segments "
            f"after the release point), got confirm_segments={confirm_segments}"
        )


def check_fraction(fraction) -> None:
    """Validate the kept fraction of the ``fixed_prefix`` control (docs/formulas.md §4): a number in (0, 1]."""
    if not is_real(fraction) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
