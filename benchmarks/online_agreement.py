"""Online vs offline release rule on a run's logged rollouts: agreement (CPU).

The online rule: docs/formulas.md §8.


Reads ``rollouts.jsonl`` of one or more runs (``log_rollouts: true``; any mode: every mode logs each rollout's
segment-mean series, its valid tokens' segment ids and its length) and replays, for each ``confirm_segments``
c, the online rule on every series (``fastopd.online_release``), against the offline rule on the whole series
(``fastopd.bic_release``, the same options). Per c it reports

- ``release_equal``: the fraction of rollouts whose online release index equals the offline one (a rollout
  that does not stop gets the offline decision, so it always agrees), and ``release_within_1``: within one
  segment;
- ``stopped``: the fraction the online rule stops; ``stopped_offline_keeps``: the fraction it stops although
  the offline rule would not release them (their suffix would have been supervised);
- tokens: ``kept_fraction_online`` / ``kept_fraction_offline`` (tokens trained, w_t > 0, over valid tokens)
  and the generation saving. Generated tokens are bounded from below by the tokens of segments [0, n')
  (``saved_upper``: the saving if the stop were seen at the end of segment n'-1); ``saved_chunked``
  rounds each stopped rollout up to the end of the ``--chunk`` holding the next token (the online sampler
  checks at chunk ends; a sentence is final about one word after it ends, which this does not count, so the
  real saving is a little lower; the time saving is the trainer's per-step log, not this).

Meant for the rollouts of an offline run (``release``, ``full``, ...: whole series). A run in mode online logs
the series its rule read, which ends at the stop for a stopped rollout; replayed, it gives the same decisions
(its logged ``tokens_generated`` are then reported as ``tokens_generated_per_rollout``), but the offline
column is then the offline rule on that prefix, not on the whole rollout.

Nothing here runs a model. The decisions are exact replays of the logged series: series logged before the
series were written unrounded (5 decimals) may flip a decision at the threshold; ``offline_matches_log``
says how often the recomputed offline decision equals the logged one.

    python benchmarks/online_agreement.py RUN_DIR [RUN_DIR ...] --confirm 2 3 4 6 --chunk 16 \\
        --json benchmarks/results/online_agreement.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

import fastopd


def load_rollouts(paths: list[str]) -> tuple[list[dict], dict]:
    """The rollout records of every run (a run folder or a rollouts.jsonl file), and the first run's config."""
    import yaml

    from fastopd.train.runlog import read_log

    records, config = [], {}
    for p in paths:
        path = Path(p)
        file = path / "rollouts.jsonl" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no rollouts.jsonl (train with log_rollouts: true)")
        rows = read_log(file)
        for r in rows:
            r["_run"] = str(path)
        records += rows
        cfg_file = file.parent / "config.yaml"
        if not config and cfg_file.is_file():
            config = yaml.safe_load(cfg_file.read_text()) or {}
    if not records:
        raise ValueError(f"no rollout records in {paths}")
    return records, config


