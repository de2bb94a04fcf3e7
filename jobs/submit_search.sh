#!/usr/bin/env bash
# Submit `attamba search CONFIG` to a Ray cluster; see jobs/README.md.
# usage: jobs/submit_search.sh configs/search/<name>.yaml [RAY_ADDRESS]
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/submit.sh" search "$@"
