#!/usr/bin/env bash
# Submit `attamba <command> CONFIG` to a Ray cluster as a Ray job, shipping this working tree.
#
# usage: jobs/submit.sh {study|search|train} CONFIG [RAY_ADDRESS]
#   RAY_ADDRESS: the job server, default $RAY_ADDRESS, else http://127.0.0.1:8265.
#   ATTAMBA_HOME: an absolute folder every node shares; the job's relative out_dir and SQLite paths
#     resolve there instead of in the job's temporary working directory (refused without one).
#   ATTAMBA_HOME, MLFLOW_TRACKING_URI, ATTAMBA_OPTUNA_STORAGE, ATTAMBA_CACHE: forwarded into the job when
#     set here; unset, the job uses the cluster nodes' own values (docker/compose.yaml sets them).
#   RAY_AUTH_MODE, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH: Ray's token authentication. Unset RAY_AUTH_MODE
#     becomes "token" when a token is found (RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, else
#     ~/.ray/auth_token), as `ray start` does for the cluster itself; see jobs/README.md.
#   ATTAMBA_SUBMIT_DRY_RUN=1: print the command, one argument per line, instead of running it.
set -euo pipefail

readonly FORWARDED_VARS=(ATTAMBA_HOME MLFLOW_TRACKING_URI ATTAMBA_OPTUNA_STORAGE ATTAMBA_CACHE)

usage() {
    echo "usage: $0 {study|search|train} CONFIG [RAY_ADDRESS]" >&2
    exit 2
}

[[ $# -ge 2 && $# -le 3 ]] || usage
command_name=$1
config=$2
address=${3:-${RAY_ADDRESS:-http://127.0.0.1:8265}}

case "$command_name" in
    study | search | train) ;;
    *)
        echo "command must be one of study, search, train; got '$command_name'" >&2
        usage
        ;;
esac

if [[ -n ${ATTAMBA_HOME:-} && ${ATTAMBA_HOME} != /* ]]; then
    echo "ATTAMBA_HOME must be an absolute folder on storage every Ray node shares; got '$ATTAMBA_HOME'" >&2
    exit 2
fi

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ ! -f $config ]]; then
    echo "config file not found: '$config'; pass a YAML file such as configs/studies/<name>.yaml" >&2
    exit 2
fi
# The job runs in an uploaded copy of the repository root, so the config must be named
# relative to that root.
config_abs=$(realpath "$config")
config_rel=$(realpath --relative-to="$repo_root" "$config_abs")
if [[ $config_rel == ../* ]]; then
    echo "config must live inside the repository ($repo_root) to be shipped with the job; got '$config'" >&2
    exit 2
fi

cd "$repo_root"
runtime_env_json=$(
    python3 - "${FORWARDED_VARS[@]}" <<'PY'
import json
import os
import sys

import yaml

with open("jobs/runtime_env.yaml") as f:
    runtime_env = yaml.safe_load(f)
env_vars = runtime_env.setdefault("env_vars", {})
env_vars.update({name: os.environ[name] for name in sys.argv[1:] if os.environ.get(name)})
print(json.dumps(runtime_env))
PY
)

# A Ray 2.60 head started where a token exists (~/.ray/auth_token is written by any local Ray) requires it, but
# `ray job submit` sends it only under RAY_AUTH_MODE=token; a cluster without authentication ignores it.
auth_env=()
token_file=${RAY_AUTH_TOKEN_PATH:-${HOME:-~}/.ray/auth_token}
if [[ -z ${RAY_AUTH_MODE:-} ]] && [[ -n ${RAY_AUTH_TOKEN:-} || -s $token_file ]]; then
    auth_env=(env RAY_AUTH_MODE=token)
    token_source=$token_file
    [[ -z ${RAY_AUTH_TOKEN:-} ]] || token_source=RAY_AUTH_TOKEN
    echo "Ray token authentication: RAY_AUTH_MODE=token (token from $token_source)" >&2
fi

name=$(basename "$config_rel" .yaml)
submission_id="attamba-${command_name}-${name}-$(date -u +%Y%m%d-%H%M%S)"

cmd=(
    "${auth_env[@]}" ray job submit
    --address "$address"
    --submission-id "$submission_id"
    --runtime-env-json "$runtime_env_json"
    --working-dir .
    --no-wait
    -- attamba "$command_name" "$config_rel"
)

if [[ ${ATTAMBA_SUBMIT_DRY_RUN:-0} == 1 ]]; then
    printf '%s\n' "${cmd[@]}"
    exit 0
fi

"${cmd[@]}"
echo "follow: ${auth_env[*]:1}${auth_env[*]:+ }ray job logs -f --address $address $submission_id"
