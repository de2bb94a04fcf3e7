#!/usr/bin/env bash
# Makes the locks again: exact versions of everything scripts/install.sh (and the GPU image) installs, resolved
# by uv from pyproject.toml's ranges (runtime and the train, postgres, lm-eval and dev extras) and
# requirements/{cpu,cuda}.in (the torch build, setuptools, wheel), for Linux x86_64:
#   requirements/lock-cpu.txt    Python 3.11 (CI, CPU machines), torch's CPU build
#   requirements/lock-cuda.txt   Python 3.12 (docker/Dockerfile.gpu), PyPI's CUDA torch
# usage: bash scripts/lock.sh
#   Needs uv (pip install uv) and torch importable by python3: DeepSpeed's sdist imports torch to report its
#   metadata, so it is built in this environment, without build isolation.
#   TORCH_CPU_FIND_LINKS: where torch's CPU wheels are listed, default PyTorch's CPU index page; a folder
#   holding the wheel works where that index cannot be reached.
#   Versions pinned in docker/versions.env must then agree with lock-cuda.txt (tests/test_packaging.py checks).
set -euo pipefail
cd "$(dirname "$0")/.."

torch_cpu_links=${TORCH_CPU_FIND_LINKS:-https://download.pytorch.org/whl/cpu/torch/}
common=(--extra train --extra postgres --extra lm-eval --extra dev --python-platform x86_64-manylinux_2_28
        --no-build-isolation-package deepspeed --quiet)
command -v uv >/dev/null || { echo "uv not found; install it first: python3 -m pip install uv" >&2; exit 2; }
python3 -c "import torch" 2>/dev/null || {
    echo "torch is not importable by python3; DeepSpeed's metadata needs it: bash scripts/install.sh first" >&2
    exit 2
}

lock() {  # lock NAME PYTHON WHERE [UV OPTIONS]: requirements/lock-NAME.txt, uv's output under a header
    local out="requirements/lock-$1.txt"
    # --upgrade: resolve afresh, not from the pins already in $out
    uv pip compile pyproject.toml "requirements/$1.in" "${common[@]}" --upgrade --python-version "$2" "${@:4}" -o "$out"
    { printf '%s\n' "# $out: exact versions of everything scripts/install.sh installs $3." \
        "# Made by \`bash scripts/lock.sh\` ($(uv --version | cut -d' ' -f1-2), $(date -u +%Y-%m-%d))." \
        "# scripts/install.sh and .ci/run install with it as pip constraints (-c). See README.md, \"Dependencies\"."
      cat "$out"; } > "$out.tmp"
    mv "$out.tmp" "$out"
}
lock cpu 3.11 "on a CPU machine:
# Linux x86_64, Python 3.11, torch's CPU build (its wheels found at $torch_cpu_links)" --find-links "$torch_cpu_links"
lock cuda 3.12 "where nvidia-smi finds a GPU,
# and the GPU image (docker/Dockerfile.gpu): Linux x86_64, Python 3.12, PyPI's torch (CUDA 13.0)"
echo "wrote requirements/lock-cpu.txt ($(grep -c '==' requirements/lock-cpu.txt) pins) and" \
     "requirements/lock-cuda.txt ($(grep -c '==' requirements/lock-cuda.txt) pins)"
