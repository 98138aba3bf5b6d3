"""``mail-selfcheck operator``: run the kopf operator in this process."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os

import kopf


def _quiet_wakeups(record: logging.LogRecord) -> bool:
    """Drop kopf's per-event success lines of the wake-up handlers (one per watch event)."""
    message = record.getMessage()
    return not message.startswith(("Handler 'resource_changed'", "Handler 'job_changed'", "Handler 'pod_changed'"))


#: glibc ``mallopt`` parameter number of ``M_ARENA_MAX`` (malloc.h).
_M_ARENA_MAX = -8
#: malloc arenas for the operator process (glibc's default is 8 per core).
MALLOC_ARENAS = 2


def _limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> None:
    """Cap glibc's malloc arenas unless ``MALLOC_ARENA_MAX`` is set.

    The API calls run in a pool of threads (:data:`.handlers.API_THREADS`); glibc gives
    threads that contend for the heap arenas of their own, each keeping freed memory
    fragmented, which inflates the resident size of a threaded Python process. No-op
    outside glibc.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, arenas)
    except (OSError, AttributeError):
        pass


def run_operator(namespaces: list[str], liveness: str | None, metrics_port: int | None, verbose: bool) -> int:
    """Run the operator until SIGINT/SIGTERM.

    Args:
        namespaces: namespaces to watch; empty = all namespaces (cluster-wide).
        liveness: kopf liveness endpoint URL (``http://0.0.0.0:8080/healthz``), None to disable.
        metrics_port: Prometheus ``/metrics`` port, None to disable.
        verbose: DEBUG logging.

    Returns:
        the process exit code (0 after a clean stop).
    """
    _limit_malloc_arenas()
    # log_prefix: every line about a resource starts with "[namespace/name]".
    kopf.configure(verbose=verbose, log_prefix=True)
    if not verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_quiet_wakeups)
    if not verbose:
        logging.getLogger("kubernetes").setLevel(logging.WARNING)
        logging.getLogger("urllib3").setLevel(logging.WARNING)
    from . import handlers  # noqa: F401  (registers the handlers)

    asyncio.run(
        kopf.operator(
            clusterwide=not namespaces,
            namespaces=namespaces,  # a list, empty when cluster-wide (kopf iterates it: never None)
            liveness_endpoint=liveness,
            standalone=True,
            memo=kopf.Memo(metrics_port=metrics_port),
        )
    )
    return 0
