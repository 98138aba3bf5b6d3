"""The capabilities in the IMAP greeting save a CAPABILITY round trip, but never after STARTTLS
(RFC 3501 6.2.1, 7.1)."""

from __future__ import annotations

from mail_selfcheck.probe.imap.session import _GreetingCapabilities


class _Asked:
    """imaplib's side: ``_get_capabilities`` would send CAPABILITY (recorded here)."""

    def __init__(self, untagged: dict, tls: bool):
        self.untagged_responses, self._tls_established, self._encoding = untagged, tls, "ascii"
        self.asked = 0

    def _get_capabilities(self):
        self.asked += 1
        self.capabilities = ("ASKED",)


class _Conn(_GreetingCapabilities, _Asked):
    pass


def test_greeting_capabilities_are_used_at_connect() -> None:
    conn = _Conn({"OK": [b""], "CAPABILITY": [b"IMAP4rev1 STARTTLS IDLE"]}, tls=False)
    conn._get_capabilities()
    assert conn.capabilities == ("IMAP4REV1", "STARTTLS", "IDLE") and conn.asked == 0
    assert "CAPABILITY" not in conn.untagged_responses


def test_without_them_capability_is_asked() -> None:
    conn = _Conn({"OK": [b""]}, tls=False)
    conn._get_capabilities()
    assert conn.capabilities == ("ASKED",) and conn.asked == 1


def test_after_starttls_what_came_in_clear_text_is_ignored() -> None:
    conn = _Conn({"CAPABILITY": [b"IMAP4rev1 AUTH=PLAIN"]}, tls=True)  # e.g. injected before TLS
    conn._get_capabilities()
    assert conn.capabilities == ("ASKED",) and conn.asked == 1
    assert "CAPABILITY" not in conn.untagged_responses
