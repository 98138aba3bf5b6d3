"""SASL bearer-token mechanisms for SMTP AUTH and IMAP AUTHENTICATE (pure functions).

* ``OAUTHBEARER``: RFC 7628 section 3.1 (GS2 header ``n,a=<authzid>,``, then ``key=value``
  pairs separated by ``\\x01``: ``host``, ``port``, ``auth=Bearer <token>``, ending ``\\x01\\x01``).
* ``XOAUTH2``: the Google/Microsoft format (https://developers.google.com/gmail/imap/xoauth2-protocol,
  https://learn.microsoft.com/exchange/client-developer/legacy-protocols/how-to-authenticate-an-imap-pop-smtp-application-by-using-oauth):
  ``user=<login>\\x01auth=Bearer <token>\\x01\\x01``.

Both return the *unencoded* initial client response: smtplib and IMAPClient base64-encode it.
On failure both servers send a challenge holding base64 JSON (RFC 7628 3.2.2:
``{"status": "invalid_token", "scope": "...", "schemes": "bearer"}``), which the client must
answer with an empty response (XOAUTH2) or ``\\x01`` (OAUTHBEARER, RFC 7628 3.2.3) before the
final error reply; :func:`describe_error_challenge` turns it into text for the error message.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Literal

Mechanism = Literal["OAUTHBEARER", "XOAUTH2"]
#: Preference when the server offers both (the standard one first).
PREFERENCE: tuple[Mechanism, ...] = ("OAUTHBEARER", "XOAUTH2")


def xoauth2(login: str, token: str) -> bytes:
    """XOAUTH2 initial client response for ``login`` with the access ``token``."""
    return f"user={login}\x01auth=Bearer {token}\x01\x01".encode()


def oauthbearer(login: str, token: str, host: str, port: int) -> bytes:
    """RFC 7628 OAUTHBEARER initial client response (``a=`` is the login, commas escaped per RFC 5801)."""
    authzid = login.replace("=", "=3D").replace(",", "=2C")
    return f"n,a={authzid},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01".encode()


def initial_response(mechanism: Mechanism, login: str, token: str, host: str, port: int) -> bytes:
    """The initial client response of ``mechanism``."""
    if mechanism == "OAUTHBEARER":
        return oauthbearer(login, token, host, port)
    return xoauth2(login, token)


#: What a client sends in answer to an error challenge, per mechanism.
ERROR_CHALLENGE_ANSWER: dict[str, bytes] = {"OAUTHBEARER": b"\x01", "XOAUTH2": b""}


def choose(offered: list[str] | tuple[str, ...] | set[str], forced: str | None = None) -> Mechanism | None:
    """The mechanism to use among ``offered`` (case-insensitive): ``forced`` if set and offered,
    else OAUTHBEARER before XOAUTH2; None when the server offers neither (or not the forced one)."""
    names = {m.upper() for m in offered}
    candidates = (forced.upper(),) if forced else PREFERENCE
    for name in candidates:
        if name in names and name in PREFERENCE:
            return name  # type: ignore[return-value]
    return None


def describe_error_challenge(challenge: bytes | str) -> str:
    """Readable text of a server's error challenge: ``status 401, scope https://...`` (base64
    JSON, RFC 7628 3.2.2); the raw text when it is not base64 JSON. Never contains a token."""
    raw = challenge.encode() if isinstance(challenge, str) else challenge
    raw = raw.strip()
    try:
        decoded = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        decoded = raw
    try:
        data = json.loads(decoded)
    except (ValueError, UnicodeDecodeError):
        return decoded.decode("utf-8", "replace")[:200]
    if not isinstance(data, dict):
        return str(data)[:200]
    parts = [f"{key} {data[key]}" for key in ("status", "scope", "schemes") if data.get(key)]
    return ", ".join(parts) or json.dumps(data)[:200]
