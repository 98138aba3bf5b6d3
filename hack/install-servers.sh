#!/usr/bin/env bash
# Fetch the IMAP servers of the server-matrix test tier into a cache outside the repo:
#
#   ~/.cache/mail-selfcheck/servers/cyrus/root/     Cyrus IMAP 3.6 (Debian 12 cyrus-imapd, cyrus-common)
#   ~/.cache/mail-selfcheck/servers/courier/root/   Courier-IMAP 5.0 (Debian 12 courier-imap, courier-authlib)
#   ~/.cache/mail-selfcheck/servers/greenmail/greenmail-standalone-<v>.jar  (Maven Central)
#
# The Cyrus and Courier packages conflict with the installed dovecot-imapd (and want to be
# the system's IMAP server), so they are never installed: `apt-get download` + `dpkg-deb -x`
# into the cache, together with the libraries they need that a Debian 12 base lacks (also
# unpacked, used through LD_LIBRARY_PATH). tests/harness/servers/ runs them from there with
# explicit configuration files in temporary directories. Each part is done once: a `.complete`
# stamp (listing the unpacked package versions) makes later runs a no-op (~10 ms) as long as
# the package list below is unchanged; delete the directory to refetch. GreenMail's jar is
# checked against a pinned SHA-256; Java (default-jre-headless) is apt-installed if missing.
#
# Needs: root or sudo only for `apt-get update` when the package lists are missing and to
# install Java; apt-get, dpkg-deb, curl (or wget). Running the servers needs root with mount
# namespaces (unshare/nsenter, overlayfs), as the test suite has.
# Usage: bash hack/install-servers.sh [cyrus|courier|greenmail ...]   (default: all three)
# Env: MAIL_SELFCHECK_CACHE (default ~/.cache/mail-selfcheck).
set -euo pipefail

CACHE="${MAIL_SELFCHECK_CACHE:-$HOME/.cache/mail-selfcheck}/servers"
GREENMAIL_VERSION=2.1.13
GREENMAIL_SHA256=21b361e46e8ffe83afe7915a2b01231c4a163c8d0fa5de607e32ed19732d908d
MAVEN=https://repo.maven.apache.org/maven2

# Package sets (Debian 12 "bookworm"). The libraries listed are the ones Cyrus/Courier link
# against that are not part of a base system with Postfix + Dovecot installed; the SASL
# modules (PLAIN/LOGIN, sasldb) are unpacked too so that SASL_PATH can point at them whatever
# the host has. sasl2-bin gives saslpasswd2 (writes the sasldb the harness uses).
CYRUS_PKGS=(cyrus-common cyrus-imapd libpcre3 libxapian30 libical3 sasl2-bin
            libsasl2-modules libsasl2-modules-db)
COURIER_PKGS=(courier-imap courier-base courier-authlib courier-authlib-userdb courier-authdaemon
              libcourier-unicode4 libidn12 libltdl7 libgamin0 gamin libpcre3)
# Binaries whose shared libraries must all resolve after unpacking (relative to root/).
CYRUS_BINS=(usr/lib/cyrus/bin/master usr/lib/cyrus/bin/imapd usr/lib/cyrus/bin/lmtpd
            usr/lib/cyrus/bin/ctl_cyrusdb usr/sbin/saslpasswd2)
COURIER_BINS=(usr/sbin/couriertcpd usr/lib/courier/courier/imaplogin usr/bin/imapd usr/bin/couriertls
              usr/lib/courier/courier-authlib/authdaemond usr/lib/courier/courier-authlib/makedatprog
              usr/bin/maildirmake.courier usr/libexec/gam_server)

