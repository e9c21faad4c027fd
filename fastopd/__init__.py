"""fastopd: kernel-accelerated on-policy distillation with the "Prefix Teach, Suffix Fade" release rule.

Public API (formulas in docs/formulas.md; the oracle of each is in :mod:`fastopd.reference`):

- :class:`StatsOptions`      the statistics' options (k, temperature, ignore_index, vocab_size, backend,
  chunk_size) as one frozen, validated object; every function below also takes them as keywords
- :func:`token_stats`        per-token log-probs, reverse-KL advantage, top-K teacher margin (section 1)
- :func:`sentence_spans`, :func:`token_segments`, :func:`batch_token_segments`   offline sentence
  segments per token (section 2)
- :func:`segment_means`      per-rollout segment means, ragged, ready for the scan (section 2)
- :func:`bic_release`        profiled RSS-BIC release point, C++ (section 3)
- :func:`online_release`, :class:`OnlineRelease`   the online rule (stop a rollout at its release point while it
  is sampled; docs/formulas.md §8): batched replay on logged series (C++) and the per-rollout object;
  :class:`OnlineRollout` one rollout's bookkeeping while it is sampled (segments so far, margins, its rule)
- :func:`release_weights`, :func:`control_weights`   per-token weights (section 4)
- :func:`opd_loss`, :class:`OPDLoss`   the loss with its gradient (section 5)
- :func:`linear_token_stats`, :func:`linear_opd_loss`, ``OPDLoss.linear``   the same from final hidden states
  and LM heads (:class:`LMHead`), by token chunks: no (N, V) logits (docs/formulas.md §6)
- :class:`ReleaseRule`       logits + segment ids -> weights and diagnostics
- :func:`sparse_margins`     margins m_t from a teacher server's top-k log-probs (section 7)
"""

from fastopd.head import LMHead
from fastopd.linear import linear_token_stats
from fastopd.loss import OPDLoss, linear_opd_loss, opd_loss
from fastopd.online import OnlineRelease, OnlineRollout, online_release
from fastopd.options import StatsOptions
from fastopd.release import (
    MODES,
    ReleaseDecision,
    ReleaseRule,
    bic_release,
    control_weights,
    release_weights,
    segment_means,
)
from fastopd.sparse import SparseMargins, sparse_margins
from fastopd.stats import token_stats
from fastopd.types import OnlineReleaseResult, OPDOutput, ReleaseResult, SegmentMeans, TokenStats

__version__ = "0.1.0"


def __getattr__(name: str):
    # The segmentation module imports NLTK; load it on first use so `import fastopd` stays light.
    if name in ("sentence_spans", "token_segments", "batch_token_segments"):
        from fastopd import segment

        return getattr(segment, name)
    raise AttributeError(f"module 'fastopd' has no attribute {name!r}")


__all__ = [
    "LMHead", "MODES", "OPDLoss", "OPDOutput", "ReleaseDecision", "ReleaseResult", "ReleaseRule", "SegmentMeans",
    "SparseMargins", "TokenStats", "bic_release", "control_weights", "linear_opd_loss", "linear_token_stats",
    "opd_loss", "release_weights", "segment_means", "sentence_spans", "sparse_margins", "token_segments",
    "batch_token_segments", "token_stats", "OnlineRelease", "OnlineReleaseResult", "OnlineRollout", "online_release",
    "StatsOptions",
]
