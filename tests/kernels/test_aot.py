"""fastopd.kernels._aot: every kernel variant compiles for sm_90 without a GPU."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
import torch

from kernel_setup import *  # noqa: F401,F403  (the interpreter setup, fixtures and helpers)

pytestmark = KERNEL_MARKS


@pytest.mark.skipif(_CUDA, reason="with a GPU the CUDA tests compile the kernels for real")
def test_kernels_compile_for_sm90(tmp_path):
    """Every kernel variant goes through the real compiler (TTIR -> cubin for sm_90) on this machine: the
    interpreter does not catch compile-only errors (non-constexpr globals, branch type mismatches). The
    ``--check`` gate of CI: no compile error, no spill in a hot variant (scripts/ci_triton_matrix.sh runs the
    same check under the other tested Triton versions)."""
    import json

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this triton wheel ships no ptxas")
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    root = str(ROOT)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = tmp_path / "aot.json"
    res = subprocess.run([sys.executable, "-m", "fastopd.kernels._aot", "90", "--check", "--json", str(out)],
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    hot = [r for r in rows if r["hot"]]
    assert len(hot) == 24 and len(rows) > len(hot)
    assert {r["variant"] for r in hot} >= {"token_stats_split slice bf16 k=16 full_kl",
                                           "token_stats_split combine bf16 k=16",
                                           "token_stats bf16 k=16 forward_kl", "loss_backward bf16 forward_kl",
                                           "token_stats_split slice bf16 k=16 forward_kl",
                                           "token_stats_split combine bf16 k=16 forward_kl"}
    for r in hot:
        assert r["regs"] > 0 and r["stack"] == r["local"] == r["spill_stores"] == 0, r


def test_aot_check_verdicts():
    """What ``python -m fastopd.kernels._aot --check`` fails on, on made-up rows: compile errors anywhere and
    spills in hot variants fail; a spill in a non-hot variant is reported but passes."""
    from fastopd.kernels import _aot

    clean = dict(regs=160, stack=0, shared=1024, local=0, spill_stores=0, spill_loads=0, seconds=1.0)
    rows = [dict(variant="a", hot=True, **clean), dict(variant="b", hot=False, **dict(clean, stack=464,
                                                                                         spill_stores=116))]
    assert _aot.problems(rows) == []
    assert _aot.spills(rows[1]) and not _aot.spills(rows[0])
    spilled = [dict(rows[0], stack=8, spill_stores=1, spill_loads=1)]
    assert _aot.problems(spilled) == ["a: hot variant spills (stack 8 B, local 0 B, 1 STL / 1 LDL)"]
    only_stl = [dict(rows[0], spill_stores=2)]
    assert len(_aot.problems(only_stl)) == 1
    broken = [dict(variant="c", hot=False, seconds=0.1, error="AttributeError: no topk")]
    assert _aot.problems(broken) == ["c: compile error: AttributeError: no topk"]
    assert _aot.problems([dict(variant="d", hot=True, seconds=0.1)]) == ["d: no resource usage from cuobjdump"]
    assert "| a | yes |" in _aot.table(rows) and "compile error" in _aot.table(broken)
    hot = [name for name, _, _, is_hot in _aot.VARIANTS if is_hot]
    assert len(hot) == 24 and {"token_stats bf16 k=16", "token_stats fp32 k=16 full_kl",
                               "loss_backward fp16 reverse_kl", "token_stats_split slice bf16 k=16",
                               "token_stats_split combine bf16 k=16 full_kl", "token_stats bf16 k=16 forward_kl",
                               "loss_backward fp32 forward_kl", "token_stats_split slice bf16 k=16 forward_kl",
                               "token_stats_split combine bf16 k=16 forward_kl"} <= set(hot)
    # each hot forward-KL variant compiles the forward branch (KL_KIND 2), the others keep theirs
    kinds = {name: kw for name, _, kw, is_hot in _aot.VARIANTS if is_hot}
    assert kinds["token_stats bf16 k=16 forward_kl"]["kl"] == "forward"
    assert kinds["token_stats_split combine bf16 k=16 forward_kl"]["kl"] == "forward"
    assert kinds["loss_backward bf16 forward_kl"]["loss"] == "forward_kl"
    assert _aot._kind(True, None) == 1 and _aot._kind(False, None) == 0 and _aot._kind(False, "forward") == 2


def test_aot_rejects_a_bad_arch(capsys):
    from fastopd.kernels import _aot

    with pytest.raises(SystemExit) as exc:
        _aot.main(["7"])
    assert exc.value.code == 2 and "arch must be a CUDA compute capability" in capsys.readouterr().err
