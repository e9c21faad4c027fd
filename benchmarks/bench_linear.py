"""Benchmark the OPD loss from hidden states (fastopd.linear_opd_loss) against the logits path and others.

One command each::

    python benchmarks/bench_linear.py                  # CPU: N=4096, V=32768, H=256, fp32 (a few minutes)
    python benchmarks/bench_linear.py --gpu            # GPU: bf16, N in {4096, 16384}, V=151936, H=4096

What one run measures: forward + backward of a loss on student hidden states h_S (N, H) through the LM head
W_S (V, H) (gradients into h_S and W_S), with a teacher head W_T on its own h_T (N, H) (no gradient).
Methods (each when installed):

- ``logits``  fastopd.opd_loss on materialised logits z = h W^T (the student's with autograd through the
              head matmul, the teacher's under no_grad): the baseline of every ratio;
- ``linear``  fastopd.linear_opd_loss (token chunks, default chunk size unless ``--chunk``);
- ``trl``     TRL's ``_chunked_divergence_loss`` with beta = 1 (reverse KL), reverse_kl rows only;
- ``liger``   Liger's ``LigerFusedLinearJSDLoss(beta=1, weight_hard_loss=0, weight_soft_loss=1)`` (its
              generalised JSD at beta = 1 is the reverse KL; ``compiled=False`` unless ``--liger-compiled``;
              it also computes the cross-entropy "hard" loss, with weight 0), reverse_kl rows only.

Every method's loss value is printed: for reverse KL the four must agree (same quantity, same mean over
tokens). Memory:

- CPU: every (method, loss) runs in a fresh Python process (after one warm-up call on tiny inputs, so that
  imports and first-call code are loaded); the extra peak is the process's peak resident set size during
  one forward + backward at the benchmark shape (VmHWM, reset through /proc/self/clear_refs just before the
  call) minus its resident size just before the call (inputs already built). It counts everything the call
  touches (allocator caches, oneDNN scratch, the returned gradients of h_S and W_S).
- GPU: ``torch.cuda.max_memory_allocated`` during one forward + backward (after a warm-up call) minus the
  memory allocated before it; the gradients of h_S and W_S (``grads_mib``, the same for every method) are
  part of it, and the table also shows the extra peak without them.

Time: CPU, after the memory runs, all methods in one process, one warm-up call each, then ``--reps``
round-robin rounds (every method once per round, so a shared machine's load falls on all of them alike),
median wall-clock; GPU, median of ``--reps`` CUDA-event-timed calls after a warm-up. Results go to ``<out-dir>/linear_<device>.json`` and ``.md`` (``<out-dir>``:
``--out-dir``, else ``$OUT``, else benchmarks/results); the table is printed as markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import fastopd  # noqa: E402

METHODS = ("logits", "linear", "trl", "liger")


def available(method: str) -> bool:
    if method == "trl":
        try:
            from trl.trainer.distillation_trainer import _chunked_divergence_loss  # noqa: F401
        except Exception:  # noqa: BLE001
            return False
        return True
    if method == "liger":
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # noqa: F401
        except Exception:  # noqa: BLE001
            return False
        return True
    return True


def make_inputs(n, v, h, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    hs = torch.randn(n, h, generator=g, device=device, dtype=dtype).requires_grad_(True)
    ws = (torch.randn(v, h, generator=g, device=device, dtype=dtype) * (2.0 / h**0.5)).requires_grad_(True)
    ht = torch.randn(n, h, generator=g, device=device, dtype=dtype)
    wt = torch.randn(v, h, generator=g, device=device, dtype=dtype) * (2.0 / h**0.5)
    y = torch.randint(0, v, (n,), generator=g, device=device)
    return hs, ws, ht, wt, y


def make_fn(method, loss, inputs, *, chunk=None, liger_compiled=False, k=16):
    """A zero-argument callable: one forward + backward; returns the loss value (float)."""
    hs, ws, ht, wt, y = inputs

    def done(val):
        hs.grad = None
        ws.grad = None
        return val

    if method == "logits":
        def run():
            zs = hs @ ws.T
            with torch.no_grad():
                zt = ht @ wt.T
            out = fastopd.opd_loss(zs, zt, y, loss=loss, k=k)
            out.loss.backward()
            return done(float(out.loss.detach()))
        return run
    if method == "linear":
        def run():
            out = fastopd.linear_opd_loss(hs, ws, ht, wt, y, loss=loss, k=k, chunk_size=chunk)
            out.loss.backward()
            return done(float(out.loss.detach()))
        return run
    if method == "trl":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        mask = torch.ones(1, y.shape[0], dtype=torch.long, device=y.device)

        def run():
            val, _, _ = _chunked_divergence_loss(hs[None], ht[None], ws, wt, mask, beta=1.0)
            val.backward()
            return done(float(val.detach()))
        return run
    if method == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        crit = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0,
                                       compiled=liger_compiled)

        def run():
            val = crit(hs, ws, ht, wt, y)
            val.backward()
            return done(float(val.detach()))
        return run
    raise ValueError(method)


# ----------------------------------------------------------------------------------------------------------
# CPU: one fresh process per row, peak RSS
# ----------------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_worker(args) -> dict:
    row = dict(method=args.method, loss=args.loss, N=args.n, V=args.v, H=args.h, dtype=args.dtype)
    dtype = getattr(torch, args.dtype)
    # Warm-up on tiny inputs: imports and first-call code paths are loaded before the measurement.
    make_fn(args.method, args.loss, make_inputs(32, 64, 8, dtype, torch.device("cpu")), chunk=args.chunk, k=args.k)()
    inputs = make_inputs(args.n, args.v, args.h, dtype, torch.device("cpu"))
    fn = make_fn(args.method, args.loss, inputs, chunk=args.chunk, k=args.k)
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS (VmHWM) to the current RSS
        f.write("5")
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    row["loss_value"] = fn()
    first = time.perf_counter() - t0
    row["extra_peak_mib"] = round((_status_kib("VmHWM") - before) / 1024, 1)
    row["first_call_ms"] = round(1e3 * first, 1)
    return row


def cpu_times(args, pairs) -> dict:
    """Median ms of every (method, loss), all in this process, round-robin: one warm-up call each, then
    ``reps`` rounds in which every method runs once, so a shared machine's load falls on all alike."""
    dtype = getattr(torch, args.dtype)
    inputs = make_inputs(args.n, args.v, args.h, dtype, torch.device("cpu"))
    fns = {pair: make_fn(pair[0], pair[1], inputs, chunk=args.chunk, k=args.k) for pair in pairs}
    times = {pair: [] for pair in pairs}
    for fn in fns.values():
        fn()
    for _ in range(max(1, args.reps)):
        for pair, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[pair].append(time.perf_counter() - t0)
    return {pair: round(1e3 * statistics.median(t), 1) for pair, t in times.items()}


