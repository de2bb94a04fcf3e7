#!/usr/bin/env bash
# Entrypoint of every service in docker/compose.yaml: refuse to start while a secret is unset, still the
# placeholder of docker/.env.example, or too short to be one; otherwise run the service's command.
#
# usage: check-secrets.sh NAME... -- COMMAND [ARG...]
#   NAME: an environment variable holding a secret (its name only: values never travel in arguments).
set -euo pipefail

readonly PLACEHOLDER_PREFIX="change-me"
readonly MIN_LENGTH=12

names=()
while [[ $# -gt 0 && $1 != "--" ]]; do
    names+=("$1")
    shift
done
if [[ $# -lt 2 || ${#names[@]} -eq 0 ]]; then
    echo "usage: $0 NAME... -- COMMAND [ARG...]" >&2
    exit 2
fi
shift

bad=0
for name in "${names[@]}"; do
    value=${!name-}
    if [[ -z $value ]]; then
        echo "refusing to start: $name is not set; set it in docker/.env (see docker/.env.example)" >&2
        bad=1
    elif [[ $value == "$PLACEHOLDER_PREFIX"* ]]; then
        echo "refusing to start: $name still has its placeholder value from docker/.env.example;" \
            "replace it in docker/.env, e.g. with: python3 -c \"import secrets; print(secrets.token_hex(32))\"" >&2
        bad=1
    elif [[ ${#value} -lt $MIN_LENGTH ]]; then
        echo "refusing to start: $name is ${#value} characters long; use at least $MIN_LENGTH" >&2
        bad=1
    fi
done
[[ $bad -eq 0 ]] || exit 1
exec "$@"
