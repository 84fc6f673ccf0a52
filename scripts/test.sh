#!/usr/bin/env bash
# Runs the whole test suite (lint, unit, integration with real Redis/SeaweedFS/Celery workers, and
# end-to-end through a real kube-apiserver, including the container images run as the chart runs them).
# Installs what is missing and builds the images first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The operator and worker images for tests/e2e/test_images_e2e.py (cached: seconds when nothing changed).
# EMBEDJOB_SKIP_IMAGE_TESTS=1 skips both, for machines without podman.
case "${EMBEDJOB_SKIP_IMAGE_TESTS:-}" in
  ""|0|false|no) scripts/build-images.sh >/dev/null \
                   || echo "test.sh: the image build FAILED (above): the image tests will fail" >&2 ;;
  *) echo "test.sh: EMBEDJOB_SKIP_IMAGE_TESTS set: no image build, image tests skipped" >&2 ;;
esac
export PATH="$PWD/.venv/bin:${EMBEDJOB_CACHE:-$HOME/.cache/embedjob}/bin:$PATH"
ruff check .
exec pytest "$@"
