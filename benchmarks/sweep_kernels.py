"""Fused kernels' launch configurations (chunk width, top-K group, warps): time (GPU).

One command, on a machine with a CUDA GPU::

    python benchmarks/sweep_kernels.py                      # bf16, N = 16384, V = 151936, K = 16
    python benchmarks/sweep_kernels.py --n 4096 --out-dir /tmp/res

For the stats kernel (forward, with and without the exact KL) and the loss-backward kernel, every
configuration of the grid is compiled, checked against the default configuration's output (stats: equal
margins and log-probs within 1e-5; backward: equal gradients within one bf16 ulp of the row's scale) and
timed with ``triton.testing.do_bench``. It prints a markdown table sorted by time, with the achieved
bandwidth as a share of the card's roofline, registers and spills per variant, and writes
``<out-dir>/sweep_<device>.json`` / ``.md`` (rows written as they finish). The defaults in
``stats_launch_config`` / ``backward_launch_config`` should be the fastest spill-free row of this table for
the card they are tuned on; the table says by how much they are not.

The split-V stats pass (``fastopd.kernels.token_stats_split``, opt-in through ``splits``) is swept over
splits in {1 (the single pass), 2, 4, 8, 16} at N = ``--n`` and at ``--split-small-n`` rows (where one program
per row leaves the GPU idle), with and without the KL, in the default launch configuration; each row is
checked against the single pass (margins exactly equal, log-probs within 1e-5) and reports both kernels'
registers and spills.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_token_stats import device_slug, peak_gbps, versions  # noqa: E402


def _compiled_resources(kernel) -> tuple[int | None, int | None]:
    """(registers, spills) of the most recently compiled variant of ``kernel``."""
    last = (None, None)
    for entry in (getattr(kernel, "device_caches", None) or {}).values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        for kern in getattr(cache, "values", lambda: [])():
            last = (getattr(kern, "n_regs", None), getattr(kern, "n_spills", None))
    return last


def sweep_stats(n, v, k, full_kl, grid, peak, emit):
    import triton.testing

    from fastopd.kernels._helpers import NUM_OUT, Rows
    from fastopd.kernels.token_stats import LOG2E, _token_stats_kernel, stats_launch_config

    gen = torch.Generator(device="cuda").manual_seed(0)
    zs = (torch.randn(n, v, generator=gen, device="cuda") * 3).to(torch.bfloat16)
    zt = (torch.randn(n, v, generator=gen, device="cuda") * 3).to(torch.bfloat16)
    y = torch.randint(0, v, (n,), generator=gen, device="cuda")
    s, t = Rows(zs), Rows(zt)
    ref = None
    default = stats_launch_config(v, k)
    for block, group, warps in grid:
        out = torch.empty((NUM_OUT.value, n), dtype=torch.float32, device="cuda")
        cfg = dict(K_PAD=max(2, 1 << (k - 1).bit_length()), BLOCK_G=block // group, GROUP_SIZE=group,
                   BITONIC=True, num_warps=warps)
        if cfg["BLOCK_G"] < cfg["K_PAD"]:
            continue

        def run():
            _token_stats_kernel[(n,)](
                s.data, t.data, y, out, out, s.stride, t.stride, s.offsets_arg(), t.offsets_arg(),
                n, v, k, -100, 1.0, 1.0, LOG2E,
                S_OFFS=s.use_offsets, T_OFFS=t.use_offsets, KL_KIND=int(bool(full_kl)), RETURN_TOPK=False, **cfg,
            )

        row = dict(kernel="stats_kl" if full_kl else "stats", N=n, V=v, K=k, block_v=block, group=group,
                   num_warps=warps, default=(block, group, warps) == (default["BLOCK_G"] * default["GROUP_SIZE"],
                                                                    default["GROUP_SIZE"], default["num_warps"]))
        try:
            run()
            torch.cuda.synchronize()
            if ref is None:
                ref = out.clone()
            row["max_diff_vs_first"] = float((out[:4] - ref[:4]).abs().max())
            ms = float(triton.testing.do_bench(run, warmup=10, rep=60, return_mode="median"))
            row["ms"] = round(ms, 4)
            row["pct_roofline"] = round(100 * 2 * n * v * 2 / (ms * 1e-3) / 1e9 / peak, 1) if peak else None
            row["regs"], row["spills"] = _compiled_resources(_token_stats_kernel)
        except Exception as e:  # noqa: BLE001 - a sweep records failures and goes on
            row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
        emit(row)


def sweep_split(n, v, k, full_kl, splits_list, peak, emit):
    """The split-V stats pass at each ``splits`` (1 = the single-pass kernel), default launch configuration."""
    import triton.testing

    from fastopd.kernels._helpers import OUT_MARGIN, OUT_S, Rows
    from fastopd.kernels.token_stats import launch_token_stats, stats_launch_config
    from fastopd.kernels.token_stats_split import _stats_combine_kernel, _stats_split_kernel, resolve_splits

    gen = torch.Generator(device="cuda").manual_seed(0)
    zs = (torch.randn(n, v, generator=gen, device="cuda") * 3).to(torch.bfloat16)
    zt = (torch.randn(n, v, generator=gen, device="cuda") * 3).to(torch.bfloat16)
    y = torch.randint(0, v, (n,), generator=gen, device="cuda")
    s, t = Rows(zs), Rows(zt)
    cfg = stats_launch_config(v, k)
    block = cfg["BLOCK_G"] * cfg["GROUP_SIZE"]
    ref = None
    for splits in splits_list:
        used = resolve_splits(splits, n, v, cfg["K_PAD"], block, torch.device("cuda"))

        def run():
            return launch_token_stats(s, t, y, v=v, k=k, temperature=1.0, ignore_index=-100, full_kl=full_kl,
                                      return_topk=False, splits=splits)[0]

        row = dict(kernel="stats_split_kl" if full_kl else "stats_split", N=n, V=v, K=k, block_v=block,
                   group=cfg["GROUP_SIZE"], num_warps=cfg["num_warps"], splits=splits, splits_used=used,
                   workspace_mib=round(n * used * (4 + full_kl) * 4 / 2**20 + n * used * cfg["K_PAD"] * 8 / 2**20, 1)
                   if used > 1 else 0.0)
        try:
            out = run()
            torch.cuda.synchronize()
            if ref is None:
                ref = out.clone()
            row["margins_equal_single"] = bool(torch.equal(out[OUT_MARGIN.value], ref[OUT_MARGIN.value]))
            row["max_diff_logprob_vs_single"] = float((out[OUT_S.value] - ref[OUT_S.value]).abs().max())
            ms = float(triton.testing.do_bench(run, warmup=10, rep=60, return_mode="median"))
            row["ms"] = round(ms, 4)
            row["pct_roofline"] = round(100 * 2 * n * v * 2 / (ms * 1e-3) / 1e9 / peak, 1) if peak else None
            if used > 1:
                row["regs"], row["spills"] = _compiled_resources(_stats_split_kernel)
                row["combine_regs"], row["combine_spills"] = _compiled_resources(_stats_combine_kernel)
        except Exception as e:  # noqa: BLE001 - a sweep records failures and goes on
            row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
        emit(row)


def sweep_backward(n, v, grid, peak, emit):
    import triton.testing

    from fastopd.kernels._helpers import NUM_OUT, OUT_LOGSUM_S, OUT_MAX_S, Rows
    from fastopd.kernels.loss_backward import _loss_backward_kernel

    gen = torch.Generator(device="cuda").manual_seed(0)
    zs = (torch.randn(n, v, generator=gen, device="cuda") * 3).to(torch.bfloat16)
    y = torch.randint(0, v, (n,), generator=gen, device="cuda")
    lse = torch.logsumexp(zs.float(), dim=-1)
    stat = torch.zeros((NUM_OUT.value, n), dtype=torch.float32, device="cuda")  # the stats kernel's buffer
    stat[OUT_MAX_S.value] = zs.float().amax(-1)
    stat[OUT_LOGSUM_S.value] = lse - stat[OUT_MAX_S.value]
    coef = torch.randn(n, generator=gen, device="cuda")
    s = Rows(zs)
    ref = None
    for block, warps in grid:
        grad = torch.empty_like(zs)
        g = Rows(grad)

        def run():
            _loss_backward_kernel[(n,)](
                zs, zs, grad, y, coef, stat, s.stride, s.stride, g.stride,
                s.offsets_arg(), s.offsets_arg(), g.offsets_arg(), n, v, v, 1.0,
                S_OFFS=s.use_offsets, T_OFFS=s.use_offsets, G_OFFS=g.use_offsets, KL_KIND=0,
                BLOCK=block, num_warps=warps,
            )

        row = dict(kernel="loss_backward_pg", N=n, V=v, block_v=block, num_warps=warps)
        try:
            run()
            torch.cuda.synchronize()
            if ref is None:
                ref = grad.float().clone()
            row["max_diff_vs_first"] = float((grad.float() - ref).abs().max())
            ms = float(triton.testing.do_bench(run, warmup=10, rep=60, return_mode="median"))
            row["ms"] = round(ms, 4)
            row["pct_roofline"] = round(100 * 2 * n * v * 2 / (ms * 1e-3) / 1e9 / peak, 1) if peak else None
            row["regs"], row["spills"] = _compiled_resources(_loss_backward_kernel)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
        emit(row)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--v", type=int, default=151936)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--split-small-n", type=int, default=1024,
                   help="also sweep the split-V pass at this many rows (default 1024; 0: skip)")
    p.add_argument("--out-dir", default=os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_kernels.py needs a CUDA GPU (it tunes compiled kernels); nothing to do on this machine.")
        return 0
    name = torch.cuda.get_device_name()
    peak = peak_gbps(name)
    meta = dict(device=name, peak_gbps=peak, **versions())
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"sweep_{device_slug(name)}")
    rows: list[dict] = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(stem + ".json", "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)

    stats_grid = list(itertools.product([2048, 4096, 8192], [32, 64, 128], [4, 8]))
    sweep_stats(args.n, args.v, args.k, False, stats_grid, peak, emit)
    best = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])[:4]
    sweep_stats(args.n, args.v, args.k, True, [(r["block_v"], r["group"], r["num_warps"]) for r in best], peak, emit)
    for n_rows in [args.n] + ([args.split_small_n] if args.split_small_n > 0 else []):
        for full_kl in (False, True):
            sweep_split(n_rows, args.v, args.k, full_kl, [1, 2, 4, 8, 16], peak, emit)
    sweep_backward(args.n, args.v, list(itertools.product([2048, 4096, 8192], [4, 8, 16])), peak, emit)

    lines = [f"# kernel launch sweep on {name}", ""] + [f"- {k}: {v}" for k, v in meta.items() if k != "device"]
    lines += ["", "| kernel | N | block_v | group | warps | splits (used) | ms | % roofline | regs | spills | default |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["N"], r.get("ms", 1e9))):
        split = f"{r['splits']} ({r['splits_used']})" if "splits" in r else ""
        regs = r.get("regs", "")
        if r.get("combine_regs") is not None:
            regs = f"{regs} + {r['combine_regs']}"
        lines.append(f"| {r['kernel']} | {r['N']} | {r['block_v']} | {r.get('group', '')} | {r['num_warps']} | "
                     f"{split} | {r.get('ms', r.get('error', ''))} | {r.get('pct_roofline', '')} | {regs} | "
                     f"{r.get('spills', '')} | {'yes' if r.get('default') else ''} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
