#!/usr/bin/env bash
# Builds kube-apiserver v1.20.2 from Debian's kubernetes source package (docs/operations.md says why) and caches it
# outside the repo. Prints the binary's path. Honours KUBEBUILDER_ASSETS and PATH first.
set -euo pipefail
CACHE="${EMBEDJOB_CACHE:-$HOME/.cache/embedjob}"
BIN="$CACHE/bin/kube-apiserver"

if [ -n "${KUBEBUILDER_ASSETS:-}" ] && [ -x "$KUBEBUILDER_ASSETS/kube-apiserver" ]; then
  echo "$KUBEBUILDER_ASSETS/kube-apiserver"; exit 0
fi
if command -v kube-apiserver >/dev/null 2>&1; then command -v kube-apiserver; exit 0; fi
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi

SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
SRC=/etc/apt/sources.list.d/debian.sources
if ! grep -q '^Types: deb deb-src' "$SRC" 2>/dev/null && ! grep -rqs '^deb-src' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  $SUDO sed -i '0,/^Types: deb$/s//Types: deb deb-src/' "$SRC"
fi
$SUDO apt-get update -qq >&2
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go rsync golang-github-modern-go-reflect2-dev >&2

WORK="$CACHE/build"
rm -rf "$WORK"; mkdir -p "$WORK"; cd "$WORK"
apt-get source --download-only kubernetes >&2
tar xzf kubernetes_*.orig.tar.gz
dir=$(find . -maxdepth 1 -mindepth 1 -type d | head -1)
cd "$dir"
# The vendored reflect2 v1.0.1 makes the apiserver crash on the first custom-resource write under Go 1.19.
rm -rf vendor/github.com/modern-go/reflect2
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
make WHAT=cmd/kube-apiserver KUBE_BUILD_PLATFORMS=linux/amd64 >&2
mkdir -p "$CACHE/bin"
cp _output/bin/kube-apiserver "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
cd "$CACHE" && rm -rf "$WORK"
echo "$BIN"
