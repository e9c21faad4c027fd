"""OPD loss from hidden states vs the logits path, TRL, Liger: time, memory (CPU; --gpu: GPU).

Benchmarks fastopd.linear_opd_loss (the loss from hidden states) against the logits path and others.


One command each::

    python benchmarks/bench_linear.py                  # CPU: N=4096, V=32768, H=256, fp32 (a few minutes)
    python benchmarks/bench_linear.py --gpu            # GPU: bf16, N in {4096, 16384}, V=151936, H=4096
    python benchmarks/bench_linear.py --smoke          # the GPU plan in one CPU process at a tiny shape

What one run measures: forward + backward of a loss on student hidden states h_S (N, H) through the LM head
W_S (V, H) (gradients into h_S and W_S), with a teacher head W_T on its own h_T (N, H) (no gradient).
Methods (each when installed; a method that is not is a row that says so):

- ``logits``  fastopd.opd_loss on materialised logits z = h W^T (the student's with autograd through the
              head matmul, the teacher's under no_grad): the baseline of every ratio;
- ``linear``  fastopd.linear_opd_loss (token chunks, default chunk size unless ``--chunk``; ``--chunk-sweep``
              adds rows at other chunk sizes): the eager path, weights known at the forward;
- ``linear_overlap``  the same with ``fastopd.linear.OVERLAP_TEACHER`` (teacher tiles on a side stream);
- ``logits_rule``  fastopd.OPDLoss(loss, rule=ReleaseRule()) on materialised logits (rollouts of 1024
              tokens, segments of 32): the baseline of the rule rows;
- ``linear_rule``  ``OPDLoss.linear`` with the same rule: the weights exist only after the forward, so the
              backward recomputes the tiles (the trainer's path); ``linear_rule_overlap`` with the side stream;
- ``trl``     TRL's ``_chunked_divergence_loss`` (``trl.kernels.chunked_divergence.ChunkedDivergenceFunction``)
              with beta = 1 (reverse KL), reverse_kl rows only;
- ``liger``   Liger's ``LigerFusedLinearJSDLoss(beta=1, weight_hard_loss=0, weight_soft_loss=1)`` (its
              generalised JSD at beta = 1 is the reverse KL; ``compiled=False``; it also computes the
              cross-entropy "hard" loss, with weight 0), reverse_kl rows only; ``liger_compiled`` the same with
              Liger's default ``compiled=True``.

Every method's loss value is recorded and checked: each row of one (loss, N) must give the loss value of its
baseline (``logits``, or ``logits_rule`` for the rule rows) within 5e-3 + 1e-2 * |value| (bf16 inputs); a row
that does not is marked ``LOSS MISMATCH`` and the run exits 3. TRL and Liger give the same reverse KL (same
mean over tokens) but no top-K margins or token statistics. Memory:

- CPU: every (method, loss) runs in a fresh Python process (after one warm-up call on tiny inputs, so that
  imports and first-call code are loaded); the extra peak is the process's peak resident set size during
  one forward + backward at the benchmark shape (VmHWM, reset through /proc/self/clear_refs just before the
  call) minus its resident size just before the call (inputs already built). It counts everything the call
  touches (allocator caches, oneDNN scratch, the returned gradients of h_S and W_S).
- GPU: ``torch.cuda.max_memory_allocated`` during one forward + backward (after a warm-up call) minus the
  memory allocated before it; the gradients of h_S and W_S (``grads_mib``, the same for every method) are
  part of it. A second call with W_S not requiring a gradient gives the extra peak without the (V, H)
  weight gradient (``extra_peak_no_wgrad_mib``), measured, not subtracted.

Time: CPU, after the memory runs, all methods in one process, one warm-up call each, then ``--reps``
round-robin rounds (every method once per round, so a shared machine's load falls on all of them alike),
median wall-clock; GPU, median of ``--reps`` CUDA-event-timed calls after a warm-up (``--smoke``: wall clock,
no memory). Results go to ``<out-dir>/linear_<device>.json`` and ``.md`` (``<out-dir>``: ``--out-dir``, else
``$OUT``, else benchmarks/results), written after every row; the table is printed as markdown.
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

METHODS = ("logits", "linear", "trl", "liger")  # the CPU run's
GPU_METHODS = ("logits", "linear", "linear_overlap", "logits_rule", "linear_rule", "linear_rule_overlap", "trl",
               "liger", "liger_compiled")
DIVERGENCE_ONLY = ("trl", "liger", "liger_compiled")  # reverse KL only
RULE_METHODS = ("linear_rule", "linear_rule_overlap")  # baseline: logits_rule
ROLLOUT, SEGMENT = 1024, 32  # the rule rows: rollouts of ROLLOUT tokens, segments of SEGMENT tokens
LOSS_ATOL, LOSS_RTOL = 5e-3, 1e-2  # agreement of loss values across methods (bf16 inputs)


def why_unavailable(method: str) -> str | None:
    """None if ``method`` can run here, else why not (e.g. ``not installed: ModuleNotFoundError: ...``)."""
    try:
        if method == "trl":
            from trl.trainer.distillation_trainer import _chunked_divergence_loss  # noqa: F401
        elif method in ("liger", "liger_compiled"):
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"not installed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return None


def available(method: str) -> bool:
    return why_unavailable(method) is None


def make_inputs(n, v, h, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    hs = torch.randn(n, h, generator=g, device=device, dtype=dtype).requires_grad_(True)
    ws = (torch.randn(v, h, generator=g, device=device, dtype=dtype) * (2.0 / h**0.5)).requires_grad_(True)
    ht = torch.randn(n, h, generator=g, device=device, dtype=dtype)
    wt = torch.randn(v, h, generator=g, device=device, dtype=dtype) * (2.0 / h**0.5)
    y = torch.randint(0, v, (n,), generator=g, device=device)
    return hs, ws, ht, wt, y


def rule_segments(n: int, device):
    """(B, L) segment ids of the rule rows: rollouts of ROLLOUT tokens (fewer if N is smaller), SEGMENT each."""
    length = min(ROLLOUT, n)
    if n % length:
        raise ValueError(f"N={n} must be a multiple of {length} for the rule rows")
    seg = torch.arange(length, device=device) // SEGMENT
    return seg.expand(n // length, length).contiguous()


def make_fn(method, loss, inputs, *, chunk=None, liger_compiled=False, k=16, backend="auto", info=None):
    """A zero-argument callable: one forward + backward; returns the loss value (float). ``info`` (a dict)
    receives what a rule row decided (kept fraction, accept rate)."""
    hs, ws, ht, wt, y = inputs

    def done(val):
        hs.grad = None
        ws.grad = None
        return val

    if method in ("logits_rule", "linear_rule", "linear_rule_overlap"):
        from fastopd import linear as lin

        seg = rule_segments(y.shape[0], y.device)
        shape = seg.shape
        crit = fastopd.OPDLoss(loss, rule=fastopd.ReleaseRule(k=k, backend=backend))  # the rule's backend
        yb = y.view(shape)

        def run_rule():
            lin.OVERLAP_TEACHER = method == "linear_rule_overlap"
            try:
                if method == "logits_rule":
                    zs = hs @ ws.T
                    with torch.no_grad():
                        zt = ht @ wt.T
                    out = crit(zs.view(*shape, -1), zt.view(*shape, -1), yb, segment_ids=seg)
                else:
                    out = crit.linear(hs.view(*shape, -1), ws, ht.view(*shape, -1), wt, yb, segment_ids=seg,
                                      chunk_size=chunk)
            finally:
                lin.OVERLAP_TEACHER = False
            out.loss.backward()
            if info is not None:
                info.update({key: round(float(out.metrics[key]), 4) for key in ("kept_fraction", "accept_rate")
                             if key in out.metrics})
            return done(float(out.loss.detach()))
        return run_rule

    if method == "logits":
        def run():
            zs = hs @ ws.T
            with torch.no_grad():
                zt = ht @ wt.T
            out = fastopd.opd_loss(zs, zt, y, loss=loss, k=k, backend=backend)
            out.loss.backward()
            return done(float(out.loss.detach()))
        return run
    if method in ("linear", "linear_overlap"):
        from fastopd import linear as lin

        def run():
            lin.OVERLAP_TEACHER = method == "linear_overlap"
            try:
                out = fastopd.linear_opd_loss(hs, ws, ht, wt, y, loss=loss, k=k, chunk_size=chunk, backend=backend)
            finally:
                lin.OVERLAP_TEACHER = False
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
    if method in ("liger", "liger_compiled"):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        crit = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0,
                                       compiled=liger_compiled or method == "liger_compiled")

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
    for method, loss, _ in plan(args):
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
    check_loss_values(rows)
    ok = [(r["method"], r["loss"]) for r in rows if "error" not in r]
    ms = cpu_times(args, ok)
    for r in rows:
        if (r["method"], r["loss"]) in ms:
            r["ms"] = ms[(r["method"], r["loss"])]
    save(rows)
    return rows


# ----------------------------------------------------------------------------------------------------------
# GPU (and --smoke on a CPU): in process, torch.cuda peak allocation
# ----------------------------------------------------------------------------------------------------------


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _peak_extra_mib(fn, dev):
    """(loss value, extra peak MiB over what was allocated before one call; None off CUDA)."""
    if dev.type != "cuda":
        return fn(), None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    val = fn()
    torch.cuda.synchronize()
    return val, round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)


def _median_ms(fn, dev, reps):
    times = []
    for _ in range(max(1, reps)):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return round(statistics.median(times), 2)


def _chunk_of(method, chunk, n, v, dev, itemsize, backend):
    """The chunk rows a linear* row runs with (its --chunk, else fastopd's default on this device)."""
    if not method.startswith("linear"):
        return None
    if chunk is not None:
        return min(chunk, n)
    from fastopd._dispatch import resolve_backend
    from fastopd.linear import default_chunk_size

    chosen = resolve_backend(backend, dev, dtypes=(torch.bfloat16,) if itemsize == 2 else (torch.float32,), k=16)
    return min(default_chunk_size(chosen, v, dev, itemsize), n)


def run_gpu(args, save) -> list[dict]:
    dev = torch.device("cpu" if args.smoke else "cuda")
    dtype = getattr(torch, args.dtype)
    rows = []
    for n in args.gpu_n:
        inputs = make_inputs(n, args.v, args.h, dtype, dev)
        grads_mib = (inputs[0].numel() + inputs[1].numel()) * inputs[0].element_size() / 2**20
        wgrad_mib = inputs[1].numel() * inputs[1].element_size() / 2**20
        for method, loss, chunk in plan(args):
            row = dict(method=method, loss=loss, N=n, V=args.v, H=args.h, dtype=args.dtype)
            if chunk != args.chunk:
                row["sweep"] = True  # a --chunk-sweep row (the goals read the default chunk's)
            why = why_unavailable(method)
            if why is not None:
                row["error"] = why
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                save(rows)
                continue
            try:
                row["chunk"] = _chunk_of(method, chunk, n, args.v, dev, inputs[0].element_size(), args.backend)
                info = {}
                fn = make_fn(method, loss, inputs, chunk=chunk, liger_compiled=args.liger_compiled, k=args.k,
                             backend=args.backend, info=info)
                t0 = time.perf_counter()
                fn()  # warm-up: compile / autotune
                _sync(dev)
                row["first_call_s"] = round(time.perf_counter() - t0, 2)
                row["loss_value"], row["extra_peak_mib"] = _peak_extra_mib(fn, dev)
                row.update(info)
                if dev.type == "cuda":
                    row["grads_mib"] = round(grads_mib, 1)
                    row["wgrad_mib"] = round(wgrad_mib, 1)
                    inputs[1].requires_grad_(False)  # the same call without the (V, H) weight gradient
                    try:
                        _, row["extra_peak_no_wgrad_mib"] = _peak_extra_mib(fn, dev)
                    except Exception as e:  # noqa: BLE001 - recorded for this column only
                        row["no_wgrad_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                    finally:
                        inputs[1].requires_grad_(True)
                row["ms"] = _median_ms(fn, dev, args.reps)
            except torch.cuda.OutOfMemoryError:
                row["error"] = "OOM"
            except Exception as e:  # noqa: BLE001 - a benchmark records failures and goes on
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            check_loss_values(rows)
            print(json.dumps(row), file=sys.stderr, flush=True)
            if row.get("loss_mismatch"):
                print(f"LOSS MISMATCH: {row['loss_mismatch']}", file=sys.stderr, flush=True)
            save(rows)
        del inputs
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------------------
# table
# ----------------------------------------------------------------------------------------------------------


def plan(args):
    """(method, loss, chunk) in the order they run; on the GPU plan, methods not installed stay in (their rows
    say why); the chunk sweep (linear rows at other chunk sizes) comes after the methods of each loss."""
    out = []
    for loss in args.losses:
        for method in args.methods:
            if method in DIVERGENCE_ONLY and loss != "reverse_kl":
                continue  # they compute divergences only: the reverse KL (beta = 1) is the common quantity
            if not args.gpu_plan and not available(method):
                print(f"skip {method}: not installed", file=sys.stderr)
                continue
            out.append((method, loss, args.chunk))
        if args.gpu_plan:
            for c in args.chunk_sweep:
                out.append(("linear", loss, c))
    return out


def baseline_of(method: str) -> str:
    return "logits_rule" if method in RULE_METHODS else "logits"


def _base_row(rows, r):
    want = baseline_of(r["method"])
    return next((b for b in rows if b["method"] == want and b["loss"] == r["loss"] and b["N"] == r["N"]
                 and "error" not in b), None)


def check_loss_values(rows):
    """Mark every row whose loss value differs from its baseline's beyond LOSS_ATOL + LOSS_RTOL * |base|."""
    for r in rows:
        base = _base_row(rows, r)
        if base is None or "loss_value" not in r or r is base:
            continue
        diff = abs(r["loss_value"] - base["loss_value"])
        if diff > LOSS_ATOL + LOSS_RTOL * abs(base["loss_value"]):
            r["loss_mismatch"] = (f"{r['method']} {r['loss']} N={r['N']}: {r['loss_value']:.6f} vs "
                                  f"{base['method']} {base['loss_value']:.6f} (|diff| {diff:.2e})")
        else:
            r.pop("loss_mismatch", None)


def add_ratios(rows):
    for r in rows:
        base = _base_row(rows, r)
        if base is None or "error" in r or "ms" not in r or "ms" not in base:
            continue
        r["time_ratio"] = round(r["ms"] / base["ms"], 3)
        if r.get("extra_peak_mib") is not None and base.get("extra_peak_mib"):
            r["mem_ratio"] = round(r["extra_peak_mib"] / base["extra_peak_mib"], 4)
        if "grads_mib" in r:
            ex = base["extra_peak_mib"] - base["grads_mib"]
            r["mem_ratio_wo_grads"] = round((r["extra_peak_mib"] - r["grads_mib"]) / ex, 4) if ex > 0 else None
        a, b = r.get("extra_peak_no_wgrad_mib"), base.get("extra_peak_no_wgrad_mib")
        if a is not None and b:
            r["mem_ratio_no_wgrad"] = round(a / b, 4)


def _f(x, fmt):
    return "-" if x is None else format(x, fmt)


def markdown(rows, gpu: bool) -> str:
    if not gpu:
        head = "| loss | N | method | time (ms) | × logits | extra peak (MiB) | × logits | loss value |"
        lines = [head, "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['loss']} | {r['N']} | {r['method']} | {r['error']} | | | | |")
                continue
            lines.append(f"| {r['loss']} | {r['N']} | {r['method']} | {r['ms']:.1f} | {_f(r.get('time_ratio'), '.2f')} | "
                         f"{_f(r.get('extra_peak_mib'), '.1f')} | {_f(r.get('mem_ratio'), '.3f')} | {r['loss_value']:.6f} |")
        return "\n".join(lines)
    head = ("| loss | N | method | chunk | time (ms) | × base | extra peak (MiB) | × base | "
            "extra w/o W grad (MiB) | × base | loss value | check |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['loss']} | {r['N']} | {r['method']} | {r.get('chunk') or '-'} | {r['error']} |"
                         + " |" * 7)
            continue
        check = "**LOSS MISMATCH**" if r.get("loss_mismatch") else "ok"
        lines.append(
            f"| {r['loss']} | {r['N']} | {r['method']} | {r.get('chunk') or '-'} | {r['ms']:.1f} | "
            f"{_f(r.get('time_ratio'), '.2f')} | {_f(r.get('extra_peak_mib'), '.1f')} | {_f(r.get('mem_ratio'), '.3f')} | "
            f"{_f(r.get('extra_peak_no_wgrad_mib'), '.1f')} | {_f(r.get('mem_ratio_no_wgrad'), '.3f')} | "
            f"{r['loss_value']:.6f} | {check} |")
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
    p.add_argument("--smoke", action="store_true",
                   help="the --gpu plan (every method, the chunk sweep) in one CPU process at a tiny shape")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--gpu-n", type=int, nargs="+", default=None)
    p.add_argument("--v", type=int, default=None)
    p.add_argument("--h", type=int, default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--chunk", type=int, default=None, help="linear_opd_loss chunk_size (default: its own)")
    p.add_argument("--chunk-sweep", type=int, nargs="*", default=None,
                   help="--gpu/--smoke: extra linear rows at these chunk sizes (default 432 2048 4096 on the GPU)")
    p.add_argument("--backend", default="auto", help="fastopd's backend (auto | triton | reference)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--losses", nargs="+", default=["reverse_kl", "pg"])
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"default: {' '.join(METHODS)} (CPU), {' '.join(GPU_METHODS)} (--gpu, --smoke)")
    p.add_argument("--liger-compiled", action="store_true")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--loss", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.gpu_plan = args.gpu or args.smoke
    if args.methods is None:
        args.methods = list(GPU_METHODS if args.gpu_plan else METHODS)
    if args.gpu:
        args.gpu_n = args.gpu_n or [4096, 16384]
        args.v = args.v or 151936
        args.h = args.h or 4096
        args.dtype = args.dtype or "bfloat16"
        args.reps = 5 if args.reps is None else args.reps
        args.chunk_sweep = [432, 2048, 4096] if args.chunk_sweep is None else args.chunk_sweep
    elif args.smoke:
        args.gpu_n = args.gpu_n or [256, 512]
        args.v = args.v or 512
        args.h = args.h or 32
        args.dtype = args.dtype or "bfloat16"
        args.reps = 1 if args.reps is None else args.reps
        args.chunk_sweep = [64] if args.chunk_sweep is None else args.chunk_sweep
    else:
        args.v = args.v or 32768
        args.h = args.h or 256
        args.dtype = args.dtype or "float32"
        args.reps = 3 if args.reps is None else args.reps
        args.chunk_sweep = args.chunk_sweep or []
    if args.worker:
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
        print(json.dumps(cpu_worker(args)), flush=True)
        return
    if args.gpu and not torch.cuda.is_available():
        sys.exit("--gpu needs a CUDA device")
    ver = versions()
    where = ver.get("gpu") if args.gpu else f"CPU ({ver['cpus']} cores, {ver['machine']})" + (
        ", smoke run: not performance" if args.smoke else "")
    title = (f"OPD loss from hidden states, forward + backward, {args.dtype}, V={args.v}, H={args.h}, k={args.k}, "
             f"on {where}; torch {ver['torch']}, triton {ver['triton']}, trl {ver['trl']}, "
             f"liger-kernel {ver['liger_kernel']}")
    out_dir = args.out_dir or os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "_", (ver.get("gpu") or "cpu").lower()).strip("_") if args.gpu else "cpu"
    slug += "_smoke" if args.smoke else ""
    saved_args = {k: v for k, v in vars(args).items() if k not in ("worker", "method", "loss")}

    def save(rows):
        """Write the JSON and markdown after every row, so a time limit keeps the rows done."""
        add_ratios(rows)
        table = markdown(rows, args.gpu_plan)
        with open(os.path.join(out_dir, f"linear_{slug}.json"), "w") as f:
            json.dump(dict(title=title, versions=ver, args=saved_args, rows=rows), f, indent=1)
        with open(os.path.join(out_dir, f"linear_{slug}.md"), "w") as f:
            f.write(title + "\n\n" + table + "\n")
        return table

    rows = run_gpu(args, save) if args.gpu_plan else run_cpu(args, save)
    print(title + "\n\n" + save(rows))
    bad = [r["loss_mismatch"] for r in rows if r.get("loss_mismatch")]
    if bad:
        print("LOSS MISMATCH in " + str(len(bad)) + " row(s):\n  " + "\n  ".join(bad), file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
