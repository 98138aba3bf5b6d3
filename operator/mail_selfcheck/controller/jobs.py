"""The probe Job: its manifest (pure), reading its outcome (pure), creating, harvesting and pruning it.

Follows batch/v1 Job (https://kubernetes.io/docs/concepts/workloads/controllers/job/) and the
CronJob controller's conventions: one Job per slot with a deterministic name, an owner
reference to the MailSelfcheck (deleting the resource garbage-collects its Jobs and pods),
``restartPolicy: Never``, a small ``backoffLimit``, ``activeDeadlineSeconds`` just above the
probe timeout, ``ttlSecondsAfterFinished`` as a safety net, and history limits applied by
deleting old Jobs with ``propagationPolicy: Background``.

The probe writes its result JSON to ``/dev/termination-log``; the Job's pod reports it in
``status.containerStatuses[].state.terminated.message``
(https://kubernetes.io/docs/tasks/debug/debug-application/determine-reason-pod-failure/).

Secret values never enter the manifest: passwords, the probe secret, the webhook URL and a
Secret-held CA bundle are ``env[].valueFrom.secretKeyRef`` references resolved by the kubelet.

The API functions take an official ``kubernetes`` client ``ApiClient`` and run its blocking
calls in worker threads (:func:`asyncio.to_thread`), so kopf's event loop never blocks.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable

from kubernetes import client
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from ..models.result import ProbeResult
from ..models.settings import env_name
from ..models.spec import API_VERSION, GROUP, KIND, MailSelfcheckSpec
from .schedule import format_time

#: Default probe image; the operator's deployment sets ``MAIL_SELFCHECK_PROBE_IMAGE``.
DEFAULT_IMAGE = os.environ.get("MAIL_SELFCHECK_PROBE_IMAGE", "ghcr.io/mail-selfcheck/mail-selfcheck:0.2.0")
TERMINATION_LOG = "/dev/termination-log"
DEFAULT_COMMAND = ["mail-selfcheck", "run", "--json", "--result-file", TERMINATION_LOG]
CONTAINER = "probe"

LABEL_OWNER_UID = f"{GROUP}/owner-uid"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "mail-selfcheck-operator"
ANNOTATION_SLOT = f"{GROUP}/schedule-time"

#: Pod retries before the Job fails: a crash is worth one retry at most. The probe's own
#: verdicts (:data:`VERDICT_EXIT_CODES`) are never retried (``podFailurePolicy``).
BACKOFF_LIMIT = 1
#: Exit codes of ``mail-selfcheck run`` that carry a verdict: 1 = the check failed, 2 = the
#: configuration is invalid (https://kubernetes.io/docs/concepts/workloads/controllers/job/#pod-failure-policy).
VERDICT_EXIT_CODES = (1, 2)
#: Seconds added to the probe timeout for ``activeDeadlineSeconds``. The probe sends the
#: heartbeat's start signal (<= 10.5 s), reaches its verdict within ``timeout``, cleans up
#: within 10 s more, then sends the final heartbeat signal (<= ~31.5 s to an unreachable
#: service: three 10 s attempts and back-off): 45 s covers the usual case (a failing heartbeat
#: service fails in seconds), so the deadline only ends a probe that hangs.
DEADLINE_MARGIN = 45
#: Lower bound of ``ttlSecondsAfterFinished`` (seconds); history limits normally delete earlier.
MIN_TTL = 3600
#: Error class of a check whose Job ended without a probe result.
JOB_FAILED = "job_failed"
#: Error class of a check whose container cannot be created from its spec: a missing Secret,
#: ConfigMap or key (``CreateContainerConfigError``), a runtime refusal (``CreateContainerError``).
JOB_CONFIG = "job_config"
#: Error class of a check whose image cannot be pulled (``ErrImagePull``, ``ImagePullBackOff``, ...).
IMAGE_PULL = "image_pull"
#: Error class of a check whose pod no node can take (``PodScheduled=False``, ``Unschedulable``).
UNSCHEDULABLE = "unschedulable"

#: Container ``state.waiting.reason`` values after which the kubelet cannot start the probe
#: without a change by someone (kubelet ``images``/``kuberuntime`` reasons), with their class.
#: ``ContainerCreating`` and ``PodInitializing`` are progress, not listed.
BLOCKING_WAITING_REASONS = {
    "CreateContainerConfigError": JOB_CONFIG,
    "CreateContainerError": JOB_CONFIG,
    "RunContainerError": JOB_CONFIG,
    "ErrImagePull": IMAGE_PULL,
    "ImagePullBackOff": IMAGE_PULL,
    "InvalidImageName": IMAGE_PULL,
    "ErrImageNeverPull": IMAGE_PULL,
    "CrashLoopBackOff": JOB_FAILED,
}


# ----------------------------------------------------------------------------- manifest


def _value(name: str, value: Any) -> dict[str, Any]:
    return {"name": name, "value": str(value)}


def _secret(name: str, ref: Any) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


#: Successful reception times passed to a probe to plan its arrival detection.
EXPECTED_ARRIVAL_SAMPLES = 10


def expected_arrival(history: list[dict[str, Any]] | None, folder: str) -> list[float]:
    """Reception times (seconds) of the newest :data:`EXPECTED_ARRIVAL_SAMPLES` successful
    checks in ``status.history`` (newest first, as the status holds it), oldest first.

    Entries that record a ``folder`` other than ``folder`` (the spec's watched folder) are
    left out: a message found elsewhere says nothing about delivery to this one. Entries
    without ``receptionTime`` (failures) are skipped."""
    times = []
    for entry in history or []:
        seconds = entry.get("receptionTime")
        if not entry.get("success") or not isinstance(seconds, (int, float)) or seconds < 0:
            continue
        if entry.get("folder") not in (None, folder):
            continue
        times.append(float(seconds))
        if len(times) == EXPECTED_ARRIVAL_SAMPLES:
            break
    return times[::-1]


def probe_env(spec: MailSelfcheckSpec, recent: list[float] | tuple[float, ...] = ()) -> list[dict[str, Any]]:
    """The probe's ``MESSAGES_SELFCHECK_*`` environment for ``spec`` (``core/v1 EnvVar`` list).

    Names come from :func:`mail_selfcheck.models.settings.env_name` (one vocabulary with the
    probe). Confidential values are Secret references only. ``recent``: reception times in
    seconds (:func:`expected_arrival`), passed as ``MESSAGES_SELFCHECK_IMAP_EXPECTED_ARRIVAL``
    (comma-separated) when not empty.
    """
    env = [
        _value(env_name("from_address"), spec.from_address),
        _value(env_name("to_address"), spec.to_address),
        _secret(env_name("secret"), spec.secret_ref),
        _value(env_name("interval"), spec.interval),
        _value(env_name("timeout"), spec.timeout),
        _value(env_name("smtp_host"), spec.smtp.host),
        _value(env_name("smtp_security"), spec.smtp.security),
        _value(env_name("imap_host"), spec.imap.host),
        _value(env_name("imap_security"), spec.imap.security),
        _value(env_name("imap_folder"), spec.imap.folder),
    ]
    if spec.imap.password_secret_ref:
        env.append(_secret(env_name("imap_password"), spec.imap.password_secret_ref))
    if spec.smtp.auth != "password":
        env.append(_value(env_name("smtp_auth"), spec.smtp.auth))
    if spec.imap.auth != "password":
        env.append(_value(env_name("imap_auth"), spec.imap.auth))
    if spec.imap.junk_folders:
        env.append(_value(env_name("imap_junk_folders"), ",".join(spec.imap.junk_folders)))
    if recent:
        env.append(_value(env_name("imap_expected_arrival"), ",".join(f"{t:g}" for t in recent)))
    for side in (spec.smtp, spec.imap):
        if side.oauth2_refresh_token_ref:
            prefix = "smtp" if side is spec.smtp else "imap"
            env.append(_secret(env_name(f"{prefix}_oauth2_refresh_token"), side.oauth2_refresh_token_ref))
    if spec.oauth2:
        o = spec.oauth2
        env.append(_value(env_name("oauth2_provider"), o.provider))
        for field, value in (("oauth2_tenant", o.tenant), ("oauth2_token_url", o.token_url),
                             ("oauth2_client_id", o.client_id), ("oauth2_scope", o.scope),
                             ("oauth2_mechanism", o.mechanism)):
            if value:
                env.append(_value(env_name(field), value))
        for field, ref in (("oauth2_client_secret", o.client_secret_ref),
                           ("oauth2_client_certificate_pem", o.client_certificate_ref),
                           ("oauth2_service_account_json", o.service_account_key_ref)):
            if ref:
                env.append(_secret(env_name(field), ref))
    if spec.smtp.port:
        env.append(_value(env_name("smtp_port"), spec.smtp.port))
    if spec.smtp.username:
        env.append(_value(env_name("smtp_username"), spec.smtp.username))
    if spec.smtp.password_secret_ref:
        env.append(_secret(env_name("smtp_password"), spec.smtp.password_secret_ref))
    if spec.imap.port:
        env.append(_value(env_name("imap_port"), spec.imap.port))
    if spec.imap.username:
        env.append(_value(env_name("imap_username"), spec.imap.username))
    if spec.webhook_url_secret_ref:
        env.append(_secret(env_name("webhook_url"), spec.webhook_url_secret_ref))
    if spec.webhook:
        if spec.webhook.kind != "generic":
            env.append(_value(env_name("webhook_kind"), spec.webhook.kind))
        if spec.webhook.failure_url_secret_ref:
            env.append(_secret(env_name("webhook_failure_url"), spec.webhook.failure_url_secret_ref))
        if spec.webhook.token_secret_ref:
            env.append(_secret(env_name("webhook_token"), spec.webhook.token_secret_ref))
    if spec.tls:
        bundle = spec.tls.ca_bundle
        if bundle and bundle.secret_key_ref:
            env.append(_secret(env_name("tls_ca_pem"), bundle.secret_key_ref))
        elif bundle and bundle.config_map_key_ref:
            ref = bundle.config_map_key_ref
            env.append(
                {"name": env_name("tls_ca_pem"), "valueFrom": {"configMapKeyRef": {"name": ref.name, "key": ref.key}}}
            )
        if spec.tls.insecure_skip_verify:
            env.append(_value(env_name("tls_insecure_skip_verify"), "true"))
    return env


def instance_label(resource_name: str) -> str:
    """The ``app.kubernetes.io/instance`` label value naming the MailSelfcheck of a Job and its pod:
    the resource name, or for names above 63 characters (a label value's limit) its first 54
    characters, ``-`` and 8 hex digits of its SHA-256, so ``kubectl get jobs -l
    app.kubernetes.io/instance=<name>`` selects a resource's Jobs."""
    if len(resource_name) <= 63:
        return resource_name
    digest = hashlib.sha256(resource_name.encode()).hexdigest()[:8]
    return f"{resource_name[:54].rstrip('-.')}-{digest}"


def job_manifest(
    *,
    name: str,
    namespace: str,
    owner_name: str,
    owner_uid: str,
    spec: MailSelfcheckSpec,
    slot: dt.datetime,
    recent: list[float] | tuple[float, ...] = (),
) -> dict[str, Any]:
    """The batch/v1 Job for one check of the MailSelfcheck ``owner_name`` at ``slot``;
    ``recent``: reception times (seconds) for the probe's detection plan (:func:`probe_env`).

    Returns a dict ready for ``BatchV1Api.create_namespaced_job``.
    """
    job = spec.job
    labels = {
        "app.kubernetes.io/name": "mail-selfcheck",
        "app.kubernetes.io/instance": instance_label(owner_name),
        "app.kubernetes.io/component": "probe",
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_OWNER_UID: owner_uid,
    }
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": (job.image if job and job.image else DEFAULT_IMAGE),
        "command": list(job.command) if job and job.command else list(DEFAULT_COMMAND),
        "env": probe_env(spec, recent),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    if job and job.image_pull_policy:
        container["imagePullPolicy"] = job.image_pull_policy
    if job and job.resources:
        container["resources"] = job.resources.model_dump(by_alias=True, exclude_none=True)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "16Mi"}}],
    }
    if job and job.node_selector:
        pod_spec["nodeSelector"] = dict(job.node_selector)
    if job and job.tolerations:
        pod_spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in job.tolerations]
    if job and job.service_account_name:
        pod_spec["serviceAccountName"] = job.service_account_name
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "annotations": {ANNOTATION_SLOT: format_time(slot)},
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": KIND,
                    "name": owner_name,
                    "uid": owner_uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "backoffLimit": BACKOFF_LIMIT,
            # A failed check (exit 1) or an invalid configuration (exit 2) is a verdict, not a
            # crash: fail the Job at once, no retry pod; the result is read from the pod anyway.
            "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {
                "containerName": CONTAINER, "operator": "In", "values": list(VERDICT_EXIT_CODES)}}]},
            "activeDeadlineSeconds": int(math.ceil(spec.timeout)) + DEADLINE_MARGIN,
            "ttlSecondsAfterFinished": max(MIN_TTL, 3 * spec.interval),
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


