"""The reconcile loop of one MailSelfcheck, run by its kopf daemon.

Each pass: harvest the active Job if it finished (status first, then history limits), then
launch the due slot's Job (Forbid: never while one is active), then sleep until the next
slot, a wake-up (the resource changed, its Job finished) or the daemon's stop.

State lives in the resource's status, never only in memory: the schedule comes from
``status.lastScheduleTime``, the running Job from ``status.active``; on start the loop also
adopts a Job it created but had no time to record (crash between create and status patch),
so a restart neither loses a result nor launches a slot twice. The only in-memory state is
the list of the resource's Jobs used for pruning: listed from the API once per loop, then
kept by the loop itself (it creates, harvests and deletes them).

API calls per check: create the Job and record it (2); on completion, list its pods, record
the result, delete Jobs beyond the history limits (2 + deletions). Every response is read
and parsed in a worker thread (:func:`.jobs.call_json`), never on kopf's event loop.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import kopf
import urllib3
from kubernetes import client
from pydantic import ValidationError

from ..models.spec import GROUP, PLURAL, VERSION, MailSelfcheckSpec
from . import jobs as jobs_mod
from .jobs import JobsApi, Outcome, call_json, job_finished, job_manifest, jobs_to_delete, outcome_from
from .metrics import Metrics
from .schedule import decide, format_time, job_name, parse_time
from .status import harvest_patch, launched_patch, pending_condition

#: Annotation that triggers one immediate check; removed by the operator once launched.
RUN_NOW_ANNOTATION = f"{GROUP}/run-now"
#: Longest sleep between passes (seconds), a safety net for missed watch events.
MAX_IDLE = 300.0
#: While a Job runs: seconds between fallback reads of it (watch events normally wake us).
ACTIVE_POLL = 30.0

Clock = Callable[[], dt.datetime]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass
class Shared:
    """Process-wide dependencies of every reconcile loop."""

    api_client: client.ApiClient
    metrics: Metrics
    clock: Clock = utcnow
    wakeups: dict[tuple[str, str], "Selfcheck"] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.jobs = JobsApi(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)

    def wake(self, namespace: str, name: str, *, job: dict[str, Any] | None | bool = False) -> None:
        """Wake the loop of ``namespace/name`` (no-op if it is not running).

        ``job``: the finished Job's body from a watch event (spares a read), ``None`` when
        the Job was deleted, ``False`` when the wake-up is not about a Job.
        """
        loop = self.wakeups.get((namespace, name))
        if loop is not None:
            loop.wake(job=job)


class Selfcheck:
    """Reconcile loop of one MailSelfcheck (``body`` is kopf's live view of the resource)."""

    def __init__(self, shared: Shared, body: kopf.Body, logger: logging.Logger | logging.LoggerAdapter) -> None:
        self.shared = shared
        self.body = body
        self.logger = logger
        self.namespace: str = body["metadata"]["namespace"]
        self.name: str = body["metadata"]["name"]
        self.uid: str = body["metadata"]["uid"]
        self.status: dict[str, Any] = json.loads(json.dumps(dict(body.get("status") or {})))
        self._event = asyncio.Event()
        self._check_job = True  # read the active Job on the first pass (operator restart)
        self._seen_jobs: dict[str, dict[str, Any]] = {}  # finished Jobs delivered by the watch
        # Owned Jobs (name -> compact body) for pruning, listed once per loop (on start or at
        # the first prune) and then kept up to date by this loop, the only creator of Jobs for
        # this resource: saves a Job list per check (one API call per run, O(Jobs) in the API
        # server). None = not listed yet.
        self._jobs: dict[str, dict[str, Any]] | None = None
        self._next_job_poll = shared.clock()

    # -------------------------------------------------------------- plumbing

    def wake(self, *, job: dict[str, Any] | None | bool = False) -> None:
        if job is not False:
            self._check_job = True
            if job is not None:
                self._seen_jobs[job["metadata"]["name"]] = job
        self._event.set()

    async def _patch_status(self, patch: dict[str, Any]) -> None:
        resp = await call_json(
            self.shared.custom.patch_namespaced_custom_object_status,
            GROUP, VERSION, self.namespace, PLURAL, self.name, patch,
            _content_type="application/merge-patch+json",
        )  # fmt: skip
        self.status = resp.get("status") or {}

    async def _patch_meta(self, patch: dict[str, Any]) -> None:
        await call_json(
            self.shared.custom.patch_namespaced_custom_object,
            GROUP, VERSION, self.namespace, PLURAL, self.name, patch,
            _content_type="application/merge-patch+json", parse=False,
        )  # fmt: skip

    # -------------------------------------------------------------- loop

    async def run(self, stopped: kopf.DaemonStopped) -> None:
        """Reconcile until ``stopped``; removes the resource's metrics if it was deleted."""
        key = (self.namespace, self.name)
        self.shared.wakeups[key] = self
        try:
            await self.start()
            while not stopped:
                self._event.clear()
                try:
                    wake_at = await self.reconcile()
                except (client.ApiException, urllib3.exceptions.HTTPError, OSError) as exc:  # API hiccup: retry soon, keep the loop
                    self.logger.warning("reconcile failed, retrying in 5 s: %s", _api_error(exc))
                    wake_at = self.shared.clock() + dt.timedelta(seconds=5)
                timeout = MAX_IDLE if wake_at is None else max(0.0, (wake_at - self.shared.clock()).total_seconds())
                await _first(self._event.wait(), stopped.wait(), timeout=min(timeout, MAX_IDLE))
        finally:
            self.shared.wakeups.pop(key, None)
            if stopped.reason and stopped.reason & kopf.DaemonStoppingReason.RESOURCE_DELETED:
                self.shared.metrics.forget(self.namespace, self.name)

    async def start(self) -> None:
        """Restore metrics from status, set ``Ready=Unknown`` if new, adopt an unrecorded Job."""
        st = self.status
        last_success = parse_time(st.get("lastSuccessTime"))
        self.shared.metrics.restore(
            self.namespace, self.name, success=st.get("success"),
            consecutive_failures=int(st.get("consecutiveFailures") or 0),
            last_success=last_success.timestamp() if last_success else None,
        )  # fmt: skip
        patch = pending_condition(st, generation=self.body["metadata"].get("generation"), now=self.shared.clock())
        if patch:
            await self._patch_status(patch)
        if not self.status.get("active"):
            await self._adopt()

    async def _adopt(self) -> None:
        known = {h.get("job") for h in self.status.get("history") or []} | {self.status.get("lastHarvestedJob")}
        last = parse_time(self.status.get("lastScheduleTime"))
        owned = await self.shared.jobs.owned(self.namespace, self.uid)
        self._jobs = {job["metadata"]["name"]: _compact(job) for job in owned}
        for job in owned:
            meta = job["metadata"]
            slot = parse_time((meta.get("annotations") or {}).get(jobs_mod.ANNOTATION_SLOT))
            if meta["name"] in known or slot is None or (last is not None and slot < last):
                continue
            self.logger.info("adopting Job %s (created but not recorded before a restart)", meta["name"])
            await self._patch_status(launched_patch(job, slot))
            return

    async def reconcile(self) -> dt.datetime | None:
        """One pass. Returns when to look again (None: only on a wake-up)."""
        now = self.shared.clock()
        active = self.status.get("active")
        if active:
            if not self._check_job and now < self._next_job_poll:
                return self._next_job_poll
            self._check_job = False
            job = self._seen_jobs.pop(active["name"], None)
            if job is None:
                job = await self.shared.jobs.get(self.namespace, active["name"])
            self._seen_jobs.clear()
            if job is not None and not job_finished(job):
                self._next_job_poll = now + dt.timedelta(seconds=ACTIVE_POLL)
                return self._next_job_poll
            await self.harvest(active, job)
            now = self.shared.clock()

        try:
            spec = MailSelfcheckSpec.model_validate(dict(self.body.get("spec") or {}))
        except ValidationError as exc:  # the CRD schema should have refused it
            self.logger.error("invalid spec, not scheduling: %s", exc.errors(include_url=False, include_input=False))
            return None
        self.shared.metrics.set_interval(self.namespace, self.name, spec.interval)
        meta = self.body["metadata"]
        run_now = RUN_NOW_ANNOTATION in (meta.get("annotations") or {})
        decision = decide(
            now,
            interval=spec.interval,
            last_schedule=parse_time(self.status.get("lastScheduleTime")),
            created=parse_time(meta["creationTimestamp"]) or now,
            suspend=spec.suspend,
            active=False,
            run_now=run_now,
        )
        if not decision.launch:
            return decision.wake_at
        await self.launch(spec, decision.slot, run_now=run_now)
        self._next_job_poll = self.shared.clock() + dt.timedelta(seconds=ACTIVE_POLL)
        return self._next_job_poll

    async def launch(self, spec: MailSelfcheckSpec, slot: dt.datetime, *, run_now: bool) -> None:
        """Create the slot's Job (409 = already launched) and record it as active."""
        name = job_name(self.name, slot)
        manifest = job_manifest(
            name=name, namespace=self.namespace, owner_name=self.name, owner_uid=self.uid, spec=spec, slot=slot
        )
        job, created = await self.shared.jobs.create(manifest)
        if self._jobs is not None:
            self._jobs[name] = _compact(job)
        if created:
            self.logger.info("launched Job %s for slot %s", name, format_time(slot))
        if not created and name == self.status.get("lastHarvestedJob"):
            await self._patch_status({"status": {"lastScheduleTime": format_time(slot)}})
        else:
            await self._patch_status(launched_patch(job, slot))
            self._check_job = not created  # an existing Job may already be finished
        if run_now:
            await self._patch_meta({"metadata": {"annotations": {RUN_NOW_ANNOTATION: None}}})

    async def harvest(self, active: dict[str, Any], job: dict[str, Any] | None) -> None:
        """Record the finished (or vanished) Job's outcome, emit a transition Event, prune old Jobs."""
        if job is None:
            outcome = Outcome.job_failed(f"Job {active['name']} disappeared before its result was read")
            if self._jobs is not None:
                self._jobs.pop(active["name"], None)
        else:
            outcome = outcome_from(job, await self.shared.jobs.pods(job))
            if self._jobs is not None:
                self._jobs[active["name"]] = _compact(job)
        now = self.shared.clock()
        patch, event = harvest_patch(
            self.status,
            outcome=outcome,
            job_name=active["name"],
            schedule_time=active.get("scheduleTime"),
            generation=self.body["metadata"].get("generation"),
            now=now,
        )
        await self._patch_status(patch)
        self.logger.info(
            "check %s: %s%s", active["name"], "success" if outcome.success else "failure",
            "" if outcome.success else f" ({outcome.error_class}): {outcome.error}",
        )  # fmt: skip
        self.shared.metrics.observe(
            self.namespace, self.name, success=outcome.success, error_class=outcome.error_class,
            send_time=outcome.send_time, reception_time=outcome.reception_time,
            consecutive_failures=int(self.status.get("consecutiveFailures") or 0), timestamp=now.timestamp(),
        )  # fmt: skip
        if event:
            kopf.event(self.body, type=event.type, reason=event.reason, message=event.message[:1000])
        await self.prune()

    async def prune(self) -> None:
        """Delete finished Jobs beyond ``successfulJobsHistoryLimit`` / ``failedJobsHistoryLimit``."""
        spec = self.body.get("spec") or {}
        results = {h["job"]: bool(h.get("success")) for h in self.status.get("history") or [] if "job" in h}
        if self._jobs is None:
            self._jobs = {j["metadata"]["name"]: _compact(j) for j in await self.shared.jobs.owned(self.namespace, self.uid)}
        names = jobs_to_delete(
            list(self._jobs.values()),
            results=results,
            successful_limit=int(spec.get("successfulJobsHistoryLimit", 3)),
            failed_limit=int(spec.get("failedJobsHistoryLimit", 1)),
            keep={(self.status.get("active") or {}).get("name", "")},
        )
        for name in names:
            await self.shared.jobs.delete(self.namespace, name)
            self._jobs.pop(name, None)


def _compact(job: dict[str, Any]) -> dict[str, Any]:
    """What pruning needs of a Job (name, creation time, conditions), to keep memory small."""
    meta = job.get("metadata") or {}
    return {
        "metadata": {"name": meta.get("name"), "creationTimestamp": meta.get("creationTimestamp")},
        "status": {"conditions": (job.get("status") or {}).get("conditions") or []},
    }


async def _first(*aws: Any, timeout: float) -> None:
    """Wait until the first awaitable finishes or ``timeout`` seconds pass; cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def _api_error(exc: BaseException) -> str:
    if isinstance(exc, client.ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"
