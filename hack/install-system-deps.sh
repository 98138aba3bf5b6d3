#!/usr/bin/env bash
# Install the Debian packages the test suite and the demo need. Idempotent; run as root
# (or with sudo available). Nothing here is needed by users of the operator itself.
set -euo pipefail
# prometheus: promtool, for the alert-rule tests (tests/cluster/test_alerts.py);
# default-jre-headless: GreenMail of the server-matrix tier (hack/install-servers.sh)
pkgs=(postfix dovecot-imapd dovecot-lmtpd dovecot-sieve postgrey openssl ca-certificates procps buildah debootstrap prometheus
      default-jre-headless)
# containerd, runc, CNI plugins, iproute2, util-linux (unshare/nsenter): the real node of
# the node tier and the demo (tests/harness/node.py, hack/build-node.sh). Debian 12: containerd
# 1.6.20. curl: what `make demo` suggests for /metrics inside the node's network namespace.
pkgs+=(containerd runc containernetworking-plugins iproute2 util-linux curl)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "system-deps: all present"; exit 0
fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "system-deps: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
