"""Send the probe message by SMTP submission (RFC 6409) with smtplib.

Security modes: ``starttls`` (RFC 3207; AUTH is never sent if the server does not offer
STARTTLS), ``tls`` (implicit TLS, RFC 8314 3.3) and ``plain`` (no TLS; lab stacks only).
Transient failures (4xx replies, RFC 5321 4.2.1, e.g. greylisting) are retried with
exponential backoff (1, 2, 4, ... 30 s; tenacity, imported on the first 4xx only) while the time budget lasts; permanent failures (5xx)
stop at once. EHLO names the FROM domain (or ``MESSAGES_SELFCHECK_SMTP_EHLO_NAME``), never
``socket.getfqdn()``, smtplib's default, which costs a DNS lookup on hosts whose name is not in
/etc/hosts.
"""

from __future__ import annotations

import smtplib
import ssl
import time
from dataclasses import dataclass, field

from ..models.settings import ProbeSettings
from .errors import ProbeFailure, describe_oserror, describe_starttls_error
from .message import SentMessage
from ..models.result import TlsFacts
from .tls import client_context, facts


@dataclass(frozen=True)
class SendOutcome:
    """``send_time``: seconds from opening the first connection to the final 250 reply to
    DATA (TLS handshake, AUTH and any 4xx retries included); ``reply``: that final reply;
    ``attempts``: number of transactions tried; ``sent_at``: ``time.monotonic()`` when the 250
    reply to DATA was read (inside the transaction: QUIT's round trip is neither in
    ``send_time`` nor in the reception time counted from here); ``sent_at_epoch``: the same
    moment as Unix epoch seconds."""

    send_time: float
    reply: str
    attempts: int
    sent_at: float
    sent_at_epoch: float
    #: Seconds per step of the last attempt: ``smtp_connect`` (TCP, greeting; the handshake too
    #: with implicit TLS), ``smtp_tls`` (STARTTLS), ``smtp_auth``, ``smtp_transaction`` (MAIL..DATA).
    timings: dict[str, float] = field(default_factory=dict)
    #: The TLS facts of the session (None without TLS).
    tls: TlsFacts | None = None


class _Deferred(Exception):
    def __init__(self, reply: str):
        super().__init__(reply)
        self.reply = reply


