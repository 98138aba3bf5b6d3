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
from .jobs import (
    JobNameConflict, JobsApi, Outcome, api_refusal, call_json, expected_arrival, job_finished, job_manifest,
    jobs_to_delete, outcome_from,
)
from .metrics import Metrics
from .schedule import decide, format_time, job_name, parse_time, skipped_slots
from .status import (
    harvest_patch, heartbeat_transition, launched_patch, pending_condition, refused_patch, suspended_patch,
)

#: The finalizer round-1 operators put on every MailSelfcheck; removed on sight (the daemon
#: needs none, see :func:`.handlers._daemon_without_finalizer`). Never added any more.
LEGACY_FINALIZER = f"{GROUP}/finalizer"
#: Annotation that triggers one immediate check; removed by the operator once launched.
RUN_NOW_ANNOTATION = f"{GROUP}/run-now"
#: Longest sleep between passes (seconds), a safety net for missed watch events.
MAX_IDLE = 300.0
#: While a Job runs: seconds between fallback reads of it (watch events normally wake us).
ACTIVE_POLL = 30.0
#: Seconds before retrying a Job the API server refused (doubling up to :data:`REFUSED_MAX`);
#: a change of the spec retries at once.
REFUSED_BACKOFF = 10.0
REFUSED_MAX = 600.0
#: HTTP statuses of a Job creation that retrying the same manifest cannot fix soon: the spec
#: is invalid (400, 422) or an admission plugin/quota refuses it (403).
REFUSED_STATUSES = {400: "InvalidJobSpec", 403: "JobForbidden", 422: "InvalidJobSpec"}
#: ``status.errorClass`` of a refused Job.
JOB_REFUSED = "job_refused"
#: Seconds between two retries of a failing API call (network, 5xx), doubling up to ``MAX_IDLE``.
API_RETRY = 5.0

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
    by_uid: dict[str, "Selfcheck"] = field(default_factory=dict)

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

    def wake_uid(self, uid: str, *, blocked: Outcome) -> None:
        """Wake the loop of the resource with ``metadata.uid`` ``uid``: its probe pod cannot start."""
        loop = self.by_uid.get(uid)
        if loop is not None:
            loop.wake(blocked=blocked)

    def stop(self, namespace: str, name: str, *, uid: str | None) -> None:
        """The resource was deleted: end its loop (no finalizer holds the resource for kopf)."""
        loop = self.wakeups.get((namespace, name))
        if loop is not None and (uid is None or loop.uid == uid):
            loop.stop()


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
        self._blocked: Outcome | None = None  # the active Job's pod cannot start (from the pod watch)
        self._deleted = False
        # A refused Job creation: (generation, reason, retry at, back-off seconds).
        self._refused: tuple[Any, str, dt.datetime, float] | None = None
        self._api_retry = API_RETRY

    # -------------------------------------------------------------- plumbing

    def wake(self, *, job: dict[str, Any] | None | bool = False, blocked: Outcome | None = None) -> None:
        if blocked is not None:
            self._blocked = blocked
            self._check_job = True
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

    def stop(self) -> None:
        self._deleted = True
        self._event.set()

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
        self.shared.by_uid[self.uid] = self
        started = False
        try:
            while not stopped and not self._deleted:
                self._event.clear()
                try:
                    if not started:
                        await self.start()
                        started = True
                    wake_at = await self.reconcile()
                    self._api_retry = API_RETRY
                except (client.ApiException, urllib3.exceptions.HTTPError, OSError) as exc:  # API hiccup: retry, keep the loop
                    if isinstance(exc, client.ApiException) and exc.status == 404 and not await self._exists():
                        break  # deleted while we were not watching
                    self.shared.metrics.reconcile_errors.inc()
                    self.logger.warning("reconcile failed, retrying in %.0f s: %s", self._api_retry, _api_error(exc))
                    wake_at = self.shared.clock() + dt.timedelta(seconds=self._api_retry)
                    self._api_retry = min(2 * self._api_retry, MAX_IDLE)
                timeout = MAX_IDLE if wake_at is None else max(0.0, (wake_at - self.shared.clock()).total_seconds())
                await _first(self._event.wait(), stopped.wait(), timeout=min(timeout, MAX_IDLE))
        finally:
            if self.shared.wakeups.get(key) is self:
                del self.shared.wakeups[key]
            if self.shared.by_uid.get(self.uid) is self:
                del self.shared.by_uid[self.uid]
            if self._deleted or (stopped.reason and stopped.reason & kopf.DaemonStoppingReason.RESOURCE_DELETED):
                self.shared.metrics.forget(self.namespace, self.name)
                self.logger.info("deleted: reconcile loop stopped, its series removed")

    async def _exists(self) -> bool:
        """Whether this resource (same UID) still exists; if not, the loop ends."""
        try:
            got = await call_json(
                self.shared.custom.get_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL, self.name
            )
        except client.ApiException as exc:
            if exc.status != 404:
                return True  # cannot tell: keep the loop
            got = None
        except (urllib3.exceptions.HTTPError, OSError):
            return True
        if got is None or got["metadata"].get("uid") != self.uid:
            self._deleted = True
        return not self._deleted

    async def start(self) -> None:
        """Restore metrics from status, set ``Ready=Unknown`` if new, adopt an unrecorded Job."""
        st = self.status
        last_success = parse_time(st.get("lastSuccessTime"))
        self.shared.metrics.restore(
            self.namespace, self.name, success=st.get("success"),
            consecutive_failures=int(st.get("consecutiveFailures") or 0),
            last_success=last_success.timestamp() if last_success else None,
            send_time=st.get("sendTime"), reception_time=st.get("receptionTime"),
            imap_commands=st.get("imapCommands"), imap_session_seconds=st.get("imapSessionSeconds"),
        )  # fmt: skip
        patch = pending_condition(st, generation=self.body["metadata"].get("generation"), now=self.shared.clock())
        if patch:
            await self._patch_status(patch)
        await self._drop_legacy_finalizer()
        if not self.status.get("active"):
            await self._adopt()

    async def _drop_legacy_finalizer(self) -> None:
        """Remove the finalizer of round-1 operators, so deleting the resource never waits for us."""
        finalizers = list(self.body["metadata"].get("finalizers") or [])
        if LEGACY_FINALIZER not in finalizers or self.body["metadata"].get("deletionTimestamp"):
            return
        index = finalizers.index(LEGACY_FINALIZER)
        path = f"/metadata/finalizers/{index}"
        await call_json(
            self.shared.custom.patch_namespaced_custom_object,
            GROUP, VERSION, self.namespace, PLURAL, self.name,
            [{"op": "test", "path": path, "value": LEGACY_FINALIZER}, {"op": "remove", "path": path}],
            _content_type="application/json-patch+json", parse=False,
        )  # fmt: skip
        self.logger.info("removed the finalizer %s (deletion no longer waits for the operator)", LEGACY_FINALIZER)

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
            blocked, self._blocked = self._blocked, None
            if job is not None and not job_finished(job):
                if blocked is None:
                    self._next_job_poll = now + dt.timedelta(seconds=ACTIVE_POLL)
                    return self._next_job_poll
                # The pod cannot start: end the check now with the kubelet's reason.
                await self.shared.jobs.delete(self.namespace, active["name"])
                await self.harvest(active, None, outcome=blocked)
            else:
                await self.harvest(active, job)
            now = self.shared.clock()

        try:
            spec = MailSelfcheckSpec.model_validate(dict(self.body.get("spec") or {}))
        except ValidationError as exc:  # the CRD schema should have refused it (an older CRD?)
            errors = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False))
            await self._refuse(self.body["metadata"].get("generation"), "InvalidSpec", f"invalid spec, not scheduling: {errors}")
            return None
        meta = self.body["metadata"]
        created = parse_time(meta["creationTimestamp"]) or now
        self.shared.metrics.set_resource(
            self.namespace, self.name, interval=spec.interval, suspended=spec.suspend, created=created.timestamp()
        )
        generation = meta.get("generation")
        patch = suspended_patch(self.status, suspended=spec.suspend, generation=generation, now=now)
        if patch:
            await self._patch_status(patch)
        run_now = RUN_NOW_ANNOTATION in (meta.get("annotations") or {})
        # The last check failed and the spec changed since: check the fix at once, not an interval later.
        retry = self.status.get("success") is False and self.status.get("observedGeneration") not in (None, generation)
        last_schedule = parse_time(self.status.get("lastScheduleTime"))
        decision = decide(
            now,
            interval=spec.interval,
            last_schedule=last_schedule,
            created=created,
            suspend=spec.suspend,
            active=False,
            run_now=run_now or (retry and not spec.suspend),
        )
        if not decision.launch:
            return decision.wake_at
        if self._refused is not None:
            refused_generation, _, retry_at, _ = self._refused
            if refused_generation == generation and now < retry_at:
                return retry_at
        try:
            await self.launch(spec, decision.slot, run_now=run_now)
        except JobNameConflict as exc:
            return await self._refuse(generation, "JobNameConflict", str(exc))
        except client.ApiException as exc:
            if exc.status not in REFUSED_STATUSES:
                raise
            return await self._refuse(generation, REFUSED_STATUSES[exc.status], f"the API server refused the probe Job: {api_refusal(exc)}")
        self._refused = None
        if last_schedule is not None and not run_now and not retry and not spec.suspend:
            skipped = skipped_slots(last_schedule, decision.slot, spec.interval)
            if skipped:
                self.shared.metrics.skipped_slots.inc(skipped)
                self.logger.info("%d slot(s) missed since %s: ran the latest only", skipped, format_time(last_schedule))
        self._next_job_poll = self.shared.clock() + dt.timedelta(seconds=ACTIVE_POLL)
        return self._next_job_poll

    async def launch(self, spec: MailSelfcheckSpec, slot: dt.datetime, *, run_now: bool) -> None:
        """Create the slot's Job (409 = already launched) and record it as active."""
        name = job_name(self.name, self.uid, slot)
        manifest = job_manifest(
            name=name, namespace=self.namespace, owner_name=self.name, owner_uid=self.uid, spec=spec, slot=slot,
            recent=expected_arrival(self.status.get("history"), spec.imap.folder),
        )
        job, created = await self.shared.jobs.create(manifest)
        if self._jobs is not None:
            self._jobs[name] = _compact(job)
        if created:
            self.shared.metrics.jobs_launched.inc()
            self.logger.info("launched Job %s for slot %s", name, format_time(slot))
        if not created and name == self.status.get("lastHarvestedJob"):
            await self._patch_status({"status": {"lastScheduleTime": format_time(slot)}})
        else:
            await self._patch_status(launched_patch(job, slot))
            self._check_job = not created  # an existing Job may already be finished
        if run_now:
            await self._patch_meta({"metadata": {"annotations": {RUN_NOW_ANNOTATION: None}}})

    async def _refuse(self, generation: Any, reason: str, message: str) -> dt.datetime:
        """The Job for this spec cannot be created: say why in status (``Ready=False``) and one
        Warning Event, and back off (doubling) until the spec changes. Returns the retry time."""
        previous = self._refused
        # Same spec, same kind of refusal: already reported (the message may differ only by
        # the Job name, which follows the slot).
        same = previous is not None and previous[0] == generation and previous[1] == reason
        delay = min(2 * previous[3], REFUSED_MAX) if same else REFUSED_BACKOFF
        retry_at = self.shared.clock() + dt.timedelta(seconds=delay)
        self._refused = (generation, reason, retry_at, delay)
        ready = next((c for c in self.status.get("conditions") or [] if c.get("type") == "Ready"), {})
        if not same and ready.get("reason") == reason and ready.get("observedGeneration") == generation:
            same = True  # reported before an operator restart: status already says it, no second Event
        if same:
            self.logger.debug("Job still refused, next try in %.0f s", delay)
            return retry_at
        self.logger.warning("%s: %s (next try in %.0f s, or when the spec changes)", reason, message, delay)
        await self._patch_status(
            refused_patch(self.status, reason=reason, message=message, error_class=JOB_REFUSED,
                          generation=generation, now=self.shared.clock())
        )  # fmt: skip
        kopf.event(self.body, type="Warning", reason=reason, message=message[:1000])
        return retry_at

    async def harvest(self, active: dict[str, Any], job: dict[str, Any] | None, *, outcome: Outcome | None = None) -> None:
        """Record the finished (or vanished) Job's outcome, emit a transition Event, prune old Jobs.

        ``outcome``: the check's outcome when it is already known (its pod cannot start and
        the Job was deleted); otherwise it is read from the Job's pods.
        """
        if outcome is not None:
            if self._jobs is not None:
                self._jobs.pop(active["name"], None)
        elif job is None:
            outcome = Outcome.job_failed(f"Job {active['name']} disappeared before its result was read")
            if self._jobs is not None:
                self._jobs.pop(active["name"], None)
        else:
            outcome = outcome_from(job, await self.shared.jobs.pods(job))
            if self._jobs is not None:
                self._jobs[active["name"]] = _compact(job)
        now = self.shared.clock()
        heartbeat = heartbeat_transition(self.status, outcome)
        patch, event = harvest_patch(
            self.status,
            outcome=outcome,
            job_name=active["name"],
            schedule_time=active.get("scheduleTime"),
            generation=self.body["metadata"].get("generation"),
            now=now,
        )
        await self._patch_status(patch)
        if outcome.success:
            self.logger.info("check %s: success", active["name"])
        else:
            self.logger.warning("check %s: failure (%s): %s", active["name"], outcome.error_class, outcome.error)
        self.shared.metrics.observe(
            self.namespace, self.name, success=outcome.success, error_class=outcome.error_class,
            send_time=outcome.send_time, reception_time=outcome.reception_time,
            consecutive_failures=int(self.status.get("consecutiveFailures") or 0), timestamp=now.timestamp(),
            leftover_count=outcome.leftover_count,
        )  # fmt: skip
        self.shared.metrics.observe_details(
            self.namespace, self.name, timings=outcome.timings, tls=outcome.tls,
            webhook_failed=(outcome.webhook or {}).get("sent") is False,
            imap_commands=outcome.imap_commands, imap_session_seconds=outcome.imap_session_seconds,
        )  # fmt: skip
        if event:
            kopf.event(self.body, type=event.type, reason=event.reason, message=event.message[:1000])
        if heartbeat:
            kopf.event(self.body, type=heartbeat.type, reason=heartbeat.reason, message=heartbeat.message[:1000])
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
        return f"HTTP {exc.status} {exc.reason}: {api_refusal(exc)}" if exc.body else f"HTTP {exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"
