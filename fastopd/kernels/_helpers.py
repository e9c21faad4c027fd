"""Shared pieces of the Triton kernels: packed top-K keys, row addressing, launch checks.

Top-K keys (docs/formulas.md §1, "ties go to the lower vocabulary index"): a logit z at column i becomes the
int64 ``ord(z) << 32 | (2**31 - 1 - i)``, where ``ord`` maps the fp32 bits to an int32 whose signed order is
the float order (``-0.0`` is first made ``+0.0`` so that it ties with ``+0.0`` as in PyTorch). A larger key is
a larger logit, and among equal logits the lower index, so ``tl.topk`` on keys is the reference's top-K with
its tie rule, and the index comes back out of the low 31 bits. Masked (out-of-vocabulary) slots get
``SENTINEL = -2**63``, below every real key (``-inf`` logits included).

Rows: the kernels address row r of a (..., W) tensor at ``base + r * row_stride`` or, when the leading dims
cannot be merged into one stride (e.g. a transposed (L, B, V) view), at ``base + row_offsets[r]`` with an
int64 offset table of N entries. Either way the offsets are int64: N * V exceeds 2**31 at real sizes.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastopd.common import KERNEL_DTYPES, KERNEL_MAX_K

SENTINEL = tl.constexpr(-(2**63))
# Largest power-of-two K the streaming top-K supports (the chunk must hold >= K groups of GROUP columns).
MAX_K_PAD = KERNEL_MAX_K

# Rows of the (NUM_OUT, N) fp32 buffer that the stats kernel writes and the backward kernel reads. They are
# tl.constexpr so that the kernels may name them (a plain int global does not compile); host code indexes
# the buffer with ``out[OUT_S.value]``.
OUT_S, OUT_U, OUT_ADV, OUT_MARGIN, OUT_KL, OUT_MAX_S, OUT_LOGSUM_S, OUT_MAX_T, OUT_LOGSUM_T = (
    tl.constexpr(i) for i in range(9)
)
NUM_OUT = tl.constexpr(9)

# Which divergence the stats kernels accumulate into OUT_KL (their KL_KIND constexpr) and which gradient the
# backward kernel writes (its KL_KIND: KL_NONE is the ``pg`` loss): none, the reverse KL(p_S || p_T)
# (``full_kl=True``, the ``reverse_kl`` loss) or the forward KL(p_T || p_S) (the ``forward_kl`` loss).
KL_NONE, KL_REVERSE, KL_FORWARD = (tl.constexpr(i) for i in range(3))
KL_KINDS = {None: 0, "reverse": 1, "forward": 2}
LOSS_KL = {"pg": None, "reverse_kl": "reverse", "forward_kl": "forward"}


def kl_kind(kl) -> int:
    """The KL_KIND constexpr of ``kl``: None (0), ``"reverse"`` (1) or ``"forward"`` (2); a clear error otherwise."""
    if not (kl is None or (isinstance(kl, str) and kl in KL_KINDS)):
        raise ValueError(f"kl must be None, 'reverse' or 'forward', got {kl!r}")
    return KL_KINDS[kl]


def loss_kl(loss: str):
    """The divergence a loss needs from the stats kernel (and the backward's branch): ``pg`` None,
    ``reverse_kl`` ``"reverse"``, ``forward_kl`` ``"forward"``."""
    if not (isinstance(loss, str) and loss in LOSS_KL):
        raise ValueError(f"loss must be one of {tuple(LOSS_KL)}, got {loss!r}")
    return LOSS_KL[loss]


@triton.jit
def order_bits(x):
    """int32 with the same signed order as the fp32 ``x`` (-0.0 counted as +0.0)."""
    x = tl.where(x == 0.0, 0.0, x)
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)


@triton.jit
def pack_key(x, idx):
    """int64 top-K key of logit ``x`` (fp32) at column ``idx``: larger value first, then lower index."""
    return (order_bits(x).to(tl.int64) << 32) | (2147483647 - idx).to(tl.int64)


@triton.jit
def key_index(key):
    """Column index stored in a key made by :func:`pack_key`."""
    return (2147483647 - (key & 0x7FFFFFFF)).to(tl.int32)


@triton.jit
def topk_keys(keys, K_PAD: tl.constexpr, BITONIC: tl.constexpr):
    """The K_PAD largest int64 keys of a 1-D block, in decreasing order.

    ``BITONIC=True`` (the GPU path) is ``tl.topk``. ``BITONIC=False`` is the interpreter's path: every key's
    rank is the number of larger keys (keys are unique apart from SENTINEL), and output slot r takes the key
    of rank r. It is O(n^2) work but two reductions, where the bitonic network costs thousands of
    Python-level ops per call in the interpreter; it must not be used on a GPU.
    """
    if BITONIC:
        out = tl.topk(keys, K_PAD)
    else:
        rank = tl.sum((keys[None, :] > keys[:, None]).to(tl.int32), axis=1)
        slot = tl.arange(0, K_PAD)[:, None]
        out = tl.max(tl.where(rank[None, :] == slot, keys[None, :], SENTINEL), axis=1)
    return out


@triton.jit
def row_base(row, stride, offs_ptr, USE_OFFS: tl.constexpr):
    """int64 element offset of row ``row``: ``row * stride`` (USE_OFFS = 0) or ``offs_ptr[row]`` (1; 2 when
    every offset is a multiple of 16 elements, which lets the compiler vectorise the row loads)."""
    if USE_OFFS == 2:
        base = tl.multiple_of(tl.load(offs_ptr + row), 16)
    elif USE_OFFS == 1:
        base = tl.load(offs_ptr + row)
    else:
        base = row.to(tl.int64) * stride
    return base


def check_triton() -> None:
    """Raise a clear RuntimeError when the installed Triton lacks what the kernels need (tl.topk, Triton >= 3.4):
    :func:`fastopd._dispatch.check_triton`, the one place that knows the floor."""
    from fastopd._dispatch import check_triton as _check

    _check()


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was decorated under TRITON_INTERPRET=1 (it then runs on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def use_bitonic(kernel, topk_impl: str) -> bool:
    """Pick the top-K implementation: ``"auto"`` = tl.topk when compiled, selection in the interpreter."""
    if topk_impl not in ("auto", "bitonic", "select"):
        raise ValueError(f"topk_impl must be 'auto', 'bitonic' or 'select', got {topk_impl!r}")
    if topk_impl == "auto":
        return not is_interpreted(kernel)
    return topk_impl == "bitonic"


def check_kernel_dtype(name: str, t: torch.Tensor) -> None:
    """The kernels read fp16/bf16/fp32 logits (fp32 arithmetic); fp64 goes to the reference."""
    if t.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16 or float32 for the Triton backend, got {t.dtype}; "
            "use backend='reference' for float64 (the fp64 ground truth)"
        )


class Rows:
    """How a kernel addresses the rows of a (..., W) tensor: data tensor + row stride or an offset table.

    Attributes:
        data: the tensor whose pointer the kernel receives (the caller's own storage: no copy is made unless
            the last dim is not contiguous, in which case ``data`` is a contiguous copy).
        stride: element stride between consecutive rows when ``offsets`` is None.
        offsets: int64 (N,) element offset of every row, for leading dims that do not merge into one stride.
    """

    def __init__(self, x: torch.Tensor) -> None:
        if x.dim() >= 1 and x.shape[-1] > 1 and x.stride(-1) != 1:
            # The kernels load runs of contiguous columns; a strided last dim is copied once (documented).
            x = x.contiguous()
        self.data = x
        self.width = x.shape[-1]
        self.offsets = None
        lead = x.shape[:-1]
        self.n = math.prod(lead)
        try:
            flat = x.view(self.n, self.width)
            self.stride = flat.stride(0) if self.n > 1 else self.width
        except RuntimeError:
            self.stride = 0
            offs = torch.zeros(lead, dtype=torch.int64, device=x.device)
            for d, (size, st) in enumerate(zip(lead, x.stride()[:-1])):
                shape = [1] * len(lead)
                shape[d] = size
                offs = offs + torch.arange(size, device=x.device, dtype=torch.int64).view(shape) * st
            self.offsets = offs.reshape(-1).contiguous()

    @classmethod
    def from_parts(cls, data: torch.Tensor, stride: int, offsets: torch.Tensor | None) -> "Rows":
        """Rebuild a Rows from what was saved for backward (no new view or offset table is made)."""
        rows = cls.__new__(cls)
        rows.data, rows.width, rows.stride, rows.offsets = data, data.shape[-1], stride, offsets
        rows.n = math.prod(data.shape[:-1])
        return rows

    @property
    def use_offsets(self) -> int:
        """The kernels' USE_OFFS constexpr: 0 = row stride, 1 = offset table, 2 = table of 16-aligned offsets."""
        if self.offsets is None:
            return 0
        return 2 if all(st % 16 == 0 for st in self.data.stride()[:-1]) else 1

    def offsets_arg(self) -> torch.Tensor:
        """Tensor for the kernel's ``offs_ptr`` (a dummy when rows use a stride)."""
        return self.offsets if self.offsets is not None else self.data


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
