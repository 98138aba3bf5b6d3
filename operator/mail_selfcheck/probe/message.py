"""Build the probe message and verify a received copy. Pure functions, no I/O.

The message follows RFC 5322 (Internet Message Format) and RFC 2046 5.1.4
(multipart/alternative): 7-bit ASCII, a text/plain and a text/html part that both carry the
token, plus the token in the ``X-Selfcheck-Token`` header. ``Auto-Submitted: auto-generated``
(RFC 3834) keeps vacation responders quiet.
"""

from __future__ import annotations

import html
import secrets
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import format_datetime, parseaddr
from datetime import datetime, timezone

TOKEN_HEADER = "X-Selfcheck-Token"
SUBJECT_PREFIX = "[selfcheck] delivery check"


def make_token(secret: str) -> tuple[str, str]:
    """Return ``(token, nonce)``: ``token`` is ``"<secret>/<32 hex digits>"``, ``nonce`` the hex part.

    The nonce (random, :func:`secrets.token_hex`) is safe to log; the token holds the secret
    and must only travel inside the message.
    """
    nonce = secrets.token_hex(16)
    return f"{secret}/{nonce}", nonce


@dataclass(frozen=True)
class SentMessage:
    """What the probe sent, i.e. what a received copy must match."""

    token: str
    from_address: str
    to_address: str
    subject: str
    message_id: str
    raw: bytes = field(repr=False)


def build_message(from_address: str, to_address: str, token: str, nonce: str, now: datetime | None = None) -> SentMessage:
    """Build the probe message.

    Args:
        from_address: header From (also used as envelope sender by :mod:`.smtp`).
        to_address: header To.
        token: ``secret/nonce`` from :func:`make_token`; must be printable ASCII.
        nonce: the token's random part (goes into the Subject, which is logged by servers).
        now: Date header value (default: current UTC time).

    Returns:
        The message as CRLF-terminated bytes with its identifying fields.

    Raises:
        ValueError: the token is not printable 7-bit ASCII.
    """
    if not token.isascii() or not token.isprintable():
        raise ValueError("the secret must be printable ASCII")
    domain = from_address.rpartition("@")[2] or "localhost"
    subject = f"{SUBJECT_PREFIX} {nonce[:8]}"
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = from_address
    msg["To"] = to_address
    msg["Subject"] = subject
    msg["Date"] = format_datetime(now or datetime.now(timezone.utc))
    msg["Message-ID"] = f"<selfcheck.{nonce}@{domain}>"  # nonce: 128 random bits, unique
    msg["Auto-Submitted"] = "auto-generated"
    msg[TOKEN_HEADER] = token
    text = (
        "This message was sent by mail-selfcheck to prove that mail is delivered end to end.\n"
        "It is deleted automatically once received.\n\n"
        f"Selfcheck token: {token}\n"
    )
    html_body = (
        "<html><body>\n"
        "<p>This message was sent by mail-selfcheck to prove that mail is delivered end to end.</p>\n"
        f"<p>Selfcheck token: <code>{html.escape(token)}</code></p>\n"
        "</body></html>\n"
    )
    msg.set_content(text, subtype="plain", charset="us-ascii", cte="7bit")
    msg.add_alternative(html_body, subtype="html", charset="us-ascii", cte="7bit")
    raw = msg.as_bytes(policy=policy.SMTP)
    return SentMessage(token, from_address, to_address, subject, str(msg["Message-ID"]), raw)


class IntegrityError(Exception):
    """A received message differs from what was sent; ``str()`` names every difference."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def _addr(value: object) -> str:
    return parseaddr(str(value or ""))[1].lower()


def verify_message(
    raw: bytes,
    token: str,
    *,
    from_address: str | None = None,
    to_address: str | None = None,
    subject: str | None = None,
    message_id: str | None = None,
) -> None:
    """Check that a received message still carries what the probe sent.

    Every text part is decoded (Content-Transfer-Encoding, then charset; RFC 2045 6) and
    headers are unfolded and RFC 2047-decoded before comparison. Required: the token in the
    text/plain and in the text/html part (HTML entities decoded), the ``X-Selfcheck-Token``
    header, and the given From/To/Subject/Message-ID values; no MIME structure defects.

    Raises:
        IntegrityError: listing every difference found, each naming the part or header.
    """
    problems: list[str] = []
    try:
        msg = BytesParser(policy=policy.default).parsebytes(raw)
    except Exception as exc:  # the parser is lenient; this is a last resort
        raise IntegrityError([f"message cannot be parsed as MIME: {exc}"]) from exc

    found = {"plain": None, "html": None}
    for part in msg.walk():
        if part.is_multipart():
            continue
        subtype = part.get_content_subtype()
        if part.get_content_maintype() != "text" or subtype not in found or found[subtype] is not None:
            continue
        try:
            found[subtype] = part.get_content()
        except Exception as exc:
            problems.append(f"{'HTML' if subtype == 'html' else 'text'} part cannot be decoded: {exc}")
            found[subtype] = ""
    labels = {"plain": "text", "html": "HTML"}
    for subtype, content in found.items():
        if content is None:
            problems.append(f"{labels[subtype]} part missing")
            continue
        if subtype == "html":
            content = html.unescape(content)
        if token not in content:
            problems.append(f"token missing from the {labels[subtype]} part (altered in transit)")

    defects = [d for part in msg.walk() for d in getattr(part, "defects", [])]
    if defects:
        names = sorted({type(d).__name__ for d in defects})
        problems.append("MIME structure damaged (" + ", ".join(names) + "), message truncated or rewritten?")

    header_token = msg.get(TOKEN_HEADER)
    if header_token is None:
        problems.append(f"{TOKEN_HEADER} header missing")
    elif str(header_token).strip() != token:
        problems.append(f"{TOKEN_HEADER} header altered")
    if from_address is not None and _addr(msg.get("From")) != from_address.lower():
        problems.append(f"From header differs (got {_addr(msg.get('From'))!r})")
    if to_address is not None and _addr(msg.get("To")) != to_address.lower():
        problems.append(f"To header differs (got {_addr(msg.get('To'))!r})")
    if subject is not None and str(msg.get("Subject", "")).strip() != subject:
        problems.append(f"Subject differs (got {str(msg.get('Subject', ''))[:80]!r})")
    if message_id is not None and str(msg.get("Message-ID", "")).strip() != message_id:
        problems.append("Message-ID differs")
    if problems:
        raise IntegrityError(problems)
