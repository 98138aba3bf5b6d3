"""TLS for SMTP and IMAP: the client context (RFC 8314 for implicit TLS, RFC 3207 / RFC 3501 for
STARTTLS) and the facts of each handshake (protocol, cipher, earliest certificate expiry, host
name match: RFC 6125), reported every run for certificate-expiry alerts."""

from __future__ import annotations

import functools
import os
import ssl

from ..models.result import TlsFacts
from ..models.settings import ProbeSettings


def client_context(settings: ProbeSettings) -> ssl.SSLContext:
    """The client TLS context (one per CA source, shared by the IMAP and SMTP sessions).

    Certificates and host names are verified by default against the system CAs, or only
    against ``tls_ca_file`` / ``tls_ca_pem`` when one is configured. With
    ``tls_insecure_skip_verify`` nothing is verified (explicit opt-in for labs).

    Loading the system CAs costs ~20-30 ms of CPU (Debian's ~140-certificate bundle), so a
    context is made once per process and CA source; a CA file that changes on disk (a rotated
    ConfigMap under ``run --loop``) makes a new one.

    Raises:
        ssl.SSLError: the CA bundle cannot be loaded.
    """
    if settings.tls_insecure_skip_verify:
        return _context(True, None, None, None)
    ca_file = str(settings.tls_ca_file) if settings.tls_ca_file else None
    if ca_file is None and settings.tls_ca_pem is None:
        ca_file_stamp = _stamp(ssl.get_default_verify_paths().cafile)  # the system bundle
    else:
        ca_file_stamp = _stamp(ca_file)
    return _context(False, ca_file, settings.tls_ca_pem, ca_file_stamp)


def _stamp(path: str | None) -> tuple | None:
    """Identity of the file at ``path`` (inode, size, mtime), None when there is none."""
    try:
        st = os.stat(path) if path else None
    except OSError:
        return None
    return st and (st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _context(insecure: bool, ca_file: str | None, ca_pem: str | None, _version: tuple | None) -> ssl.SSLContext:
    """A new context; ``_version`` (the CA file's inode, size and mtime) only keys the cache."""
    if insecure:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # create_default_context()'s settings without loading CAs
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if ca_file or ca_pem:
        return ssl.create_default_context(cafile=ca_file, cadata=ca_pem)
    return ssl.create_default_context()


def _chain_info(sock: ssl.SSLSocket) -> list[dict]:
    """The decoded certificates the server sent (leaf first). The chain accessors of the
    ``_ssl`` object are private before Python 3.13 (public there as ``get_verified_chain`` /
    ``get_unverified_chain``); without them, the leaf alone."""
    sslobj = getattr(sock, "_sslobj", None)
    for name in ("get_verified_chain", "get_unverified_chain"):
        getter = getattr(sock, name, None) or getattr(sslobj, name, None)
        if getter is None:
            continue
        try:
            chain = getter() or []
        except (ssl.SSLError, ValueError):
            continue
        infos = [c.get_info() for c in chain if hasattr(c, "get_info")]
        if infos:
            return infos
    leaf = sock.getpeercert()
    return [leaf] if leaf else []


def hostname_matches(cert: dict, host: str) -> bool:
    """Whether the certificate ``cert`` (``getpeercert()`` form) names ``host``: an IP address
    against its ``IP Address`` entries, a DNS name against its ``DNS`` entries (one leftmost
    ``*`` label matches one label), the subject CN only without DNS entries (RFC 6125 6.4)."""
    import ipaddress

    host = host.rstrip(".").lower()
    san = cert.get("subjectAltName") or ()
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        return any(kind == "IP Address" and ipaddress.ip_address(value.strip()) == ip for kind, value in san)
    names = [value.lower() for kind, value in san if kind == "DNS"]
    if not names:
        names = [value.lower() for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
    for name in names:
        if name == host:
            return True
        if name.startswith("*.") and "." in host and host.split(".", 1)[1] == name[2:]:
            return True
    return False


def facts(sock: object, host: str) -> TlsFacts | None:
    """The :class:`TlsFacts` of an established TLS socket (None for a plain socket).

    ``not_after`` is the earliest ``notAfter`` over the chain the server sent (Unix seconds),
    like blackbox_exporter's ``probe_ssl_earliest_cert_expiry``. With verification off the
    certificates are decoded all the same (the chain accessors do not need verification).
    """
    if not isinstance(sock, ssl.SSLSocket):
        return None
    cipher = sock.cipher()
    infos = _chain_info(sock)
    expiries = [ssl.cert_time_to_seconds(i["notAfter"]) for i in infos if i.get("notAfter")]
    return TlsFacts(
        version=sock.version(),
        cipher=cipher[0] if cipher else None,
        not_after=float(min(expiries)) if expiries else None,
        hostname_matched=hostname_matches(infos[0], host) if infos else None,
    )
