"""Compile every kernel variant for a CUDA target without a GPU (ahead of time), and report its resources.

The Triton interpreter checks what a kernel computes, not whether it compiles: a non-constexpr global, a
type mismatch between the branches of a runtime ``if`` or an unsupported op only fail in the real
compiler. ``triton.compile`` with an explicit ``GPUTarget`` runs the whole pipeline (TTIR, TTGIR, LLVM,
PTX, and cubin through the ptxas bundled with the triton wheel) on a CPU-only machine, so CI can catch
those errors and a developer can read the register count and spills of each variant (``cuobjdump``).

Run ``python -m fastopd.kernels._aot`` in a process *without* ``TRITON_INTERPRET=1`` (under the interpreter
the kernels are not compilable objects). Integer arguments get the ``tt.divisibility=16`` hint that the JIT
gives them at launch when the value is a multiple of 16 (pointers from torch, V = 151936, row strides), so
the vectorisation matches a real launch.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time

import triton

from fastopd.kernels._helpers import kl_kind, loss_kl
from fastopd.kernels.loss_backward import _loss_backward_kernel, backward_launch_config
from fastopd.kernels.token_stats import _segment_sums_kernel, _token_stats_kernel, stats_launch_config
from fastopd.kernels.token_stats_split import _stats_combine_kernel, _stats_split_kernel, split_launch_configs

_DT = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


def _compile(fn, sig: dict, const: dict, aligned: list[str], num_warps: int, arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def _usage(compiled) -> dict:
    """Registers, stack, shared and local bytes of a compiled kernel (``cuobjdump --dump-resource-usage`` of
    its cubin), and its spill instructions: the count of STL (local store) and LDL (local load) in the SASS."""
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    tool = os.path.join(bindir, "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
    if not m:
        return {}
    return dict(regs=int(m.group(1)), stack=int(m.group(2)), shared=int(m.group(3)), local=int(m.group(4)),
                spill_stores=len(re.findall(r"\bSTL(?:\.\w+)*\s", sass)),
                spill_loads=len(re.findall(r"\bLDL(?:\.\w+)*\s", sass)))


def _kind(full_kl, kl) -> int:
    """KL_KIND of a stats variant: ``kl`` (None, "reverse", "forward") when given, else the reverse KL if
    ``full_kl``."""
    return kl_kind(kl) if kl is not None else int(bool(full_kl))


def stats_variant(dt="bf16", k=16, v=151936, full_kl=True, topk=True, offsets=0, arch=90, kl=None, **override):
    """offsets: 0 row stride, 1 offset table, 2 offset table of 16-aligned offsets (USE_OFFS). ``kl="forward"``
    compiles the forward-KL accumulator (the ``forward_kl`` loss) instead of ``full_kl``'s reverse one.
    ``override`` replaces entries of :func:`stats_launch_config`'s result (e.g. ``num_warps=8``) to try a
    configuration."""
    cfg = dict(stats_launch_config(v, k), **override)
    num_warps = cfg.pop("num_warps")
    sig = {
        "zs_ptr": f"*{_DT[dt]}", "zt_ptr": f"*{_DT[dt]}", "tgt_ptr": "*i64", "out_ptr": "*fp32", "ids_ptr": "*i64",
        "s_stride": "i64", "t_stride": "i64", "s_offs_ptr": "*i64", "t_offs_ptr": "*i64",
        "N": "i32", "V": "i32", "k": "i32", "ignore_index": "i32", "tau": "fp32", "inv_tau": "fp32", "scale2": "fp32",
        "S_OFFS": "constexpr", "T_OFFS": "constexpr", "KL_KIND": "constexpr", "RETURN_TOPK": "constexpr",
        "K_PAD": "constexpr", "BLOCK_G": "constexpr", "GROUP_SIZE": "constexpr", "BITONIC": "constexpr",
    }
    const = dict(S_OFFS=int(offsets), T_OFFS=int(offsets), KL_KIND=_kind(full_kl, kl), RETURN_TOPK=topk, **cfg)
    aligned = ["zs_ptr", "zt_ptr", "tgt_ptr", "out_ptr", "ids_ptr", "s_offs_ptr", "t_offs_ptr", "N"]
    aligned += ["V", "s_stride", "t_stride"] if v % 16 == 0 and not offsets else []
    return _compile(_token_stats_kernel, sig, const, aligned, num_warps, arch), dict(cfg, num_warps=num_warps)


def split_variant(phase="slice", dt="bf16", k=16, v=151936, full_kl=True, topk=False, splits=8, arch=90, kl=None):
    """The split-V pass (:mod:`fastopd.kernels.token_stats_split`): ``phase`` "slice" (phase 1, grid
    (N, SPLITS)) or "combine" (phase 2, SPLITS_PAD = next power of two >= ``splits``), rows by row stride;
    ``full_kl`` / ``kl`` as in :func:`stats_variant`."""
    kind = _kind(full_kl, kl)
    phase1, combine = split_launch_configs(v, k, splits)
    cfg = dict(phase1 if phase == "slice" else combine)
    num_warps = cfg.pop("num_warps")
    sig = {"zs_ptr": f"*{_DT[dt]}", "zt_ptr": f"*{_DT[dt]}", "tgt_ptr": "*i64", "part_ptr": "*fp32", "key_ptr": "*i64"}
    if phase == "slice":
        sig.update({"s_stride": "i64", "t_stride": "i64", "s_offs_ptr": "*i64", "t_offs_ptr": "*i64",
                    "N": "i32", "V": "i32", "ignore_index": "i32", "splits": "i32", "n_chunks": "i32",
                    "scale2": "fp32", "S_OFFS": "constexpr", "T_OFFS": "constexpr", "KL_KIND": "constexpr",
                    "K_PAD": "constexpr", "BLOCK_G": "constexpr", "GROUP_SIZE": "constexpr", "BITONIC": "constexpr"})
        fn, const = _stats_split_kernel, dict(S_OFFS=0, T_OFFS=0, KL_KIND=kind, **cfg)
        aligned = ["zs_ptr", "zt_ptr", "tgt_ptr", "part_ptr", "key_ptr", "s_offs_ptr", "t_offs_ptr"]
    else:
        sig.update({"out_ptr": "*fp32", "ids_ptr": "*i64", "s_stride": "i64", "t_stride": "i64",
                    "s_offs_ptr": "*i64", "t_offs_ptr": "*i64", "N": "i32", "V": "i32", "k": "i32",
                    "ignore_index": "i32", "splits": "i32", "tau": "fp32", "inv_tau": "fp32", "scale2": "fp32",
                    "S_OFFS": "constexpr", "T_OFFS": "constexpr", "KL_KIND": "constexpr", "RETURN_TOPK": "constexpr",
                    "K_PAD": "constexpr", "GROUP_SIZE": "constexpr", "BITONIC": "constexpr", "SPLITS_PAD": "constexpr"})
        fn, const = _stats_combine_kernel, dict(S_OFFS=0, T_OFFS=0, KL_KIND=kind, RETURN_TOPK=topk, **cfg)
        aligned = ["zs_ptr", "zt_ptr", "tgt_ptr", "part_ptr", "key_ptr", "out_ptr", "ids_ptr", "s_offs_ptr",
                   "t_offs_ptr"]
    aligned += ["V", "s_stride", "t_stride"] if v % 16 == 0 else []
    return _compile(fn, sig, const, aligned, num_warps, arch), dict(cfg, num_warps=num_warps)


def backward_variant(dt="bf16", loss="pg", v=151936, offsets=0, arch=90):
    """The loss-backward kernel's branch for ``loss`` (``pg``, ``reverse_kl``, ``forward_kl``)."""
    cfg = backward_launch_config(v)
    num_warps = cfg.pop("num_warps")
    sig = {
        "zs_ptr": f"*{_DT[dt]}", "zt_ptr": f"*{_DT[dt]}", "grad_ptr": f"*{_DT[dt]}", "tgt_ptr": "*i64",
        "coef_ptr": "*fp32", "stat_ptr": "*fp32", "s_stride": "i64", "t_stride": "i64", "g_stride": "i64",
        "s_offs_ptr": "*i64", "t_offs_ptr": "*i64", "g_offs_ptr": "*i64", "N": "i32", "V": "i32", "W": "i32",
        "inv_tau": "fp32", "S_OFFS": "constexpr", "T_OFFS": "constexpr", "G_OFFS": "constexpr",
        "KL_KIND": "constexpr", "BLOCK": "constexpr",
    }
    const = dict(S_OFFS=int(offsets), T_OFFS=int(offsets), G_OFFS=int(offsets), KL_KIND=kl_kind(loss_kl(loss)),
                 **cfg)
    aligned = ["zs_ptr", "zt_ptr", "grad_ptr", "tgt_ptr", "coef_ptr", "stat_ptr", "N", "V", "W"]
    aligned += [] if offsets else ["s_stride", "t_stride", "g_stride"]
    return _compile(_loss_backward_kernel, sig, const, aligned, num_warps, arch), dict(cfg, num_warps=num_warps)


