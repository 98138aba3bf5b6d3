"""EHLO names a fixed host (the FROM domain or MESSAGES_SELFCHECK_SMTP_EHLO_NAME), never a DNS lookup."""

from __future__ import annotations

import socket

import pytest
from pydantic import ValidationError

from mail_selfcheck.models.settings import ProbeSettings, describe_errors
from mail_selfcheck.probe import smtp
from tests.harness.smtpstub import SmtpStub

BASE = dict(from_address="probe@mail.example.test", to_address="b@example.test", secret="s", smtp_security="plain",
            imap_password="q", smtp_host="127.0.0.1")


@pytest.fixture
def no_fqdn(monkeypatch):
    def refuse(*_args):
        raise AssertionError("socket.getfqdn() called: a DNS lookup")

    monkeypatch.setattr(socket, "getfqdn", refuse)


@pytest.mark.parametrize(("extra", "expected"), [({}, "mail.example.test"),
                                                 ({"smtp_ehlo_name": "probe-1.example.net"}, "probe-1.example.net"),
                                                 ({"smtp_ehlo_name": "[192.0.2.7]"}, "[192.0.2.7]")])
def test_ehlo_names_the_from_domain_or_the_setting_without_dns(no_fqdn, extra, expected) -> None:
    server = SmtpStub()
    settings = ProbeSettings(**BASE, smtp_port=server.port, **extra)
    client = smtp._connect(settings, 5.0)
    client.ehlo()
    client.quit()
    assert server.lines[0] == f"ehlo {expected}"


def test_an_ehlo_name_that_is_no_host_name_is_refused_naming_the_variable() -> None:
    with pytest.raises(ValidationError) as err:
        ProbeSettings(**BASE, smtp_ehlo_name="not a host")
    assert describe_errors(err.value) == [
        "MESSAGES_SELFCHECK_SMTP_EHLO_NAME: 'not a host' is not a host name like probe.example.com "
        "or an address literal like [192.0.2.1]"]
