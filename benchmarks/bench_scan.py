"""BIC release scan: C++ vs numpy vs the Python reference, time per rollout (CPU).

The batched BIC release scan of docs/formulas.md §3 on B equal-length rollouts.


Compares
- the C++ scan ``fastopd._C.bic_scan`` on one thread and on all threads (and through the public
  ``fastopd.bic_release``, which adds the Python-side argument checks),
- the Python reference ``fastopd.reference.bic_release`` (timed on a subset of the rollouts and scaled
  per rollout, since it is a plain Python loop),
- a numpy-vectorised scan written here: (B, n) matrices, cumsum prefix sums of the centred series, the argmin
  of BIC1 taken on its (monotone) log argument, processed in row chunks that stay in cache.

Every method is checked against the C++ result before it is timed (the reference exactly, numpy to 1e-9).

    python benchmarks/bench_scan.py --rollouts 100000 --segments 64 --repeats 5 \\
        --json benchmarks/results/scan_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

import fastopd
from fastopd import _C, reference

EPS = reference.BIC_EPS


def make_batch(rollouts: int, segments: int, seed: int) -> np.ndarray:
    """(B, n) segment means: noise around a level, with a downward step in about half of the rollouts."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rollouts, segments)) * rng.uniform(0.2, 1.5, size=(rollouts, 1))
    x += rng.uniform(0.5, 3.0, size=(rollouts, 1))
    step = rng.random(rollouts) < 0.5
    cut = rng.integers(2, segments - 1, size=rollouts)
    drop = rng.uniform(0.5, 3.0, size=rollouts)
    x -= (step * drop)[:, None] * (np.arange(segments)[None, :] >= cut[:, None])
    return x


def numpy_scan(x: np.ndarray, min_segments: int, min_gain: float, chunk: int = 4096):
    """The section-3 scan of B equal-length series at once with numpy: (release, gain, accepted).

    Same definitions as the reference (centred prefix sums, RSS clamped at 0, strictly downward splits,
    smallest tau on ties); the sums are numpy's (pairwise / vectorised), so results agree to rounding.
    ln is monotone, so the argmin of BIC1 is taken on its argument (RSS_left + RSS_right) and only the best
    split's BIC1 is evaluated.
    """
    b, n = x.shape
    m = min_segments
    release = np.full(b, n, dtype=np.int64)
    gain = np.full(b, -np.inf)
    accepted = np.zeros(b, dtype=bool)
    if n < 2 * m:
        gain[~np.isfinite(x).all(1)] = np.nan
        return release, gain, accepted
    taus = np.arange(m, n - m + 1)
    inv_left = 1.0 / taus
    inv_right = 1.0 / (n - taus)
    log_n = np.log(n)
    for lo in range(0, b, chunk):
        xc = x[lo:lo + chunk]
        rows = np.arange(len(xc))
        d = xc - xc.mean(1, keepdims=True)
        s1 = np.cumsum(d, 1)
        s2 = np.cumsum(d * d, 1)
        s1n, s2n = s1[:, -1:], s2[:, -1:]
        l1, l2 = s1[:, m - 1:n - m], s2[:, m - 1:n - m]  # prefix sums at tau = m..n-m
        r1 = s1n - l1
        downward = r1 * inv_right < l1 * inv_left
        q = np.maximum(l2 - l1 * l1 * inv_left, 0.0) + np.maximum((s2n - l2) - r1 * r1 * inv_right, 0.0)
        q[~downward] = np.inf
        k = np.argmin(q, 1)
        has = downward.any(1)
        bic1 = n * np.log(q[rows, k] / n + EPS) + 4.0 * log_n
        rss0 = np.maximum(s2n[:, 0] - s1n[:, 0] ** 2 / n, 0.0)
        bic0 = n * np.log(rss0 / n + EPS) + 2.0 * log_n
        g = np.where(has, bic0 - bic1, -np.inf)
        g[~np.isfinite(xc).all(1)] = np.nan
        acc = g > min_gain
        gain[lo:lo + chunk] = g
        accepted[lo:lo + chunk] = acc
        release[lo:lo + chunk] = np.where(acc, taus[k], n)
    return release, gain, accepted


