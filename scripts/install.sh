#!/usr/bin/env bash
# Installs the project and its engines into the current Python environment.
#   scripts/install.sh          runtime (model, pipeline, DeepSpeed, Ray, MLflow, Optuna)
#   scripts/install.sh --dev    plus the test tools and the Debian packages the tests use
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install --progress-bar off"

# torch first: an unpinned torch pulled in by another package would be the multi-GB CUDA build.
if ! $PY -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PIP torch
  else
    $PIP "torch==2.13.0" || $PIP torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
$PY -m pip install --progress-bar off setuptools wheel >/dev/null
# deepspeed's sdist imports torch while building: build it against the torch just installed.
$PY -c "import deepspeed" 2>/dev/null || $PIP --no-build-isolation "deepspeed>=0.19,<0.20"

if [[ "${1:-}" == "--dev" ]]; then
  $PIP -e ".[dev]"
  if command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
    need=()
    command -v chromium >/dev/null 2>&1 || need+=(chromium)
    command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || need+=(postgresql)
    if (( ${#need[@]} )); then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
  fi
else
  $PIP -e .
fi

# DeepSpeed JIT-compiles a small C++ op (its CPU shared-memory collectives) the first time a process group
# starts: build it once now, not inside the first training runs (cached in ~/.cache/torch_extensions).
$PY -c "from pipeline.train.engine import build_deepspeed_ops; print('DeepSpeed ops ready:', build_deepspeed_ops())" \
  2>&1 | grep -v "Setting accelerator to"