# ----------------------------------------------------------------------------- outcome


@dataclass(frozen=True)
class Outcome:
    """A finished check as the controller records it (a probe result, or why there is none).

    ``send_time`` and ``reception_time`` are seconds; ``error_class`` is a probe error class
    (:data:`mail_selfcheck.models.result.ErrorClass`) or :data:`JOB_FAILED`.
    """

    success: bool
    error: str | None = None
    error_class: str | None = None
    send_time: float | None = None
    reception_time: float | None = None
    leftover_count: int | None = None
    cleanup_warning: str | None = None
    timings: dict[str, float] | None = None
    #: endpoint -> {version, cipher, not_after (Unix seconds), hostname_matched}
    tls: dict[str, dict[str, Any]] | None = None
    #: {kind, signal, sent, error}
    webhook: dict[str, Any] | None = None
    auth_warning: str | None = None
    #: the folder the message was found in (the watched one on success)
    folder: str | None = None
    #: the IMAP load of the check: commands sent, seconds connected
    imap_commands: int | None = None
    imap_session_seconds: float | None = None

    @classmethod
    def from_result(cls, result: ProbeResult) -> "Outcome":
        return cls(
            success=result.success,
            error=None if result.success else (result.error or "probe reported failure without an error"),
            error_class=None if result.success else (result.error_class or "internal"),
            send_time=result.send_time,
            reception_time=result.reception_time,
            leftover_count=result.leftover_count,
            cleanup_warning=result.cleanup_warning,
            timings=result.timings,
            tls={k: v.model_dump() for k, v in result.tls.items()} if result.tls else None,
            webhook=result.webhook.model_dump() if result.webhook else None,
            auth_warning=result.auth_warning,
            folder=result.folder,
            imap_commands=result.imap_commands,
            imap_session_seconds=result.imap_session_seconds,
        )

    @classmethod
    def job_failed(cls, message: str) -> "Outcome":
        return cls(success=False, error=message, error_class=JOB_FAILED)


