"""``fastopd.StatsOptions``: the options of the token statistics, as one frozen, validated object.

The statistics of docs/formulas.md §1 and everything built on them (the loss of §5, the hidden-state path of
§6, the rule's margins) read the same five options -- k, the temperature tau, ``ignore_index``,
``vocab_size`` and the backend -- plus the token chunk of the hidden-state path. A public entry point
(:func:`fastopd.token_stats`, :func:`fastopd.opd_loss`, :class:`fastopd.OPDLoss`,
:func:`fastopd.linear_token_stats`, :func:`fastopd.linear_opd_loss`, :class:`fastopd.ReleaseRule`) builds
one :class:`StatsOptions` from its keywords (or takes the caller's ``options=``), validated once, and hands
that object down to the reference, the kernels and the chunked path: a new option is one field here, not a
keyword in every signature.

The internal functions (:mod:`fastopd.reference`, :mod:`fastopd.kernels`, :func:`fastopd._validate.check_token_inputs`)
take ``options=`` and, for callers that predate it, the same fields as keywords (:meth:`StatsOptions.of`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import numpy as np

__all__ = ["BACKENDS", "StatsOptions", "check_k", "check_temperature", "is_int", "is_real"]

BACKENDS = ("auto", "triton", "reference")


# ----------------------------------------------------------------------------------------------------------
# Scalar checks (fastopd._validate re-exports them). A bool is never a number here: ``True`` is refused where
# a temperature, a k or a gain is expected (Python would otherwise take it as 1).
# ----------------------------------------------------------------------------------------------------------


def is_real(value) -> bool:
    """True for a real number (int, float, NumPy scalar) that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def is_int(value) -> bool:
    """True for an integer (int, NumPy integer) that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def as_float(value) -> float | None:
    """``float(value)`` for a real number, None for one a float cannot hold (an int beyond 1.8e308)."""
    try:
        return float(value)
    except OverflowError:
        return None


def check_temperature(temperature, name: str = "temperature") -> None:
    """tau of the margin and the log-probs: a finite number > 0 (not a bool)."""
    t = as_float(temperature) if is_real(temperature) else None
    if t is None or not math.isfinite(t) or t <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {temperature!r}")


def check_k(k, name: str = "k") -> None:
    """K, the student's candidates for the margin: an int >= 2 (not a bool)."""
    if not is_int(k):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if k < 2:
        raise ValueError(f"{name} must be >= 2 (the margin needs a top-1 and a top-2 candidate), got {name}={k}")


@dataclass(frozen=True)
class StatsOptions:
    """The options of the token statistics and of every loss built on them (docs/formulas.md §1, §5, §6).

    Attributes:
        k: K, the student's top-K candidates of the margin m_t; an int >= 2 (and <= V, checked with the logits).
        temperature: tau, the loss/margin temperature: log-probs are log softmax(z / tau), the margin is
            divided by tau. A finite number > 0. (The *sampling* temperature of a generator is another
            quantity; the trainer calls it ``sampling_temperature``: docs/formulas.md, "Names".)
        ignore_index: target id of the positions that are not trained (never read).
        vocab_size: the shared vocabulary V both logits (or heads) are cut to; None: their common width.
        backend: ``"auto"`` (Triton on CUDA, the reference otherwise), ``"triton"`` or ``"reference"``.
        chunk_size: token rows per tile of the hidden-state path (:mod:`fastopd.linear`); None: its default.
            The logits path does not read it.

    Every field is checked when the object is built (``TypeError``/``ValueError`` naming it; a bool is not
    a number); ``dataclasses.replace(opts, k=8)`` checks again.
    """

    k: int = 16
    temperature: float = 1.0
    ignore_index: int = -100
    vocab_size: int | None = None
    backend: str = "auto"
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        check_k(self.k)
        check_temperature(self.temperature)
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        if self.vocab_size is not None and (
                isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int) or self.vocab_size < 1):
            raise ValueError(f"vocab_size must be a positive int or None, got {self.vocab_size!r}")
        if not isinstance(self.backend, str) or self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.chunk_size is not None and (not is_int(self.chunk_size) or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {self.chunk_size!r}")
        # One representation per value (k = np.int64(4) and 4 are one option; tau a Python float).
        object.__setattr__(self, "k", int(self.k))
        object.__setattr__(self, "temperature", float(self.temperature))
        if self.chunk_size is not None:
            object.__setattr__(self, "chunk_size", int(self.chunk_size))

    @classmethod
    def of(cls, options: StatsOptions | None = None, **fields) -> StatsOptions:
        """``options`` as given, or built from ``fields`` (the keywords of the public functions).

        With both, every field must be at its default or equal ``options``' value (a ``ValueError`` naming
        the field otherwise): a value is set in one place. An unknown name is a ``TypeError``.
        """
        names = {f.name: f.default for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - set(names))
        if unknown:
            raise TypeError(f"unexpected keyword argument {unknown[0]!r} (StatsOptions fields: {', '.join(names)})")
        if options is None:
            return cls(**fields)
        if not isinstance(options, cls):
            raise TypeError(f"options must be a fastopd.StatsOptions or None, got {type(options).__name__}")
        for name, value in fields.items():
            if value is not names[name] and value != names[name] and value != getattr(options, name):
                raise ValueError(
                    f"{name}={value!r} conflicts with options.{name}={getattr(options, name)!r}: set {name} in "
                    "options= only"
                )
        return options