log() { echo "install-servers: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

apt_lists_ready() {
  apt-cache show cyrus-imapd courier-imap >/dev/null 2>&1
}

ld_path() {  # the library directories of an unpacked root, for LD_LIBRARY_PATH
  local r=$1
  echo "$r/usr/lib/x86_64-linux-gnu:$r/lib/x86_64-linux-gnu:$r/usr/lib:$r/usr/lib/courier-authlib"
}

unpack_debs() {  # name, packages...
  local name=$1; shift
  local dir="$CACHE/$name"
  if [ -f "$dir/.complete" ]; then
    log "$name: cached in $dir"; return 0
  fi
  command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || die "needs apt-get and dpkg-deb (Debian 12)"
  apt_lists_ready || { log "apt package lists missing: apt-get update"; $SUDO apt-get update -qq; }
  apt_lists_ready || die "apt-cache does not know cyrus-imapd/courier-imap even after apt-get update"
  local tmp; tmp=$(mktemp -d "$CACHE/.$name.XXXXXX")
  mkdir -p "$tmp/debs" "$tmp/root"
  # apt-get download runs as _apt when it can: let it write there.
  chmod 0777 "$tmp/debs"
  log "$name: apt-get download ${*}"
  (cd "$tmp/debs" && apt-get download -q "$@" 2>&1 | grep -v '^Get:\|unsandboxed' >&2 || true)
  local deb
  for p in "$@"; do
    deb=$(ls "$tmp/debs/${p}"_*.deb 2>/dev/null | head -1)
    [ -n "$deb" ] || die "$name: apt-get download $p produced no .deb"
    dpkg-deb -x "$deb" "$tmp/root"
    dpkg-deb --show --showformat='${Package}=${Version}\n' "$deb" >> "$tmp/versions"
  done
  rm -rf "$tmp/debs"
  echo "$tmp"
}

check_libs() {  # dir, bins...
  local dir=$1; shift
  local missing="" b
  for b in "$@"; do
    [ -x "$dir/root/$b" ] || die "missing binary $dir/root/$b after unpacking"
    m=$(LD_LIBRARY_PATH=$(ld_path "$dir/root") ldd "$dir/root/$b" 2>&1 | grep 'not found' || true)
    [ -z "$m" ] || missing+="$b: $m"$'\n'
  done
  [ -z "$missing" ] || die "unresolved shared libraries (add their packages to this script):"$'\n'"$missing"
}

install_debs() {  # name, bins-array-name, packages...
  local name=$1 bins_var=$2; shift 2
  local -n bins=$bins_var
  # Cached when complete and unpacked from the same package list as this script's.
  if [ -f "$CACHE/$name/.complete" ] && [ "$(cat "$CACHE/$name/.packages" 2>/dev/null)" = "$*" ]; then
    log "$name: cached in $CACHE/$name"; return 0
  fi
  rm -f "$CACHE/$name/.complete"
  local t0=$SECONDS tmp
  tmp=$(unpack_debs "$name" "$@")
  check_libs "$tmp" "${bins[@]}"
  echo "$*" > "$tmp/.packages"
  mv "$tmp/versions" "$tmp/.complete"
  rm -rf "$CACHE/$name"
  mv "$tmp" "$CACHE/$name"
  log "$name: unpacked into $CACHE/$name in $((SECONDS - t0)) s: $(paste -sd' ' "$CACHE/$name/.complete")"
}

install_greenmail() {
  local dir="$CACHE/greenmail" jar="greenmail-standalone-$GREENMAIL_VERSION.jar"
  if [ -f "$dir/$jar" ] && echo "$GREENMAIL_SHA256  $dir/$jar" | sha256sum -c --quiet - 2>/dev/null; then
    log "greenmail: cached in $dir/$jar"; return 0
  fi
  mkdir -p "$dir"
  local url="$MAVEN/com/icegreen/greenmail-standalone/$GREENMAIL_VERSION/$jar"
  log "greenmail: downloading $url"
  if command -v curl >/dev/null; then
    curl -fsSL --retry 3 -o "$dir/$jar.part" "$url"
  else
    wget -q -O "$dir/$jar.part" "$url"
  fi
  echo "$GREENMAIL_SHA256  $dir/$jar.part" | sha256sum -c --quiet - || die "greenmail: SHA-256 mismatch for $url"
  mv "$dir/$jar.part" "$dir/$jar"
}

ensure_java() {  # GreenMail 2.1 needs Java >= 11; Debian 12's default is OpenJDK 17.
  command -v java >/dev/null && return 0
  log "greenmail: no java on PATH: apt-get install default-jre-headless"
  apt-cache show default-jre-headless >/dev/null 2>&1 || $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends default-jre-headless >/dev/null
}

mkdir -p "$CACHE"
# One installer at a time (parallel test runs share the cache).
exec 9>"$CACHE/.lock"
flock 9
want=("$@"); [ ${#want[@]} -gt 0 ] || want=(cyrus courier greenmail)
for w in "${want[@]}"; do
  case "$w" in
    cyrus) install_debs cyrus CYRUS_BINS "${CYRUS_PKGS[@]}" ;;
    courier) install_debs courier COURIER_BINS "${COURIER_PKGS[@]}" ;;
    greenmail) install_greenmail; ensure_java ;;
    *) die "unknown part '$w' (cyrus, courier, greenmail)" ;;
  esac
done