def timed(fn, repeats: int) -> dict:
    """Median and min wall seconds, and median process CPU seconds (all threads), over ``repeats`` calls
    after one warm-up call. On a shared machine the CPU time of a one-thread method is the steadier number."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"time_s": statistics.median(wall), "min_time_s": min(wall), "cpu_time_s": statistics.median(cpu)}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rollouts", type=int, default=100_000)
    ap.add_argument("--segments", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--python-rollouts", type=int, default=2000,
                    help="rollouts the Python reference is timed on (scaled per rollout to --rollouts)")
    ap.add_argument("--min-segments", type=int, default=2)
    ap.add_argument("--min-gain", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=0, help="threads of the 'all threads' row (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=str, default=None, help="write the results here")
    args = ap.parse_args()

    b, n, m, g = args.rollouts, args.segments, args.min_segments, args.min_gain
    threads = args.threads or os.cpu_count() or 1
    x = make_batch(b, n, args.seed)
    values = np.ascontiguousarray(x.ravel())
    offsets = np.arange(0, b * n + 1, n, dtype=np.int64)

    # ---- correctness first ----
    cpp = _C.bic_scan(values, offsets, m, g, 1)
    cpp_all = _C.bic_scan(values, offsets, m, g, threads)
    for a, c in zip(cpp, cpp_all):
        np.testing.assert_array_equal(a, c)
    p = min(args.python_rollouts, b)
    ref = reference.bic_release(values[: p * n], offsets[: p + 1], min_segments=m, min_gain=g)
    np.testing.assert_array_equal(ref.release_index, cpp[0][:p])
    np.testing.assert_array_equal(ref.gain, cpp[1][:p])
    np.testing.assert_array_equal(ref.accepted, cpp[2][:p])
    npy = numpy_scan(x, m, g)
    np.testing.assert_allclose(npy[1], cpp[1], rtol=1e-9, atol=1e-9)
    release_mismatch = int(np.sum(npy[0] != cpp[0]))
    accepted_mismatch = int(np.sum(npy[2] != cpp[2]))
    assert release_mismatch <= max(1, b // 10000) and accepted_mismatch <= max(1, b // 10000), (
        release_mismatch, accepted_mismatch)

    # ---- timings ----
    rows = []

    def add(name, fn, scale=1.0, note=""):
        t = {k: v * scale for k, v in timed(fn, args.repeats).items()}
        rows.append({"method": name, **t, "measured_rollouts": int(round(b / scale)), "note": note})

    add("C++ _C.bic_scan, 1 thread", lambda: _C.bic_scan(values, offsets, m, g, 1))
    add(f"C++ _C.bic_scan, {threads} threads", lambda: _C.bic_scan(values, offsets, m, g, threads))
    add(f"fastopd.bic_release (checks + C++, {threads} threads)",
        lambda: fastopd.bic_release(values, offsets, min_segments=m, min_gain=g, num_threads=threads))
    add("numpy vectorised (B, n)", lambda: numpy_scan(x, m, g))
    py_vals, py_offs = values[: p * n], offsets[: p + 1]
    add("Python reference", lambda: reference.bic_release(py_vals, py_offs, min_segments=m, min_gain=g),
        scale=b / p, note=f"timed on {p} rollouts, scaled x{b / p:g}")

    py_row = next(r for r in rows if r["method"] == "Python reference")
    np_row = next(r for r in rows if r["method"].startswith("numpy"))
    for r in rows:
        r["rollouts_per_s"] = b / r["time_s"]
        r["speedup_vs_python"] = py_row["time_s"] / r["time_s"]
        r["speedup_vs_numpy"] = np_row["time_s"] / r["time_s"]
        r["cpu_speedup_vs_python"] = py_row["cpu_time_s"] / r["cpu_time_s"]
        r["cpu_speedup_vs_numpy"] = np_row["cpu_time_s"] / r["cpu_time_s"]

    print(f"\nBIC scan: B={b} rollouts x n={n} segments, min_segments={m}, min_gain={g}; "
          f"{cpu_name()}, {os.cpu_count()} CPUs; median of {args.repeats} runs. Wall time; CPU = process "
          f"CPU time (all threads), steadier on a shared machine")
    print(f"accepted: {cpp[2].mean():.3f} of rollouts; numpy vs C++: {release_mismatch} release and "
          f"{accepted_mismatch} accept mismatches (near ties), gains within 1e-9\n")
    print("| method | time (ms) | CPU (ms) | rollouts/s | vs Python | vs numpy | vs Python (CPU) | vs numpy (CPU) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        note = f" ({r['note']})" if r["note"] else ""
        print(f"| {r['method']}{note} | {1e3 * r['time_s']:.1f} | {1e3 * r['cpu_time_s']:.1f} | "
              f"{r['rollouts_per_s']:.3g} | {r['speedup_vs_python']:.1f}x | {r['speedup_vs_numpy']:.2f}x | "
              f"{r['cpu_speedup_vs_python']:.1f}x | {r['cpu_speedup_vs_numpy']:.2f}x |")

    if args.json:
        out = {
            "benchmark": "bic_scan",
            "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(), "numpy": np.__version__},
            "args": vars(args),
            "checks": {"reference_subset_exact": True, "threads_equal_single": True,
                       "numpy_release_mismatches": release_mismatch,
                       "numpy_accept_mismatches": accepted_mismatch,
                       "accept_rate": float(cpp[2].mean())},
            "results": rows,
        }
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
