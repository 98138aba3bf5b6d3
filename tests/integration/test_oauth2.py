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


# ----------------------------------------------------------------------------- the probe, end to end

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from tests.harness.oauth2_mailstack import CLIENT_ID, OAuth2MailStack  # noqa: E402

CLI = str(Path(sys.executable).parent / "mail-selfcheck")


@pytest.fixture(scope="module")
def oauth_stack():
    with OAuth2MailStack() as stack:
        yield stack


@pytest.fixture
def ostack(oauth_stack):
    oauth_stack.oauth2.reset()
    oauth_stack.clear_mailboxes()
    yield oauth_stack


def run(env: dict[str, str]) -> tuple[dict, str]:
    proc = subprocess.run([CLI, "run", "--json"], env={**os.environ, **env}, capture_output=True, text=True, timeout=90)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result, proc.stdout + proc.stderr


def assert_no_secrets(output: str, stack: OAuth2MailStack, *more: str) -> None:
    for value in (stack.client_secret, stack.oauth2.resource_secret, *stack.oauth2.tokens, *more):
        assert value not in output, "a secret or token leaked into the probe's output"


@pytest.mark.parametrize("mechanism", ["", "XOAUTH2", "OAUTHBEARER"])
def test_app_only_oauth2_end_to_end(ostack, mechanism):
    """client_credentials on both sides; SASL OAUTHBEARER by default (both offered), or the forced one."""
    env = ostack.probe_env(OAUTH2_MECHANISM=mechanism or None)
    mark = len(ostack.dovecot_log.read_text())
    result, output = run(env)
    assert result["success"] is True, result
    assert result["token_time"] > 0 and result["leftover_count"] == 0
    assert [r["grant_type"] for r in ostack.oauth2.requests] == ["client_credentials", "client_credentials"]
    assert not ostack.messages("receiver"), "the probe message was not deleted"
    logins = [line for line in ostack.dovecot_log.read_text()[mark:].splitlines() if "imap-login: Info: Login:" in line]
    assert logins and all(f"method={mechanism or 'OAUTHBEARER'}," in line for line in logins), logins
    assert_no_secrets(output, ostack)


def test_delegated_refresh_tokens_per_side(ostack):
    """FROM and TO are different accounts, each with its own refresh token."""
    smtp_rt = ostack.oauth2.issue_refresh_token(CLIENT_ID, "sender@example.test")
    imap_rt = ostack.oauth2.issue_refresh_token(CLIENT_ID, "receiver@example.test")
    env = ostack.probe_env(SMTP_OAUTH2_REFRESH_TOKEN=smtp_rt, IMAP_OAUTH2_REFRESH_TOKEN=imap_rt)
    result, output = run(env)
    assert result["success"] is True, result
    assert [r["grant_type"] for r in ostack.oauth2.requests] == ["refresh_token", "refresh_token"]
    users = {t.user for t in ostack.oauth2.tokens.values() if t.user}
    assert {"sender@example.test", "receiver@example.test"} <= users
    assert_no_secrets(output, ostack, smtp_rt, imap_rt)


def test_revoked_refresh_token(ostack):
    rt = ostack.oauth2.issue_refresh_token(CLIENT_ID, "receiver@example.test")
    ostack.oauth2.revoke(rt)
    result, output = run(ostack.probe_env(IMAP_OAUTH2_REFRESH_TOKEN=rt))
    assert result["error_class"] == "oauth2_invalid_grant", result
    assert result["error"].startswith("IMAP OAuth2 token for receiver@example.test: ") and "revoked or expired" in result["error"]
    assert_no_secrets(output, ostack, rt)


def test_wrong_client_secret(ostack):
    result, output = run(ostack.probe_env(OAUTH2_CLIENT_SECRET="wrong-secret-123"))
    assert result["error_class"] == "oauth2_invalid_client" and "check the client ID" in result["error"], result
    assert "wrong-secret-123" not in output


def test_token_endpoint_down(ostack):
    ostack.oauth2.set_down()
    result, _ = run(ostack.probe_env())
    assert result["error_class"] == "oauth2_endpoint" and "HTTP 503" in result["error"], result


def test_expired_token_is_refused_by_the_mail_server(ostack):
    ostack.oauth2.expire_on_issue = True
    result, output = run(ostack.probe_env())
    assert result["error_class"] == "oauth2_rejected", result
    assert "refused the OAuth2 token of receiver@example.test (AUTHENTICATE OAUTHBEARER)" in result["error"]
    assert "server said status invalid_token" in result["error"], result["error"]  # RFC 7628 3.2.2
    assert_no_secrets(output, ostack)


def test_token_without_the_mailbox_scope(ostack):
    ostack.oauth2.add_client("no-mail-scope", "nm-secret", scope="other", domain="example.test")
    result, output = run(ostack.probe_env(OAUTH2_CLIENT_ID="no-mail-scope", OAUTH2_CLIENT_SECRET="nm-secret",
                                          OAUTH2_SCOPE="other", OAUTH2_MECHANISM="XOAUTH2"))
    assert result["error_class"] == "oauth2_rejected", result
    # Dovecot's XOAUTH2 error challenge names the scope it wants (Google's format)
    assert "(AUTHENTICATE XOAUTH2)" in result["error"] and "server said status 401, scope mail" in result["error"], result["error"]


def test_smtp_token_refused_reports_the_decoded_challenge(ostack):
    """Only the SMTP side on a token without the scope: Postfix relays Dovecot's 334 challenge."""
    ostack.oauth2.add_client("smtp-no-scope", "sn-secret", scope="other", domain="example.test")
    env = ostack.probe_env(OAUTH2_CLIENT_ID="smtp-no-scope", OAUTH2_CLIENT_SECRET="sn-secret", OAUTH2_SCOPE="other",
                           OAUTH2_MECHANISM="XOAUTH2", IMAP_AUTH="password",
                           IMAP_PASSWORD=ostack.users["receiver"].password)
    result, _ = run(env)
    assert result["error_class"] == "oauth2_rejected", result
    assert result["error"].startswith("SMTP server 127.0.0.1:") and "535" in result["error"]
    assert "server said status 401, scope mail" in result["error"], result["error"]


def test_password_refused_on_an_oauth2_only_mailbox_says_what_to_change(ostack):
    env = ostack.probe_env(to_user="oauthonly", IMAP_AUTH="password", IMAP_PASSWORD=ostack.users["oauthonly"].password)
    result, _ = run(env)
    assert result["error_class"] == "mailbox_unavailable", result
    assert "the server also offers OAuth2: if passwords are disabled for this mailbox, use oauth2" in result["error"]
    # and the same mailbox over OAuth2 works
    result, _ = run(ostack.probe_env(to_user="oauthonly"))
    assert result["success"] is True, result


def test_rotated_or_expiring_refresh_token_is_surfaced(ostack):
    """A stateless Job cannot store a rotated refresh token: the result says so (auth_warning), as it says
    when the provider announces the refresh token's expiry; the check itself still succeeds."""
    ostack.oauth2.rotate_refresh_tokens = True
    ostack.oauth2.refresh_token_expires_in = 3 * 86400
    rt = ostack.oauth2.issue_refresh_token(CLIENT_ID, "receiver@example.test")
    result, output = run(ostack.probe_env(IMAP_OAUTH2_REFRESH_TOKEN=rt))
    assert result["success"] is True, result
    assert result["auth_warning"].startswith("imap: the refresh token expires in 3.0 days; the provider rotated"), result
    assert_no_secrets(output, ostack, rt, *ostack.oauth2.refresh_tokens)
