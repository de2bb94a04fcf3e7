#!/usr/bin/env bash
# Does the project still work with the newest versions its ranges allow? In a fresh virtual environment (in a
# temporary folder, removed afterwards) this runs `scripts/install.sh --dev --latest`, prints each package whose
# version differs from the lock (name: locked -> latest; "-" where one side has none), then runs tests there.
# The exit status is the tests' (or the install's, when that fails).
# usage: scripts/check_latest.sh [--all | PYTEST ARGS...]
#   default: a quick set, one test file per engine (about 3 minutes on 2 cores): configs and the import layout,
#     data (datasets, tokenizers), DeepSpeed, MLflow, the report's statistics (pandas, scipy), Ray Tune with
#     Optuna (the search's searcher pickled and a Tuner restored).
#   --all: every test CI runs (python3 -m pytest, which leaves out the slow ones); other arguments go to pytest.
#   PYTHON: the interpreter the environment is made from (default python3). KEEP_VENV=1 keeps the environment.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=(tests/test_layout.py tests/pipeline/test_config.py tests/model/test_config.py tests/pipeline/data/test_data.py
       tests/pipeline/train/test_engine.py tests/pipeline/tracking/test_sync.py tests/pipeline/report/test_compare.py
       tests/pipeline/ray/test_tune_searcher.py)
if [[ ${1:-} == --all ]]; then
    shift
    tests=("$@")
elif (($#)); then
    tests=("$@")
else
    tests=("${QUICK[@]}")
fi

lock=requirements/lock-$(command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu).txt
root=$(mktemp -d -t attamba-latest-XXXXXX)
if [[ ${KEEP_VENV:-0} == 1 ]]; then
    echo "the environment stays in $root/venv"
else
    trap 'rm -rf "$root"' EXIT
fi
"${PYTHON:-python3}" -m venv "$root/venv"
venv_python=$root/venv/bin/python
if ! PYTHON=$venv_python bash scripts/install.sh --dev --latest; then
    echo "check_latest: scripts/install.sh --dev --latest failed (above); the newest versions do not install" >&2
    exit 1
fi

echo "versions that moved from $lock (locked -> latest):"
"$venv_python" -m pip list --format freeze | "$venv_python" -c '
import re
import sys

def pins(lines):
    found = {}
    for line in lines:
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if match:
            found[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return found

locked, latest = pins(open(sys.argv[1])), pins(sys.stdin)
not_locked = {"pip", "attamba-scaling"}   # the installer, and the project itself
moved = [name for name in sorted((locked.keys() | latest.keys()) - not_locked) if locked.get(name) != latest.get(name)]
none = "-"
for name in moved:
    print(f"  {name}: {locked.get(name, none)} -> {latest.get(name, none)}")
print(f"  {len(moved)} differ from the lock ({len(locked)} pins)" if moved else "  none: the lock is the newest")
' "$lock"

echo "tests: ${tests[*]:-python3 -m pytest (what CI runs)}"
PATH="$root/venv/bin:$PATH" PYTHONPATH=$PWD "$venv_python" -m pytest -q "${tests[@]}"
