"""Smoke tests of the real mail stack (tests/harness/mailstack.py) with stdlib clients only.

Each test proves one personality of the stack that the probe's integration tests rely on:
submission ports, TLS with the test CA, Junk filing by Sieve, HOLD, greylisting, tampering,
authentication failures, and stopping/starting Dovecot.
"""

from __future__ import annotations

import email
import email.policy
import imaplib
import secrets
import smtplib
import ssl
import time
from email.message import EmailMessage
from email.utils import make_msgid

import pytest

from tests.harness.mailstack import HOST, TAMPERED_HTML_LINE, MailStack

pytestmark = pytest.mark.integration


def _message(stack: MailStack, to_user: str, from_user: str = "sender") -> tuple[EmailMessage, str]:
    """A probe-like 7-bit multipart/alternative message; returns (message, token)."""
    token = f"{stack.secret}/{secrets.token_hex(16)}"
    msg = EmailMessage()
    msg["From"] = stack.users[from_user].address
    msg["To"] = stack.users[to_user].address
    msg["Subject"] = "mailstack smoke test"
    msg["Message-ID"] = make_msgid(domain="example.test")
    msg["X-Selfcheck-Token"] = token
    msg.set_content(f"Hello.\n\nSelfcheck token: {token}\n", cte="7bit")
    msg.add_alternative(f"<html><body>\n<p>Hello.</p>\n<p>Selfcheck token: <code>{token}</code></p>\n"
                        "</body></html>\n", subtype="html", cte="7bit")
    return msg, token


def _ctx(stack: MailStack) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(stack.ca_file))


def _submit(stack: MailStack, msg: EmailMessage, user: str = "sender") -> None:
    with smtplib.SMTP(HOST, stack.submission_port, timeout=10) as s:
        s.ehlo()
        assert "auth" not in s.esmtp_features, "AUTH must not be offered before STARTTLS"
        s.starttls(context=_ctx(stack))
        s.ehlo()
        s.login(stack.users[user].address, stack.users[user].password)
        s.send_message(msg)


def _imaps_fetch_all(stack: MailStack, user: str, folder: str = "INBOX") -> list[email.message.Message]:
    with imaplib.IMAP4_SSL(HOST, stack.imaps_port, ssl_context=_ctx(stack), timeout=10) as m:
        m.login(stack.users[user].address, stack.users[user].password)
        typ, _ = m.select(folder, readonly=True)
        assert typ == "OK"
        typ, data = m.uid("SEARCH", None, "ALL")
        out = []
        for uid in data[0].split():
            typ, parts = m.uid("FETCH", uid, "(BODY.PEEK[])")
            out.append(email.message_from_bytes(parts[0][1], policy=email.policy.default))
        return out


def _parts(parsed) -> dict[str, str]:
    return {p.get_content_type(): p.get_content() for p in parsed.walk() if not p.is_multipart()}


def test_starts_fast_and_has_tls_material(mail_stack: MailStack) -> None:
    assert mail_stack.startup_seconds is not None and mail_stack.startup_seconds < 10
    assert mail_stack.ca_file.read_text().startswith("-----BEGIN CERTIFICATE-----")
    env = mail_stack.probe_env()
    assert env["MESSAGES_SELFCHECK_SMTP_PORT"] == str(mail_stack.submission_port)
    assert env["MESSAGES_SELFCHECK_IMAP_PORT"] == str(mail_stack.imaps_port)
    assert env["MESSAGES_SELFCHECK_TLS_CA_FILE"] == str(mail_stack.ca_file)
    tls_env = mail_stack.probe_env("sender", "junked", "tls", "starttls", timeout=5, imap_folder=None)
    assert tls_env["MESSAGES_SELFCHECK_SMTP_PORT"] == str(mail_stack.submissions_port)
    assert tls_env["MESSAGES_SELFCHECK_IMAP_PORT"] == str(mail_stack.imap_port)
    assert tls_env["MESSAGES_SELFCHECK_TO"] == "junked@example.test"
    assert tls_env["MESSAGES_SELFCHECK_TIMEOUT"] == "5"
    assert "MESSAGES_SELFCHECK_IMAP_FOLDER" not in tls_env


def test_submission_starttls_auth_delivers_to_inbox(mail_stack: MailStack) -> None:
    msg, token = _message(mail_stack, "receiver")
    _submit(mail_stack, msg)
    mail_stack.wait_messages("receiver", count=1, timeout=10)
    [got] = _imaps_fetch_all(mail_stack, "receiver")
    assert got["X-Selfcheck-Token"] == token
    assert got["Message-ID"] == msg["Message-ID"]
    stored = mail_stack.delivery_time(msg["Message-ID"])
    assert abs(stored - time.time()) < 30
    assert mail_stack.delivery_records()[-1]["folder"] == "INBOX"


