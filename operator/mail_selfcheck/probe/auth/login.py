"""OAuth2 login for the probe: the token of a side, then SASL XOAUTH2 / OAUTHBEARER over SMTP or IMAP.

SMTP AUTH (RFC 4954) with an initial response; IMAP AUTHENTICATE (RFC 3501 6.2.2, SASL-IR
RFC 4959) through IMAPClient's ``sasl_login``. When the server rejects the token it sends an
error challenge (``334`` / ``+`` with base64 JSON, RFC 7628 3.2.2); the client answers it as
the mechanism requires (empty line for XOAUTH2, ``\\x01`` for OAUTHBEARER) and the decoded JSON
(status, scope) goes into the error. Every failure is a
:class:`~mail_selfcheck.probe.errors.ProbeFailure` whose message holds no token or secret.

Error classes: the token endpoint's (``oauth2_endpoint``, ``oauth2_invalid_client``,
``oauth2_invalid_grant``, ``oauth2_error``, see :mod:`.tokens`); ``oauth2_rejected`` when the
mail server refuses a token it was given (scope, mailbox permission, expired), or offers no
bearer mechanism at all.
"""

from __future__ import annotations

import os
import smtplib
import tempfile
import time
from typing import Any

from ...models.settings import ProbeSettings
from ..errors import ProbeFailure
from . import sasl
from .tokens import OAuth2Config, Side, TokenError, fetch

#: Replies of Microsoft 365 to basic authentication once the tenant refuses it
#: (https://learn.microsoft.com/exchange/troubleshoot/email-delivery/5-7-139-error-code-smtp-auth
#: and Message Center MC786329 for SMTP client submission).
BASIC_AUTH_REFUSED_CODES = ("5.7.139", "5.7.30")


def oauth2_config(settings: ProbeSettings) -> OAuth2Config:
    """The token source configuration of ``settings`` (``MESSAGES_SELFCHECK_OAUTH2_*``)."""

    def value(secret: Any) -> str | None:
        return secret.get_secret_value() if secret is not None else None

    refresh = {side: value(getattr(settings, f"{side}_oauth2_refresh_token")) for side in ("smtp", "imap")}
    return OAuth2Config(
        provider=settings.oauth2_provider,
        token_url=settings.oauth2_token_url,
        tenant=settings.oauth2_tenant,
        client_id=settings.oauth2_client_id,
        client_secret=value(settings.oauth2_client_secret),
        client_certificate_pem=value(settings.oauth2_client_certificate_pem),
        scope=settings.oauth2_scope,
        refresh_tokens={side: token for side, token in refresh.items() if token},
        service_account_json=value(settings.oauth2_service_account_json),
        ca_file=_ca_file(settings),
        verify=not settings.tls_insecure_skip_verify,
    )


_CA_FILES: dict[str, str] = {}


def _ca_file(settings: ProbeSettings) -> str | None:
    """The CA bundle of the TLS settings as a file (HTTP clients take a path): ``tls_ca_file``, or
    ``tls_ca_pem`` (what a Job gets from a ConfigMap/Secret key) written once to a private temp file."""
    if settings.tls_ca_file:
        return str(settings.tls_ca_file)
    if not settings.tls_ca_pem:
        return None
    if settings.tls_ca_pem not in _CA_FILES:
        fd, path = tempfile.mkstemp(prefix="mail-selfcheck-ca-", suffix=".pem")
        with os.fdopen(fd, "w") as f:
            f.write(settings.tls_ca_pem)
        _CA_FILES[settings.tls_ca_pem] = path
    return _CA_FILES[settings.tls_ca_pem]


#: Tokens of this process: (side, login) -> (token, monotonic expiry). A run fetches each side's
#: token once (:func:`prefetch`) and reuses it for reconnects and the cleanup session; ``--loop``
#: runs reuse it until shortly before it expires.
_TOKENS: dict[tuple[str, str], tuple[str, float]] = {}
#: Seconds before its expiry a cached token is no longer used (lifetime unknown: 5 minutes).
EXPIRY_MARGIN = 60.0
DEFAULT_LIFETIME = 300.0


def access_token(settings: ProbeSettings, side: Side, login: str, deadline: float) -> str:
    """An access token for ``login`` on ``side``, fetched before ``deadline`` (``time.monotonic()``)
    unless this process holds one that is still valid.

    Raises:
        ProbeFailure: no token (the token endpoint's error class and message).
    """
    cached = _TOKENS.get((side, login))
    now = time.monotonic()
    if cached and cached[1] > now:
        return cached[0]
    try:
        token = fetch(oauth2_config(settings), side, login, timeout=max(0.0, deadline - now))
    except TokenError as exc:
        raise ProbeFailure(exc.error_class, f"{side.upper()} OAuth2 token for {login}: {exc}") from None  # type: ignore[arg-type]
    lifetime = float(token.expires_in) if token.expires_in else DEFAULT_LIFETIME
    _TOKENS[(side, login)] = (token.value, time.monotonic() + max(0.0, lifetime - EXPIRY_MARGIN))
    if token.warning:
        WARNINGS[side] = token.warning
    return token.value


