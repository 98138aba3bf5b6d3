"""Status patches and transition Events of a MailSelfcheck. Pure functions; the clock is a parameter.

The patches are JSON merge patches (RFC 7386) for the ``status`` subresource; a ``None``
value removes the field. The ``Ready`` condition has the ``metav1.Condition`` shape
(https://github.com/kubernetes/enhancements/tree/master/keps/sig-api-machinery/1623-standardize-conditions):
``lastTransitionTime`` changes only when ``status`` changes, ``observedGeneration`` is the
``metadata.generation`` the check ran with.

Events are emitted on transitions only (first failure, recovery, first success), never on
every run, so a failing selfcheck does not flood the namespace's Events.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from ..models.spec import STATUS_HISTORY_LIMIT
from .jobs import Outcome
from .schedule import format_time

READY = "Ready"


@dataclass(frozen=True)
class Transition:
    """A Kubernetes Event to emit: ``type`` is ``Normal`` or ``Warning``."""

    type: str
    reason: str
    message: str


def launched_patch(job: dict[str, Any], slot: dt.datetime) -> dict[str, Any]:
    """Record a launched Job as ``status.active`` and its slot as ``status.lastScheduleTime``."""
    meta = job.get("metadata") or {}
    return {
        "status": {
            "active": {"name": meta.get("name"), "uid": meta.get("uid"), "scheduleTime": format_time(slot)},
            "lastScheduleTime": format_time(slot),
        }
    }


def ready_condition(
    previous: list[dict[str, Any]] | None, *, ok: bool, reason: str, message: str, generation: int | None, now: dt.datetime
) -> list[dict[str, Any]]:
    """The ``conditions`` list with ``Ready`` set (other condition types are kept)."""
    status = "True" if ok else "False"
    others = [c for c in previous or [] if c.get("type") != READY]
    old = next((c for c in previous or [] if c.get("type") == READY), None)
    transition = old["lastTransitionTime"] if old and old.get("status") == status and old.get("lastTransitionTime") else format_time(now)
    cond: dict[str, Any] = {
        "type": READY,
        "status": status,
        "lastTransitionTime": transition,
        "reason": reason,
        "message": message,
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    return others + [cond]


def _failure_message(outcome: Outcome) -> str:
    return outcome.error or "check failed"


def harvest_patch(
    status: dict[str, Any],
    *,
    outcome: Outcome,
    job_name: str,
    schedule_time: str | None,
    generation: int | None,
    now: dt.datetime,
) -> tuple[dict[str, Any], Transition | None]:
    """The status patch recording a finished check, and the Event to emit (if a transition).

    Args:
        status: the current ``status`` (read for ``consecutiveFailures``, ``history``,
            ``conditions`` and the previous ``success``).
        outcome: the finished check.
        job_name: the Job harvested (recorded as ``lastHarvestedJob``; ``active`` is cleared).
        schedule_time: the Job's slot (RFC 3339).
        generation: ``metadata.generation`` of the resource.
        now: completion time.
    """
    when = format_time(now)
    previous_success = status.get("success")
    failures = 0 if outcome.success else int(status.get("consecutiveFailures") or 0) + 1
    entry = {
        "job": job_name,
        "scheduleTime": schedule_time,
        "completionTime": when,
        "success": outcome.success,
        "error": outcome.error,
        "errorClass": outcome.error_class,
        "sendTime": outcome.send_time,
        "receptionTime": outcome.reception_time,
        "folder": outcome.folder,
    }
    entry = {k: v for k, v in entry.items() if v is not None}
    history = [entry] + [h for h in status.get("history") or [] if h.get("job") != job_name]
    if outcome.success:
        reason, message = "CheckSucceeded", _success_message(outcome)
    else:
        reason, message = "CheckFailed", _failure_message(outcome)
    patch = {
        "status": {
            "active": None,
            "lastHarvestedJob": job_name,
            "lastCompletionTime": when,
            "success": outcome.success,
            "error": outcome.error,
            "errorClass": outcome.error_class,
            "sendTime": outcome.send_time,
            "receptionTime": outcome.reception_time,
            "consecutiveFailures": failures,
            "leftoverCount": outcome.leftover_count,
            "cleanupWarning": outcome.cleanup_warning,
            "timings": outcome.timings,
            "imapCommands": outcome.imap_commands,
            "imapSessionSeconds": outcome.imap_session_seconds,
            "tls": _tls_status(outcome.tls),
            "webhook": _webhook_status(outcome.webhook),
            "authWarning": outcome.auth_warning,
            "history": history[:STATUS_HISTORY_LIMIT],
            "conditions": ready_condition(
                status.get("conditions"), ok=outcome.success, reason=reason, message=message, generation=generation, now=now
            ),
            "observedGeneration": generation,
        }
    }
    if outcome.success:
        patch["status"]["lastSuccessTime"] = when
    return patch, transition(previous_success, outcome)


def _tls_status(tls: dict[str, dict[str, Any]] | None) -> dict[str, Any] | None:
    """Result TLS facts in status form (camelCase, ``notAfter`` as RFC 3339)."""
    if not tls:
        return None
    out = {}
    for endpoint, f in tls.items():
        not_after = f.get("not_after")
        out[endpoint] = {k: v for k, v in {
            "version": f.get("version"), "cipher": f.get("cipher"), "hostnameMatched": f.get("hostname_matched"),
            "notAfter": format_time(dt.datetime.fromtimestamp(not_after, dt.timezone.utc)) if not_after else None,
        }.items() if v is not None}
    return out


def _webhook_status(webhook: dict[str, Any] | None) -> dict[str, Any] | None:
    if not webhook:
        return None
    return {k: webhook.get(k) for k in ("kind", "signal", "sent", "error") if webhook.get(k) is not None}


def heartbeat_transition(status: dict[str, Any], outcome: Outcome) -> Transition | None:
    """A Warning Event when the heartbeat starts failing (it was delivered, or never tried, before)."""
    webhook = outcome.webhook or {}
    if webhook.get("sent") is not False:
        return None
    if (status.get("webhook") or {}).get("sent") is False:
        return None
    return Transition("Warning", "HeartbeatFailing",
                      f"the {webhook.get('kind', 'generic')} heartbeat could not be delivered: {webhook.get('error') or 'failed'}")


def _success_message(outcome: Outcome) -> str:
    parts = ["mail delivered"]
    if outcome.send_time is not None:
        parts.append(f"send {outcome.send_time:.3f}s")
    if outcome.reception_time is not None:
        parts.append(f"reception {outcome.reception_time:.3f}s")
    return ", ".join(parts)


def transition(previous_success: bool | None, outcome: Outcome) -> Transition | None:
    """The Event for a change of ``success``: first failure (Warning), recovery, first success."""
    if outcome.success and previous_success is False:
        return Transition("Normal", "CheckRecovered", f"Selfcheck recovered: {_success_message(outcome)}")
    if outcome.success and previous_success is None:
        return Transition("Normal", "CheckSucceeded", f"First successful selfcheck: {_success_message(outcome)}")
    if not outcome.success and previous_success is not False:
        return Transition("Warning", "CheckFailing", f"Selfcheck failing: {_failure_message(outcome)}")
    return None


def refused_patch(
    status: dict[str, Any], *, reason: str, message: str, error_class: str, generation: int | None, now: dt.datetime
) -> dict[str, Any]:
    """Patch recording that no check could be launched: the API server refused the Job.

    ``Ready=False`` with ``reason`` (``InvalidJobSpec``, ``JobForbidden``, ``JobNameConflict``)
    and the API server's ``message``; ``error``/``errorClass`` show it in ``kubectl get``.
    The last check's ``success``, times and history are kept (no check ran).
    """
    return {
        "status": {
            "error": message,
            "errorClass": error_class,
            "conditions": ready_condition(
                status.get("conditions"), ok=False, reason=reason, message=message, generation=generation, now=now
            ),
            "observedGeneration": generation,
        }
    }


#: ``Ready`` reason while ``spec.suspend`` is true (no check runs, so nothing is known).
SUSPENDED = "Suspended"


def suspended_patch(status: dict[str, Any], *, suspended: bool, generation: int | None, now: dt.datetime) -> dict[str, Any] | None:
    """Patch of ``Ready`` for a change of ``spec.suspend`` (None when nothing changes).

    Suspended: ``Ready=Unknown``, reason ``Suspended`` (like a paused Deployment's
    ``Progressing=Unknown``): no check runs, so whether mail flows is unknown; the last
    result stays in ``success`` and ``history``. Resumed: ``Ready=Unknown``, reason
    ``Pending``, until the check that runs at once finishes.
    """
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == READY), {})
    if suspended == (ready.get("reason") == SUSPENDED):
        return None
    reason, message = (SUSPENDED, "suspended (spec.suspend): no check is scheduled") if suspended else (
        "Pending", "resumed: a check runs now")
    others = [c for c in status.get("conditions") or [] if c.get("type") != READY]
    cond: dict[str, Any] = {"type": READY, "status": "Unknown", "lastTransitionTime": format_time(now),
                            "reason": reason, "message": message}
    if generation is not None:
        cond["observedGeneration"] = generation
    return {"status": {"conditions": others + [cond]}}


def pending_condition(status: dict[str, Any], *, generation: int | None, now: dt.datetime) -> dict[str, Any] | None:
    """Patch setting ``Ready=Unknown`` before the first result (None once a condition exists)."""
    if status.get("conditions"):
        return None
    cond = {
        "type": READY,
        "status": "Unknown",
        "lastTransitionTime": format_time(now),
        "reason": "Pending",
        "message": "no check has finished yet",
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    return {"status": {"conditions": [cond]}}
