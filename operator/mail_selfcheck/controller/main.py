"""``mail-selfcheck operator``: run the kopf operator in this process."""

from __future__ import annotations

import asyncio
import logging

import kopf


def _quiet_wakeups(record: logging.LogRecord) -> bool:
    """Drop kopf's per-event success lines of the wake-up handlers (one per watch event)."""
    message = record.getMessage()
    return not (message.startswith("Handler 'resource_changed'") or message.startswith("Handler 'job_changed'"))


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
    kopf.configure(verbose=verbose)
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
            namespaces=namespaces or None,
            liveness_endpoint=liveness,
            standalone=True,
            memo=kopf.Memo(metrics_port=metrics_port),
        )
    )
    return 0
