#!/usr/bin/env bash
# Builds the two images of the Dockerfile (operator, worker) on a machine with no Docker engine and no
# access to a public container registry, the way the image tests run them (tests/e2e/test_images_e2e.py):
#
#   1. a Debian bookworm base root filesystem (python3 3.11, pip, venv, passwd) made with mmdebstrap from
#      Debian's packages, set up to behave like python:3.11-slim for the Dockerfile (plain `pip install`
#      works, `python` exists), imported as localhost/embedjob-base:<recipe hash>;
#   2. a CPU torch base, localhost/embedjob-torch-cpu:<hash>: that base plus the CPU torch wheel, which is
#      bind-mounted into the build container and installed first (pip inside a build sees neither this
#      machine's pip configuration nor its wheel folder, and an unpinned torch from PyPI is the multi-GB
#      CUDA build). It stands in for the CUDA pytorch/pytorch base, exactly as TORCH_IMAGE expects: a
#      Python >= 3.11 image whose torch satisfies the `worker` extra;
#   3. `buildah bud --target operator` and `--target worker` of the unchanged Dockerfile with
#      PYTHON_IMAGE=<base> and TORCH_IMAGE=<CPU torch base>.
#
# Everything is cached outside the repo: the base tarball in $EMBEDJOB_CACHE/images (default
# ~/.cache/embedjob/images), the images in containers-storage (/var/lib/containers). Each image's tag is a
# hash of its inputs (base: the recipe below; torch base: base + wheel name; images: Dockerfile, the build
# context's files, this script, both bases), so nothing is rebuilt while they are unchanged. The Dockerfile
# builds run without --layers: buildah 1.28 reuses a cached `RUN --mount=type=bind,from=<stage>` layer when
# only that stage's files changed, and mounts a cache-hit stage as an empty folder (a stale or failed
# image). A source change therefore rebuilds both images from the two cached bases.
#
#   scripts/build-images.sh           installs buildah/podman/runc/mmdebstrap if missing, builds what is stale,
#                                     prints the two image references
#   scripts/build-images.sh --tag     prints the tag the current sources build to (builds nothing)
#
# Environment: EMBEDJOB_TORCH_WHEEL (a torch-*+cpu-cp311 wheel; default: the one in /opt/wheels, else
# downloaded once from download.pytorch.org/whl/cpu), EMBEDJOB_DEBIAN_MIRROR (default
# http://deb.debian.org/debian), EMBEDJOB_EXTRA_CA_DIR (*.crt files the base trusts, so that pip inside
# the build works behind a TLS-inspecting proxy; default /usr/local/share/ca-certificates).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${EMBEDJOB_CACHE:-$HOME/.cache/embedjob}"
IMG_CACHE="$CACHE/images"
MIRROR="${EMBEDJOB_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CA_DIR="${EMBEDJOB_EXTRA_CA_DIR:-/usr/local/share/ca-certificates}"
OPERATOR_REPO=localhost/embedjob-operator
WORKER_REPO=localhost/embedjob-worker
BASE_REPO=localhost/embedjob-base

die() { echo "build-images: ERROR: $*" >&2; exit 1; }
log() { echo "build-images: $*" >&2; }

# Files the Dockerfile's context holds (.dockerignore lets only these in).
context_files() {
  find pyproject.toml README.md embedjob crds examples/shards -type f \
    -not -path '*/__pycache__/*' -not -name '*.pyc' | LC_ALL=C sort
}

find_torch_wheel() {
  if [ -n "${EMBEDJOB_TORCH_WHEEL:-}" ]; then
    [ -f "$EMBEDJOB_TORCH_WHEEL" ] || die "EMBEDJOB_TORCH_WHEEL=$EMBEDJOB_TORCH_WHEEL is not a file"
    echo "$EMBEDJOB_TORCH_WHEEL"; return
  fi
  local w
  for w in /opt/wheels/torch-*+cpu-cp311-cp311-*.whl "$IMG_CACHE"/wheels/torch-*+cpu-cp311-cp311-*.whl; do
    [ -f "$w" ] && { echo "$w"; return; }
  done
  echo ""
}