def _condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return cond
    return None


def job_finished(job: dict[str, Any]) -> bool:
    """True when the Job has a ``Complete`` or ``Failed`` condition with status True."""
    return _condition(job, "Complete") is not None or _condition(job, "Failed") is not None


def job_succeeded(job: dict[str, Any]) -> bool:
    return _condition(job, "Complete") is not None


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == CONTAINER:
            return (status.get("state") or {}).get("terminated") or (status.get("lastState") or {}).get("terminated")
    return None


def _waiting_reason(pods: list[dict[str, Any]]) -> str | None:
    for pod in pods:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (status.get("state") or {}).get("waiting")
            if waiting and waiting.get("reason"):
                return _short(f"{waiting['reason']}: {waiting.get('message', '')}".rstrip(": "))
    return None


def blocked_pod(pod: dict[str, Any]) -> Outcome | None:
    """The failed check for a probe pod that cannot start, or None while it can still run.

    A pod blocks when its container waits for one of :data:`BLOCKING_WAITING_REASONS`
    (the kubelet's message says what is wrong: ``couldn't find key imap-password in Secret
    mail/creds``), or when the scheduler reports ``PodScheduled=False`` with reason
    ``Unschedulable`` (https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/).
    Such a check ends at once with that message instead of at the Job's deadline.
    """
    name = (pod.get("metadata") or {}).get("name", "?")
    status = pod.get("status") or {}
    for cstatus in status.get("containerStatuses") or []:
        waiting = (cstatus.get("state") or {}).get("waiting") or {}
        error_class = BLOCKING_WAITING_REASONS.get(waiting.get("reason", ""))
        if error_class:
            detail = _short(f"{waiting['reason']}: {waiting.get('message', '')}".rstrip(": "))
            return Outcome(success=False, error=f"probe pod {name} cannot start: {detail}", error_class=error_class)
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
            detail = _short(f"Unschedulable: {cond.get('message', '')}".rstrip(": "))
            return Outcome(success=False, error=f"probe pod {name} cannot be scheduled: {detail}", error_class=UNSCHEDULABLE)
    return None


