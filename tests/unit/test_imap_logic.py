"""Unit tests of the pure IMAP logic: exact token check, special folders, SMTP AUTH choice."""

from __future__ import annotations

import smtplib

import pytest

from mail_selfcheck.models.result import ProbeResult
from mail_selfcheck.probe.errors import ProbeFailure
from mail_selfcheck.probe.imap.cleanup import own_nonce, token_values
from mail_selfcheck.probe.imap.folders import classify
from mail_selfcheck.probe.message import build_message, make_token
from mail_selfcheck.probe.smtp import _authenticate, choose_mechanism

SECRET = "s3cret"
NONCE = "0123456789abcdef0123456789abcdef"


def _hdr(value: str) -> bytes:
    return f"X-Selfcheck-Token: {value}\r\n\r\n".encode()


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        (_hdr(f"{SECRET}/{NONCE}"), NONCE),
        (_hdr(f"other-{SECRET}/{NONCE}"), None),  # substring match of HEADER search: not ours
        (_hdr(f"{SECRET}/{NONCE}x"), None),
        (_hdr(f"{SECRET}/{NONCE.upper()}"), None),
        (_hdr(f"{SECRET}/sub/{NONCE}"), None),
        (_hdr(f"{SECRET}/{NONCE}") + _hdr(f"{SECRET}/{NONCE}"), None),  # two token fields
        (b"Subject: x\r\n\r\n", None),
        (f"x-selfcheck-token:\r\n {SECRET}/{NONCE}\r\n\r\n".encode(), NONCE),  # folded before the value
    ],
)
def test_own_nonce_requires_the_whole_value(block: bytes, expected) -> None:
    assert own_nonce(block, SECRET) == expected


def test_long_tokens_encoded_by_the_email_package_are_recognised() -> None:
    secret = "a-rather-long-secret-" + "x" * 40
    token, nonce = make_token(secret)
    raw = build_message("a@example.test", "b@example.test", token, nonce).raw
    header = raw.split(b"\r\n\r\n", 1)[0]
    block = b"\r\n".join(line for line in header.split(b"\r\n")) + b"\r\n"
    start = block.index(b"X-Selfcheck-Token:")
    assert b"=?utf-8?q?" in block[start:start + 40]  # the package did encode it
    assert own_nonce(block[start:], secret) == nonce
    assert token_values(block[start:]) == [token]


def test_classify_prefers_special_use_then_known_names() -> None:
    listing = [
        ((b"\\HasNoChildren",), b"/", "INBOX"),
        ((b"\\HasNoChildren",), b"/", "Junk E-mail"),
        ((b"\\HasNoChildren", b"\\Trash"), b"/", "[Gmail]/Bin"),
        ((b"\\HasNoChildren", b"\\All"), b"/", "[Gmail]/All Mail"),
        ((b"\\Noselect",), b"/", "Spam"),
    ]
    folders = classify(listing, gmail=True)
    assert (folders.junk, folders.trash, folders.all_mail) == ("Junk E-mail", "[Gmail]/Bin", "[Gmail]/All Mail")
    assert classify(listing).all_mail is None  # \All matters only on Gmail


@pytest.mark.parametrize("name", ["Junk Email", "Junk E-mail", "Junk Mail", "Spam", "[Gmail]/Spam", "Bulk Mail",
                                  "INBOX.Junk", "Courrier indésirable"])
def test_known_junk_names(name: str) -> None:
    assert classify([((), b"/", "INBOX"), ((), b"/", name)]).junk == name


def test_configured_junk_folder_names_come_first() -> None:
    listing = [((), b"/", "INBOX"), ((), b"/", "Spam"), ((), b"/", "Quarantine")]
    assert classify(listing, junk_names=("Quarantine",)).junk == "Quarantine"


@pytest.mark.parametrize(("offered", "chosen"), [("PLAIN LOGIN", "PLAIN"), ("login cram-md5", "LOGIN"),
                                                 ("CRAM-MD5", "CRAM-MD5"), ("XOAUTH2 GSSAPI", None)])
def test_one_mechanism_from_the_servers_list(offered: str, chosen) -> None:
    assert choose_mechanism(offered) == chosen


class _FakeSMTP:
    """Stands in for smtplib.SMTP in the AUTH decision only (no I/O)."""

    def __init__(self, code: int, text: bytes):
        self.esmtp_features = {"auth": " PLAIN LOGIN"}
        self.calls = []
        self.code, self.text = code, text

    def has_extn(self, name: str) -> bool:
        return name in self.esmtp_features

    def auth_plain(self):
        return ""

    def auth(self, mechanism, authobject, initial_response_ok=True):
        self.calls.append(mechanism)
        raise smtplib.SMTPAuthenticationError(self.code, self.text)


def _settings():
    from mail_selfcheck.models.settings import ProbeSettings

    return ProbeSettings(from_address="a@example.test", to_address="b@example.test", secret="s",
                         smtp_password="pw", imap_password="pw")


@pytest.mark.parametrize(("code", "error_class"), [(454, "auth_temporary"), (535, "mailbox_unavailable")])
def test_smtp_auth_reply_class(code: int, error_class: str) -> None:
    smtp = _FakeSMTP(code, b"4.7.0 Temporary authentication failure" if code == 454 else b"5.7.8 invalid")
    with pytest.raises(ProbeFailure) as info:
        _authenticate(smtp, _settings(), "mx:587")
    assert info.value.error_class == error_class and smtp.calls == ["PLAIN"]
    assert str(code) in str(info.value) and info.value.smtp_reply.startswith(str(code))


def test_leftover_count_is_part_of_the_result() -> None:
    result = ProbeResult(success=True, leftover_count=3, cleanup_warning="3 probe message(s) left in 'INBOX'")
    assert ProbeResult.from_json(result.to_json()).leftover_count == 3
    assert ProbeResult(success=True).leftover_count is None
