#!/usr/bin/env bash
# Run HERE, where pip reaches the package registry: downloads into .whl/ (ignored by git: .gitignore's /.whl/)
# the wheels that the GPU image lacks (/work/.library/device/KINDS.md: no trl, liger-kernel, nltk) for its
# Python 3.12 on manylinux x86_64. benchmarks/gpu_check.sh installs them there into /tmp/site (on PYTHONPATH);
# the device call carries them: `carry: [".whl"]`.
#
#   bash benchmarks/gpu_wheels.sh            # or: DEST=/some/dir bash benchmarks/gpu_wheels.sh
#
# What and why (each wheel's Requires-Dist read against the image's package list; only what the benchmark's
# imports need):
#   trl 1.16.0          bench_linear's TRL row: trl.trainer.distillation_trainer._chunked_divergence_loss
#                       (trl.kernels.chunked_divergence.ChunkedDivergenceFunction). The kernel module alone
#                       cannot be imported without datasets: it imports trl/trainer/utils.py, which imports
#                       `datasets` (so does distillation_trainer.py). Its other requirements (accelerate,
#                       huggingface_hub, jinja2, numpy, packaging, pandas, psutil, pyarrow, pyyaml,
#                       transformers) are in the image; checked here: trl 1.16.0 imports with the image's
#                       transformers 5.17.0 and huggingface_hub 1.33.0.
#   datasets 5.2.0      imported by trl (above); needs dill and multiprocess, which the image lacks (filelock,
#                       numpy, pyarrow, pandas, tqdm, xxhash, fsspec, huggingface-hub, packaging, pyyaml: there)
#   dill 0.4.1, multiprocess 0.70.19   imported by datasets (multiprocess: a py312 wheel)
#   liger-kernel 0.8.5  bench_linear's Liger rows (LigerFusedLinearJSDLoss); needs torch and triton only
#   nltk 3.10.4         fastopd.segment's Punkt sentences (the release rule's segments in the tests); needs
#                       click, joblib, regex, tqdm (there) and lists defusedxml, which nltk imports only when
#                       present (nltk/xmlsec.py): not downloaded
# About 4.5 MB in all, well under the 64 MiB a device call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${DEST:-.whl}"
PKGS=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5 nltk==3.10.4)
mkdir -p "$DEST"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${PKGS[@]}"
# pip install of the folder stops on two versions of one distribution: say so rather than fail on the GPU
dups=$(for w in "$DEST"/*.whl; do basename "$w" | cut -d- -f1 | tr 'A-Z-' 'a-z_'; done | sort | uniq -d)
if [ -n "$dups" ]; then
    echo "more than one wheel of: $dups -- keep one version of each in $DEST" >&2
    exit 1
fi
ls -l "$DEST"/*.whl
echo "total: $(du -cb "$DEST"/*.whl | tail -1 | cut -f1) bytes in $DEST"
