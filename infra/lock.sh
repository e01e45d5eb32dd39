#!/usr/bin/env bash
# Regenerate infra/constraints.txt, the version pins both images install with:
#
#   bash infra/lock.sh               # keep the pinned versions where they still fit
#   bash infra/lock.sh --upgrade     # move every pin to the newest release that fits
#
# Needs uv (pip install uv, or the project's dev extra). Resolves for the images' Python (3.11)
# on x86_64 Linux with glibc 2.35 (Ubuntu 22.04, the GPU image; Debian 12 has 2.36), from PyPI.
# Not pinned here: torch's CUDA libraries (cuda-*, nvidia-*, triton). Each torch build names its
# own exact versions (the +cpu build none, the +cu128 build the CUDA 12.8 ones), and PyPI's torch,
# which this resolves against, is a CUDA 13 build whose pins would clash with the cu128 one.
set -euo pipefail
cd "$(dirname "$0")/.."
uv pip compile pyproject.toml infra/requirements-image.in --extra dev \
    --python-version 3.11 --python-platform x86_64-manylinux_2_35 \
    --no-emit-package cuda-bindings --no-emit-package cuda-pathfinder --no-emit-package cuda-toolkit \
    --no-emit-package triton \
    --no-emit-package nvidia-cublas --no-emit-package nvidia-cublas-cu12 \
    --no-emit-package nvidia-cuda-cccl --no-emit-package nvidia-cuda-cupti \
    --no-emit-package nvidia-cuda-nvrtc --no-emit-package nvidia-cuda-nvrtc-cu12 \
    --no-emit-package nvidia-cuda-runtime --no-emit-package nvidia-cuda-runtime-cu12 \
    --no-emit-package nvidia-cudnn-cu13 --no-emit-package nvidia-cufft --no-emit-package nvidia-cufile \
    --no-emit-package nvidia-curand --no-emit-package nvidia-cusolver --no-emit-package nvidia-cusparse \
    --no-emit-package nvidia-cusparselt-cu13 --no-emit-package nvidia-nccl-cu13 \
    --no-emit-package nvidia-nvjitlink --no-emit-package nvidia-nvshmem-cu13 --no-emit-package nvidia-nvtx \
    --custom-compile-command "bash infra/lock.sh" \
    --output-file infra/constraints.txt "$@"
# Anything torch's CUDA stack brings that the list above does not name yet fails here, not in a build.
if grep -nE '^(nvidia-|cuda-|triton=)' infra/constraints.txt; then
    echo "infra/lock.sh: add the packages above to its --no-emit-package list" >&2
    exit 1
fi
