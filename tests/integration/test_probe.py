"""The probe against the real Postfix + Dovecot stack (tests/harness/mailstack.py).

Every test runs a real selfcheck: SMTP submission through Postfix, LMTP delivery by
Dovecot, IMAP detection, integrity check and cleanup. Each test uses its own secret so
leftover sweeping of one test never touches another's messages.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from email import policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from imapclient import IMAPClient

from mail_selfcheck.models.result import ProbeResult
from mail_selfcheck.models.settings import ProbeSettings
from mail_selfcheck.probe.main import run_once
from mail_selfcheck.probe.message import build_message, make_token
from mail_selfcheck.probe.report import configure_logging
from mail_selfcheck.probe.tls import client_context

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).with_name("mail-selfcheck"))


@pytest.fixture
def stack(clean_mail_stack):
    """The session's mail stack, reset to a clean state for this test."""
    return clean_mail_stack


def _env(stack, **kw) -> dict[str, str]:
    env = stack.probe_env(**{k: v for k, v in kw.items() if not k.isupper()})
    env.update({k: v for k, v in kw.items() if k.isupper()})
    env["MESSAGES_SELFCHECK_SECRET"] = "it-" + secrets.token_hex(6)
    return env


def _settings(monkeypatch, env: dict[str, str]) -> ProbeSettings:
    for key in list(os.environ):
        if key.startswith("MESSAGES_SELFCHECK_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return ProbeSettings()


def _run(monkeypatch, env: dict[str, str]) -> ProbeResult:
    configure_logging()
    return run_once(_settings(monkeypatch, env))


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MESSAGES_SELFCHECK_")}
    full.update(env)
    return subprocess.run([CLI, "run", *args], env=full, capture_output=True, text=True, timeout=120)


def _assert_no_probe_mail(stack, user: str) -> None:
    for folder in ("INBOX", "Junk", "Trash"):
        assert stack.messages(user, folder) == [], f"probe message left in {user}/{folder}"


def _assert_no_secrets(text: str, env: dict[str, str]) -> None:
    for key in ("MESSAGES_SELFCHECK_SECRET", "MESSAGES_SELFCHECK_SMTP_PASSWORD", "MESSAGES_SELFCHECK_IMAP_PASSWORD",
                "MESSAGES_SELFCHECK_WEBHOOK_URL"):
        value = env.get(key)
        if value:
            assert value not in text, f"{key} leaked"


# -- success --------------------------------------------------------------------------------


def test_success_end_to_end_via_cli(stack, tmp_path) -> None:
    env = _env(stack)
    result_file = tmp_path / "termination-log"
    proc = _cli(env, "--json", "--verbose", "--result-file", str(result_file))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["success"] is True and result["error"] is None, result
    assert 0 < result["send_time"] < 30 and 0 <= result["reception_time"] < 30
    assert json.loads(result_file.read_text()) == result
    completed = [line for line in proc.stderr.splitlines() if "selfcheck_completed" in line]
    assert len(completed) == 1 and " INFO selfcheck_completed success=true send_time=" in completed[0]
    _assert_no_secrets(proc.stdout + proc.stderr, env)
    _assert_no_probe_mail(stack, "receiver")


@pytest.mark.parametrize(
    ("smtp_security", "imap_security", "detection"),
    [("tls", "starttls", "adaptive"), ("starttls", "tls", "idle"), ("starttls", "tls", "poll")],
)
def test_success_in_every_tls_mode_and_detection(stack, monkeypatch, smtp_security, imap_security, detection) -> None:
    env = _env(stack, smtp_security=smtp_security, imap_security=imap_security,
               MESSAGES_SELFCHECK_IMAP_DETECTION=detection)
    result = _run(monkeypatch, env)
    assert result.success, result.error
    assert result.folder == "INBOX"
    _assert_no_probe_mail(stack, "receiver")


def test_plain_mode_is_an_explicit_lab_opt_in(stack, monkeypatch) -> None:
    env = _env(stack, MESSAGES_SELFCHECK_SMTP_SECURITY="plain", MESSAGES_SELFCHECK_SMTP_PORT=str(stack.submission_notls_port),
               MESSAGES_SELFCHECK_IMAP_SECURITY="plain", MESSAGES_SELFCHECK_IMAP_PORT=str(stack.imap_port))
    result = _run(monkeypatch, env)
    assert result.success, result.error


# -- failures, each precise -------------------------------------------------------------------


def test_wrong_password_for_from(stack, monkeypatch) -> None:
    env = _env(stack, MESSAGES_SELFCHECK_SMTP_PASSWORD="wrong-password-1")
    result = _run(monkeypatch, env)
    assert not result.success and result.error_class == "mailbox_unavailable"
    assert result.error.startswith("mailbox unavailable: sender@example.test cannot authenticate at SMTP server 127.0.0.1:")
    assert "535" in result.error and "wrong-password-1" not in result.to_json()


def test_wrong_password_for_to(stack, monkeypatch) -> None:
    env = _env(stack, MESSAGES_SELFCHECK_IMAP_PASSWORD="wrong-password-2")
    result = _run(monkeypatch, env)
    assert not result.success and result.error_class == "mailbox_unavailable"
    assert result.error.startswith("mailbox unavailable: receiver@example.test cannot log in at IMAP server 127.0.0.1:")
    assert "AUTHENTICATIONFAILED" in result.error and result.send_time is None  # nothing was sent


def test_smtp_server_down(stack, monkeypatch) -> None:
    stack.stop_postfix()
    result = _run(monkeypatch, _env(stack))
    assert not result.success and result.error_class == "smtp_connect"
    assert "unreachable" in result.error and "Connection refused" in result.error


def test_imap_server_down(stack, monkeypatch) -> None:
    stack.stop_dovecot()
    result = _run(monkeypatch, _env(stack))
    assert not result.success and result.error_class == "imap_connect"
    # the class is imap_connect, and so is the message (no "mailbox unavailable:" prefix since issue 12)
    assert result.error.startswith("cannot reach IMAP server 127.0.0.1:")


@pytest.mark.parametrize("smtp_security", ["starttls", "tls"])
def test_tls_verification_fails_without_the_ca(stack, monkeypatch, smtp_security) -> None:
    env = _env(stack, smtp_security=smtp_security, imap_security="plain", MESSAGES_SELFCHECK_TLS_CA_FILE="")
    env["MESSAGES_SELFCHECK_IMAP_PORT"] = str(stack.imap_port)
    result = _run(monkeypatch, env)
    assert not result.success and result.error_class == "smtp_tls"
    assert "certificate verify failed" in result.error


def test_tls_ca_as_pem_text_verifies(stack, monkeypatch) -> None:
    env = _env(stack, MESSAGES_SELFCHECK_TLS_CA_FILE="",
               MESSAGES_SELFCHECK_TLS_CA_PEM=Path(stack.ca_file).read_text())
    assert _run(monkeypatch, env).success


def test_starttls_missing_means_no_auth_in_clear(stack, monkeypatch) -> None:
    env = _env(stack, MESSAGES_SELFCHECK_SMTP_PORT=str(stack.submission_notls_port))
    result = _run(monkeypatch, env)
    assert not result.success and result.error_class == "smtp_tls"
    assert "does not offer STARTTLS" in result.error


def test_delivered_to_junk(stack, monkeypatch) -> None:
    result = _run(monkeypatch, _env(stack, to_user="junked", MESSAGES_SELFCHECK_TIMEOUT="15"))
    assert not result.success and result.error_class == "junk"
    assert result.error.startswith("delivered to junk") and result.folder == "Junk"
    _assert_no_probe_mail(stack, "junked")


def test_reception_timeout(stack, monkeypatch) -> None:
    result = _run(monkeypatch, _env(stack, to_user="held", MESSAGES_SELFCHECK_TIMEOUT="3"))
    assert not result.success and result.error_class == "timeout"
    assert result.error == "Message not received within 3 seconds"
    assert result.send_time is not None and result.reception_time is None
    assert 3 <= result.duration < 3 + 10


def test_greylisting_4xx_is_retried_to_success(stack, monkeypatch) -> None:
    result = _run(monkeypatch, _env(stack, to_user="greylisted", MESSAGES_SELFCHECK_TIMEOUT="20"))
    assert result.success, result.error
    assert result.send_time >= 1.0  # the first RCPT TO got 450, the retry came after the backoff
    _assert_no_probe_mail(stack, "greylisted")


def test_greylisting_past_the_budget_is_reported_deferred(stack, monkeypatch) -> None:
    result = _run(monkeypatch, _env(stack, to_user="greylisted", MESSAGES_SELFCHECK_TIMEOUT="0.8"))
    assert not result.success and result.error_class == "smtp_deferred"
    assert "deferred" in result.error and "450" in result.error


def test_integrity_failure_names_the_html_part(stack, monkeypatch) -> None:
    result = _run(monkeypatch, _env(stack, to_user="tampered"))
    assert not result.success and result.error_class == "integrity"
    assert "HTML part" in result.error
    _assert_no_probe_mail(stack, "tampered")


# -- cleanup -------------------------------------------------------------------------------------


def _append_old_probe_message(stack, env: dict[str, str], age: timedelta) -> None:
    token, nonce = make_token(env["MESSAGES_SELFCHECK_SECRET"])
    sent = build_message("sender@example.test", "receiver@example.test", token, nonce)
    with IMAPClient("127.0.0.1", port=stack.imaps_port, ssl_context=client_context(
            ProbeSettings(tls_ca_file=stack.ca_file))) as client:
        client.login("receiver@example.test", stack.users["receiver"].password)
        client.append("INBOX", sent.raw, msg_time=datetime.now(timezone.utc) - age)


def _token_of(path: Path) -> str:
    return str(BytesParser(policy=policy.default).parsebytes(path.read_bytes())["X-Selfcheck-Token"])


def test_leftovers_of_failed_runs_are_swept_but_recent_ones_kept(stack, monkeypatch) -> None:
    env = _env(stack)
    _append_old_probe_message(stack, env, timedelta(hours=2))
    other = {**env, "MESSAGES_SELFCHECK_SECRET": "another-probe"}
    _append_old_probe_message(stack, other, timedelta(hours=2))  # another probe's: not ours to delete
    assert len(stack.messages("receiver")) == 2
    assert _run(monkeypatch, env).success
    remaining = stack.messages("receiver")
    assert len(remaining) == 1 and b"another-probe/" in remaining[0].read_bytes()


def test_sweep_never_deletes_another_monitors_lookalike_token(stack, monkeypatch) -> None:
    """Issue 9 item 1: HEADER search is a substring match (RFC 3501 6.4.4), so the sweep's
    search for ``<secret>/`` also finds ``other-<secret>/<32 hex>``: another monitor's
    message, older than the timeout. Only an exact whole-value match may be deleted."""
    env = _env(stack)
    secret = env["MESSAGES_SELFCHECK_SECRET"]
    _append_old_probe_message(stack, env, timedelta(hours=2))  # ours: swept
    lookalike = {**env, "MESSAGES_SELFCHECK_SECRET": "other-" + secret}
    _append_old_probe_message(stack, lookalike, timedelta(hours=2))
    suffixed = {**env, "MESSAGES_SELFCHECK_SECRET": secret + "/" + "0" * 32 + "-x"}  # ours + a tail: not ours
    _append_old_probe_message(stack, suffixed, timedelta(hours=2))
    result = _run(monkeypatch, env)
    assert result.success, result.error
    tokens = sorted(_token_of(p) for p in stack.messages("receiver"))
    assert len(tokens) == 2, f"another monitor's message was deleted: {tokens}"
    assert any(t.startswith(f"other-{secret}/") for t in tokens)
    assert any(t.startswith(f"{secret}/{'0' * 32}-x/") for t in tokens)
    assert result.leftover_count == 0 and result.cleanup_warning is None


def test_other_mail_is_never_touched(stack, monkeypatch) -> None:
    import smtplib

    with smtplib.SMTP("127.0.0.1", stack.smtp_port) as smtp:
        smtp.sendmail("someone@example.org", ["receiver@example.test"], b"Subject: hello\r\n\r\nkeep me\r\n")
    stack.wait_messages("receiver", count=1)
    assert _run(monkeypatch, _env(stack)).success
    assert len(stack.messages("receiver")) == 1


# -- webhook ---------------------------------------------------------------------------------------


class _Hook(BaseHTTPRequestHandler):
    behaviour = "ok"
    requests: list = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).requests.append((self.path, self.headers.get("Content-Type"), body))
        if type(self).behaviour == "hang":
            time.sleep(15)
        self.send_response(500 if type(self).behaviour == "error" else 200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    _Hook.requests, _Hook.behaviour = [], "ok"
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, f"http://127.0.0.1:{server.server_port}/ping/tok-{secrets.token_hex(4)}"
    server.shutdown()


def test_webhook_gets_exactly_the_documented_body_on_success(stack, webhook) -> None:
    _, url = webhook
    env = _env(stack, MESSAGES_SELFCHECK_WEBHOOK_URL=url)
    proc = _cli(env, "--json")
    result = json.loads(proc.stdout)
    assert result["success"], result
    assert len(_Hook.requests) == 1
    path, content_type, body = _Hook.requests[0]
    assert path == url.split(str(webhook[0].server_port))[1] and content_type == "application/json"
    assert json.loads(body) == {"send_time": result["send_time"], "reception_time": result["reception_time"]}
    _assert_no_secrets(proc.stdout + proc.stderr, env)


def test_webhook_not_called_on_failure(stack, webhook) -> None:
    env = _env(stack, MESSAGES_SELFCHECK_WEBHOOK_URL=webhook[1], MESSAGES_SELFCHECK_IMAP_PASSWORD="wrong")
    proc = _cli(env, "--json")
    assert json.loads(proc.stdout)["success"] is False
    assert _Hook.requests == []


@pytest.mark.parametrize("behaviour", ["error", "hang"])
def test_webhook_failure_never_fails_the_check(stack, webhook, behaviour) -> None:
    _Hook.behaviour = behaviour
    env = _env(stack, MESSAGES_SELFCHECK_WEBHOOK_URL=webhook[1])
    proc = _cli(env, "--json")
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["success"] is True
    assert "WARNING webhook_failed" in proc.stderr
    _assert_no_secrets(proc.stdout + proc.stderr, env)


def test_loop_mode_repeats_every_interval(stack) -> None:
    env = _env(stack, MESSAGES_SELFCHECK_INTERVAL="3", MESSAGES_SELFCHECK_TIMEOUT="2.5")
    full = {k: v for k, v in os.environ.items() if not k.startswith("MESSAGES_SELFCHECK_")}
    full.update(env)
    proc = subprocess.Popen([CLI, "run", "--loop", "--json"], env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr.read()
    assert all(line and json.loads(line)["success"] for line in lines), lines


def test_starttls_against_an_implicit_tls_port_says_so(stack, monkeypatch) -> None:
    env = _env(stack, MESSAGES_SELFCHECK_SMTP_PORT=str(stack.submissions_port), MESSAGES_SELFCHECK_TIMEOUT="2")
    result = _run(monkeypatch, env)
    assert not result.success and result.error_class == "smtp_connect"
    assert "sent no greeting" in result.error and "implicit TLS" in result.error


def test_implicit_tls_against_a_starttls_port_says_so(stack, monkeypatch) -> None:
    env = _env(stack, MESSAGES_SELFCHECK_SMTP_SECURITY="tls", MESSAGES_SELFCHECK_SMTP_PORT=str(stack.submission_port))
    result = _run(monkeypatch, env)
    assert not result.success and result.error_class == "smtp_tls"
    assert "WRONG_VERSION_NUMBER" in result.error and "wrong port or security mode" in result.error


def test_loop_refuses_a_timeout_not_below_the_interval(stack) -> None:
    proc = _cli(_env(stack, MESSAGES_SELFCHECK_INTERVAL="10", MESSAGES_SELFCHECK_TIMEOUT="10"), "--loop")
    assert proc.returncode == 2 and "smaller than MESSAGES_SELFCHECK_INTERVAL" in proc.stderr


def test_server_without_uidplus_move_idle_or_special_use(stack, monkeypatch) -> None:
    """An IMAP server advertising only IMAP4rev1: detection falls back to polling, Junk/Trash
    are found by name, and cleanup only flags the probe message \\Deleted (with a warning):
    no bare EXPUNGE, so another client's \\Deleted message survives."""
    with IMAPClient("127.0.0.1", port=stack.imaps_port,
                    ssl_context=client_context(ProbeSettings(tls_ca_file=stack.ca_file))) as client:
        client.login(stack.users["legacy"].address, stack.users["legacy"].password)
        assert client.capabilities() == (b"IMAP4REV1",)
        client.append("INBOX", b"Subject: flagged by another client\r\n\r\nkeep\r\n", flags=[b"\\Deleted"])
    result = _run(monkeypatch, _env(stack, to_user="legacy"))
    assert result.success, result.error
    assert result.cleanup_warning and "only flagged \\Deleted" in result.cleanup_warning
    bodies = [p.read_bytes() for p in stack.messages("legacy")]
    assert len(bodies) == 2  # nothing was expunged: the other client's message and ours (flagged)
    assert any(b"flagged by another client" in b for b in bodies)
    ours = [p for p in stack.messages("legacy") if b"X-Selfcheck-Token" in p.read_bytes()]
    assert len(ours) == 1 and "T" in ours[0].name.rsplit(",", 1)[-1]  # Maildir flag T = \Deleted
    assert result.leftover_count == 1 and "other clients" in result.cleanup_warning


@pytest.mark.parametrize("imap_security", ["starttls", "plain"])
def test_imap_starttls_or_plain_against_an_implicit_tls_port_says_so(stack, monkeypatch, imap_security) -> None:
    """Issue 9 item 9: Dovecot's IMAPS port waits for a TLS ClientHello and sends no greeting;
    the probe waited its whole timeout and said ``cannot reach ...: timed out``."""
    env = _env(stack, MESSAGES_SELFCHECK_IMAP_SECURITY=imap_security,
               MESSAGES_SELFCHECK_IMAP_PORT=str(stack.imaps_port), MESSAGES_SELFCHECK_TIMEOUT="20")
    result = _run(monkeypatch, env)
    assert not result.success and result.error_class == "imap_connect"
    assert "sent no greeting within 5 seconds" in result.error and "implicit TLS" in result.error, result.error
    assert result.duration < 8 and result.send_time is None


def test_wrong_smtp_password_costs_one_auth_attempt_and_shows_its_reply(stack, monkeypatch) -> None:
    """Issue 9 item 10: smtplib's ``login()`` tries PLAIN, then LOGIN: two failed logins per
    run (fail2ban-style lockouts) and the error shows the last reply. One AUTH, one reply."""
    env = _env(stack, MESSAGES_SELFCHECK_SMTP_PASSWORD="wrong-password-3")
    mark = len(stack.postfix_log.read_text().splitlines())
    result = _run(monkeypatch, env)
    time.sleep(0.3)  # smtpd logs the disconnect after QUIT
    lines = stack.postfix_log.read_text().splitlines()[mark:]
    assert sum("authentication failed" in line for line in lines) == 1, lines
    assert any("auth=0/1" in line for line in lines), lines
    assert not result.success and result.error_class == "mailbox_unavailable"
    assert "(AUTH PLAIN): 535 5.7.8" in result.error and result.smtp_reply.startswith("535 5.7.8")


def test_imap_temporary_authentication_failure_has_its_own_class(stack, monkeypatch) -> None:
    """Issue 9 item 11: the server's authentication backend fails (Dovecot: ``NO [UNAVAILABLE]
    Temporary authentication failure``, RFC 5530 3): not a wrong password."""
    result = _run(monkeypatch, _env(stack, to_user="authbroken"))
    assert not result.success and result.error_class == "auth_temporary", result.error
    assert "temporary authentication failure" in result.error and "[UNAVAILABLE]" in result.error
    assert result.send_time is None


def test_starttls_accepted_then_clear_text_does_not_blame_the_port(stack, monkeypatch) -> None:
    """Issue 9 item 11: the server (here a middlebox in front of Postfix) accepts STARTTLS with
    220 and then answers in clear text: the port and mode are right, say so."""
    from tests.harness.imapproxy import StarttlsStripper

    with StarttlsStripper(stack) as middlebox:
        result = _run(monkeypatch, _env(stack, MESSAGES_SELFCHECK_SMTP_PORT=str(middlebox.port)))
    assert not result.success and result.error_class == "smtp_tls", result.error
    assert "WRONG_VERSION_NUMBER after the server accepted STARTTLS" in result.error
    assert "wrong port" not in result.error


def test_smtp_auth_none_submits_to_an_mx_port_without_auth(stack, monkeypatch) -> None:
    """MESSAGES_SELFCHECK_SMTP_AUTH=none: no AUTH at all (an MX port 25, a relay by IP), no SMTP password needed."""
    env = _env(stack, smtp_security="plain", MESSAGES_SELFCHECK_SMTP_PORT=str(stack.smtp_port),
               MESSAGES_SELFCHECK_SMTP_AUTH="none")
    env.pop("MESSAGES_SELFCHECK_SMTP_PASSWORD")
    result = _run(monkeypatch, env)
    assert result.success, result
    assert not stack.messages("receiver"), "the probe message was not deleted"


def test_smtp_auth_none_still_requires_starttls_when_asked(stack, monkeypatch) -> None:
    """STARTTLS rules stay as they are with auth none: starttls on a port without it is refused."""
    env = _env(stack, smtp_security="starttls", MESSAGES_SELFCHECK_SMTP_PORT=str(stack.submission_notls_port),
               MESSAGES_SELFCHECK_SMTP_AUTH="none")
    env.pop("MESSAGES_SELFCHECK_SMTP_PASSWORD")
    result = _run(monkeypatch, env)
    assert result.error_class == "smtp_tls" and "does not offer STARTTLS" in result.error, result