def _reply(code: int, text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return f"{code} {' '.join(text.split())}"


def _server(settings: ProbeSettings) -> str:
    return f"{settings.smtp_host}:{settings.smtp_port_effective}"


#: Seconds to wait for the 220 greeting (RFC 5321 4.5.3.2 suggests 5 minutes; a working server
#: greets in milliseconds, and 10 s is above postscreen's 6 s greet wait on an MX port). A port
#: that expects implicit TLS never greets a plain client: the run says so after this, not at
#: its timeout.
GREETING_TIMEOUT = 10.0


def _connect(settings: ProbeSettings, timeout: float) -> smtplib.SMTP:
    host, port = settings.smtp_host, settings.smtp_port_effective
    greeting = min(GREETING_TIMEOUT, timeout)
    try:
        if settings.smtp_security == "tls":
            smtp = smtplib.SMTP_SSL(host, port, local_hostname=settings.smtp_ehlo, timeout=greeting,
                                    context=client_context(settings))
        else:
            smtp = smtplib.SMTP(host, port, local_hostname=settings.smtp_ehlo, timeout=greeting)
        smtp.timeout = timeout
        if smtp.sock is not None:
            smtp.sock.settimeout(timeout)  # the rest of the session: the run's budget
        return smtp
    except ssl.SSLError as exc:
        raise ProbeFailure("smtp_tls", f"TLS error with SMTP server {_server(settings)}: {describe_oserror(exc)}") from exc
    except smtplib.SMTPConnectError as exc:
        raise ProbeFailure("smtp_connect", f"SMTP server {_server(settings)} refused the session: {_reply(exc.smtp_code, exc.smtp_error)}") from exc
    except smtplib.SMTPServerDisconnected as exc:
        # TCP connected, but no 220 greeting (RFC 5321 4.3.1) came: typically a port that
        # expects implicit TLS (465) probed with starttls/plain.
        hint = " (does this port expect implicit TLS? try security tls)" if settings.smtp_security != "tls" else ""
        raise ProbeFailure(
            "smtp_connect", f"SMTP server {_server(settings)} sent no greeting: {describe_oserror(exc)}{hint}"
        ) from exc
    except (OSError, smtplib.SMTPException) as exc:
        raise ProbeFailure("smtp_connect", f"SMTP server {_server(settings)} unreachable: {describe_oserror(exc)}") from exc


def _transaction(settings: ProbeSettings, message: SentMessage, deadline: float, session: dict) -> str:
    """One SMTP session: connect, (STARTTLS), AUTH, MAIL, RCPT, DATA. Returns the final reply.

    ``session`` receives ``timings`` (seconds per step) and ``tls`` (:class:`TlsFacts`).
    """
    server = _server(settings)
    timeout = max(0.5, deadline - time.monotonic())
    timings: dict[str, float] = {}
    session.clear()
    session["timings"] = timings
    mark = time.monotonic()

    def lap(step: str) -> None:
        nonlocal mark
        now = time.monotonic()
        timings[step] = round(now - mark, 4)
        mark = now

    smtp = _connect(settings, timeout)
    try:
        smtp.ehlo()
        lap("smtp_connect")
        if settings.smtp_security == "starttls":
            if not smtp.has_extn("starttls"):
                raise ProbeFailure(
                    "smtp_tls",
                    f"SMTP server {server} does not offer STARTTLS; refusing to send credentials in clear text "
                    "(use MESSAGES_SELFCHECK_SMTP_SECURITY=plain only for lab stacks)",
                )
            try:
                smtp.starttls(context=client_context(settings))
            except ssl.SSLError as exc:
                raise ProbeFailure("smtp_tls", f"TLS error with SMTP server {server}: {describe_starttls_error(exc)}") from exc
            smtp.ehlo()
            lap("smtp_tls")
        session["tls"] = facts(smtp.sock, settings.smtp_host)
        if settings.smtp_auth == "oauth2":
            from .auth.login import access_token, smtp_oauth2

            token = access_token(settings, "smtp", settings.smtp_login, deadline)
            smtp_oauth2(smtp, settings.smtp_login, token, host=settings.smtp_host, port=settings.smtp_port_effective,
                        server=server, forced=settings.oauth2_mechanism)
            lap("smtp_auth")
        elif settings.smtp_auth == "password" and settings.smtp_password is not None:
            _authenticate(smtp, settings, server)
            lap("smtp_auth")
        for step, args in (("MAIL FROM", (message.from_address,)), ("RCPT TO", (message.to_address,))):
            code, text = (smtp.mail if step == "MAIL FROM" else smtp.rcpt)(*args)
            _check(code, text, f"{step}:<{args[0]}>", server)
        code, text = smtp.data(message.raw)
        _check(code, text, "DATA", server)
        session["sent_at"] = (time.monotonic(), time.time())  # the 250, before QUIT's round trip
        lap("smtp_transaction")
        return _reply(code, text)
    except smtplib.SMTPServerDisconnected as exc:
        raise ProbeFailure("smtp_connect", f"SMTP server {server} closed the connection: {exc}") from exc
    except (OSError, smtplib.SMTPException) as exc:
        if isinstance(exc, ssl.SSLError):
            raise ProbeFailure("smtp_tls", f"TLS error with SMTP server {server}: {describe_oserror(exc)}") from exc
        if isinstance(exc, smtplib.SMTPResponseException):
            _check(exc.smtp_code, exc.smtp_error, "session", server)
        raise ProbeFailure("smtp_connect", f"SMTP session with {server} failed: {describe_oserror(exc)}") from exc
    finally:
        try:
            smtp.quit()
        except Exception:
            smtp.close()


#: SASL mechanisms the probe can do, best first (RFC 4616 PLAIN, draft LOGIN; CRAM-MD5 last).
AUTH_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")


def choose_mechanism(offered: str) -> str | None:
    """The first of :data:`AUTH_MECHANISMS` in the server's EHLO ``AUTH`` list (pure)."""
    names = {m.upper() for m in offered.split()}
    return next((m for m in AUTH_MECHANISMS if m in names), None)


def _authenticate(smtp: smtplib.SMTP, settings: ProbeSettings, server: str) -> None:
    """One AUTH (RFC 4954) with one mechanism chosen from the server's list: a wrong password
    costs one failed login, and the error shows the server's reply to it (smtplib's
    ``login()`` would try every mechanism and report the last reply).

    Raises:
        ProbeFailure: ``mailbox_unavailable`` (5xx: credentials refused, or no usable
            mechanism), ``auth_temporary`` (4xx, e.g. ``454 4.7.0 Temporary authentication
            failure``: the server's authentication backend is broken, not the password).
    """
    login = settings.smtp_login
    if not smtp.has_extn("auth"):
        raise ProbeFailure("mailbox_unavailable", f"mailbox unavailable: SMTP server {server} offers no AUTH for {login}")
    offered = smtp.esmtp_features.get("auth", "")
    mechanism = choose_mechanism(offered)
    if mechanism is None:
        raise ProbeFailure(
            "mailbox_unavailable",
            f"mailbox unavailable: SMTP server {server} offers no AUTH mechanism the probe supports "
            f"(offered: {' '.join(offered.split()) or 'none'}; supported: {', '.join(AUTH_MECHANISMS)})",
        )
    smtp.user, smtp.password = login, settings.smtp_password.get_secret_value()
    try:
        smtp.auth(mechanism, getattr(smtp, "auth_" + mechanism.lower().replace("-", "_")), initial_response_ok=True)
    except smtplib.SMTPAuthenticationError as exc:
        reply = _reply(exc.smtp_code, exc.smtp_error)
        if 400 <= exc.smtp_code < 500:
            raise ProbeFailure(
                "auth_temporary",
                f"SMTP server {server} could not check the credentials of {login} (temporary authentication "
                f"failure, AUTH {mechanism}): {reply}",
                smtp_reply=reply,
            ) from exc
        from .auth.login import basic_auth_hint

        raise ProbeFailure(
            "mailbox_unavailable",
            f"mailbox unavailable: {login} cannot authenticate at SMTP server {server} (AUTH {mechanism}): {reply}"
            f"{basic_auth_hint(reply, offered.split())}",
            smtp_reply=reply,
        ) from exc
    finally:
        smtp.password = ""


def _check(code: int, text: bytes | str, step: str, server: str) -> None:
    if 200 <= code < 400:
        return
    reply = _reply(code, text)
    if 400 <= code < 500:
        raise _Deferred(f"{step} {reply}")
    raise ProbeFailure("smtp_rejected", f"SMTP server {server} rejected {step}: {reply}", smtp_reply=reply)


#: Longest pause between two attempts after a 4xx reply, seconds (the pauses double from 1 s).
RETRY_MAX_WAIT = 30.0


def _deferred_failure(settings: ProbeSettings, attempts: int, reply: str) -> ProbeFailure:
    return ProbeFailure(
        "smtp_deferred",
        f"SMTP server {_server(settings)} deferred the message ({attempts} attempts) until the time budget "
        f"ran out: {reply}",
        smtp_reply=reply,
    )


def _retry_later(
    settings: ProbeSettings, message: SentMessage, deadline: float, session: dict, first: "_Deferred"
) -> tuple[str, int]:
    """Attempts 2, 3, ... after a 4xx reply (RFC 5321 4.2.1, e.g. greylisting): pauses of 1, 2,
    4 ... :data:`RETRY_MAX_WAIT` seconds (tenacity), no attempt starting past ``deadline``.
    tenacity is imported here only: most runs never meet a 4xx, and its import costs ~40 ms.

    Returns ``(reply, attempts)``; raises ``ProbeFailure`` ``smtp_deferred`` with the last reply."""
    if time.monotonic() + 1.0 >= deadline:
        raise _deferred_failure(settings, 1, first.reply)
    from tenacity import RetryError, Retrying, retry_if_exception_type, stop_before_delay, wait_exponential

    time.sleep(1.0)  # the pause after attempt 1; tenacity paces the rest
    retrying = Retrying(
        retry=retry_if_exception_type(_Deferred),
        wait=wait_exponential(multiplier=2, max=RETRY_MAX_WAIT),  # 2, 4, 8 ... after attempts 2, 3, 4 ...
        stop=stop_before_delay(max(0.0, deadline - time.monotonic())),
        reraise=False,
    )
    attempts = 1
    try:
        for attempt in retrying:
            with attempt:
                attempts += 1
                reply = _transaction(settings, message, deadline, session)
    except RetryError as exc:
        last = exc.last_attempt.exception()
        raise _deferred_failure(settings, attempts, getattr(last, "reply", str(last))) from None
    return reply, attempts


def send(settings: ProbeSettings, message: SentMessage, deadline: float) -> SendOutcome:
    """Submit ``message`` from ``settings.from_address`` to ``settings.to_address``.

    Args:
        deadline: ``time.monotonic()`` value after which no new attempt starts; socket
            operations time out by then too.

    Raises:
        ProbeFailure: ``mailbox_unavailable`` (AUTH refused), ``smtp_connect``, ``smtp_tls``,
            ``smtp_rejected`` (5xx, with the reply) or ``smtp_deferred`` (4xx until the
            budget ran out, with the last reply).
    """
    started = time.monotonic()
    session: dict = {}
    try:
        reply, attempts = _transaction(settings, message, deadline, session), 1
    except _Deferred as first:
        reply, attempts = _retry_later(settings, message, deadline, session, first)
    sent_at, sent_at_epoch = session["sent_at"]
    return SendOutcome(send_time=sent_at - started, reply=reply, attempts=attempts, sent_at=sent_at,
                       sent_at_epoch=sent_at_epoch, timings=session.get("timings") or {}, tls=session.get("tls"))


__all__ = ["SendOutcome", "send"]
