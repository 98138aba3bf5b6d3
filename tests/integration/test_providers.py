"""Provider behaviour no local server has, reproduced by the scripted IMAP proxy
(tests/harness/imapproxy.py) in front of the real Dovecot; mail goes through the real
Postfix. Each test names the documentation or issue it reproduces (issue 9 of this repo).
Data-safety tests plant foreign mail and assert it is untouched.
"""

from __future__ import annotations

import os
import secrets
from datetime import datetime, timedelta, timezone
from email import policy
from email.parser import BytesParser
from pathlib import Path

import pytest
from imapclient import IMAPClient

from mail_selfcheck.models.result import ProbeResult
from mail_selfcheck.models.settings import ProbeSettings
from mail_selfcheck.probe.main import run_once
from mail_selfcheck.probe.message import build_message, make_token
from mail_selfcheck.probe.report import configure_logging
from mail_selfcheck.probe.tls import client_context
from tests.harness import imapproxy

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(clean_mail_stack):
    return clean_mail_stack


@pytest.fixture
def proxied(stack):
    """``start(personality, user="receiver", **env) -> (proxy, env)``: a proxy in front of
    Dovecot and the probe environment that goes through it (IMAP ``plain`` to the proxy)."""
    proxies = []

    def start(personality, user: str = "receiver", **overrides):
        proxy = imapproxy.ImapProxy(stack, personality).start()
        proxies.append(proxy)
        env = stack.probe_env(to_user=user, imap_security="plain", imap_port=proxy.port)
        env.update({k: str(v) for k, v in overrides.items()})
        env["MESSAGES_SELFCHECK_SECRET"] = "pv-" + secrets.token_hex(6)
        return proxy, env

    yield start
    for proxy in proxies:
        proxy.stop()