def series_batch(records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    values = [np.asarray([math.nan if v is None else v for v in r["series"]], dtype=np.float64) for r in records]
    offsets = np.concatenate([[0], np.cumsum([len(v) for v in values])]).astype(np.int64)
    return (np.concatenate(values) if values else np.zeros(0)), offsets


def tokens_before(record: dict, index: int) -> int:
    """Valid tokens of the record in the segments before series entry ``index`` (entries are the segments that
    hold a valid token, in order)."""
    seg = np.asarray(record["segments"], dtype=np.int64)
    ids = np.unique(seg)
    if index >= len(ids):
        return int(seg.size)
    return int((seg < ids[index]).sum())


def agreement(records: list[dict], confirm: int, *, min_segments: int, min_gain: float, chunk: int) -> dict:
    values, offsets = series_batch(records)
    offline = fastopd.bic_release(values, offsets, min_segments=min_segments, min_gain=min_gain)
    online = fastopd.online_release(values, offsets, min_segments=min_segments, min_gain=min_gain,
                                    confirm_segments=confirm)
    n = len(records)
    lengths = np.array([r["length"] for r in records], dtype=np.int64)
    kept_off = np.array([tokens_before(r, int(i)) for r, i in zip(records, offline.release_index)])
    kept_on = np.array([tokens_before(r, int(i)) for r, i in zip(records, online.release_index)])
    through_stop = np.array([tokens_before(r, int(i)) for r, i in zip(records, online.stop_index)])
    chunked = np.where(online.stopped, np.minimum(lengths, -(-(through_stop + 1) // chunk) * chunk), lengths)
    total = max(int(lengths.sum()), 1)
    diff = np.abs(online.release_index - offline.release_index)
    out = {
        "confirm_segments": confirm,
        "rollouts": n,
        "release_equal": float(np.mean(diff == 0)),
        "release_within_1": float(np.mean(diff <= 1)),
        "stopped": float(np.mean(online.stopped)),
        "stopped_offline_keeps": float(np.mean(online.stopped & ~offline.accepted)),
        "offline_accept_rate": float(np.mean(offline.accepted)),
        "kept_fraction_offline": float(kept_off.sum() / total),
        "kept_fraction_online": float(kept_on.sum() / total),
        "saved_upper": float(1 - through_stop.sum() / total),
        "saved_chunked": float(1 - chunked.sum() / total),
        "mean_stop_position": float(np.mean(through_stop[online.stopped] / np.maximum(lengths[online.stopped], 1)))
        if online.stopped.any() else math.nan,
    }
    if all("tokens_generated" in r for r in records):
        out["tokens_generated_per_rollout"] = float(np.mean([r["tokens_generated"] for r in records]))
    return out


def offline_matches_log(records: list[dict], *, min_segments: int, min_gain: float) -> float:
    values, offsets = series_batch(records)
    offline = fastopd.bic_release(values, offsets, min_segments=min_segments, min_gain=min_gain)
    logged = np.array([bool(r["accepted"]) for r in records])
    return float(np.mean(offline.accepted == logged))


def format_table(rows: list[dict]) -> str:
    lines = ["| c | release equal | within 1 segment | stopped | stopped, offline keeps | kept (offline -> online) "
             "| generation saved (upper / chunked) | stop position |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['confirm_segments']} | {r['release_equal']:.1%} | {r['release_within_1']:.1%} | {r['stopped']:.1%} "
            f"| {r['stopped_offline_keeps']:.1%} | {r['kept_fraction_offline']:.3f} -> {r['kept_fraction_online']:.3f} "
            f"| {r['saved_upper']:.1%} / {r['saved_chunked']:.1%} | {r['mean_stop_position']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders (or rollouts.jsonl files) written with log_rollouts: true")
    ap.add_argument("--confirm", type=int, nargs="+", default=[2, 3, 4, 6],
                    help="confirm_segments values to replay (each >= min_segments)")
    ap.add_argument("--min-segments", type=int, default=None, help="default: the run's config, else 2")
    ap.add_argument("--min-gain", type=float, default=None, help="default: the run's config, else 10")
    ap.add_argument("--chunk", type=int, default=None, help="the online sampler's chunk (default: the run's "
                    "online_chunk_size, else 16)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    records, config = load_rollouts(args.runs)
    m = args.min_segments if args.min_segments is not None else int(config.get("min_segments", 2))
    g = args.min_gain if args.min_gain is not None else float(config.get("min_gain", 10.0))
    chunk = args.chunk if args.chunk is not None else int(config.get("online_chunk_size", 16))
    skipped = [c for c in args.confirm if c < m]
    rows = [agreement(records, c, min_segments=m, min_gain=g, chunk=chunk) for c in args.confirm if c >= m]
    result = {"runs": args.runs, "rollouts": len(records), "min_segments": m, "min_gain": g, "chunk": chunk,
              "offline_matches_log": offline_matches_log(records, min_segments=m, min_gain=g),
              "skipped_confirm_below_min_segments": skipped, "rows": rows}
    print(f"{len(records)} rollouts from {len(args.runs)} run(s); min_segments={m}, min_gain={g}, chunk={chunk}; "
          f"the recomputed offline decision equals the logged one on {result['offline_matches_log']:.1%}")
    if skipped:
        print(f"skipped confirm_segments {skipped}: below min_segments={m}")
    print(format_table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
