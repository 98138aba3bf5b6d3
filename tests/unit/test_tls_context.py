"""One TLS client context per CA source: loading CAs is the costly part of making one (issue 13)."""

from __future__ import annotations

import re
import ssl
from pathlib import Path

import pytest

from mail_selfcheck.models.settings import ProbeSettings
from mail_selfcheck.probe.tls import client_context

SYSTEM_BUNDLE = Path(ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt")


@pytest.fixture
def pems() -> list[str]:
    assert SYSTEM_BUNDLE.is_file(), f"no system CA bundle at {SYSTEM_BUNDLE} (hack/install-system-deps.sh installs ca-certificates)"
    found = re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n", SYSTEM_BUNDLE.read_text(), re.S)
    return found[:2]


def test_imap_and_smtp_share_one_context_per_ca_file(tmp_path, pems) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text(pems[0])
    first = client_context(ProbeSettings(tls_ca_file=ca))
    assert client_context(ProbeSettings(tls_ca_file=ca)) is first
    assert first.cert_store_stats()["x509_ca"] == 1 and first.verify_mode == ssl.CERT_REQUIRED and first.check_hostname


def test_a_ca_file_that_changes_on_disk_is_loaded_again(tmp_path, pems) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text(pems[0])
    before = client_context(ProbeSettings(tls_ca_file=ca))
    ca.write_text(pems[0] + pems[1])  # a rotated ConfigMap under `run --loop`
    after = client_context(ProbeSettings(tls_ca_file=ca))
    assert after is not before and after.cert_store_stats()["x509_ca"] == 2


def test_ca_pem_text_and_the_system_cas_are_their_own_sources(pems) -> None:
    from_pem = client_context(ProbeSettings(tls_ca_pem=pems[1]))
    system = client_context(ProbeSettings())
    assert from_pem.cert_store_stats()["x509_ca"] == 1
    assert system is not from_pem and system is client_context(ProbeSettings())


def test_skip_verify_loads_no_ca_and_verifies_nothing() -> None:
    ctx = client_context(ProbeSettings(tls_insecure_skip_verify=True))
    assert (ctx.verify_mode, ctx.check_hostname) == (ssl.CERT_NONE, False)
    assert ctx.cert_store_stats()["x509_ca"] == 0 and ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
