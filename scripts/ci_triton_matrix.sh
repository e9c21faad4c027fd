#!/usr/bin/env bash
# The kernels under every tested Triton: compile each kernel variant for sm_90 without a GPU
# (`python -m fastopd.kernels._aot --check`) under the declared floor (3.4), torch 2.11's Triton (3.6) and the
# newest tested (3.9). A compile error in any variant, or a register spill in a hot variant, fails (exit 1).
# Called by .ci/run; docs/kernels.md has the table it produces and what "hot" means.
#
# Each version gets its own small venv (triton + torch 2.13.0 CPU + numpy, ~1.5 GB), made once and reused
# while it still holds the right versions:
#   TRITON_MATRIX_VERSIONS   versions to check (default "3.4.0 3.6.0 3.9.0")
#   TRITON_MATRIX_VENVS      where the venvs live (default ~/.cache/fastopd-triton)
#   TRITON_MATRIX_OUT        where the per-version logs and JSON go (default build/triton-matrix)
#   TRITON_MATRIX_TESTS=1    also run tests/kernels/ under each version's interpreter (installs pytest
#                            into the venvs; a few minutes per version; off in CI)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSIONS="${TRITON_MATRIX_VERSIONS:-3.4.0 3.6.0 3.9.0}"
VENVS="${TRITON_MATRIX_VENVS:-${XDG_CACHE_HOME:-$HOME/.cache}/fastopd-triton}"
OUT="${TRITON_MATRIX_OUT:-build/triton-matrix}"
TORCH="torch==2.13.0"  # the CPU build (an unpinned torch pulls a CUDA build and its Triton pin)
mkdir -p "$VENVS" "$OUT"
unset TRITON_INTERPRET            # the AOT check needs the real compiler
export TRITON_DEFAULT_FP_FUSION=1 # Triton 3.9's default, stated to silence its warning (older versions ignore it)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"

failed=()
for v in $VERSIONS; do
    t0=$(date +%s)
    venv="$VENVS/venv-$v"
    if ! "$venv/bin/python" -c "import sys, torch, triton; sys.exit(triton.__version__ != '$v' or torch.version.cuda is not None)" 2>/dev/null; then
        rm -rf "$venv"
        "$PY" -m venv "$venv"
        "$venv/bin/python" -m pip install --quiet "$TORCH" numpy "triton==$v"
    fi
    # Guard: the venv must hold the CPU torch and no CUDA wheels (pip must not have swapped torch for a CUDA build).
    "$venv/bin/python" - <<PY
import importlib.metadata as md, sys, torch, triton
cuda = sorted(d.metadata["Name"] for d in md.distributions() if d.metadata["Name"].lower().startswith("nvidia"))
if torch.version.cuda is not None or cuda or triton.__version__ != "$v":
    sys.exit(f"venv-$v: expected torch CPU + triton $v, got torch {torch.__version__} (cuda {torch.version.cuda}), "
             f"triton {triton.__version__}, CUDA wheels {cuda}")
PY
    t1=$(date +%s)
    status=0
    "$venv/bin/python" -m fastopd.kernels._aot 90 --check --json "$OUT/aot_triton_$v.json" > "$OUT/aot_triton_$v.log" 2>&1 \
        || status=$?
    grep -E "^(triton |\| token_stats|\| loss_backward|\| segment|note:|FAIL|check:)" "$OUT/aot_triton_$v.log" || true
    if [ "$status" -ne 0 ]; then
        tail -20 "$OUT/aot_triton_$v.log"
        failed+=("$v (aot exit $status)")
    fi
    if [ "${TRITON_MATRIX_TESTS:-0}" = "1" ]; then
        "$venv/bin/python" -m pip install --quiet pytest
        "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/kernels/ > "$OUT/interp_triton_$v.log" 2>&1 \
            || failed+=("$v (interpreter tests)")
        tail -3 "$OUT/interp_triton_$v.log"
    fi
    echo "triton $v: venv $((t1 - t0)) s, check $(( $(date +%s) - t1 )) s"
done

if [ "${#failed[@]}" -ne 0 ]; then
    echo "Triton matrix FAILED: ${failed[*]} (logs in $OUT)"
    exit 1
fi
echo "Triton matrix ok: $VERSIONS"
