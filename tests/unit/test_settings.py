"""Unit tests of the probe settings (environment variables, validation messages)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mail_selfcheck.models.settings import ProbeSettings, describe_errors

BASE = {
    "MESSAGES_SELFCHECK_FROM": "sender@example.test",
    "MESSAGES_SELFCHECK_TO": "receiver@example.test",
    "MESSAGES_SELFCHECK_SECRET": "topsecret",
    "MESSAGES_SELFCHECK_SMTP_PASSWORD": "smtp-pw-123",
    "MESSAGES_SELFCHECK_IMAP_PASSWORD": "imap-pw-456",
}


@pytest.fixture
def env(monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("MESSAGES_SELFCHECK_"):
            monkeypatch.delenv(key)

    def set_env(**values: str) -> None:
        for key, value in {**BASE, **values}.items():
            monkeypatch.setenv(key, value)

    return set_env


def test_seed_names_and_defaults(env) -> None:
    env()
    s = ProbeSettings()
    assert (s.from_address, s.to_address) == ("sender@example.test", "receiver@example.test")
    assert (s.interval, s.timeout, s.webhook_url) == (600, 60, None)
    assert (s.smtp_security, s.smtp_port_effective, s.imap_security, s.imap_port_effective) == ("starttls", 587, "tls", 993)
    assert (s.smtp_login, s.imap_login, s.imap_folder) == ("sender@example.test", "receiver@example.test", "INBOX")


@pytest.mark.parametrize(("security", "port"), [("tls", 465), ("plain", 587)])
def test_default_smtp_port_follows_security(env, security: str, port: int) -> None:
    env(MESSAGES_SELFCHECK_SMTP_SECURITY=security)
    assert ProbeSettings().smtp_port_effective == port


def test_empty_from_or_to_disables(env, monkeypatch) -> None:
    env(MESSAGES_SELFCHECK_TO="")
    assert not ProbeSettings().enabled


@pytest.mark.parametrize(
    ("override", "variable", "fragment"),
    [
        ({"MESSAGES_SELFCHECK_TO": "not-an-address"}, "MESSAGES_SELFCHECK_TO", "not a mail address"),
        ({"MESSAGES_SELFCHECK_FROM": "a@@b"}, "MESSAGES_SELFCHECK_FROM", "not a mail address"),
        ({"MESSAGES_SELFCHECK_SMTP_PORT": "70000"}, "MESSAGES_SELFCHECK_SMTP_PORT", "65535"),
        ({"MESSAGES_SELFCHECK_SMTP_SECURITY": "ssl"}, "MESSAGES_SELFCHECK_SMTP_SECURITY", "starttls"),
        ({"MESSAGES_SELFCHECK_TIMEOUT": "-1"}, "MESSAGES_SELFCHECK_TIMEOUT", "greater than 0"),
        ({"MESSAGES_SELFCHECK_SMTP_PASSWORD": ""}, "MESSAGES_SELFCHECK_SMTP_PASSWORD", "must be set"),
        ({"MESSAGES_SELFCHECK_IMAP_PASSWORD": ""}, "MESSAGES_SELFCHECK_IMAP_PASSWORD", "must be set"),
        ({"MESSAGES_SELFCHECK_SECRET": ""}, "MESSAGES_SELFCHECK_SECRET", "must be set"),
        ({"MESSAGES_SELFCHECK_WEBHOOK_URL": "ftp://x/tok-999"}, "MESSAGES_SELFCHECK_WEBHOOK_URL", "http"),
        ({"MESSAGES_SELFCHECK_TLS_CA_FILE": "/nonexistent/ca.pem"}, "MESSAGES_SELFCHECK_TLS_CA_FILE", "does not exist"),
    ],
)
def test_invalid_values_name_the_variable(env, override, variable: str, fragment: str) -> None:
    env(**override)
    with pytest.raises(ValidationError) as err:
        ProbeSettings()
    text = "\n".join(describe_errors(err.value))
    assert variable in text and fragment in text
    for secret in ("smtp-pw-123", "imap-pw-456", "topsecret", "tok-999"):
        assert secret not in text


def test_plain_smtp_may_go_without_auth(env) -> None:
    env(MESSAGES_SELFCHECK_SMTP_SECURITY="plain", MESSAGES_SELFCHECK_SMTP_PASSWORD="")
    assert ProbeSettings().smtp_password is None


def test_secrets_are_hidden_in_repr(env) -> None:
    env(MESSAGES_SELFCHECK_WEBHOOK_URL="https://hc.example/ping/tok-999")
    s = ProbeSettings()
    text = repr(s) + str(s.model_dump())
    for secret in ("smtp-pw-123", "imap-pw-456", "topsecret", "tok-999"):
        assert secret not in text
    assert set(s.secret_values()) == {"smtp-pw-123", "imap-pw-456", "topsecret", "https://hc.example/ping/tok-999"}


def test_junk_folder_names_are_comma_separated(env) -> None:
    env(MESSAGES_SELFCHECK_IMAP_JUNK_FOLDERS=" Quarantine , Junk Email,,")
    assert ProbeSettings().imap_junk_folder_names == ["Quarantine", "Junk Email"]
