"""What both TRL configs and trainers share, in one place: the ``opd_*`` option fields and their checks, the
criterion they build, the metrics they log, and the TRL versions the adapter is tested with.

Imports no TRL (so it is testable without it); :mod:`fastopd.integrations.trl` and
:mod:`fastopd.integrations._trl_gkd` both import it, and neither imports the other at module level.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from dataclasses import dataclass, field

from fastopd._dispatch import parse_version
from fastopd.common import LOSSES, MODES
from fastopd.integrations import METRIC_PREFIX
from fastopd.loss import OPDLoss
from fastopd.release import ReleaseRule

# The TRL releases the adapter is tested with (tests/integrations/test_trl.py, CI); pyproject's extra `trl`
# pins the same range. It reads TRL internals (DistillationTrainer._compute_loss, _get_last_hidden_state,
# GKDTrainer.compute_loss), which TRL may change in any minor release.
TRL_TESTED = ((1, 16), (1, 16))  # (oldest, newest) (major, minor), both included


def trl_import_message(error: ImportError) -> str:
    """The one-line message when ``import trl`` / ``from trl import DistillationTrainer`` failed with ``error``:
    TRL missing, or the import error that actually happened (TRL's own, one of its dependencies', or a local
    ``trl.py`` shadowing the installed package -- then named with its path)."""
    lo = f"{TRL_TESTED[0][0]}.{TRL_TESTED[0][1]}"
    if isinstance(error, ModuleNotFoundError) and error.name == "trl":
        return f"fastopd.integrations.trl needs TRL >= {lo}, which is not installed: pip install 'fastopd[trl]'"
    found = getattr(sys.modules.get("trl"), "__file__", None) or ""
    shadow = ""
    if found and os.path.basename(found) != "__init__.py":
        shadow = f"; {found} is not the TRL package but a file that shadows it on sys.path: rename it"
    return (f"fastopd.integrations.trl could not import trl.DistillationTrainer: {type(error).__name__}: {error}"
            f"{shadow}")


def check_trl_version(version: str) -> None:
    """ImportError for a TRL older than the tested range or of another major version; a warning for a newer
    minor release of the tested major version."""
    (lo, hi) = TRL_TESTED
    tested = f"{lo[0]}.{lo[1]}" if lo == hi else f"{lo[0]}.{lo[1]} to {hi[0]}.{hi[1]}"
    try:
        found = parse_version(version)
    except ValueError:
        return  # an unparsable (development) version: the imports themselves decide
    if found < lo:
        raise ImportError(f"fastopd.integrations.trl needs TRL >= {lo[0]}.{lo[1]}, found trl {version}: "
                          "pip install 'fastopd[trl]'")
    if found[0] != hi[0]:
        raise ImportError(f"fastopd.integrations.trl is tested with TRL {tested}, found trl {version} (another "
                          "major version): pip install 'fastopd[trl]'")
    if found > hi:
        warnings.warn(f"fastopd.integrations.trl is tested with TRL {tested}, found trl {version}: it reads TRL "
                      "internals that a newer release may have changed", UserWarning, stacklevel=3)


@dataclass
class OPDOptions:
    """The release rule's options, as fields of a TRL config (a mixin: ``class C(OPDOptions, TRLConfig)``).

    Checked when the config is constructed (``__post_init__``), each with an error naming the field;
    booleans are not numbers.
    """

    opd_mode: str = field(default="release", metadata={"help": f"'release' (the rule) or a control: one of {MODES}"})
    opd_loss: str = field(default="pg", metadata={"help": f"per-token loss, one of {LOSSES}"})
    opd_k: int = field(default=16, metadata={"help": "student candidates K of the margin m_t (>= 2)"})
    opd_min_gain: float = field(default=10.0, metadata={"help": "accept a release when the BIC gain exceeds this"})
    opd_fraction: float = field(default=0.5, metadata={"help": "kept fraction of the 'fixed_prefix' control, in (0, 1]"})
    opd_chunk_size: int | None = field(default=None, metadata={
        "help": "token rows per LM-head chunk of the hidden-state path (None: fastopd's default; the GKD logits "
                "path does not use it)"})

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        check_opd_options(self)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_opd_options(cfg) -> None:
    """ValueError naming the first bad ``opd_*`` field of ``cfg``."""
    if cfg.opd_mode not in MODES:
        raise ValueError(f"opd_mode must be one of {MODES}, got {cfg.opd_mode!r}")
    if cfg.opd_loss not in LOSSES:
        raise ValueError(f"opd_loss must be one of {LOSSES}, got {cfg.opd_loss!r}")
    if not _is_int(cfg.opd_k) or cfg.opd_k < 2:
        raise ValueError(f"opd_k must be an int >= 2, got {cfg.opd_k!r}")
    if not _is_number(cfg.opd_min_gain) or math.isnan(cfg.opd_min_gain):
        raise ValueError(f"opd_min_gain must be a number (not NaN, not a bool), got {cfg.opd_min_gain!r}")
    if not _is_number(cfg.opd_fraction) or not 0 < cfg.opd_fraction <= 1:
        raise ValueError(f"opd_fraction must be a number in (0, 1] (not a bool), got {cfg.opd_fraction!r}")
    if cfg.opd_chunk_size is not None and (not _is_int(cfg.opd_chunk_size) or cfg.opd_chunk_size < 1):
        raise ValueError(f"opd_chunk_size must be a positive int or None (not a bool), got {cfg.opd_chunk_size!r}")


def make_criterion(args, temperature: float) -> OPDLoss:
    """The trainer's :class:`fastopd.OPDLoss` with its :class:`fastopd.ReleaseRule` (seeded by ``args.seed``).

    ``opd_mode="full"`` gets no rule: its weights are the valid mask whatever the margins, so neither the
    sentence segments nor the BIC scan are computed (the rule's ``accept_rate``/``gain_mean`` diagnostics
    are then not logged; ``kept_fraction`` is 1, ``margin_mean``/``adv_mean`` come with the loss).
    """
    if args.opd_mode == "full":
        return OPDLoss(args.opd_loss, k=args.opd_k, temperature=temperature)
    rule = ReleaseRule(args.opd_mode, k=args.opd_k, temperature=temperature, min_gain=args.opd_min_gain,
                       fraction=args.opd_fraction, seed=args.seed)
    return OPDLoss(args.opd_loss, k=args.opd_k, temperature=temperature, rule=rule)


def log_opd_metrics(metrics_store, out) -> None:
    """Append the rule's and the loss's diagnostics to TRL's ``self._metrics[mode]`` under ``opd/``."""
    m = out.metrics
    for key in ("accept_rate", "kept_fraction", "release_position", "gain_mean", "margin_mean", "adv_mean",
                "reverse_kl_mean", "forward_kl_mean"):
        # gain_mean is NaN when no rollout has a candidate split, release_position when none is accepted
        if key in m and not math.isnan(float(m[key])):
            metrics_store[f"{METRIC_PREFIX}{key}"].append(float(m[key]))
