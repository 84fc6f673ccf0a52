#!/usr/bin/env bash
# The main job end to end on the bundled sample shards (no cluster): installs what is missing, then
# `embedjob demo` writes embeddings + metadata + manifests under out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/embedjob demo "$@"
