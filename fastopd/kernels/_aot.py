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

from fastopd.kernels.loss_backward import _loss_backward_kernel, backward_launch_config
from fastopd.kernels.token_stats import _segment_sums_kernel, _token_stats_kernel, stats_launch_config

_DT = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


def _compile(fn, sig: dict, const: dict, aligned: list[str], num_warps: int, arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def _usage(compiled) -> dict:
    """Registers / spill stores / stack of a compiled kernel, from cuobjdump of its cubin."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
    if not m:
        return {}
    return dict(regs=int(m.group(1)), stack=int(m.group(2)), shared=int(m.group(3)), local=int(m.group(4)))


def stats_variant(dt="bf16", k=16, v=151936, full_kl=True, topk=True, offsets=0, arch=90):
    """offsets: 0 row stride, 1 offset table, 2 offset table of 16-aligned offsets (USE_OFFS)."""
    cfg = stats_launch_config(v, k)
    num_warps = cfg.pop("num_warps")
    sig = {
        "zs_ptr": f"*{_DT[dt]}", "zt_ptr": f"*{_DT[dt]}", "tgt_ptr": "*i64", "out_ptr": "*fp32", "ids_ptr": "*i64",
        "s_stride": "i64", "t_stride": "i64", "s_offs_ptr": "*i64", "t_offs_ptr": "*i64",
        "N": "i32", "V": "i32", "k": "i32", "ignore_index": "i32", "tau": "fp32", "inv_tau": "fp32", "scale2": "fp32",
        "S_OFFS": "constexpr", "T_OFFS": "constexpr", "FULL_KL": "constexpr", "RETURN_TOPK": "constexpr",
        "K_PAD": "constexpr", "BLOCK_G": "constexpr", "GROUP_SIZE": "constexpr", "BITONIC": "constexpr",
    }
    const = dict(S_OFFS=int(offsets), T_OFFS=int(offsets), FULL_KL=full_kl, RETURN_TOPK=topk, **cfg)
    aligned = ["zs_ptr", "zt_ptr", "tgt_ptr", "out_ptr", "ids_ptr", "s_offs_ptr", "t_offs_ptr", "N"]
    aligned += ["V", "s_stride", "t_stride"] if v % 16 == 0 and not offsets else []
    return _compile(_token_stats_kernel, sig, const, aligned, num_warps, arch), dict(cfg, num_warps=num_warps)


def backward_variant(dt="bf16", reverse_kl=False, v=151936, offsets=0, arch=90):
    cfg = backward_launch_config(v)
    num_warps = cfg.pop("num_warps")
    sig = {
        "zs_ptr": f"*{_DT[dt]}", "zt_ptr": f"*{_DT[dt]}", "grad_ptr": f"*{_DT[dt]}", "tgt_ptr": "*i64",
        "coef_ptr": "*fp32", "stat_ptr": "*fp32", "s_stride": "i64", "t_stride": "i64", "g_stride": "i64",
        "s_offs_ptr": "*i64", "t_offs_ptr": "*i64", "g_offs_ptr": "*i64", "N": "i32", "V": "i32", "W": "i32",
        "inv_tau": "fp32", "S_OFFS": "constexpr", "T_OFFS": "constexpr", "G_OFFS": "constexpr",
        "REVERSE_KL": "constexpr", "BLOCK": "constexpr",
    }
    const = dict(S_OFFS=int(offsets), T_OFFS=int(offsets), G_OFFS=int(offsets), REVERSE_KL=reverse_kl, **cfg)
    aligned = ["zs_ptr", "zt_ptr", "grad_ptr", "tgt_ptr", "coef_ptr", "stat_ptr", "N", "V", "W"]
    aligned += [] if offsets else ["s_stride", "t_stride", "g_stride"]
    return _compile(_loss_backward_kernel, sig, const, aligned, num_warps, arch), dict(cfg, num_warps=num_warps)


def segment_variant(arch=90):
    sig = {"val_ptr": "*fp32", "seg_ptr": "*i64", "ok_ptr": "*i8", "sums_ptr": "*fp32", "counts_ptr": "*i32",
           "n_tokens": "i32", "L": "i32", "S": "i32", "BLOCK": "constexpr"}
    return _compile(_segment_sums_kernel, sig, {"BLOCK": 1024}, ["val_ptr", "seg_ptr", "sums_ptr"], 4, arch), {}


VARIANTS = [
    ("token_stats bf16 k=16 full_kl topk", stats_variant, dict(dt="bf16", k=16, full_kl=True, topk=True)),
    ("token_stats bf16 k=16 (loss pg)", stats_variant, dict(dt="bf16", k=16, full_kl=False, topk=False)),
    ("token_stats fp32 k=64", stats_variant, dict(dt="fp32", k=64, full_kl=True)),
    ("token_stats bf16 k=16 row-offsets", stats_variant, dict(dt="bf16", k=16, full_kl=False, offsets=1)),
    ("token_stats bf16 k=16 aligned row-offsets", stats_variant, dict(dt="bf16", k=16, full_kl=True, offsets=2)),
    ("token_stats fp16 k=2 V=50257 (unaligned rows)", stats_variant, dict(dt="fp16", k=2, v=50257, full_kl=False)),
    ("token_stats bf16 k=16 V=50257 (unaligned rows)", stats_variant, dict(dt="bf16", k=16, v=50257, full_kl=True)),
    ("loss_backward bf16 pg", backward_variant, dict(dt="bf16", reverse_kl=False)),
    ("loss_backward bf16 reverse_kl", backward_variant, dict(dt="bf16", reverse_kl=True)),
    ("loss_backward fp32 pg row-offsets", backward_variant, dict(dt="fp32", offsets=1)),
    ("segment_sums", segment_variant, {}),
]


def compile_all(arch: int = 90, variants=VARIANTS) -> list[dict]:
    """Compile each variant for sm_<arch>; raise on the first compile error. Returns one dict per variant."""
    from fastopd.kernels._helpers import is_interpreted

    if is_interpreted(_token_stats_kernel):
        raise RuntimeError("AOT compilation needs the compiled kernels: run without TRITON_INTERPRET=1")
    rows = []
    for name, fn, kw in variants:
        t0 = time.perf_counter()
        compiled, cfg = fn(arch=arch, **kw)
        rows.append(dict(variant=name, seconds=round(time.perf_counter() - t0, 1), **cfg, **_usage(compiled)))
    return rows


def main(argv=None) -> int:
    arch = int((argv or sys.argv[1:] or ["90"])[0])
    for row in compile_all(arch):
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
