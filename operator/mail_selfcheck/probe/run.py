"""One selfcheck run: the seven steps, their timings and the :class:`ProbeResult`.

Steps: (1) open TO's mailbox over IMAP and record UIDNEXT; (2) build the message;
(3) submit it (FROM's AUTH is verified here, before MAIL FROM); (4) wait for it;
(5) verify its integrity; (6) delete it, in a ``finally``; (7) the result, reported by
:mod:`.report`. One deadline (``timeout`` seconds from the start) bounds steps 1-5;
cleanup gets at most two attempts of :data:`CLEANUP_BUDGET` seconds more.
"""

from __future__ import annotations

import time


from ..models.result import ProbeResult
from ..models.settings import ProbeSettings
from . import smtp
from .errors import ProbeFailure
from .eventlog import get_logger
from .imap import CleanupReport, Mailbox
from .message import IntegrityError, build_message, make_token, verify_message

CLEANUP_BUDGET = 5.0  # seconds per cleanup attempt (at most two)

log = get_logger()


def redact(text: str | None, secrets: list[str]) -> str | None:
    """Replace every occurrence of each secret value in ``text`` by ``***``."""
    if text is None:
        return None
    for value in sorted(secrets, key=len, reverse=True):
        if value:
            text = text.replace(value, "***")
    return text


def run_probe(settings: ProbeSettings) -> ProbeResult:
    """Run one selfcheck. Never raises: every failure becomes ``success=False`` with a precise
    ``error`` and ``error_class``; unexpected exceptions become ``error_class="internal"``.

    Args:
        settings: a validated, enabled configuration (``settings.enabled`` is true).

    Returns:
        The result; its strings never contain a password, the secret or the webhook URL.
    """
    started = time.monotonic()
    deadline = started + settings.timeout
    secret = settings.secret.get_secret_value()
    token, nonce = make_token(secret)
    fields: dict = {"success": False}
    timings: dict[str, float] = {}  # seconds per step (ProbeResult.timings)
    tls: dict = {}  # endpoint -> TlsFacts
    mailbox = Mailbox(settings)
    sent = None
    try:
        if "oauth2" in (settings.smtp_auth, settings.imap_auth):
            from .auth import login as auth_login
            from .auth.login import prefetch

            fields["token_time"] = round(prefetch(settings, deadline), 3)
            fields["auth_warning"] = auth_login.warning()
        mailbox.open(deadline)
        log.debug("mailbox_opened", folder=mailbox.folder, uidvalidity=mailbox.uidvalidity,
                  uidnext=mailbox.uidnext, junk_folder=mailbox.junk)
        message = build_message(settings.from_address, settings.to_address, token, nonce)
        fields["message_id"] = message.message_id
        sent = smtp.send(settings, message, deadline)
        fields.update(send_time=round(sent.send_time, 3), smtp_reply=sent.reply, sent_at=sent.sent_at_epoch)
        timings.update(sent.timings)
        tls["smtp"] = sent.tls
        log.debug("message_sent", send_time=sent.send_time, attempts=sent.attempts, reply=sent.reply, nonce=nonce[:8])
        found = mailbox.wait_for(nonce, deadline, since=sent.sent_at)
        fields["folder"] = found.folder
        waited = found.seen_at - sent.sent_at
        if found.folder != mailbox.folder:
            raise ProbeFailure(
                "junk",
                f"delivered to junk: the message arrived in {found.folder!r} instead of {mailbox.folder!r} "
                f"after {waited:.3f} seconds",
            )
        fields["reception_time"] = round(waited, 3)
        timings["first_sight"] = round(waited, 4)
        log.debug("message_received", folder=found.folder, uid=found.uid, reception_time=waited)
        fetch_started = time.monotonic()
        raw = mailbox.fetch(found, max(deadline, time.monotonic() + 2.0), nonce)
        try:
            verify_message(
                raw,
                token,
                from_address=message.from_address,
                to_address=message.to_address,
                subject=message.subject,
                message_id=message.message_id,
            )
        except IntegrityError as exc:
            raise ProbeFailure("integrity", f"integrity check failed: {exc}") from None
        finally:
            timings["fetch_verify"] = round(time.monotonic() - fetch_started, 4)
        fields["success"] = True
    except ProbeFailure as failure:
        fields.update(error=str(failure), error_class=failure.error_class)
        if failure.smtp_reply:
            fields["smtp_reply"] = failure.smtp_reply
        if failure.folder:
            fields["folder"] = failure.folder
    except Exception as exc:  # a bug, not a mail failure: report it, never crash
        log.debug("probe_internal_error", exc_info=True)
        fields.update(error=f"internal error: {type(exc).__name__}: {exc}", error_class="internal")
    finally:
        cleanup_started = time.monotonic()
        timings.update({k: v for k, v in mailbox.timings.items() if k not in timings})
        tls["imap"] = mailbox.tls
        report = _cleanup(settings, mailbox, nonce, secret, sent is not None, fields.get("message_id"))
        timings["cleanup"] = round(time.monotonic() - cleanup_started, 4)
        fields["cleanup_warning"] = report.warning
        fields["leftover_count"] = report.leftover_count
        fields["timings"] = _ordered(timings)
        if mailbox.commands:
            fields["imap_commands"] = mailbox.commands
            fields["imap_session_seconds"] = round(mailbox.session_seconds, 3)
        fields["tls"] = {side: value for side, value in tls.items() if value is not None} or None
    fields["duration"] = round(time.monotonic() - started, 3)
    secrets = settings.secret_values() + [token]
    if "oauth2" in (settings.smtp_auth, settings.imap_auth):
        from .auth.login import cached_tokens

        secrets += cached_tokens()
    for key in ("error", "smtp_reply", "cleanup_warning", "auth_warning"):
        fields[key] = redact(fields.get(key), secrets)
    return ProbeResult(**fields)