# The base recipe is this script's base_rootfs function plus the extra CA certificates.
base_tag() {
  { declare -f base_rootfs; cat "$CA_DIR"/*.crt 2>/dev/null || true; echo "$MIRROR"; } | sha256sum | cut -c1-16
}

torch_tag() {
  { base_tag; basename "$1"; } | sha256sum | cut -c1-16
}

images_tag() {
  local wheel="$1"
  { echo "base=$(base_tag)"; echo "torch=$(torch_tag "$wheel")"; cat Dockerfile .dockerignore "$0";
    context_files | while read -r f; do echo "== $f"; cat "$f"; done; } | sha256sum | cut -c1-16
}

base_rootfs() {
  # $1: output tarball. Like python:3.11-slim: no docs/man pages, pip installs system-wide (Debian's
  # EXTERNALLY-MANAGED marker removed), `python` is python3, useradd/groupadd present.
  local out="$1" ca_hook=()
  if compgen -G "$CA_DIR/*.crt" >/dev/null; then
    ca_hook=(--customize-hook="mkdir -p \"\$1/usr/local/share/ca-certificates\"; cp $CA_DIR/*.crt \"\$1/usr/local/share/ca-certificates/\"; chroot \"\$1\" update-ca-certificates >/dev/null")
  fi
  mmdebstrap --variant=minbase --mode=root --format=tar \
    --include=python3,python3-pip,python3-venv,python-is-python3,passwd,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED' \
    "${ca_hook[@]}" \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    bookworm "$out" "$MIRROR" "deb ${MIRROR%/debian}/debian-security bookworm-security main" \
    || die "mmdebstrap failed (Debian mirror $MIRROR reachable?)"
}

if [ "${1:-}" = "--tag" ]; then
  images_tag "$(find_torch_wheel)"; exit 0
fi
[ $# -eq 0 ] || die "usage: scripts/build-images.sh [--tag]"

# -- tools ---------------------------------------------------------------------------------------------
# mmdebstrap --mode=root, and the tests' podman, use root's container storage (CI runs as root).
[ "$(id -u)" -eq 0 ] || die "run as root (sudo scripts/build-images.sh): the base is made with mmdebstrap --mode=root and the images go into root's podman storage, where the tests look"
need_apt=()
for b in buildah podman runc mmdebstrap; do command -v $b >/dev/null 2>&1 || need_apt+=("$b"); done
if [ ${#need_apt[@]} -gt 0 ]; then
  log "apt-get install ${need_apt[*]}"
  apt-get update -qq || die "apt-get update failed"
  env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" uidmap >/dev/null \
    || die "apt-get install ${need_apt[*]} failed"
fi
mkdir -p "$IMG_CACHE"
# runc cannot raise RLIMIT_NOFILE to podman's default ulimits on every machine: none by default.
CONF="$IMG_CACHE/containers.conf"
[ -f "$CONF" ] || printf '[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n' > "$CONF"
export CONTAINERS_CONF="$CONF"

# -- the torch wheel for the CPU worker ----------------------------------------------------------------
wheel=$(find_torch_wheel)
if [ -z "$wheel" ]; then
  log "downloading the CPU torch wheel (once) into $IMG_CACHE/wheels"
  mkdir -p "$IMG_CACHE/wheels"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 --platform manylinux_2_28_x86_64 \
    --index-url https://download.pytorch.org/whl/cpu -d "$IMG_CACHE/wheels" "torch==2.13.0+cpu" \
    || die "no CPU torch wheel: set EMBEDJOB_TORCH_WHEEL to a torch-*+cpu-cp311 wheel"
  wheel=$(find_torch_wheel)
  [ -n "$wheel" ] || die "downloaded no torch-*+cpu-cp311 wheel into $IMG_CACHE/wheels"
fi
wheel_dir="$IMG_CACHE/torch-wheels"
mkdir -p "$wheel_dir"
if [ ! -f "$wheel_dir/$(basename "$wheel")" ]; then
  rm -f "$wheel_dir"/*.whl
  ln "$wheel" "$wheel_dir/" 2>/dev/null || cp "$wheel" "$wheel_dir/"
fi

# -- the base image ------------------------------------------------------------------------------------
btag=$(base_tag)
BASE="$BASE_REPO:$btag"
if ! podman image exists "$BASE"; then
  tarball="$IMG_CACHE/base-$btag.tar"
  if [ ! -f "$tarball" ]; then
    log "making the Debian bookworm base root filesystem ($tarball)"
    base_rootfs "$tarball.tmp"
    mv "$tarball.tmp" "$tarball"
  fi
  log "importing $BASE"
  podman import -q \
    --change 'ENV=PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV=LANG=C.UTF-8' --change 'CMD=["python3"]' \
    "$tarball" "$BASE" >/dev/null || die "podman import $tarball failed"
fi

# -- the CPU torch base (TORCH_IMAGE) -------------------------------------------------------------------
TORCH_BASE="localhost/embedjob-torch-cpu:$(torch_tag "$wheel")"
if ! podman image exists "$TORCH_BASE"; then
  log "installing $(basename "$wheel") into $TORCH_BASE"
  ctr=$(buildah from --pull=never "$BASE")
  trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
  buildah --runtime runc run --isolation chroot --network host -v "$wheel_dir:/torch-wheels:ro" "$ctr" -- \
    env PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 pip install -q --root-user-action=ignore \
      "/torch-wheels/$(basename "$wheel")" >&2 || die "pip install of the torch wheel in the base failed (PyPI reachable?)"
  buildah run --isolation chroot "$ctr" -- python -c "import torch; print('torch', torch.__version__)" >&2 \
    || die "torch does not import in $TORCH_BASE"
  buildah commit -q --rm "$ctr" "$TORCH_BASE" >/dev/null || die "buildah commit $TORCH_BASE failed"
  trap - EXIT
fi

# -- the two images ------------------------------------------------------------------------------------
tag=$(images_tag "$wheel")
for target in operator worker; do
  repo=$OPERATOR_REPO; [ $target = worker ] && repo=$WORKER_REPO
  if podman image exists "$repo:$tag"; then
    log "$repo:$tag is up to date"
    continue
  fi
  blog="$IMG_CACHE/build-$target.log"
  log "buildah bud --target $target -> $repo:$tag (log: $blog)"
  start=$(date +%s)
  if ! buildah --runtime runc bud --isolation chroot --network host --pull=never --no-cache --force-rm \
      --build-arg PYTHON_IMAGE="$BASE" --build-arg TORCH_IMAGE="$TORCH_BASE" \
      --target $target -t "$repo:$tag" -f Dockerfile . >"$blog" 2>&1; then
    tail -n 40 "$blog" >&2
    die "buildah bud --target $target failed (last lines above; all of it in $blog)"
  fi
  log "$repo:$tag built in $(( $(date +%s) - start ))s"
  # Keep the three newest builds of each image; older source states are not needed.
  podman images --format '{{.Repository}}:{{.Tag}}' --sort created "$repo" | tail -n +4 \
    | xargs -r podman rmi >/dev/null 2>&1 || true
done
echo "$OPERATOR_REPO:$tag"
echo "$WORKER_REPO:$tag"