def segment_variant(arch=90):
    sig = {"val_ptr": "*fp32", "seg_ptr": "*i64", "ok_ptr": "*i8", "sums_ptr": "*fp32", "counts_ptr": "*i32",
           "n_tokens": "i32", "L": "i32", "S": "i32", "BLOCK": "constexpr"}
    return _compile(_segment_sums_kernel, sig, {"BLOCK": 1024}, ["val_ptr", "seg_ptr", "sums_ptr"], 4, arch), {}


# (name, builder, kwargs, hot). Hot = a variant that a default call takes: fp16/bf16/fp32 rows addressed by an
# aligned row stride (V a multiple of 16), k = 16, for token_stats / the pg loss (no KL), the reverse-KL
# loss (full_kl) and the forward-KL loss (forward_kl), and the backward of the three losses; and both phases
# of the split-V stats pass (opt-in, ``splits``) in bf16, k = 16, without a KL, with the reverse KL and with
# the forward KL. `--check` fails on any spill in these.
HOT_DTYPES = ("bf16", "fp16", "fp32")
VARIANTS = (
    [(f"token_stats {dt} k=16", stats_variant, dict(dt=dt, k=16, full_kl=False, topk=False), True)
     for dt in HOT_DTYPES]
    + [(f"token_stats {dt} k=16 full_kl", stats_variant, dict(dt=dt, k=16, full_kl=True, topk=False), True)
       for dt in HOT_DTYPES]
    + [(f"token_stats {dt} k=16 forward_kl", stats_variant, dict(dt=dt, k=16, kl="forward", topk=False), True)
       for dt in HOT_DTYPES]
    + [(f"loss_backward {dt} {loss}", backward_variant, dict(dt=dt, loss=loss), True)
       for dt in HOT_DTYPES for loss in ("pg", "reverse_kl", "forward_kl")]
    + [(f"token_stats_split {phase} bf16 k=16{suffix}", split_variant,
        dict(phase=phase, dt="bf16", k=16, kl=kl, full_kl=False), True)
       for phase in ("slice", "combine") for kl, suffix in ((None, ""), ("reverse", " full_kl"), ("forward", " forward_kl"))]
    + [
        ("token_stats bf16 k=16 full_kl topk", stats_variant, dict(dt="bf16", k=16, full_kl=True, topk=True), False),
        ("token_stats fp32 k=64 full_kl topk", stats_variant, dict(dt="fp32", k=64, full_kl=True, topk=True), False),
        ("token_stats bf16 k=16 row-offsets", stats_variant, dict(dt="bf16", k=16, full_kl=False, offsets=1), False),
        ("token_stats bf16 k=16 full_kl aligned row-offsets", stats_variant,
         dict(dt="bf16", k=16, full_kl=True, offsets=2), False),
        ("token_stats fp16 k=2 V=50257 (unaligned rows)", stats_variant,
         dict(dt="fp16", k=2, v=50257, full_kl=False), False),
        ("token_stats bf16 k=16 full_kl V=50257 (unaligned rows)", stats_variant,
         dict(dt="bf16", k=16, v=50257, full_kl=True), False),
        ("loss_backward fp32 pg row-offsets", backward_variant, dict(dt="fp32", loss="pg", offsets=1), False),
        ("segment_sums", segment_variant, {}, False),
        ("token_stats_split combine bf16 k=16 full_kl topk splits=64", split_variant,
         dict(phase="combine", dt="bf16", k=16, full_kl=True, topk=True, splits=64), False),
    ]
)


