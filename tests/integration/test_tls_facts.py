"""TLS facts of a run (issue 12): protocol, cipher, earliest certificate expiry, host name match.

Against the real mail stack (Postfix submission with STARTTLS, Dovecot IMAPS) through the CLI,
and against a loopback TLS server whose certificates the test generates with short and expired
lifetimes (the probe's :func:`~mail_selfcheck.probe.tls.facts` on a real handshake).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mail_selfcheck.probe.tls import facts

pytestmark = pytest.mark.integration
CLI = str(Path(sys.executable).parent / "mail-selfcheck")


def _not_after(pem: Path) -> float:
    return x509.load_pem_x509_certificate(pem.read_bytes()).not_valid_after_utc.timestamp()


def test_every_run_reports_tls_facts_and_step_timings(mail_stack):
    env = mail_stack.probe_env()
    proc = subprocess.run([CLI, "run", "--json"], env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["success"], result
    expiry = _not_after(mail_stack.cert_file)
    for endpoint in ("smtp", "imap"):
        tls = result["tls"][endpoint]
        assert tls["version"] in ("TLSv1.2", "TLSv1.3") and tls["cipher"]
        assert tls["hostname_matched"] is True
        assert tls["not_after"] == min(expiry, _not_after(mail_stack.ca_file)), tls
    steps = result["timings"]
    assert list(steps) == ["imap_connect", "imap_login", "smtp_connect", "smtp_tls", "smtp_auth", "smtp_transaction",
                           "first_sight", "fetch_verify", "cleanup"]
    assert all(v >= 0 for v in steps.values()) and sum(steps.values()) <= result["duration"] + 0.05
    assert steps["first_sight"] == pytest.approx(result["reception_time"], abs=0.001)


def _certificate(days: float, name: str = "localhost") -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    not_after = now + dt.timedelta(days=days)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(min(now, not_after) - dt.timedelta(days=1))
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def _serve_once(tmp_path: Path, cert: bytes, key: bytes) -> int:
    (tmp_path / "c.pem").write_bytes(cert)
    (tmp_path / "k.pem").write_bytes(key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass
        listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1]


@pytest.mark.parametrize("days", [3, -2])
def test_short_and_expired_certificates_are_reported(tmp_path, days):
    """A certificate expiring in 3 days, or expired 2 days ago (seen with verification off, as a lab would)."""
    cert, key = _certificate(days)
    port = _serve_once(tmp_path, cert, key)
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        got = facts(tls, "localhost")
        tls.send(b"x")
    expected = x509.load_pem_x509_certificate(cert).not_valid_after_utc.timestamp()
    assert got.not_after == expected
    assert (got.not_after - dt.datetime.now(dt.timezone.utc).timestamp()) / 86400 == pytest.approx(days, abs=0.01)
    assert got.hostname_matched is True


def test_a_certificate_for_another_name_is_noticed(tmp_path):
    cert, key = _certificate(30, name="mail.example.test")
    port = _serve_once(tmp_path, cert, key)
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        assert facts(tls, "localhost").hostname_matched is False
        assert facts(tls, "mail.example.test").hostname_matched is True
        tls.send(b"x")