def parse_result(message: str) -> ProbeResult | None:
    """The probe result in a termination message: the whole message, else its last JSON line."""
    candidates = [message] + [line for line in reversed(message.splitlines()) if line.startswith("{")]
    for text in candidates:
        try:
            return ProbeResult.from_json(text)
        except (ValidationError, ValueError):
            continue
    return None


def outcome_from(job: dict[str, Any], pods: list[dict[str, Any]]) -> Outcome:
    """The outcome of a finished Job, from its pods' termination messages.

    The newest pod holding a parseable probe result wins. Without any result the check
    failed; the error says why: the container's termination (``OOMKilled``, exit code, the
    tail of its message), a waiting reason (``ImagePullBackOff``) or the Job's ``Failed``
    condition (``DeadlineExceeded``, ``BackoffLimitExceeded``).
    """
    name = (job.get("metadata") or {}).get("name", "?")
    ordered = sorted(pods, key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "", reverse=True)
    crash: str | None = None
    for pod in ordered:
        term = _terminated(pod)
        if not term:
            continue
        message = (term.get("message") or "").strip()
        result = parse_result(message)
        if result is not None:
            return Outcome.from_result(result)
        if crash is None:
            detail = f"exit code {term.get('exitCode')}"
            if term.get("reason"):
                detail = f"{term['reason']}, {detail}"
            crash = f"probe container ended without a result ({detail})"
            if message:
                crash += f": {_short(message, 200)}"
    failed = _condition(job, "Failed")
    parts = [f"Job {name} failed without a probe result" if failed else f"Job {name} finished without a probe result"]
    if failed:
        parts.append(f"{failed.get('reason', 'Failed')}: {_short(failed.get('message', ''))}".rstrip(": "))
    if crash:
        parts.append(crash)
    else:
        waiting = _waiting_reason(ordered)
        if waiting:
            parts.append(f"container never ran ({waiting})")
    return Outcome.job_failed("; ".join(parts))