def compile_all(arch: int = 90, variants=VARIANTS, *, stop_on_error: bool = True) -> list[dict]:
    """Compile each variant for sm_<arch>; returns one dict per variant (name, hot, launch config, usage).

    With ``stop_on_error`` (the default) the first compile error is raised; otherwise it is recorded in the
    row's ``error`` field and the other variants are still compiled.
    """
    from fastopd.kernels._helpers import is_interpreted

    if is_interpreted(_token_stats_kernel):
        raise RuntimeError("AOT compilation needs the compiled kernels: run without TRITON_INTERPRET=1")
    rows = []
    for name, fn, kw, hot in variants:
        t0 = time.perf_counter()
        try:
            compiled, cfg = fn(arch=arch, **kw)
        except Exception as exc:  # noqa: BLE001 - any compiler failure is a finding to report
            if stop_on_error:
                raise
            msg = f"{type(exc).__name__}: {exc}".strip().splitlines()
            rows.append(dict(variant=name, hot=hot, seconds=round(time.perf_counter() - t0, 1),
                             error=msg[-1][:300] if msg else type(exc).__name__))
            continue
        rows.append(dict(variant=name, hot=hot, seconds=round(time.perf_counter() - t0, 1), **cfg, **_usage(compiled)))
    return rows


def problems(rows: list[dict]) -> list[str]:
    """What ``--check`` fails on: a compile error in any variant, or spills (stack, local memory or STL/LDL
    instructions) in a hot variant. Empty when the check passes."""
    out = []
    for r in rows:
        if "error" in r:
            out.append(f"{r['variant']}: compile error: {r['error']}")
        elif "regs" not in r:
            out.append(f"{r['variant']}: no resource usage from cuobjdump")
        elif r["hot"] and spills(r):
            out.append(f"{r['variant']}: hot variant spills (stack {r['stack']} B, local {r['local']} B, "
                       f"{r['spill_stores']} STL / {r['spill_loads']} LDL)")
    return out


