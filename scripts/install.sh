#!/usr/bin/env bash
# Installs the project and its engines into the current Python environment.
#   scripts/install.sh            runtime (model, pipeline, DeepSpeed, Ray, MLflow, Optuna) at the locked versions
#   scripts/install.sh --dev      plus the test tools and the Debian packages the tests use
#   scripts/install.sh --latest   the newest versions pyproject.toml's ranges allow instead of the locked ones
# The flags combine. The lock is requirements/lock-cpu.txt, or lock-cuda.txt where nvidia-smi finds a GPU; both
# are pip constraints made by scripts/lock.sh (README.md, "Dependencies").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP=("$PY" -m pip install --progress-bar off)
# PyTorch's page of CPU wheels: torch from there is never the multi-GB CUDA build that PyPI serves for Linux.
TORCH_CPU_PAGE=https://download.pytorch.org/whl/cpu/torch/

dev=0 latest=0
for arg in "$@"; do
    case $arg in
        --dev) dev=1 ;;
        --latest) latest=1 ;;
        *) echo "scripts/install.sh: unknown option '$arg'; the options are --dev and --latest" >&2; exit 2 ;;
    esac
done

gpu=0
command -v nvidia-smi >/dev/null 2>&1 && gpu=1
lock=requirements/lock-$( ((gpu)) && echo cuda || echo cpu ).txt
lock_python=$(sed -n 's/.*--python-version \([0-9.]*\).*/\1/p' "$lock" | head -n 1)
python=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if ((!latest)) && [[ $python != "$lock_python" ]]; then
    echo "note: $lock was resolved for Python $lock_python and this is $python; a pinned version without a" \
         "wheel for it may build from source (--latest resolves for this Python instead)" >&2
fi

# torch first, by itself: installed as a dependency of another package it would be PyPI's CUDA build.
if ((latest)); then
    if ((gpu)); then
        "${PIP[@]}" --upgrade torch
    else
        # --no-index: no other index may offer a CUDA build; pip's own --find-links (a local wheel folder) stay
        "${PIP[@]}" --upgrade --no-deps --no-index --find-links "$TORCH_CPU_PAGE" torch
    fi
else
    torch_pin=$(sed -n 's/^torch==\([^ ;]*\).*/\1/p' "$lock")
    if ((gpu)); then
        "${PIP[@]}" --no-deps "torch==$torch_pin"
    else  # the CPU build (a +cpu version): from pip's own sources where they hold it, else from PyTorch's page
        "${PIP[@]}" --no-deps "torch==$torch_pin" 2>/dev/null \
            || "${PIP[@]}" --no-deps --no-index --find-links "$TORCH_CPU_PAGE" "torch==$torch_pin"
    fi
fi

# From here on, pip may not replace the torch just installed (nor, below, DeepSpeed): the lock pins them, and
# with --latest a constraints file of their installed versions does.
if ((latest)); then
    held=$(mktemp)
    trap 'rm -f "$held"' EXIT
    "$PY" -m pip list --format freeze | grep -i '^torch==' > "$held"
    constraints=(-c "$held")
    upgrade=(--upgrade --upgrade-strategy eager)
else
    constraints=(-c "$lock")
    upgrade=()
fi
"${PIP[@]}" "${constraints[@]}" "${upgrade[@]}" torch setuptools wheel   # torch's own dependencies, and the build tools
# deepspeed's sdist imports torch while building: build it against the torch just installed.
deepspeed=$(grep -o '"deepspeed[^"]*"' pyproject.toml | head -n 1 | tr -d '"')   # the train extra's range
"${PIP[@]}" "${constraints[@]}" "${upgrade[@]}" --no-build-isolation "$deepspeed"
if ((latest)); then
    "$PY" -m pip list --format freeze | grep -i '^deepspeed==' >> "$held"
fi

if ((dev)); then
    "${PIP[@]}" "${constraints[@]}" "${upgrade[@]}" -e ".[dev]"
    if command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
        need=()
        command -v chromium >/dev/null 2>&1 || need+=(chromium)
        command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || need+=(postgresql)
        if (( ${#need[@]} )); then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
        fi
    fi
else
    "${PIP[@]}" "${constraints[@]}" "${upgrade[@]}" -e .
fi

# DeepSpeed JIT-compiles a small C++ op (its CPU shared-memory collectives) the first time a process group
# starts: build it once now, not inside the first training runs (cached in ~/.cache/torch_extensions).
"$PY" -c "from pipeline.train.engine import build_deepspeed_ops; print('DeepSpeed ops ready:', build_deepspeed_ops())" \
  2>&1 | grep -v "Setting accelerator to"