def jobs_to_delete(
    jobs: list[dict[str, Any]], *, results: dict[str, bool], successful_limit: int, failed_limit: int, keep: set[str]
) -> list[str]:
    """Names of finished Jobs beyond the history limits (oldest first), CronJob-style.

    A Job counts as successful when its recorded check succeeded (``results``: Job name →
    success, from ``status.history``); a Job with no recorded result counts by its own
    ``Complete``/``Failed`` condition. Unfinished Jobs and ``keep`` are never deleted.
    """
    finished = [j for j in jobs if job_finished(j) and j["metadata"]["name"] not in keep]
    finished.sort(key=lambda j: j["metadata"].get("creationTimestamp") or "", reverse=True)
    ok, bad = [], []
    for j in finished:
        name = j["metadata"]["name"]
        (ok if results.get(name, job_succeeded(j)) else bad).append(name)
    return list(reversed(ok[successful_limit:])) + list(reversed(bad[failed_limit:]))


# ----------------------------------------------------------------------------- API


async def call_json(fn: Callable[..., Any], *args: Any, parse: bool = True, **kwargs: Any) -> Any:
    """Run the client call ``fn(*args, **kwargs)`` in a worker thread and return its JSON body.

    The call is made with ``_preload_content=False`` (raw JSON, no model classes) and the
    body is read and parsed in the worker thread too: a response read on kopf's event loop
    would block it for as long as the API server takes to send the body. The connection is
    returned to the pool in every case. ``parse=False``: the body is discarded, None returned.
    """

    def call() -> Any:
        resp = fn(*args, _preload_content=False, **kwargs)
        try:
            return json.loads(resp.data) if parse else resp.drain_conn()
        finally:
            resp.release_conn()

    return await asyncio.to_thread(call)


