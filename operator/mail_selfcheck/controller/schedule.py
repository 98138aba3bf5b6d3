"""When the next check is due, and the Job name for a slot. Pure functions; the clock is a parameter.

Semantics follow the Kubernetes CronJob controller
(https://kubernetes.io/docs/concepts/workloads/controllers/cron-jobs/):

* the schedule is anchored on the *persisted* ``status.lastScheduleTime`` (or, before the
  first run, on ``metadata.creationTimestamp``, so the first check is due at creation), never
  on operator memory: a restart neither runs early nor loses a slot;
* missed slots are not caught up one by one: after downtime only the most recent missed slot
  runs (``startingDeadlineSeconds``-less CronJob behaviour, without its 100-miss limit);
* ``concurrencyPolicy: Forbid``: no slot is launched while a Job is active;
* Job names are deterministic per resource UID and slot, so creating the same slot twice
  yields ``409 AlreadyExists`` instead of a second Job.

All times are timezone-aware ``datetime`` objects in UTC; intervals are seconds.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from dataclasses import dataclass

#: Longest Job name: the Job controller copies it into the pod label ``job-name``
#: (a label value, at most 63 characters).
MAX_JOB_NAME = 63


def parse_time(value: str | None) -> dt.datetime | None:
    """Parse an RFC 3339 timestamp as Kubernetes writes it (``2024-05-01T12:00:00Z``); None stays None."""
    if not value:
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(dt.timezone.utc)


def format_time(value: dt.datetime) -> str:
    """RFC 3339 UTC with second precision and a ``Z`` suffix (``metav1.Time`` wire format)."""
    return value.astimezone(dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Decision:
    """What the controller should do now.

    ``launch``: create the Job for ``slot`` now. Otherwise ``wake_at`` is when to look again
    (None: only when something changes, e.g. while suspended).
    """

    launch: bool
    slot: dt.datetime | None = None
    wake_at: dt.datetime | None = None
    reason: str = ""


def due_slot(
    now: dt.datetime, interval: float, last_schedule: dt.datetime | None, created: dt.datetime
) -> dt.datetime:
    """The slot that is due next (may be in the past, i.e. due now).

    Before any run: ``created``. Afterwards: ``last_schedule + interval``, or, when several
    slots were missed, the most recent missed one (``last_schedule + k * interval <= now``).
    """
    if last_schedule is None:
        anchor, first = created, created
        if now <= first:
            return first
    else:
        anchor = last_schedule
        first = last_schedule + dt.timedelta(seconds=interval)
        if now < first:
            return first
    missed = math.floor((now - anchor).total_seconds() / interval)
    return anchor + dt.timedelta(seconds=max(missed * interval, 0 if last_schedule is None else interval))


def skipped_slots(last_schedule: dt.datetime, slot: dt.datetime, interval: float) -> int:
    """Slots between the last launched one and ``slot`` that never ran (0 when ``slot`` is the next one)."""
    return max(0, round((slot - last_schedule).total_seconds() / interval) - 1)


def decide(
    now: dt.datetime,
    *,
    interval: float,
    last_schedule: dt.datetime | None,
    created: dt.datetime,
    suspend: bool,
    active: bool,
    run_now: bool,
) -> Decision:
    """Decide whether to launch a check now.

    Args:
        now: the current time (UTC).
        interval: seconds between checks (``spec.interval``).
        last_schedule: ``status.lastScheduleTime`` parsed, None before the first run.
        created: ``metadata.creationTimestamp`` parsed.
        suspend: ``spec.suspend``; suspends scheduled runs only (``run_now`` still works).
        active: a Job is running (Forbid: nothing is launched meanwhile).
        run_now: the run-now annotation is present (one extra run, now).
    """
    if active:
        return Decision(False, reason="a check is running (Forbid)")
    if run_now:
        return Decision(True, slot=now.replace(microsecond=0), reason="run-now requested")
    if suspend:
        return Decision(False, reason="suspended")
    slot = due_slot(now, interval, last_schedule, created).replace(microsecond=0)
    if slot <= now:
        return Decision(True, slot=slot, reason="due")
    return Decision(False, wake_at=slot, reason="not yet due")


def job_name(resource_name: str, resource_uid: str, slot: dt.datetime) -> str:
    """Deterministic Job name for a resource and a slot: ``<name>-<uid hash>-<unix seconds of slot>``.

    ``<uid hash>`` is 6 hex digits of SHA-256 of the resource's ``metadata.uid``, so two
    resources whose names differ only where a Job name cannot (``dot.name`` and
    ``dot-name``: dots become dashes), or a resource deleted and re-created under the same
    name, never share a Job name; the owner reference is still checked before a Job is
    adopted (:meth:`.jobs.JobsApi.create`). Names too long for :data:`MAX_JOB_NAME` are
    shortened. The result is a valid DNS-1123 label.
    """
    suffix = f"{hashlib.sha256(resource_uid.encode()).hexdigest()[:6]}-{int(slot.timestamp())}"
    room = MAX_JOB_NAME - len(suffix) - 1
    base = resource_name.replace(".", "-")[:room].rstrip("-")
    return f"{base}-{suffix}"
