"""kopf registration of the MailSelfcheck operator. Thin: the logic lives in :mod:`.reconcile`.

* ``on.startup``: the project's own finalizer and annotation storage names, Event posting
  limited to explicit transition Events, the Kubernetes API client, the metrics endpoint;
* one daemon per MailSelfcheck running :class:`~.reconcile.Selfcheck`;
* watch-event handlers that wake a daemon when its resource changes or its Job finishes.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from ..models.spec import GROUP, KIND, PLURAL, VERSION
from . import metrics as metrics_mod
from .jobs import LABEL_MANAGED_BY, MANAGED_BY, job_finished
from .kube import api_client
from .reconcile import Selfcheck, Shared

FINALIZER = f"{GROUP}/finalizer"
#: Worker threads for the blocking ``kubernetes`` client calls.
API_THREADS = 32
#: HTTP connections kept to the API server: above :data:`API_THREADS`, so a burst never
#: makes urllib3 discard (and later re-handshake) a TLS connection ("Connection pool is full").
API_POOL = 2 * API_THREADS


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # Only explicit kopf.event() calls (transitions) become Kubernetes Events, not log lines.
    settings.posting.level = logging.CRITICAL
    settings.watching.server_timeout = 300
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=API_THREADS, thread_name_prefix="k8s-api")
    )
    metrics = metrics_mod.Metrics()
    if memo.get("metrics_port"):
        metrics_mod.serve(memo["metrics_port"])
        logger.info("metrics on :%d/metrics", memo["metrics_port"])
    memo["shared"] = Shared(api_client=api_client(pool_size=API_POOL), metrics=metrics)


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    shared = memo.get("shared")
    if shared is not None:
        shared.api_client.close()


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=10)
async def selfcheck(body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped, logger: Any, **_: Any) -> None:
    """One reconcile loop per MailSelfcheck, for the resource's lifetime."""
    await Selfcheck(memo["shared"], body, logger).run(stopped)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def resource_changed(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    memo["shared"].wake(namespace, name)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGED_BY})
async def job_changed(body: kopf.Body, type: str | None, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    if type != "DELETED" and not job_finished(body):
        return
    for owner in body.metadata.get("ownerReferences") or []:
        if owner.get("kind") == KIND and owner.get("apiVersion", "").startswith(GROUP + "/"):
            memo["shared"].wake(namespace, owner["name"], job=None if type == "DELETED" else dict(body))
