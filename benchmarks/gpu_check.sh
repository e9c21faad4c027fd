#!/usr/bin/env bash
# One command for a session with a GPU: the CUDA kernel tests, then the full kernel benchmark.
# Everything is written under $OUT (default benchmarks/results). Target: < 8 minutes on one H100.
#
#   bash benchmarks/gpu_check.sh            # or: OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Files: test_kernels_cuda.log / .xml (pytest), token_stats_<device>.json / .md (benchmark, written after
# every row, so a time limit still leaves the rows done), bench.log, nvidia_smi.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
unset TRITON_INTERPRET                    # compiled kernels on CUDA tensors
export TRITON_DEFAULT_FP_FUSION=1         # Triton 3.9's default, stated to silence its warning
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi > "$OUT/nvidia_smi.txt" 2>&1 || echo "no nvidia-smi" > "$OUT/nvidia_smi.txt"
start=$(date +%s)

# 1. correctness on CUDA (~35 stats + ~13 backward kernel specialisations to JIT-compile: ~2 min)
timeout 270 python -m pytest tests/test_kernels.py -q -x -p no:cacheprovider \
    --junitxml="$OUT/test_kernels_cuda.xml" 2>&1 | tee "$OUT/test_kernels_cuda.log"
test_status=${PIPESTATUS[0]}
echo "tests: exit $test_status after $(( $(date +%s) - start )) s" | tee -a "$OUT/test_kernels_cuda.log"

# 2. benchmark: bf16, K=16, N in {1024, 4096, 16384}, V in {32768, 151936}; Triton rows first
timeout 240 python benchmarks/bench_token_stats.py --out-dir "$OUT" 2>&1 | tee "$OUT/bench.log"
bench_status=${PIPESTATUS[0]}
echo "bench: exit $bench_status, total $(( $(date +%s) - start )) s" | tee -a "$OUT/bench.log"

[ "$test_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