#: Warnings of the token endpoints, per side (refresh token rotated or expiring).
WARNINGS: dict[str, str] = {}


def cached_tokens() -> list[str]:
    """The access tokens this process holds (for redaction)."""
    return [value for value, _ in _TOKENS.values()]


def warning() -> str | None:
    """The token warnings of the run, ``smtp: ...; imap: ...`` (None when there are none)."""
    return "; ".join(f"{side}: {text}" for side, text in sorted(WARNINGS.items())) or None


def forget(token: str) -> None:
    """Drop ``token`` from the cache (the server refused it: the next login fetches a new one)."""
    for key, (value, _) in list(_TOKENS.items()):
        if value == token:
            del _TOKENS[key]


def prefetch(settings: ProbeSettings, deadline: float) -> float:
    """Fetch the token of every side that uses oauth2, before anything is timed. Returns the seconds it took.

    Raises:
        ProbeFailure: a token could not be obtained.
    """
    started = time.monotonic()
    if settings.imap_auth == "oauth2":
        access_token(settings, "imap", settings.imap_login, deadline)
    if settings.smtp_auth == "oauth2":
        access_token(settings, "smtp", settings.smtp_login, deadline)
    return time.monotonic() - started


def basic_auth_hint(reply: str, offered: list[str] | tuple[str, ...] | set[str]) -> str:
    """What to tell a user whose password login failed, given the server's reply and mechanisms."""
    if any(code in reply for code in BASIC_AUTH_REFUSED_CODES):
        return " (this tenant no longer accepts passwords: use oauth2, MESSAGES_SELFCHECK_SMTP_AUTH/IMAP_AUTH=oauth2)"
    if sasl.choose(offered):
        return " (the server also offers OAuth2: if passwords are disabled for this mailbox, use oauth2)"
    return ""


def smtp_oauth2(smtp: smtplib.SMTP, login: str, token: str, *, host: str, port: int, server: str,
                forced: str | None = None) -> str:
    """Authenticate the (EHLO-ed, TLS) SMTP session as ``login`` with ``token``. Returns the mechanism.

    Raises:
        ProbeFailure: ``oauth2_rejected`` with the server's reply and its error challenge.
    """
    offered = smtp.esmtp_features.get("auth", "").split()
    mechanism = _mechanism(offered, forced, f"SMTP server {server}", login, "no AUTH")
    challenges: list[bytes] = []

    def respond(challenge: bytes | None = None) -> str:
        if challenge is None:  # the initial response
            return sasl.initial_response(mechanism, login, token, host, port).decode()
        challenges.append(challenge)
        return sasl.ERROR_CHALLENGE_ANSWER[mechanism].decode()

    try:
        smtp.auth(mechanism, respond, initial_response_ok=True)
    except smtplib.SMTPAuthenticationError as exc:
        forget(token)
        reply = f"{exc.smtp_code} {_text(exc.smtp_error)}"
        detail = f"; server said {sasl.describe_error_challenge(challenges[0])}" if challenges else ""
        raise ProbeFailure("oauth2_rejected", f"SMTP server {server} refused the OAuth2 token of {login} "
                                              f"(AUTH {mechanism}): {reply}{detail}") from None
    return mechanism


def imap_oauth2(client: Any, login: str, token: str, *, host: str, port: int, server: str,
                forced: str | None = None) -> str:
    """Authenticate the IMAPClient ``client`` as ``login`` with ``token``. Returns the mechanism.

    Raises:
        ProbeFailure: ``oauth2_rejected`` with the server's reply and its error challenge.
    """
    from imapclient.exceptions import IMAPClientError

    offered = [c.decode().split("=", 1)[1] for c in client.capabilities() if c.upper().startswith(b"AUTH=")]
    mechanism = _mechanism(offered, forced, f"IMAP server {server}", login, "no AUTHENTICATE")
    challenges: list[bytes] = []
    sent = False

    def respond(challenge: bytes) -> bytes:
        nonlocal sent
        if not sent:
            sent = True
            return sasl.initial_response(mechanism, login, token, host, port)
        challenges.append(challenge)
        return sasl.ERROR_CHALLENGE_ANSWER[mechanism]

    try:
        client.sasl_login(mechanism, respond)
    except IMAPClientError as exc:
        forget(token)
        detail = f"; server said {sasl.describe_error_challenge(challenges[0])}" if challenges else ""
        raise ProbeFailure("oauth2_rejected", f"IMAP server {server} refused the OAuth2 token of {login} "
                                              f"(AUTHENTICATE {mechanism}): {_text(exc)}{detail}") from None
    return mechanism


def _mechanism(offered: list[str], forced: str | None, where: str, login: str, none: str) -> sasl.Mechanism:
    """The bearer mechanism to use, or ``oauth2_rejected`` naming what the server offers instead."""
    mechanism = sasl.choose(offered, forced)
    if mechanism is None:
        wanted = forced or " or ".join(sasl.PREFERENCE)
        raise ProbeFailure("oauth2_rejected", f"{where} offers no {wanted} for {login} (it offers: {' '.join(offered) or none})")
    return mechanism


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return " ".join(str(value).split())[:300]
