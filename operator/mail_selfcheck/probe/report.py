"""Step 7: the ``selfcheck_completed`` log line and the heartbeat webhook.

Log line (structlog), exactly one per run::

    selfcheck_completed success=true send_time=0.150 reception_time=2.340        (INFO)
    selfcheck_completed success=false error="Message not received within 60 seconds"   (ERROR)

``console`` renders ``key=value`` pairs (logfmt-style values); ``json`` renders one JSON
object per line for log pipelines.
"""

from __future__ import annotations

import json
import logging
import sys

import requests
import structlog
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from ..models.result import ProbeResult

WEBHOOK_TIMEOUT = 10.0  # seconds per attempt
WEBHOOK_RETRIES = 2  # extra attempts on connection errors and 429/5xx replies

log = structlog.get_logger("mail_selfcheck.probe")


def _logfmt_values(_logger, _name, event_dict):
    """Render values the logfmt way: ``true``/``false``, seconds with 3 decimals, quoted text."""
    for key, value in list(event_dict.items()):
        if key in ("event", "timestamp", "level"):
            continue
        if isinstance(value, bool):
            event_dict[key] = "true" if value else "false"
        elif isinstance(value, float):
            event_dict[key] = f"{value:.3f}"
        elif value is None:
            event_dict[key] = "null"
        elif isinstance(value, str) and (not value or any(c in value for c in ' "=\\')):
            event_dict[key] = json.dumps(value)
    return event_dict


def _render_line(_logger, _name, event_dict) -> str:
    """``<timestamp> <LEVEL> <event> key=value ...`` in the order the values were logged."""
    head = [event_dict.pop("timestamp", ""), event_dict.pop("level", "info").upper(), event_dict.pop("event", "")]
    return " ".join(head + [f"{key}={value}" for key, value in event_dict.items()])


def configure_logging(verbose: bool = False, log_format: str = "console") -> None:
    """Configure structlog for the probe: INFO (DEBUG with ``verbose``) to stderr.

    Args:
        log_format: ``console`` (human, ``key=value``) or ``json`` (one object per line).
    """
    processors = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    if log_format == "json":
        processors.append(structlog.processors.JSONRenderer())
    else:
        processors += [_logfmt_values, _render_line]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG if verbose else logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def log_result(result: ProbeResult) -> None:
    """Emit the one ``selfcheck_completed`` line for ``result`` (INFO on success, else ERROR)."""
    if result.success:
        log.info(
            "selfcheck_completed",
            success=True,
            send_time=result.send_time,
            reception_time=result.reception_time,
        )
    else:
        log.error("selfcheck_completed", success=False, error=result.error, error_class=result.error_class)


def post_heartbeat(url: str, result: ProbeResult) -> bool:
    """POST ``{"send_time": s, "reception_time": s}`` (seconds) to the heartbeat ``url``.

    Call on success only. 10 s timeout per attempt, up to 2 retries (connection errors,
    429 and 5xx, with backoff; a read timeout is not retried so a hanging server costs at most
    10 s). Never raises: a failure is logged as WARNING without the URL (it holds a token).

    Returns:
        True when the endpoint answered 2xx.
    """
    retry = Retry(
        total=WEBHOOK_RETRIES,
        connect=WEBHOOK_RETRIES,
        read=0,
        status=WEBHOOK_RETRIES,
        backoff_factor=0.5,
        status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=frozenset({"POST"}),
        raise_on_status=False,
    )
    body = {"send_time": result.send_time, "reception_time": result.reception_time}
    with requests.Session() as session:
        session.mount("http://", HTTPAdapter(max_retries=retry))
        session.mount("https://", HTTPAdapter(max_retries=retry))
        try:
            response = session.post(url, json=body, timeout=WEBHOOK_TIMEOUT)
        except requests.RequestException as exc:
            log.warning("webhook_failed", reason=_reason(exc))
            return False
    if not response.ok:
        log.warning("webhook_failed", reason=f"HTTP {response.status_code}")
        return False
    log.debug("webhook_sent", status=response.status_code)
    return True


def _reason(exc: requests.RequestException) -> str:
    """Name the failure without the URL (requests puts host and path in its messages)."""
    if isinstance(exc, requests.Timeout):
        return f"no answer within {WEBHOOK_TIMEOUT:g} seconds"
    if isinstance(exc, requests.ConnectionError):
        return "connection failed"
    return type(exc).__name__
