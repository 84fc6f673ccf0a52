#!/usr/bin/env bash
# The main job end to end on the bundled sample shards (no cluster): installs the venv when missing
# (nothing else: no services, no kube-apiserver build), then `embedjob demo` writes embeddings +
# metadata + manifests under out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --venv-only
exec .venv/bin/embedjob demo "$@"