def test_submission_rejects_unauthenticated_relay_and_mail_before_starttls(mail_stack: MailStack) -> None:
    with smtplib.SMTP(HOST, mail_stack.submission_port, timeout=10) as s:
        s.ehlo()
        assert s.has_extn("starttls")
        code, _ = s.mail("sender@example.test")
        assert code == 530  # "Must issue a STARTTLS command first"
        s.starttls(context=_ctx(mail_stack))
        s.ehlo()
        assert "PLAIN" in s.esmtp_features.get("auth", "")
        s.mail("sender@example.test")
        code, reply = s.rcpt("receiver@example.test")
        assert code == 554 and b"rejected: Access denied" in reply, (code, reply)


def test_implicit_tls_submission_port(mail_stack: MailStack) -> None:
    msg, token = _message(mail_stack, "receiver")
    with smtplib.SMTP_SSL(HOST, mail_stack.submissions_port, context=_ctx(mail_stack), timeout=10) as s:
        s.login(mail_stack.users["sender"].address, mail_stack.users["sender"].password)
        s.send_message(msg)
    mail_stack.wait_messages("receiver", count=1)
    assert token in mail_stack.messages("receiver")[0].read_text()


def test_notls_port_offers_auth_without_starttls(mail_stack: MailStack) -> None:
    msg, token = _message(mail_stack, "receiver")
    with smtplib.SMTP(HOST, mail_stack.submission_notls_port, timeout=10) as s:
        s.ehlo()
        assert not s.has_extn("starttls")
        assert "PLAIN" in s.esmtp_features.get("auth", "")
        s.login(mail_stack.users["sender"].address, mail_stack.users["sender"].password)
        s.send_message(msg)
    mail_stack.wait_messages("receiver", count=1)


def test_plain_smtp_port_and_imap_starttls(mail_stack: MailStack) -> None:
    msg, token = _message(mail_stack, "receiver")
    with smtplib.SMTP(HOST, mail_stack.smtp_port, timeout=10) as s:
        s.send_message(msg)
    mail_stack.wait_messages("receiver", count=1)
    with imaplib.IMAP4(HOST, mail_stack.imap_port, timeout=10) as m:
        m.starttls(ssl_context=_ctx(mail_stack))
        m.login("receiver@example.test", mail_stack.users["receiver"].password)
        typ, data = m.select("INBOX")
        assert typ == "OK" and data == [b"1"]
        typ, caps = m.capability()
        assert b"IDLE" in caps[0] and b"UIDPLUS" in caps[0] and b"MOVE" in caps[0]
        typ, boxes = m.list()
        listing = b"\n".join(boxes)
        for flag, name in ((b"\\Junk", b"Junk"), (b"\\Trash", b"Trash"), (b"\\Sent", b"Sent")):
            assert any(flag in line and line.endswith(name) for line in boxes), listing


def test_junked_user_gets_token_mail_in_junk(mail_stack: MailStack) -> None:
    msg, token = _message(mail_stack, "junked")
    _submit(mail_stack, msg)
    mail_stack.wait_messages("junked", "Junk", count=1)
    assert mail_stack.messages("junked") == []
    [got] = _imaps_fetch_all(mail_stack, "junked", "Junk")
    assert got["X-Selfcheck-Token"] == token
    # A message without the token header stays in INBOX.
    plain = EmailMessage()
    plain["From"], plain["To"], plain["Subject"] = "sender@example.test", "junked@example.test", "hi"
    plain.set_content("no token here\n")
    _submit(mail_stack, plain)
    mail_stack.wait_messages("junked", "INBOX", count=1)


def test_held_user_mail_is_accepted_but_stays_on_hold(mail_stack: MailStack) -> None:
    msg, _ = _message(mail_stack, "held")
    _submit(mail_stack, msg)  # 250: accepted
    deadline = time.monotonic() + 5
    queue = []
    while time.monotonic() < deadline and not queue:
        queue = mail_stack.mail_queue()
        time.sleep(0.05)
    assert [(q["queue_name"], q["recipients"][0]["address"]) for q in queue] == [
        ("hold", "held@example.test")]
    time.sleep(1.5)  # more than queue_run_delay: still not delivered
    assert mail_stack.messages("held") == []
    assert mail_stack.mail_queue()[0]["queue_name"] == "hold"


def test_greylisted_user_first_rcpt_4xx_then_accepted(mail_stack: MailStack) -> None:
    msg, token = _message(mail_stack, "greylisted")
    with pytest.raises(smtplib.SMTPRecipientsRefused) as first:
        _submit(mail_stack, msg)
    code, reply = first.value.recipients["greylisted@example.test"]
    assert 400 <= code < 500 and b"Greylisted" in reply, (code, reply)
    # Other recipients are not greylisted.
    other, _ = _message(mail_stack, "receiver")
    _submit(mail_stack, other)
    time.sleep(1.2)  # postgrey --delay=1
    _submit(mail_stack, msg)
    mail_stack.wait_messages("greylisted", count=1)
    assert token in mail_stack.messages("greylisted")[0].read_text()


