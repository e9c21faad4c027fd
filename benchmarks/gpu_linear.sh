#!/usr/bin/env bash
# The hidden-state loss on one GPU in under 3 minutes: the benchmark grid (bf16, N in {4096, 16384},
# V = 151936, H = 4096: linear_opd_loss vs opd_loss on logits vs TRL vs Liger), then the linear path's CUDA
# tests. Everything goes under $OUT (default benchmarks/results/gpu).
#
#   bash benchmarks/gpu_linear.sh            # or: OUT=/some/dir BENCH_ARGS="--chunk 1024" bash benchmarks/gpu_linear.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# The C++ scan (fastopd._C) is not built on a fresh machine; build it in place (pybind11 is enough).
python -c "import fastopd._C" 2>/dev/null || python setup.py -q build_ext --inplace > "$OUT/build_ext.log" 2>&1 \
    || echo "could not build fastopd._C (see $OUT/build_ext.log); tests of the release rule will fail"
start=$(date +%s)
timeout "${BENCH_S:-140}" python benchmarks/bench_linear.py --gpu --out-dir "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_linear.log"
bench_status=${PIPESTATUS[0]}
echo "bench: exit $bench_status after $(( $(date +%s) - start )) s" | tee -a "$OUT/bench_linear.log"
timeout "${TEST_S:-40}" python -m pytest -q -x -p no:cacheprovider tests/kernels/test_linear_chunks.py 2>&1 | tee "$OUT/test_linear_cuda.log"
test_status=${PIPESTATUS[0]}
echo "tests: exit $test_status, total $(( $(date +%s) - start )) s" | tee -a "$OUT/test_linear_cuda.log"
[ "$test_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