def _run(monkeypatch, env: dict[str, str]) -> ProbeResult:
    for key in list(os.environ):
        if key.startswith("MESSAGES_SELFCHECK_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    configure_logging()
    return run_once(ProbeSettings())


def _direct(stack, user: str) -> IMAPClient:
    """A session straight to Dovecot (IMAPS, not through the proxy) for planting mail."""
    client = IMAPClient("127.0.0.1", port=stack.imaps_port,
                        ssl_context=client_context(ProbeSettings(tls_ca_file=stack.ca_file)))
    client.login(stack.users[user].address, stack.users[user].password)
    return client


def _plant(stack, user: str, folder: str, token: str, age: timedelta = timedelta(hours=2), flags=()) -> None:
    nonce = token.rsplit("/", 1)[-1]
    sent = build_message("sender@example.test", stack.users[user].address, token, nonce)
    with _direct(stack, user) as client:
        client.append(folder, sent.raw, flags=flags, msg_time=datetime.now(timezone.utc) - age)


def _old_token(secret: str) -> str:
    return make_token(secret)[0]


def _tokens(stack, user: str, folder: str) -> list[str]:
    out = []
    for path in stack.messages(user, folder):
        value = BytesParser(policy=policy.default).parsebytes(path.read_bytes())["X-Selfcheck-Token"]
        if value is not None:
            out.append(str(value))
    return out


def _flags(path: Path) -> str:
    return path.name.rsplit(",", 1)[-1] if ":2," in path.name else ""


def _foreign_deleted(stack, user: str, folder: str) -> None:
    with _direct(stack, user) as client:
        client.append(folder, b"Subject: flagged by another client\r\n\r\nkeep\r\n", flags=[b"\\Deleted"])


def _has_foreign(stack, user: str, folder: str) -> bool:
    return any(b"flagged by another client" in p.read_bytes() for p in stack.messages(user, folder))


# -- item 2: Gmail -----------------------------------------------------------------------------


def test_gmail_deletes_by_moving_to_trash_and_nothing_stays_in_all_mail(stack, monkeypatch, proxied) -> None:
    """Gmail (X-GM-EXT-1): ``UID EXPUNGE`` in INBOX only removes the label; the message stays in
    ``[Gmail]/All Mail`` (https://developers.google.com/gmail/imap/imap-extensions,
    https://support.google.com/mail/answer/7401). Deleting = move to ``\\Trash``
    (``[Gmail]/Bin``, RFC 6154), expunge there, confirm absence from ``\\All``."""
    proxy, env = proxied(imapproxy.Gmail(), user="gmail")
    secret = env["MESSAGES_SELFCHECK_SECRET"]
    _plant(stack, "gmail", "[Gmail]/All Mail", _old_token(secret))  # an earlier run's archived copy
    other = _old_token("other-" + secret)
    _plant(stack, "gmail", "[Gmail]/All Mail", other)  # another monitor's: untouched
    result = _run(monkeypatch, env)
    assert result.success, result.error
    assert _tokens(stack, "gmail", "[Gmail]/All Mail") == [other], "probe copies left in All Mail"
    assert _tokens(stack, "gmail", "INBOX") == [] and _tokens(stack, "gmail", "[Gmail]/Bin") == []
    assert result.cleanup_warning is None and result.leftover_count == 0
    assert any(b"MOVE" in c and b"[Gmail]/Bin" in c for c in proxy.commands)


# -- item 3: MOVE without UIDPLUS (maddy) ---------------------------------------------------------


def test_move_without_uidplus_leaves_nothing_in_trash(stack, monkeypatch, proxied) -> None:
    """maddy 0.8 offers MOVE but not UIDPLUS: the probe moved its message to ``\\Trash`` and
    left it there (issue 9 item 3). The copy in Trash (and earlier runs' copies) must go too."""
    _proxy, env = proxied(imapproxy.MoveWithoutUidplus())
    secret = env["MESSAGES_SELFCHECK_SECRET"]
    _plant(stack, "receiver", "Trash", _old_token(secret))  # left in Trash by an earlier run
    result = _run(monkeypatch, env)
    assert result.success, result.error
    assert _tokens(stack, "receiver", "Trash") == [] and _tokens(stack, "receiver", "INBOX") == []
    assert result.cleanup_warning is None and result.leftover_count == 0


def test_move_without_uidplus_never_expunges_another_clients_deleted_mail_in_trash(
        stack, monkeypatch, proxied) -> None:
    """As above, with another client's ``\\Deleted`` message in Trash: a plain EXPUNGE would
    remove it too, so the probe's copy stays flagged, is counted and reported."""
    _proxy, env = proxied(imapproxy.MoveWithoutUidplus())
    _foreign_deleted(stack, "receiver", "Trash")
    result = _run(monkeypatch, env)
    assert result.success, result.error
    assert _has_foreign(stack, "receiver", "Trash")
    assert len(_tokens(stack, "receiver", "Trash")) == 1 and _tokens(stack, "receiver", "INBOX") == []
    assert result.cleanup_warning and "1 probe message(s) left in 'Trash'" in result.cleanup_warning
    assert "other clients" in result.cleanup_warning
    assert result.leftover_count == 1


# -- item 4: undeletable probes ---------------------------------------------------------------------


def test_refused_expunge_is_counted_and_the_reply_shown_once(stack, monkeypatch, proxied) -> None:
    """Microsoft 365 with a retention policy answers ``NO EXPUNGE failed.``
    (https://learn.microsoft.com/en-us/purview/retention, issue 9 item 4): each run leaves a
    ``\\Deleted`` probe; the result counts them (this run's and earlier runs') and the warning
    quotes the server's reply once."""
    _proxy, env = proxied(imapproxy.RefusedExpunge())
    _plant(stack, "receiver", "INBOX", _old_token(env["MESSAGES_SELFCHECK_SECRET"]), flags=[b"\\Deleted"])
    result = _run(monkeypatch, env)
    assert result.success, result.error
    assert result.leftover_count == 2
    assert result.cleanup_warning.count("EXPUNGE failed.") == 1, result.cleanup_warning
    assert "refused EXPUNGE in 'INBOX': EXPUNGE failed." in result.cleanup_warning
    files = stack.messages("receiver")
    assert len(files) == 2 and all("T" in _flags(p) for p in files)


def test_without_uidplus_or_move_own_deleted_probes_are_expunged_when_only_ours(stack, monkeypatch) -> None:
    """A server with neither UIDPLUS nor MOVE (Dovecot user ``legacy``: IMAP4rev1 only):
    when ``UID SEARCH DELETED`` holds only the probe's own verified messages, a plain EXPUNGE
    is safe and removes them, including an earlier run's flagged leftover."""
    env = stack.probe_env(to_user="legacy")
    env["MESSAGES_SELFCHECK_SECRET"] = "lg-" + secrets.token_hex(6)
    _plant(stack, "legacy", "INBOX", _old_token(env["MESSAGES_SELFCHECK_SECRET"]), flags=[b"\\Deleted"])
    result = _run(monkeypatch, env)
    assert result.success, result.error
    assert stack.messages("legacy") == []
    assert result.cleanup_warning is None and result.leftover_count == 0


# -- item 6: stale views, empty fetch -------------------------------------------------------------


def test_stale_search_after_idle_finds_the_message_at_once(stack, monkeypatch, proxied) -> None:
    """SEARCH reflects the mailbox as of the last NOOP/SELECT, not what IDLE announced (Gmail;
    MailKit issue 835, https://github.com/jstedfast/MailKit/issues/835): without a NOOP before
    the search the message was found only by the final search, at the timeout."""
    _proxy, env = proxied(imapproxy.StaleSearch(), MESSAGES_SELFCHECK_IMAP_DETECTION="idle",
                          MESSAGES_SELFCHECK_TIMEOUT="8")
    result = _run(monkeypatch, env)
    assert result.success, result.error
    assert result.reception_time < 3, result.reception_time


def test_empty_fetch_is_retried_not_an_integrity_failure(stack, monkeypatch, proxied) -> None:
    """maddy: ``UID SEARCH`` finds a message not yet announced and ``UID FETCH`` returns nothing
    until a NOOP (issue 9 item 6): was ``integrity: ... returned no body for UID n``."""
    _proxy, env = proxied(imapproxy.EmptyFetchUntilNoop(), MESSAGES_SELFCHECK_IMAP_DETECTION="idle")
    result = _run(monkeypatch, env)
    assert result.success, result.error
    assert _tokens(stack, "receiver", "INBOX") == []


# -- item 7: untagged before the IDLE continuation ------------------------------------------------


def test_untagged_data_before_idle_continuation_is_accepted(stack, monkeypatch, proxied) -> None:
    """GreenMail 2.1 sends ``* n EXISTS`` before ``+ idling``; RFC 3501 7 allows untagged data
    at any time. Was: ``lost connection ...: Unexpected IDLE response``."""
    proxy, env = proxied(imapproxy.UntaggedBeforeIdle(), MESSAGES_SELFCHECK_IMAP_DETECTION="idle")
    result = _run(monkeypatch, env)
    assert result.success, result.error
    assert any(c.endswith(b" IDLE") for c in proxy.commands)


# -- item 5: an unanswered command ---------------------------------------------------------------


def test_unanswered_idle_done_reconnects_within_the_deadline(stack, monkeypatch, proxied) -> None:
    """The DONE that ends an IDLE is never answered (a NAT dropped the flow; issue 9 item 5):
    was ``lost connection ...: timed out`` at the deadline although the mail had arrived."""
    proxy, env = proxied(imapproxy.DeadIdle(), MESSAGES_SELFCHECK_IMAP_DETECTION="idle",
                         MESSAGES_SELFCHECK_TIMEOUT="15")
    result = _run(monkeypatch, env)
    assert result.success, result.error
    assert len(proxy.sessions) >= 2  # a second session was opened
    assert result.reception_time < 8 and result.duration < 15
    assert _tokens(stack, "receiver", "INBOX") == []


# -- item 12: no CHARSET for ASCII criteria ----------------------------------------------------------


def test_searches_work_where_charset_is_refused(stack, monkeypatch, proxied) -> None:
    """Exchange refuses ``CHARSET`` with ``NO [BADCHARSET (US-ASCII)]`` (RFC 3501 6.4.4, 7.1):
    the probe's criteria are ASCII and never carry one (regression test)."""
    proxy, env = proxied(imapproxy.BadCharset())
    result = _run(monkeypatch, env)
    assert result.success, result.error
    assert result.cleanup_warning is None and _tokens(stack, "receiver", "INBOX") == []
    assert not any(b"CHARSET" in c.upper() for c in proxy.commands)


# -- item 8: mail moved after delivery --------------------------------------------------------------


def test_message_moved_to_junk_email_after_delivery_is_reported_as_junk(stack, monkeypatch, proxied) -> None:
    """Exchange Online delivers to INBOX, then files spam into ``Junk Email`` (no special-use
    attribute; https://learn.microsoft.com/en-us/exchange/antispam-and-antimalware/antispam-protection/antispam-and-antimalware-protection).
    Was: ``integrity: ... returned no body for UID n``; the UID vanished, the message is in junk."""
    stack.create_mailbox("receiver", "Junk Email", "Deleted Items")
    _proxy, env = proxied(imapproxy.ExchangeJunkMove(), MESSAGES_SELFCHECK_TIMEOUT="10")
    try:
        result = _run(monkeypatch, env)
        junk_left = _tokens(stack, "receiver", "Junk Email")
    finally:
        stack.doveadm("mailbox", "delete", "-u", stack.users["receiver"].address, "Junk Email", "Deleted Items")
    assert not result.success and result.error_class == "junk", result.error
    assert result.folder == "Junk Email" and "moved to 'Junk Email'" in result.error
    assert junk_left == [] and _tokens(stack, "receiver", "INBOX") == []
    assert result.duration < 10


def test_idle_advertised_but_refused_falls_back_to_polling(stack, monkeypatch, proxied) -> None:
    """A server (or an IMAP proxy in front of it) that advertises IDLE and answers it ``NO``:
    RFC 2177 makes IDLE optional to honour; the probe polls instead of failing."""
    _proxy, env = proxied(imapproxy.IdleRefused(), MESSAGES_SELFCHECK_IMAP_DETECTION="idle",
                          MESSAGES_SELFCHECK_TIMEOUT="10")
    result = _run(monkeypatch, env)
    assert result.success, result.error
    assert result.reception_time < 3


def test_gmail_copy_left_in_all_mail_is_reported_and_counted(stack, monkeypatch, proxied) -> None:
    """Gmail where the copy in ``\\All`` survives the move to Trash and cannot be moved itself
    (https://support.google.com/mail/answer/7401; the "auto-expunge off / archive" IMAP
    settings): the absence check by Message-ID finds it: a warning and a count, never silence."""
    _proxy, env = proxied(imapproxy.Gmail(trash_purges_all_mail=False, all_mail_read_only=True), user="gmail")
    result = _run(monkeypatch, env)
    assert result.success, result.error
    assert result.cleanup_warning and "a copy remains in '[Gmail]/All Mail'" in result.cleanup_warning
    assert result.leftover_count == 1
    assert len(_tokens(stack, "gmail", "[Gmail]/All Mail")) == 1 and _tokens(stack, "gmail", "INBOX") == []
