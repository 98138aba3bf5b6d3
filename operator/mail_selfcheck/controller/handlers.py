"""kopf registration of the MailSelfcheck operator. Thin: the logic lives in :mod:`.reconcile`.

* ``on.startup``: annotation storage names, Event posting limited to explicit transition
  Events and signed with the project's component and the pod's name, server-side label
  selectors for the Job and pod watches, the Kubernetes API client, the metrics endpoint;
* one daemon per MailSelfcheck running :class:`~.reconcile.Selfcheck`, **without a
  finalizer** (see :func:`_daemon_without_finalizer`);
* watch-event handlers that wake a daemon when its resource changes, its Job finishes or its
  probe pod cannot start, and that stop it when its resource is deleted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from ..models.spec import GROUP, KIND, PLURAL, VERSION
from . import metrics as metrics_mod
from .jobs import LABEL_MANAGED_BY, LABEL_OWNER_UID, MANAGED_BY, blocked_pod, job_finished
from .kube import api_client
from .reconcile import LEGACY_FINALIZER, Selfcheck, Shared

#: ``reportingComponent`` / ``source.component`` of the Events the operator posts.
REPORTING_COMPONENT = "mail-selfcheck-operator"
#: Server-side selector of the Jobs and pods the operator watches (only its own).
MANAGED_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
#: Worker threads for the blocking ``kubernetes`` client calls.
API_THREADS = 32
#: HTTP connections kept to the API server: above :data:`API_THREADS`, so a burst never
#: makes urllib3 discard (and later re-handshake) a TLS connection ("Connection pool is full").
API_POOL = 2 * API_THREADS


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    settings.persistence.finalizer = LEGACY_FINALIZER  # only ever removed (no handler needs it)
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # Only explicit kopf.event() calls (transitions) become Kubernetes Events, not log lines.
    settings.posting.level = logging.CRITICAL
    settings.watching.server_timeout = 300
    # Never give up on an API request (kopf's default gives up after 8 retries, ~54 s, and the
    # operator exits): a watched namespace re-created without its Role answers 403 until
    # `helm upgrade` restores it; the other namespaces must go on meanwhile.
    settings.networking.error_backoffs = RetryForever()
    # Events name their author: `kubectl describe` shows "From: mail-selfcheck-operator".
    settings.posting.reporting_component = REPORTING_COMPONENT
    settings.posting.reporting_instance = os.environ.get("POD_NAME") or socket.gethostname()
    # Watch only the operator's own Jobs and pods, filtered by the API server.
    settings.watching.label_selectors["batch", "v1", "jobs"] = MANAGED_SELECTOR
    settings.watching.label_selectors["v1", "pods"] = MANAGED_SELECTOR
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=API_THREADS, thread_name_prefix="k8s-api")
    )
    metrics = metrics_mod.Metrics()
    if memo.get("metrics_port"):
        metrics_mod.serve(memo["metrics_port"])
        logger.info("metrics on :%d/metrics", memo["metrics_port"])
    memo["shared"] = Shared(api_client=api_client(pool_size=API_POOL), metrics=metrics)


class RetryForever:
    """kopf's default back-off sequence (seconds), then every :attr:`STEADY` seconds, forever.

    An iterable, not an iterator: kopf iterates it afresh for every request. Not ``Sized``, so
    kopf logs attempts as ``#n`` without a total.
    """

    FIRST = (1, 1, 2, 3, 5, 8, 13, 21)
    STEADY = 30

    def __iter__(self) -> Any:
        yield from self.FIRST
        while True:
            yield self.STEADY


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    shared = memo.get("shared")
    if shared is not None:
        shared.api_client.close()


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=10)
async def selfcheck(body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped, logger: Any, **_: Any) -> None:
    """One reconcile loop per MailSelfcheck, for the resource's lifetime."""
    await Selfcheck(memo["shared"], body, logger).run(stopped)


def _daemon_without_finalizer(fn: Any, registry: kopf.OperatorRegistry | None = None) -> None:
    """Register the daemon ``fn`` as not requiring a finalizer.

    kopf puts a finalizer on every resource that has a daemon, so that it can stop the
    daemon before the resource is gone. This operator needs nothing done at deletion: its
    Jobs and pods are garbage-collected through their owner references, and the daemon is
    stopped by :func:`resource_changed` on the ``DELETED`` watch event. A finalizer would
    only make ``kubectl delete mailselfcheck`` (and the deletion of its namespace) hang
    whenever the operator is not running: after ``helm uninstall``, during a crash loop.
    kopf 1.x has no public flag for this (``@kopf.daemon`` hard-codes
    ``requires_finalizer=True``), so the registered handler is replaced by a copy with the
    flag off; ``tests/unit/test_handlers.py`` fails if kopf changes that structure.
    """
    spawning = (registry or kopf.get_default_registry())._spawning
    handlers = spawning._handlers
    for index, handler in enumerate(handlers):
        if handler.fn is fn:
            handlers[index] = dataclasses.replace(handler, requires_finalizer=False)
            return
    raise RuntimeError(f"daemon {fn.__name__} is not registered")


_daemon_without_finalizer(selfcheck)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def resource_changed(body: kopf.Body, type: str | None, namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    if type == "DELETED":
        memo["shared"].stop(namespace, name, uid=body.metadata.uid)
    else:
        memo["shared"].wake(namespace, name)


def _owner_names(body: kopf.Body) -> list[str]:
    return [
        owner["name"]
        for owner in body.metadata.get("ownerReferences") or []
        if owner.get("kind") == KIND and owner.get("apiVersion", "").startswith(GROUP + "/")
    ]


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGED_BY})
async def job_changed(body: kopf.Body, type: str | None, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    if type != "DELETED" and not job_finished(body):
        return
    for owner in _owner_names(body):
        memo["shared"].wake(namespace, owner, job=None if type == "DELETED" else dict(body))


@kopf.on.event("v1", "pods", labels={LABEL_MANAGED_BY: MANAGED_BY})
async def pod_changed(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    """Wake the owner of a probe pod that cannot start (missing Secret key, image pull, ...)."""
    if type == "DELETED":
        return
    uid = body.metadata.labels.get(LABEL_OWNER_UID)
    blocked = blocked_pod(dict(body))
    if uid and blocked is not None:
        memo["shared"].wake_uid(uid, blocked=blocked)