class JobNameConflict(Exception):
    """The slot's Job name is taken by a Job this resource does not own (never adopted)."""


def api_refusal(exc: ApiException) -> str:
    """The API server's reason for refusing a request: ``Status.message`` of the response body
    (``Job.batch "x" is invalid: spec.template...: Invalid value: ...``), else ``HTTP <code> <reason>``.
    """
    try:
        message = json.loads(exc.body or "{}").get("message")
    except (ValueError, AttributeError):
        message = None
    return _short(message, 900) if message else f"HTTP {exc.status} {exc.reason}"


class JobsApi:
    """Async facade over ``BatchV1Api``/``CoreV1Api`` for the probe Jobs (raw JSON dicts in and out).

    Every method runs one blocking client call in a worker thread. Errors other than the
    ones documented per method propagate as ``kubernetes.client.rest.ApiException``.
    """

    def __init__(self, api_client: client.ApiClient) -> None:
        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)

    async def create(self, manifest: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create the Job; on 409 AlreadyExists return the existing one. Returns ``(job, created)``.

        A Job that already exists is adopted only when its controller owner reference is the
        manifest's owner (same UID).

        Raises:
            JobNameConflict: the existing Job belongs to someone else.
            kubernetes.client.rest.ApiException: any other refusal (422 Invalid: the API
                server's message is in ``exc.body``, see :func:`api_refusal`).
        """
        ns, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
        try:
            return await call_json(self.batch.create_namespaced_job, ns, manifest), True
        except ApiException as exc:
            if exc.status != 409:
                raise
        existing = await self.get(ns, name)
        if existing is None:  # deleted in between: treat as launched and gone
            return {"metadata": {"name": name, "namespace": ns}}, False
        owner_uid = manifest["metadata"]["ownerReferences"][0]["uid"]
        owners = {o.get("uid") for o in existing["metadata"].get("ownerReferences") or [] if o.get("controller")}
        if owners != {owner_uid}:
            raise JobNameConflict(f"Job {ns}/{name} already exists and is not owned by this MailSelfcheck")
        return existing, False

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Job, or None when it does not exist (404)."""
        try:
            return await call_json(self.batch.read_namespaced_job, name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def owned(self, namespace: str, owner_uid: str) -> list[dict[str, Any]]:
        """Jobs created for the MailSelfcheck with UID ``owner_uid``."""
        resp = await call_json(self.batch.list_namespaced_job, namespace, label_selector=f"{LABEL_OWNER_UID}={owner_uid}")
        return resp.get("items") or []

    async def pods(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        """Pods of ``job`` (selected by its controller UID label)."""
        uid = job["metadata"].get("uid")
        selector = f"batch.kubernetes.io/controller-uid={uid}" if uid else f"job-name={job['metadata']['name']}"
        resp = await call_json(self.core.list_namespaced_pod, job["metadata"]["namespace"], label_selector=selector)
        return resp.get("items") or []

    async def delete(self, namespace: str, name: str) -> None:
        """Delete a Job and, in the background, its pods; a missing Job is fine."""
        try:
            await call_json(self.batch.delete_namespaced_job, name, namespace, propagation_policy="Background", parse=False)
        except ApiException as exc:
            if exc.status != 404:
                raise
