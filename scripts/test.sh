#!/usr/bin/env bash
# Runs the whole test suite (lint, unit, integration with real Redis/SeaweedFS/Celery workers, and
# end-to-end through a real kube-apiserver). Installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:${EMBEDJOB_CACHE:-$HOME/.cache/embedjob}/bin:$PATH"
ruff check .
exec pytest "$@"