def test_tampered_user_gets_html_line_altered_text_intact(mail_stack: MailStack) -> None:
    msg, token = _message(mail_stack, "tampered")
    _submit(mail_stack, msg)
    mail_stack.wait_messages("tampered", count=1)
    [got] = _imaps_fetch_all(mail_stack, "tampered")
    parts = _parts(got)
    assert f"Selfcheck token: {token}" in parts["text/plain"]
    assert token not in parts["text/html"]
    assert TAMPERED_HTML_LINE in parts["text/html"]
    assert got["X-Selfcheck-Token"] == token
    # The same message to receiver is not touched.
    intact, token2 = _message(mail_stack, "receiver")
    _submit(mail_stack, intact)
    mail_stack.wait_messages("receiver", count=1)
    [got2] = _imaps_fetch_all(mail_stack, "receiver")
    assert f"<code>{token2}</code>" in _parts(got2)["text/html"]


def test_wrong_password_smtp_535_and_imap_fails(mail_stack: MailStack) -> None:
    mail_stack.set_password("sender", "new-secret")
    old = mail_stack._initial_passwords["sender"]
    with smtplib.SMTP(HOST, mail_stack.submission_port, timeout=10) as s:
        s.starttls(context=_ctx(mail_stack))
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            s.login("sender@example.test", old)
        assert e.value.smtp_code == 535
        s.login("sender@example.test", "new-secret")
    with imaplib.IMAP4_SSL(HOST, mail_stack.imaps_port, ssl_context=_ctx(mail_stack), timeout=10) as m:
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            m.login("sender@example.test", old)
    mail_stack.reset_passwords()
    with imaplib.IMAP4_SSL(HOST, mail_stack.imaps_port, ssl_context=_ctx(mail_stack), timeout=10) as m:
        m.login("sender@example.test", old)


def test_tls_without_the_ca_fails_verification(mail_stack: MailStack) -> None:
    system = ssl.create_default_context()  # system CAs only
    with pytest.raises(ssl.SSLCertVerificationError):
        smtplib.SMTP_SSL(HOST, mail_stack.submissions_port, context=system, timeout=10)
    with pytest.raises(ssl.SSLCertVerificationError):
        imaplib.IMAP4_SSL(HOST, mail_stack.imaps_port, ssl_context=system, timeout=10)
    # With the CA, both the IP and "localhost" verify.
    with smtplib.SMTP_SSL("localhost", mail_stack.submissions_port, context=_ctx(mail_stack),
                          timeout=10, source_address=None) as s:
        s.noop()


def test_stop_and_start_dovecot(mail_stack: MailStack) -> None:
    mail_stack.stop_dovecot()
    assert not mail_stack.dovecot_running()
    with pytest.raises(OSError):
        imaplib.IMAP4_SSL(HOST, mail_stack.imaps_port, ssl_context=_ctx(mail_stack), timeout=5)
    # Postfix accepts and defers while Dovecot (LMTP) is down...
    msg, token = _message(mail_stack, "receiver")
    _submit(mail_stack, msg)
    mail_stack.start_dovecot()
    # ...and delivers on the next queue run (queue_run_delay / backoff are 1-2 s).
    mail_stack.wait_messages("receiver", count=1, timeout=15)
    assert _imaps_fetch_all(mail_stack, "receiver")[0]["X-Selfcheck-Token"] == token


def test_stop_and_start_postfix(mail_stack: MailStack) -> None:
    mail_stack.stop_postfix()
    assert not mail_stack.postfix_running()
    with pytest.raises(OSError):
        smtplib.SMTP(HOST, mail_stack.submission_port, timeout=5)
    mail_stack.start_postfix()
    msg, _ = _message(mail_stack, "receiver")
    _submit(mail_stack, msg)
    mail_stack.wait_messages("receiver", count=1)


def test_reset_leaves_a_clean_state(mail_stack: MailStack) -> None:
    # Leave a mess; the next test's fixture must clean it (checked by the other tests,
    # which all assume empty mailboxes); here check the reset function directly.
    from tests.harness.mail_fixtures import reset_mail_stack

    msg, _ = _message(mail_stack, "receiver")
    _submit(mail_stack, msg)
    held, _ = _message(mail_stack, "held")
    _submit(mail_stack, held)
    mail_stack.wait_messages("receiver", count=1)
    mail_stack.set_password("receiver", "changed")
    mail_stack.stop_dovecot()
    t0 = time.monotonic()
    reset_mail_stack(mail_stack)
    assert time.monotonic() - t0 < 5
    assert mail_stack.messages("receiver") == []
    assert mail_stack.mail_queue() == []
    assert mail_stack.dovecot_running() and mail_stack.postfix_running()
    with imaplib.IMAP4_SSL(HOST, mail_stack.imaps_port, ssl_context=_ctx(mail_stack), timeout=10) as m:
        m.login("receiver@example.test", mail_stack.users["receiver"].password)
        typ, data = m.select("INBOX")
        assert data == [b"0"]
