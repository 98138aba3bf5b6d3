#!/usr/bin/env bash
# Build (or find in ~/.cache/mail-selfcheck) everything the real-node test tier needs
# (tests/node/, tests/harness/node.py): the Debian packages (containerd, runc, CNI plugins,
# via hack/install-system-deps.sh), the control plane (etcd, kube-apiserver,
# kube-controller-manager, kubectl, helm), the kubelet v1.35 and kube-scheduler from the
# k8s.io/kubernetes wrapper module, a static pause binary and image, the app image
# (hack/build-image.sh) and docker-archive exports of both images for containerd.
# Idempotent: a second run builds nothing (the app image build reuses buildah's layer cache).
#
# Usage (as root): hack/build-node.sh [--no-images]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
bash "$ROOT/hack/install-system-deps.sh"
cd "$ROOT"
exec "$PY" -m tests.harness.node build "$@"
