"""OAuth2 token acquisition against a real authorization server (Authlib's server classes, HTTPS on loopback).

Grants ``client_credentials`` and ``refresh_token``; a wrong client secret, a revoked refresh
token, a failing (503) and an unreachable token endpoint each give their own error class and
a message without any secret. The server is :mod:`tests.harness.oauth2server`, its TLS
certificate the mail stack's (a throw-away CA the probe is told about).
"""

from __future__ import annotations

import pytest

from mail_selfcheck.probe.auth import OAuth2Config, TokenError, fetch
from tests.harness.controlplane import free_port
from tests.harness.oauth2server import OAuth2Server

pytestmark = pytest.mark.integration

SECRET = "app-secret-7f3a9c"


@pytest.fixture
def oauth2(mail_stack_session):
    server = OAuth2Server(str(mail_stack_session.cert_file), str(mail_stack_session.key_file)).start()
    server.add_client("monitor", SECRET, domain="example.test")
    yield server
    server.stop()


def config(server: OAuth2Server, ca: str, **over) -> OAuth2Config:
    values = dict(provider="generic", token_url=server.token_url, client_id="monitor", client_secret=SECRET,
                  scope="mail", ca_file=ca)
    values.update(over)
    return OAuth2Config(**values)


def test_client_credentials_and_refresh_token(oauth2, mail_stack_session):
    ca = str(mail_stack_session.ca_file)
    app_only = fetch(config(oauth2, ca), "imap", "receiver@example.test", timeout=10)
    assert oauth2.tokens[app_only.value].domain == "example.test" and app_only.expires_in == 600
    refresh = oauth2.issue_refresh_token("monitor", "receiver@example.test")
    delegated = fetch(config(oauth2, ca, refresh_tokens={"imap": refresh}), "imap", "receiver@example.test", timeout=10)
    assert oauth2.tokens[delegated.value].user == "receiver@example.test"
    assert [r["grant_type"] for r in oauth2.requests] == ["client_credentials", "refresh_token"]
    assert all(r["basic_auth"] for r in oauth2.requests), "client_secret_basic (RFC 6749 2.3.1)"


def test_wrong_secret_and_revoked_refresh_token(oauth2, mail_stack_session):
    ca = str(mail_stack_session.ca_file)
    with pytest.raises(TokenError) as info:
        fetch(config(oauth2, ca, client_secret="not-the-secret"), "imap", "receiver@example.test", timeout=10)
    assert info.value.error_class == "oauth2_invalid_client" and "check the client ID" in str(info.value)
    assert "not-the-secret" not in str(info.value)
    refresh = oauth2.issue_refresh_token("monitor", "receiver@example.test")
    oauth2.revoke(refresh)
    with pytest.raises(TokenError) as info:
        fetch(config(oauth2, ca, refresh_tokens={"smtp": refresh}), "smtp", "sender@example.test", timeout=10)
    assert info.value.error_class == "oauth2_invalid_grant" and "revoked or expired" in str(info.value)
    assert refresh not in str(info.value)


def test_failing_endpoint_is_retried_once_then_reported(oauth2, mail_stack_session):
    oauth2.set_down()
    with pytest.raises(TokenError) as info:
        fetch(config(oauth2, str(mail_stack_session.ca_file)), "imap", "receiver@example.test", timeout=10)
    assert info.value.error_class == "oauth2_endpoint" and "HTTP 503" in str(info.value)
    assert len(oauth2.requests) == 2, "one retry of a transient failure"


def test_unreachable_endpoint(mail_stack_session):
    url = f"https://127.0.0.1:{free_port()}/token"
    with pytest.raises(TokenError) as info:
        fetch(OAuth2Config(token_url=url, client_id="c", client_secret="s", ca_file=str(mail_stack_session.ca_file)),
              "imap", "receiver@example.test", timeout=5)
    assert info.value.error_class == "oauth2_endpoint" and "unreachable: connection failed" in str(info.value)