def run_cpu(args, save) -> list[dict]:
    rows = []
    for method, loss in plan(args):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--method", method, "--loss", loss,
               "--n", str(args.n), "--v", str(args.v), "--h", str(args.h), "--dtype", args.dtype,
               "--k", str(args.k)] + (["--chunk", str(args.chunk)] if args.chunk else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            err = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
            row = dict(method=method, loss=loss, N=args.n, V=args.v, H=args.h, dtype=args.dtype, error=err)
        else:
            row = json.loads(lines[-1])
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    ok = [(r["method"], r["loss"]) for r in rows if "error" not in r]
    ms = cpu_times(args, ok)
    for r in rows:
        if (r["method"], r["loss"]) in ms:
            r["ms"] = ms[(r["method"], r["loss"])]
    save(rows)
    return rows


# ----------------------------------------------------------------------------------------------------------
# GPU: in process, torch.cuda peak allocation
# ----------------------------------------------------------------------------------------------------------


def run_gpu(args, save) -> list[dict]:
    dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    rows = []
    for n in args.gpu_n:
        inputs = make_inputs(n, args.v, args.h, dtype, dev)
        grads_mib = (inputs[0].numel() + inputs[1].numel()) * inputs[0].element_size() / 2**20
        for method, loss in plan(args):
            row = dict(method=method, loss=loss, N=n, V=args.v, H=args.h, dtype=args.dtype)
            try:
                fn = make_fn(method, loss, inputs, chunk=args.chunk, liger_compiled=args.liger_compiled, k=args.k)
                fn()  # warm-up: compile / autotune
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                row["loss_value"] = fn()
                torch.cuda.synchronize()
                row["extra_peak_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
                row["grads_mib"] = round(grads_mib, 1)
                times = []
                for _ in range(args.reps):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    fn()
                    b.record()
                    torch.cuda.synchronize()
                    times.append(a.elapsed_time(b))
                row["ms"] = round(statistics.median(times), 2)
            except torch.cuda.OutOfMemoryError:
                row["error"] = "OOM"
            except Exception as e:  # noqa: BLE001 - a benchmark records failures and goes on
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            save(rows)
        del inputs
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------------------
# table
# ----------------------------------------------------------------------------------------------------------


def plan(args):
    out = []
    for loss in args.losses:
        for method in args.methods:
            if method in ("trl", "liger") and loss != "reverse_kl":
                continue  # they compute divergences only: the reverse KL (beta = 1) is the common quantity
            if not available(method):
                print(f"skip {method}: not installed", file=sys.stderr)
                continue
            out.append((method, loss))
    return out


def add_ratios(rows):
    for r in rows:
        base = next((b for b in rows if b["method"] == "logits" and b["loss"] == r["loss"] and b["N"] == r["N"]
                     and "error" not in b), None)
        if base is None or "error" in r:
            continue
        r["time_ratio"] = round(r["ms"] / base["ms"], 3)
        r["mem_ratio"] = round(r["extra_peak_mib"] / base["extra_peak_mib"], 4)
        if "grads_mib" in r:
            ex = base["extra_peak_mib"] - base["grads_mib"]
            r["mem_ratio_wo_grads"] = round((r["extra_peak_mib"] - r["grads_mib"]) / ex, 4) if ex > 0 else None


def markdown(rows, gpu: bool) -> str:
    head = "| loss | N | method | time (ms) | × logits | extra peak (MiB) | × logits |"
    sep = "|---|---|---|---|---|---|---|"
    if gpu:
        head += " extra w/o grads × logits |"
        sep += "---|"
    head += " loss value |"
    sep += "---|"
    lines = [head, sep]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['loss']} | {r['N']} | {r['method']} | {r['error']} |" + " |" * (5 if gpu else 4))
            continue
        line = (f"| {r['loss']} | {r['N']} | {r['method']} | {r['ms']:.1f} | {r.get('time_ratio', float('nan')):.2f} | "
                f"{r['extra_peak_mib']:.1f} | {r.get('mem_ratio', float('nan')):.3f} |")
        if gpu:
            m = r.get("mem_ratio_wo_grads")
            line += f" {m:.3f} |" if m is not None else " - |"
        lines.append(line + f" {r['loss_value']:.6f} |")
    return "\n".join(lines)


def versions() -> dict:
    out = dict(python=platform.python_version(), torch=torch.__version__, machine=platform.machine(),
               cpus=os.cpu_count())
    from importlib import metadata

    for mod, dist in (("triton", "triton"), ("trl", "trl"), ("liger_kernel", "liger-kernel")):
        try:
            out[mod] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[mod] = None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["cuda"] = torch.version.cuda
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="bf16, N in {4096, 16384}, V=151936, H=4096 on CUDA")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--gpu-n", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--v", type=int, default=None)
    p.add_argument("--h", type=int, default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--chunk", type=int, default=None, help="linear_opd_loss chunk_size (default: its own)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--losses", nargs="+", default=["reverse_kl", "pg"])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--liger-compiled", action="store_true")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--loss", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.gpu:
        args.v = args.v or 151936
        args.h = args.h or 4096
        args.dtype = args.dtype or "bfloat16"
        args.reps = 3 if args.reps is None else args.reps
    else:
        args.v = args.v or 32768
        args.h = args.h or 256
        args.dtype = args.dtype or "float32"
        args.reps = 3 if args.reps is None else args.reps
    if args.worker:
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
        print(json.dumps(cpu_worker(args)), flush=True)
        return
    if args.gpu and not torch.cuda.is_available():
        sys.exit("--gpu needs a CUDA device")
    ver = versions()
    where = ver.get("gpu") if args.gpu else f"CPU ({ver['cpus']} cores, {ver['machine']})"
    title = (f"OPD loss from hidden states, forward + backward, {args.dtype}, V={args.v}, H={args.h}, k={args.k}, "
             f"on {where}; torch {ver['torch']}, triton {ver['triton']}, trl {ver['trl']}, "
             f"liger-kernel {ver['liger_kernel']}")
    out_dir = args.out_dir or os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "_", (ver.get("gpu") or "cpu").lower()).strip("_") if args.gpu else "cpu"
    saved_args = {k: v for k, v in vars(args).items() if k not in ("worker", "method", "loss")}

    def save(rows):
        """Write the JSON and markdown after every row, so a time limit keeps the rows done."""
        add_ratios(rows)
        table = markdown(rows, args.gpu)
        with open(os.path.join(out_dir, f"linear_{slug}.json"), "w") as f:
            json.dump(dict(title=title, versions=ver, args=saved_args, rows=rows), f, indent=1)
        with open(os.path.join(out_dir, f"linear_{slug}.md"), "w") as f:
            f.write(title + "\n\n" + table + "\n")
        return table

    rows = run_gpu(args, save) if args.gpu else run_cpu(args, save)
    print(title + "\n\n" + save(rows))


if __name__ == "__main__":
    main()
