#!/usr/bin/env bash
# Build the mail-selfcheck container image from ./Dockerfile, daemonless, with buildah.
#
# No Docker engine and no container registry are needed: the base image (Debian bookworm
# minbase + python3, the stand-in for python:3.12-slim) is made with debootstrap from the
# Debian mirror and kept, like every build layer, in a private buildah storage under
# ~/.cache/mail-selfcheck/images/ (reused when present, so warm builds only redo changed layers).
#
# Usage (as root):
#   hack/build-image.sh                  build; prints the image name (IMAGE, default localhost/mail-selfcheck:dev)
#   hack/build-image.sh base             only make sure the cached base image exists
#   hack/build-image.sh buildah ARGS...  run buildah on the same storage (inspect, run, images, rmi, push ...)
#   hack/build-image.sh constraints      regenerate constraints.txt from the dev venv (.venv)
#
# Environment:
#   IMAGE            tag of the built image (default localhost/mail-selfcheck:dev)
#   BASE_IMAGE       build from this image instead of the local debootstrap base (e.g.
#                    docker.io/library/python:3.12-slim, pulled if a registry is reachable)
#   IMAGE_CACHE      cache directory (default ~/.cache/mail-selfcheck/images)
#   DEBIAN_MIRROR    mirror for debootstrap (default: this machine's apt mirror, else deb.debian.org)
#   PIP_INDEX_URL    pip index inside the build (default: this machine's pip config, else PyPI)
#   CA_BUNDLE        CA bundle pip uses inside the build (default /etc/ssl/certs/ca-certificates.crt)
#
# Push to a registry afterwards with: hack/build-image.sh buildah push "$IMAGE" docker://REGISTRY/mail-selfcheck:TAG
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mail-selfcheck/images}
IMAGE=${IMAGE:-localhost/mail-selfcheck:dev}
SUITE=bookworm
LOCAL_BASE=localhost/mail-selfcheck-base:${SUITE}-python3
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

mkdir -p "$CACHE"
BUILDAH=(buildah --root "$CACHE/storage" --runroot "$CACHE/run" --storage-driver vfs)

log() { echo "build-image: $*" >&2; }

need() {
  local missing=()
  for cmd in "$@"; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
  if [ ${#missing[@]} -gt 0 ]; then
    log "missing ${missing[*]}: run 'make system-deps' (apt-get install buildah debootstrap)"; exit 1
  fi
}

debian_mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  # The first Debian (not -security) mirror apt uses here, deb822 or one-line format.
  local m
  m=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list 2>/dev/null \
      | grep -oE 'https?://[^ ]+/debian/?' | grep -v security | head -n1 || true)
  echo "${m:-http://deb.debian.org/debian}"
}

have_image() { "${BUILDAH[@]}" inspect --type image "$1" >/dev/null 2>&1; }

ensure_base() {
  if have_image "$LOCAL_BASE"; then log "base $LOCAL_BASE cached in $CACHE/storage"; return; fi
  need buildah debootstrap
  local mirror rootfs ctr mnt
  mirror=$(debian_mirror)
  rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  trap 'rm -rf "$rootfs"' EXIT
  mkdir -p "$CACHE/debs"
  log "debootstrap --variant=minbase $SUITE from $mirror (once; cached afterwards)"
  debootstrap --variant=minbase --cache-dir="$CACHE/debs" \
    --include=python3,python3-venv,ca-certificates "$SUITE" "$rootfs" "$mirror" >"$CACHE/debootstrap.log" 2>&1 \
    || { tail -n 30 "$CACHE/debootstrap.log" >&2; log "debootstrap failed (log: $CACHE/debootstrap.log)"; exit 1; }
  # Like the official slim images: no apt lists, no docs, no caches.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
         "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/var/log/*.log
  ctr=$("${BUILDAH[@]}" from scratch)
  mnt=$("${BUILDAH[@]}" mount "$ctr")
  cp -a "$rootfs"/. "$mnt"/
  "${BUILDAH[@]}" umount "$ctr" >/dev/null
  "${BUILDAH[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd '["python3"]' \
    --label org.opencontainers.image.description="Debian $SUITE minbase + python3 (local stand-in for python:3.12-slim)" \
    "$ctr"
  "${BUILDAH[@]}" commit --rm --quiet "$ctr" "$LOCAL_BASE" >/dev/null
  rm -rf "$rootfs"; trap - EXIT
  log "base $LOCAL_BASE committed"
}

pip_index_url() {
  if [ -n "${PIP_INDEX_URL:-}" ]; then echo "$PIP_INDEX_URL"; return; fi
  { pip3 config get global.index-url 2>/dev/null || python3 -m pip config get global.index-url 2>/dev/null; } | head -n1 || true
}

