#!/usr/bin/env bash
# One command for a session with a GPU: versions, the kernel benchmark (goal shape first, with a check
# against the fp64 reference), then the CUDA kernel tests. Everything is written under $OUT (default
# benchmarks/results). Target: about 5 minutes on one H100/H200, so a 15-minute GPU lease leaves a rerun.
#
#   bash benchmarks/gpu_check.sh            # or: OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Another Triton than the installed one (fastopd needs >= 3.4): install its wheel into a folder and put that
# folder on PYTHONPATH, which Python searches before site-packages (this script prepends only the checkout):
#   pip install --no-deps --target /tmp/tri triton==3.9.0 && PYTHONPATH=/tmp/tri bash benchmarks/gpu_check.sh
# versions.txt then shows the Triton actually imported. On a machine without network, download the wheel
# elsewhere for that machine's Python (e.g. `pip download --no-deps --only-binary=:all: --python-version 3.12
# triton==3.9.0`; the 3.6.0 and 3.8.0 wheels are 188 and 248 MB) and install it there with
# `pip install --no-index --no-deps --target /tmp/tri triton-*.whl`.
# torch.compile (the "compile" rows) runs torch's own Triton code against that Triton too, which torch was
# not built for: if those rows fail, add BENCH_ARGS="--impls triton,triton_inplace,eager".
# Every result file records the Triton, torch, CUDA and driver versions it was measured with.
#
# Files: versions.txt, nvidia_smi.txt, token_stats_<device>.json / .md (written after every row, so a time
# limit still leaves the rows done), bench.log, test_kernels_cuda.log / .xml.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
unset TRITON_INTERPRET                    # compiled kernels on CUDA tensors
export TRITON_DEFAULT_FP_FUSION=1         # Triton 3.9's default, stated to silence its warning
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# The C++ scan (fastopd._C) is not built on a fresh machine; build it in place (pybind11 is enough).
python -c "import fastopd._C" 2>/dev/null || python setup.py -q build_ext --inplace > "$OUT/build_ext.log" 2>&1 \
    || echo "could not build fastopd._C (see $OUT/build_ext.log); tests of the release rule will fail"
BENCH_S="${BENCH_S:-200}"
TEST_S="${TEST_S:-150}"

nvidia-smi > "$OUT/nvidia_smi.txt" 2>&1 || echo "no nvidia-smi" > "$OUT/nvidia_smi.txt"
python - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import platform, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| triton", tv, "| gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
PY
start=$(date +%s)

# 1. benchmark: bf16, K=16; N in {1024, 4096, 16384}, V in {32768, 151936}, the goal shape
#    (N=16384, V=151936) first with every implementation (triton, triton_inplace, eager, compile)
timeout "$BENCH_S" python benchmarks/bench_token_stats.py --out-dir "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
bench_status=${PIPESTATUS[0]}
echo "bench: exit $bench_status after $(( $(date +%s) - start )) s" | tee -a "$OUT/bench.log"

# 2. correctness on CUDA (~48 kernel specialisations to JIT-compile)
timeout "$TEST_S" python -m pytest tests/kernels/ -q -x -p no:cacheprovider \
    --junitxml="$OUT/test_kernels_cuda.xml" 2>&1 | tee "$OUT/test_kernels_cuda.log"
test_status=${PIPESTATUS[0]}
echo "tests: exit $test_status, total $(( $(date +%s) - start )) s" | tee -a "$OUT/test_kernels_cuda.log"

[ "$test_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
