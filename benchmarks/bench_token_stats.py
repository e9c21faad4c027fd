"""Fused Triton token-stats / loss kernels vs the reference: time, bandwidth (GPU; tiny on CPU).

The reference is timed eager and compiled.


One command::

    python benchmarks/bench_token_stats.py                 # GPU: the full grid; CPU: a tiny smoke grid
    python benchmarks/bench_token_stats.py --peak-gbps 2039 --out-dir /tmp/res

Ops (bf16 logits, K = 16):
- ``stats``     token_stats forward (s, u, A, m)                     bytes = 2 * N * V * itemsize
- ``stats_kl``  token_stats forward with the exact reverse KL       bytes = 2 * N * V * itemsize
- ``loss_pg``   opd_loss(loss="pg") forward + backward              bytes = 4 * N * V * itemsize
                (forward reads both rows, backward reads the student row and writes the gradient row)
- ``loss_kl``   opd_loss(loss="reverse_kl") forward + backward      bytes = 5 * N * V * itemsize
Implementations: ``triton`` (fastopd.kernels), ``triton_inplace`` (loss ops, ``inplace_backward=True``),
``triton_split`` (the split-V stats pass, ``splits="auto"``; in the loss ops its forward) and
``triton_split<S>`` (e.g. ``triton_split8``: S V-slices per row, clamped to the row's chunks; not in the
default list), ``eager`` (fastopd.reference) and ``compile`` (``torch.compile(reference..., dynamic=True)``).
``splits="auto"`` keeps the single pass when the rows alone fill the GPU (N = 16384 on an H200: see
``fastopd.kernels.token_stats_split.auto_splits``), so at the goal shape ``triton_split`` equals ``triton``;
``benchmarks/sweep_kernels.py`` times fixed slice counts.

Reported per row: median time (``triton.testing.do_bench`` on CUDA, wall clock on CPU), achieved bandwidth
= bytes / time and its share of the card's memory roofline (peak table below, or ``--peak-gbps``), and
the peak extra memory (``torch.cuda.max_memory_allocated`` minus what was allocated before the call, i.e.
over the inputs). Out-of-memory is recorded as such. Results go to
``<out-dir>/token_stats_<device>.json`` and ``.md``; ``<out-dir>`` defaults to ``$OUT`` or
``benchmarks/results``.

Without a GPU the script runs a tiny configuration only (eager reference; ``--compile`` adds the compiled
reference; the Triton kernels only when ``TRITON_INTERPRET=1`` is set, under the interpreter) and says that
its numbers are CPU numbers: kernel performance needs a GPU (see benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from fastopd import reference  # noqa: E402

# Peak DRAM bandwidth in GB/s by device-name pattern (first match wins).
PEAK_GBPS = [
    (r"H200", 4800.0),
    (r"H100.*PCIe", 2000.0),
    (r"H100.*NVL", 3900.0),
    (r"H100", 3350.0),  # SXM (HBM3)
    (r"A100.*80GB", 2039.0),
    (r"A100", 1555.0),
]
BYTES_PER_ELEMENT = {"stats": 2, "stats_kl": 2, "loss_pg": 4, "loss_kl": 5}
OPS = ("stats", "stats_kl", "loss_pg", "loss_kl")


def peak_gbps(name: str) -> float | None:
    for pattern, gbps in PEAK_GBPS:
        if re.search(pattern, name, re.IGNORECASE):
            return gbps
    return None


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def impl_splits(impl: str):
    """The ``splits`` argument of a Triton implementation name: ``triton`` -> None (the default single
    pass), ``triton_split`` -> ``"auto"``, ``triton_split8`` -> 8."""
    if not impl.startswith("triton_split"):
        return None
    tail = impl[len("triton_split"):]
    if not tail:
        return "auto"
    if not tail.isdigit() or int(tail) < 1:
        raise ValueError(f"implementation {impl!r}: expected triton_split or triton_split<N> with N >= 1")
    return int(tail)


def make_fn(op: str, impl: str, zs, zt, y, k: int):
    """A zero-argument callable running ``op`` with ``impl`` (the loss ops include backward)."""
    from fastopd.kernels import opd_loss_triton, token_stats_triton

    full_kl = op == "stats_kl"
    splits = impl_splits(impl)
    if op.startswith("stats"):
        if impl == "triton" or impl.startswith("triton_split"):
            return lambda: token_stats_triton(zs, zt, y, k=k, full_kl=full_kl, splits=splits)
        ref = reference.token_stats
        if impl == "compile":
            ref = torch.compile(reference.token_stats, dynamic=True)
        return lambda: ref(zs, zt, y, k=k, full_kl=full_kl)
    loss = "pg" if op == "loss_pg" else "reverse_kl"
    leaf = zs.detach().clone().requires_grad_(True)
    if impl in ("triton", "triton_inplace") or impl.startswith("triton_split"):
        inplace = impl == "triton_inplace"

        def run():
            # In place, the gradient overwrites the input's own storage (which then holds gradients on the next
            # call: same work, different values). torch.autograd.grad hands the gradient back as the kernel
            # wrote it, as the backward of an LM head's matmul receives it in training; ``.backward()`` into a
            # leaf would add AccumulateGrad's copy (the leaf's .grad may not alias its data).
            out = opd_loss_triton(leaf, zt, y, loss=loss, k=k, inplace_backward=inplace, splits=splits)
            torch.autograd.grad(out.loss, leaf)

        return run
    ref = reference.opd_loss if impl == "eager" else torch.compile(reference.opd_loss, dynamic=True)

    def run_ref():
        torch.autograd.grad(ref(leaf, zt, y, loss=loss, k=k).loss, leaf)

    return run_ref


def time_it(fn, device: torch.device, reps: int) -> float:
    """Median milliseconds."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(op, impl, n, v, k, device, dtype, peak, reps):
    row = dict(op=op, impl=impl, N=n, V=v, K=k, dtype=str(dtype).replace("torch.", ""))
    zs = zt = y = None
    try:
        gen = torch.Generator(device=device).manual_seed(0)  # generated on the device: 5 GB per tensor at most
        zs = (torch.randn(n, v, generator=gen, device=device, dtype=torch.float32) * 3).to(dtype)
        zt = (torch.randn(n, v, generator=gen, device=device, dtype=torch.float32) * 3).to(dtype)
        y = torch.randint(0, v, (n,), generator=gen, device=device)
        fn = make_fn(op, impl, zs, zt, y, k)
        if device.type == "cuda":
            torch.cuda.synchronize()
            fn()  # compile / autotune outside the memory and time measurement
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            row["extra_mem_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        ms = time_it(fn, device, reps)
        row["ms"] = round(ms, 4)
        nbytes = BYTES_PER_ELEMENT[op] * n * v * torch.finfo(dtype).bits // 8
        row["gbps"] = float(f"{nbytes / (ms * 1e-3) / 1e9:.4g}")
        if peak:
            row["pct_roofline"] = round(100.0 * row["gbps"] / peak, 1)
    except torch.cuda.OutOfMemoryError:
        row["error"] = "OOM"
    except Exception as e:  # noqa: BLE001 - a benchmark records failures and goes on
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    finally:
        del zs, zt, y
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def kernel_resources() -> list[dict]:
    """Registers and spills of every compiled kernel variant so far (Triton's JIT cache; best effort)."""
    from fastopd.kernels.loss_backward import _loss_backward_kernel
    from fastopd.kernels.token_stats import _token_stats_kernel
    from fastopd.kernels.token_stats_split import _stats_combine_kernel, _stats_split_kernel

    out = []
    for name, fn in (("token_stats", _token_stats_kernel), ("loss_backward", _loss_backward_kernel),
                     ("token_stats_split", _stats_split_kernel), ("token_stats_combine", _stats_combine_kernel)):
        caches = getattr(fn, "device_caches", None) or {}
        for entry in caches.values():
            cache = entry[0] if isinstance(entry, tuple) else entry
            for key, kern in getattr(cache, "items", lambda: [])():
                out.append(dict(kernel=name, n_regs=getattr(kern, "n_regs", None),
                                n_spills=getattr(kern, "n_spills", None),
                                num_warps=getattr(getattr(kern, "metadata", None), "num_warps", None),
                                variant=str(key)[:400]))
    return out


def check_against_reference(n: int, v: int, k: int, device) -> dict:
    """Largest difference between the kernels and the eager reference at one shape (bf16 inputs), so a
    benchmark row is never reported for a kernel that computes something else."""
    from fastopd.kernels import opd_loss_triton, token_stats_triton

    gen = torch.Generator(device=device).manual_seed(1)
    zs = (torch.randn(n, v, generator=gen, device=device) * 3).to(torch.bfloat16)
    zt = (torch.randn(n, v, generator=gen, device=device) * 3).to(torch.bfloat16)
    y = torch.randint(0, v, (n,), generator=gen, device=device)
    got = token_stats_triton(zs, zt, y, k=k, full_kl=True)
    ref = reference.token_stats(zs.double(), zt.double(), y, k=k, full_kl=True)
    out = {f"max_abs_err_{f}": float((getattr(got, f).double() - getattr(ref, f).double()).abs().max())
           for f in ("student_logprobs", "teacher_logprobs", "advantages", "margins", "reverse_kl")}
    leaf_t = zs.detach().clone().requires_grad_(True)
    leaf_r = zs.detach().double().requires_grad_(True)
    opd_loss_triton(leaf_t, zt, y, loss="reverse_kl", k=k).loss.backward()
    reference.opd_loss(leaf_r, zt.double(), y, loss="reverse_kl", k=k).loss.backward()
    out["max_abs_err_grad_reverse_kl"] = float((leaf_t.grad.double() - leaf_r.grad).abs().max())
    out["max_abs_grad_reverse_kl"] = float(leaf_r.grad.abs().max())
    # The split-V pass (4 V-slices): its error against fp64, and equal margins with the single pass.
    split = token_stats_triton(zs, zt, y, k=k, full_kl=True, splits=4)
    for f in ("student_logprobs", "margins", "reverse_kl"):
        out[f"split4_max_abs_err_{f}"] = float((getattr(split, f).double() - getattr(ref, f).double()).abs().max())
    out["split4_margins_equal_single_pass"] = bool(torch.equal(split.margins, got.margins))
    out["shape"] = f"N={n}, V={v}, K={k}, bf16 inputs vs the fp64 reference"
    del zs, zt, y, got, ref, leaf_t, leaf_r, split
    torch.cuda.empty_cache()
    return out


def versions() -> dict:
    """Every version a number depends on, recorded with every result."""
    import platform

    v = dict(python=platform.python_version(), torch=torch.__version__, torch_cuda=torch.version.cuda)
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        v["triton"] = None
    if torch.cuda.is_available():
        v["gpu"] = torch.cuda.get_device_name()
        v["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        try:
            import subprocess

            v["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                         capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:  # noqa: BLE001 - informational only
            v["driver"] = None
    return v


def to_markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# token_stats / opd_loss benchmark on {meta['device']}", ""]
    lines += [f"- {key}: {val}" for key, val in meta.items() if key not in ("device", "kernels")]
    lines += ["", "| op | impl | N | V | K | ms (median) | GB/s | % roofline | extra mem MiB |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['impl']} | {r['N']} | {r['V']} | {r['K']} | {r['error']} | | | |")
        else:
            lines.append(
                f"| {r['op']} | {r['impl']} | {r['N']} | {r['V']} | {r['K']} | {r['ms']:.3f} | {r['gbps']:.4g} | "
                f"{r.get('pct_roofline', 'n/a')} | {r.get('extra_mem_mib', 'n/a')} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default=os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--peak-gbps", type=float, default=None, help="memory roofline of this card in GB/s")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list of {OPS}")
    p.add_argument("--impls", default=None,
                   help="comma list of triton,triton_inplace,triton_split,triton_split<S>,eager,compile")
    p.add_argument("--n", default=None, help="comma list of N (default 1024,4096,16384 on GPU)")
    p.add_argument("--v", default=None, help="comma list of V (default 32768,151936 on GPU)")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--compile", action="store_true", help="CPU only: also time torch.compile of the reference")
    p.add_argument("--reps", type=int, default=10, help="CPU repetitions (GPU uses do_bench)")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if cuda:
        name = torch.cuda.get_device_name()
        ns, vs = [1024, 4096, 16384], [32768, 151936]
        impls = ["triton", "triton_inplace", "triton_split", "eager", "compile"]
    else:
        name = "cpu"
        torch.set_num_threads(1)  # a shared CPU: one thread gives steadier (still not meaningful) numbers
        ns, vs = [16], [2048]
        impls = (["triton", "triton_split"] if interpret else []) + ["eager"] + (["compile"] if args.compile else [])
        print("No GPU: running a tiny CPU configuration. These are CPU numbers"
              + (" (Triton under the interpreter)" if interpret else "")
              + "; kernel performance needs a GPU (benchmarks/gpu_check.sh).")
    if args.n:
        ns = [int(x) for x in args.n.split(",")]
    if args.v:
        vs = [int(x) for x in args.v.split(",")]
    if args.impls:
        impls = args.impls.split(",")
        for impl in impls:
            if impl in ("triton", "triton_inplace", "eager", "compile"):
                continue
            if not impl.startswith("triton_split"):
                p.error(f"unknown impl {impl!r}")
            try:
                impl_splits(impl)
            except ValueError as e:
                p.error(str(e))
    ops = args.ops.split(",")
    peak = args.peak_gbps or (peak_gbps(name) if cuda else None)
    if cuda and peak is None:
        print(f"unknown peak bandwidth for {name!r}: pass --peak-gbps to get % of roofline")

    meta = dict(
        device=name, peak_gbps=peak, **versions(), dtype="bfloat16",
        note="GPU run" if cuda else "CPU run: not kernel performance" + (" (Triton interpreter)" if interpret else ""),
        bytes="stats: 2*N*V*itemsize; loss_pg: 4*N*V*itemsize; loss_kl: 5*N*V*itemsize",
        extra_mem="torch.cuda.max_memory_allocated during one call minus memory allocated before it",
    )
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"token_stats_{device_slug(name)}")

    rows = []
    # The goal shape (largest N and V) first, every implementation of it, then the smaller shapes: if a time
    # limit cuts the run, the rows that decide the goals are saved (each row is written as soon as it is done).
    shapes = sorted(((n, v) for v in vs for n in ns), key=lambda nv: (-nv[1], -nv[0]))
    if cuda and any(i.startswith("triton") for i in impls):
        try:
            meta["check"] = check_against_reference(min(1024, min(ns)), max(vs), args.k, device)
        except Exception as e:  # noqa: BLE001 - recorded, and the run goes on
            meta["check"] = f"{type(e).__name__}: {e}"[:300]
        print("check vs fp64 reference:", json.dumps(meta["check"]), flush=True)
    for n, v in shapes:
        for impl in impls:
            for op in ops:
                if impl == "triton_inplace" and not op.startswith("loss"):
                    continue
                row = measure(op, impl, n, v, args.k, device, torch.bfloat16, peak, args.reps)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if cuda and impl.startswith("triton"):
                    meta["kernels"] = kernel_resources()
                with open(stem + ".json", "w") as f:
                    json.dump(dict(meta=meta, rows=rows), f, indent=1)
                with open(stem + ".md", "w") as f:
                    f.write(to_markdown(meta, rows))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