build() {
  need buildah
  local base=${BASE_IMAGE:-}
  local pull=--pull=never
  if [ -z "$base" ]; then ensure_base; base=$LOCAL_BASE; else pull=--pull=missing; fi
  local args=(--build-arg "BASE_IMAGE=$base")
  local volumes=()
  if [ -r "$CA_BUNDLE" ]; then
    # pip inside the build trusts this machine's CAs (a TLS-intercepting proxy, a private
    # index). Mounted read-only, only during RUN steps, at a path the image does not use.
    volumes+=(-v "$CA_BUNDLE:/run/build-ca.crt:ro")
    args+=(--build-arg PIP_CERT=/run/build-ca.crt)
  fi
  local index; index=$(pip_index_url)
  args+=(--build-arg "PIP_INDEX_URL=${index:-https://pypi.org/simple}")
  log "buildah bud $IMAGE (FROM $base)"
  local t0=$SECONDS
  "${BUILDAH[@]}" bud --isolation chroot "$pull" --layers --format oci \
    "${volumes[@]}" "${args[@]}" -f "$ROOT/Dockerfile" -t "$IMAGE" "$ROOT" 2>&1 | tee "$CACHE/last-build.log" >&2
  log "built $IMAGE in $((SECONDS - t0)) s"
  prune
  echo "$IMAGE"
}

# The vfs driver stores every layer as a full copy of the root filesystem (~350 MB), so the
# cache would grow by ~1 GB per source change. Keep the tagged images and the intermediate
# layer images this build made or reused (its cache for the next build); drop the rest.
prune() {
  local keep stale=() id
  keep=$(grep -oE -- '^--> (Using cache )?[0-9a-f]{11,64}' "$CACHE/last-build.log" | grep -oE '[0-9a-f]{11,64}$' | cut -c1-11 || true)
  while read -r id name; do
    [ "$name" = "<none>" ] || continue
    grep -qx "${id:0:11}" <<<"$keep" || stale+=("$id")
  done < <("${BUILDAH[@]}" images -a --no-trunc --format '{{.ID}} {{.Name}}' | sed 's/^sha256://')
  if [ ${#stale[@]} -gt 0 ]; then
    "${BUILDAH[@]}" rmi -f "${stale[@]}" >/dev/null 2>&1 || log "prune: some stale images were not removed"
    log "pruned ${#stale[@]} stale cache images"
  fi
}

# Build-system pins (pyproject [build-system] requires setuptools>=68, wheel; wheel needs packaging).
BUILD_PINS=("setuptools==84.2.1" "wheel==0.48.0" "packaging==26.4")

# constraints.txt = the exact versions installed in .venv of every runtime dependency of
# pyproject.toml, transitively (markers evaluated for CPython 3.11-3.13 on Linux), plus the
# build backend. Update: bump .venv (pip install -U -e '.[test]'), then run this.
constraints() {
  local py=${VENV_PYTHON:-$ROOT/.venv/bin/python}
  {
    echo "# Pinned runtime dependencies of pyproject.toml [project.dependencies], transitively,"
    echo "# plus the build backend. Used by the Dockerfile (PIP_CONSTRAINT). Generated from .venv by"
    echo "#   hack/build-image.sh constraints"
    echo "# Do not edit by hand."
    (cd "$ROOT" && "$py" - <<'PY'
import importlib.metadata as md
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ENVS = [{"python_version": v, "python_full_version": v + ".0", "sys_platform": "linux",
         "platform_system": "Linux", "os_name": "posix", "implementation_name": "cpython",
         "platform_python_implementation": "CPython", "platform_machine": m}
        for v in ("3.11", "3.12", "3.13") for m in ("x86_64", "aarch64")]


def applies(req, extras):
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": extra}) for env in ENVS for extra in ("", *extras))


with open("pyproject.toml", "rb") as f:
    todo = [Requirement(d) for d in tomllib.load(f)["project"]["dependencies"]]
pins, seen = {}, set()
while todo:
    req = todo.pop()
    key = (canonicalize_name(req.name), frozenset(req.extras))
    if key in seen:
        continue
    seen.add(key)
    dist = md.distribution(req.name)  # PackageNotFoundError: .venv lacks a dependency
    pins[key[0]] = dist.version
    todo += [r for r in map(Requirement, dist.requires or []) if applies(r, req.extras)]
for name in sorted(pins):
    print(f"{name}=={pins[name]}")
PY
    )
    echo "# build backend ([build-system] requires)"
    printf '%s\n' "${BUILD_PINS[@]}"
  } > "$ROOT/constraints.txt.new"
  mv "$ROOT/constraints.txt.new" "$ROOT/constraints.txt"
  log "wrote $ROOT/constraints.txt ($(grep -vc '^#' "$ROOT/constraints.txt") pins)"
}

# One build at a time per cache (the test and a developer may both build).
exec 9>"$CACHE/lock"
flock 9

case "${1:-build}" in
  build) build ;;
  base) need buildah; ensure_base ;;
  constraints) constraints ;;
  buildah) shift; exec "${BUILDAH[@]}" "$@" ;;
  -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) log "unknown command $1 (build | base | buildah ARGS...)"; exit 2 ;;
esac
