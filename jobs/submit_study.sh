#!/usr/bin/env bash
# Submit `attamba study CONFIG` to a Ray cluster; see jobs/README.md.
# usage: jobs/submit_study.sh configs/studies/<name>.yaml [RAY_ADDRESS]
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/submit.sh" study "$@"