def spills(row: dict) -> bool:
    """True when a compiled variant uses local memory (register spills: STACK/LOCAL bytes or STL/LDL)."""
    return any(row.get(key, 0) for key in ("stack", "local", "spill_stores", "spill_loads"))


def table(rows: list[dict]) -> str:
    """Markdown table of the rows (one line per variant)."""
    lines = ["| variant | hot | num_warps | regs | stack B | local B | STL/LDL | compile s |",
             "|---|:-:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        hot = "yes" if r["hot"] else ""
        if "error" in r:
            lines.append(f"| {r['variant']} | {hot} | | compile error: {r['error']} | | | | {r['seconds']} |")
            continue
        lines.append(f"| {r['variant']} | {hot} | {r.get('num_warps', '')} | {r.get('regs', '?')} | "
                     f"{r.get('stack', '?')} | {r.get('local', '?')} | {r.get('spill_stores', '?')}/"
                     f"{r.get('spill_loads', '?')} | {r['seconds']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(
        prog="python -m fastopd.kernels._aot",
        description="Compile every fastopd kernel variant for sm_<arch> without a GPU and report registers/spills.",
    )
    ap.add_argument("arch", nargs="?", type=int, default=90, help="CUDA compute capability as an int (default 90)")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 on any compile error or on any spill in a hot variant (CI)")
    ap.add_argument("--hot-only", action="store_true", help="compile only the hot variants")
    ap.add_argument("--json", metavar="PATH", help="also write the rows (with the triton version) as JSON")
    args = ap.parse_args(argv)
    if args.arch < 50:
        ap.error(f"arch must be a CUDA compute capability such as 80 or 90, got {args.arch}")
    variants = [v for v in VARIANTS if v[3]] if args.hot_only else VARIANTS
    t0 = time.perf_counter()
    rows = compile_all(args.arch, variants, stop_on_error=not args.check)
    total = round(time.perf_counter() - t0, 1)
    print(f"triton {triton.__version__}, sm_{args.arch}, {len(rows)} variants in {total} s")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, arch=args.arch, seconds=total, rows=rows), f, indent=1)
    if not args.check:
        return 0
    found = problems(rows)
    cold = [r["variant"] for r in rows if not r["hot"] and "error" not in r and spills(r)]
    if cold:
        print(f"note: {len(cold)} non-hot variant(s) spill (allowed, documented in docs/kernels.md): {', '.join(cold)}")
    for p in found:
        print(f"FAIL {p}")
    print(f"check: {'FAILED' if found else 'ok'} (triton {triton.__version__})")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