#: Order of the steps in ``ProbeResult.timings`` (the order they run in).
STEPS = ("imap_connect", "imap_login", "smtp_connect", "smtp_tls", "smtp_auth", "smtp_transaction", "first_sight",
         "fetch_verify", "cleanup")


def _ordered(timings: dict[str, float]) -> dict[str, float]:
    return {step: timings[step] for step in STEPS if step in timings}


def _cleanup(
    settings: ProbeSettings, mailbox: Mailbox, nonce: str, secret: str, sent: bool, message_id: str | None
) -> CleanupReport:
    """Step 6, bounded by :data:`CLEANUP_BUDGET` seconds per attempt.

    Uses the run's IMAP session; when it is unusable (or broke) and a message was sent, one
    fresh session is tried. Returns the warning (``None`` when nothing was left behind) and
    the number of the probe's own messages left (``None`` when unknown).
    """
    attempts = [mailbox] if mailbox.ready else []
    if sent:
        attempts.append(None)  # a fresh session, if the first attempt fails or is impossible
    report = CleanupReport(None, None)  # nothing looked at (yet)
    for candidate in attempts:
        box = candidate
        try:
            if box is None:
                box = Mailbox(settings)
                box.open(time.monotonic() + CLEANUP_BUDGET)
            box.client.socket().settimeout(CLEANUP_BUDGET)
            report = box.cleanup(nonce, secret, settings.timeout, message_id)
            if report.warning is None or not report.warning.startswith("cleanup failed"):
                break
        except ProbeFailure as exc:
            report = CleanupReport(f"cleanup not possible: {exc}", None)
        except Exception as exc:
            report = CleanupReport(f"cleanup failed: {type(exc).__name__}: {exc}", None)
        finally:
            if box is not None:
                box.close()
            if box is not None and box is not mailbox:
                mailbox.commands += box.commands  # the run's load includes the cleanup session
                mailbox.session_seconds += box.session_seconds
    mailbox.close()
    if report.warning:
        log.warning("cleanup_incomplete", warning=report.warning, leftover_count=report.leftover_count)
    return report
