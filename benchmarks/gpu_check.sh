#!/usr/bin/env bash
# One command for a session with one GPU: every number of issue 17 into one folder, in about 8 minutes at most
# on one H200 (each phase under its own `timeout`, so a slow phase leaves the others' results; every benchmark
# writes its files row by row), so a 15-minute lease leaves time to rerun a phase.
#
#   OUT=benchmarks/results/gpu/run3 bash benchmarks/gpu_check.sh       # the default OUT
#   PHASES="linear summary" OUT=benchmarks/results/gpu/run3 bash benchmarks/gpu_check.sh   # rerun some phases
#
# From a session here (the device tool): run `bash benchmarks/gpu_wheels.sh` first (trl, liger-kernel, nltk and
# what they import, into .whl/, ~4.5 MB), then one call
#   run(command="OUT=benchmarks/results/gpu/run3 bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# and copy the folder back from $OUT (or set OUT=$OUT/run3 there). Then `python benchmarks/gpu_tables.py
# benchmarks/results/gpu/run3 --readme` rewrites the README's GPU table from it.
#
# Phases (PHASES, default all, in this order; the time cap of each in brackets, seconds, overridable):
#   setup    wheels from .whl/ into $SITE (/tmp/site, on PYTHONPATH), build fastopd._C, versions.txt, nvidia_smi.txt  (~30)
#   stats    bench_token_stats.py at the goal shape only (bf16, N = 16384, V = 151936, K = 16): every impl it
#            runs by default (triton, triton_inplace, eager, compile and whatever it adds) and every op (the
#            stats pass, with the KL, the pg / reverse_kl losses fwd + bwd); first the fp64 correctness check
#            at N = 1024  [STATS_S=150]
#   linear   bench_linear.py --gpu --gpu-n 16384 4096: the hidden-state loss (bf16, V = 151936, H = 4096):
#            logits path, linear (eager), linear_overlap, logits_rule / linear_rule(_overlap) (the recompute
#            path with the release rule's weights), TRL's chunked divergence, Liger (compiled=False, True),
#            a chunk sweep; loss values checked across methods (exit 3 on a mismatch)  [LINEAR_S=180]
#   tests    the CUDA tests: tests/kernels/ without test_aot.py (a CPU compile check), the hidden-state
#            path's first; pytest-xdist -n 4 when installed; each test at most 120 s  [TEST_S=120]
#   summary  benchmarks/gpu_tables.py "$OUT" --summary: summary.md, each goal of issue 17 met / short
#
# Files in $OUT: versions.txt, nvidia_smi.txt, wheels.log, build_ext.log, phases.txt (exit status and seconds
# of each phase; a rerun appends), <phase>.log (each phase's output), token_stats_<gpu>.json / .md,
# linear_<gpu>.json / .md, test_cuda.xml, summary.md.
#
# Another Triton than the installed one (fastopd needs >= 3.4): install its wheel into a folder and put that
# folder on PYTHONPATH (searched before site-packages; this script prepends the checkout and /tmp/site only):
#   pip install --no-deps --target /tmp/tri triton==3.9.0 && PYTHONPATH=/tmp/tri bash benchmarks/gpu_check.sh
# versions.txt then shows the Triton actually imported. torch.compile (the "compile" rows) runs torch's own
# Triton code against that Triton too: if those rows fail, add STATS_ARGS="--impls triton,triton_inplace,eager".
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-benchmarks/results/gpu/run3}"
PHASES="${PHASES:-setup stats linear tests summary}"
PY="${PYTHON:-python3}"
SITE="${SITE:-/tmp/site}"  # the carried wheels go here (on PYTHONPATH)
mkdir -p "$OUT"
unset TRITON_INTERPRET                    # compiled kernels on CUDA tensors
export TRITON_DEFAULT_FP_FUSION=1         # Triton 3.9's default, stated to silence its warning
export PYTHONUNBUFFERED=1
# The wheels of benchmarks/gpu_wheels.sh, when carried (.whl/): installed every time (a fresh machine is bare)
if ls .whl/*.whl > /dev/null 2>&1 && [[ " $PHASES " == *" setup "* || ! -d "$SITE" ]]; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            .whl/*.whl > "$OUT/wheels.log" 2>&1; then
        echo "installed into $SITE:" .whl/*.whl >> "$OUT/wheels.log"
    else
        echo "wheel install failed (see $OUT/wheels.log): trl / liger rows will say not installed"
    fi
fi
[ -d "$SITE" ] && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
status=0

# phase NAME CAP COMMAND...: runs COMMAND under `timeout CAP` (CAP 0: none) if NAME is in PHASES, its output
# to $OUT/NAME.log and the terminal; records "NAME exit N, S s" in phases.txt
phase() {
    local name=$1 cap=$2 t0 rc
    shift 2
    [[ " $PHASES " == *" $name "* ]] || return 0
    echo "== $name (cap ${cap} s) at $(( $(date +%s) - start )) s"
    t0=$(date +%s)
    if [ "$cap" -gt 0 ]; then
        timeout --kill-after=10 "$cap" "$@" 2>&1 | tee "$OUT/$name.log"
    else
        "$@" 2>&1 | tee "$OUT/$name.log"
    fi
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "$name: stopped at its ${cap} s cap (the rows done are saved)" | tee -a "$OUT/$name.log"
    fi
    echo "$name exit $rc, $(( $(date +%s) - t0 )) s" | tee -a "$OUT/phases.txt"
    [ "$rc" -eq 0 ] || status=1
}

# shellcheck disable=SC2317  # called through phase
setup() {
    nvidia-smi > "$OUT/nvidia_smi.txt" 2>&1 || echo "no nvidia-smi" > "$OUT/nvidia_smi.txt"
    # The C++ scan (fastopd._C; the release rule) is not built on a fresh machine: build it in place.
    "$PY" -c "import fastopd._C" 2>/dev/null || "$PY" setup.py -q build_ext --inplace > "$OUT/build_ext.log" 2>&1 \
        || echo "could not build fastopd._C (see $OUT/build_ext.log): the rule rows and tests will fail"
    "$PY" - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import platform, subprocess
import torch
from importlib import metadata


def dist(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def importable(stmt):
    try:
        exec(stmt, {})
        return "importable"
    except Exception as e:  # noqa: BLE001
        return f"NOT importable ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"


try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = None
try:
    drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20).stdout.strip() or None
except Exception:  # noqa: BLE001
    drv = None
cuda = torch.cuda.is_available()
print("python", platform.python_version())
print("torch", torch.__version__)
print("cuda", torch.version.cuda)
print("triton", tv)
print("driver", drv)
print("gpu", torch.cuda.get_device_name() if cuda else None)
print("capability", ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None)
print("trl", dist("trl"), importable("from trl.trainer.distillation_trainer import _chunked_divergence_loss"))
print("liger-kernel", dist("liger-kernel"), importable("from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss"))
print("nltk", dist("nltk"), "| datasets", dist("datasets"), "| transformers", dist("transformers"))
print("fastopd._C", importable("import fastopd._C"))
PY
}

# the CUDA tests, the hidden-state path's first (test_aot.py is a CPU compile check: left out)
TEST_ARGS=(-v -p no:cacheprovider --junitxml="$OUT/test_cuda.xml")
"$PY" -c "import xdist" 2>/dev/null && TEST_ARGS+=(-n 4)
"$PY" -c "import pytest_timeout" 2>/dev/null && TEST_ARGS+=(--timeout 120)
TEST_FILES=(tests/kernels/test_linear_chunks.py tests/kernels/test_autograd.py tests/kernels/test_token_stats.py)
for f in tests/kernels/test_*.py; do
    [[ " ${TEST_FILES[*]} tests/kernels/test_aot.py " == *" $f "* ]] || TEST_FILES+=("$f")
done

phase setup 0 setup
# shellcheck disable=SC2086  # STATS_ARGS / LINEAR_ARGS: several words on purpose
phase stats "${STATS_S:-150}" "$PY" benchmarks/bench_token_stats.py --out-dir "$OUT" --n 16384 --v 151936 ${STATS_ARGS:-}
# shellcheck disable=SC2086
phase linear "${LINEAR_S:-180}" "$PY" benchmarks/bench_linear.py --gpu --gpu-n 16384 4096 --out-dir "$OUT" ${LINEAR_ARGS:-}
phase tests "${TEST_S:-120}" "$PY" -m pytest "${TEST_ARGS[@]}" "${TEST_FILES[@]}"
phase summary 60 "$PY" benchmarks/gpu_tables.py "$OUT" --summary
echo "total $(( $(date +%s) - start )) s; files in $OUT" | tee -a "$OUT/phases.txt"
exit "$status"
