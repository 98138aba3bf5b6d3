"""``mail-selfcheck run``: settings -> run -> report, once or in a loop.

Exit codes: 0 when a verdict was reached (or the run was skipped), 2 on invalid configuration.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import structlog
from pydantic import ValidationError

from ..models.result import ProbeResult
from ..models.settings import ProbeSettings, describe_errors
from .report import configure_logging, log_result, post_heartbeat
from .run import CLEANUP_BUDGET, run_probe

EXIT_OK = 0
EXIT_CONFIG = 2
WATCHDOG_GRACE = 2 * CLEANUP_BUDGET + 5.0  # seconds beyond `timeout` before the watchdog ends the run

log = structlog.get_logger("mail_selfcheck.probe")


def _write_result(result: ProbeResult, print_json: bool, result_file: str | None) -> None:
    line = result.to_json()
    if print_json:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    if result_file:
        Path(result_file).write_text(line)


def _watchdog(timeout: float, print_json: bool, result_file: str | None) -> threading.Timer:
    """Last-resort overall deadline: if a run is still going ``timeout + WATCHDOG_GRACE``
    seconds after it started (e.g. a DNS lookup without timeout), report and exit."""

    def fire() -> None:
        result = ProbeResult(
            success=False,
            error=f"probe exceeded its overall deadline of {timeout + WATCHDOG_GRACE:g} seconds",
            error_class="internal",
        )
        log_result(result)
        _write_result(result, print_json, result_file)
        os._exit(EXIT_OK)

    timer = threading.Timer(timeout + WATCHDOG_GRACE, fire)
    timer.daemon = True
    timer.start()
    return timer


def run_once(settings: ProbeSettings, print_json: bool = False, result_file: str | None = None) -> ProbeResult:
    """Run, log, write and (on success) post one selfcheck; returns the result."""
    timer = _watchdog(settings.timeout, print_json, result_file)
    try:
        result = run_probe(settings)
    finally:
        timer.cancel()
    log_result(result)
    _write_result(result, print_json, result_file)
    if result.success and settings.webhook_url is not None:
        post_heartbeat(settings.webhook_url.get_secret_value(), result)
    return result


def main(
    overrides: dict,
    *,
    verbose: bool = False,
    print_json: bool = False,
    result_file: str | None = None,
    log_format: str = "console",
    loop: bool = False,
) -> int:
    """Entry point of ``mail-selfcheck run``; see the module docstring for exit codes."""
    configure_logging(verbose, log_format)
    try:
        settings = ProbeSettings(**overrides)
    except ValidationError as exc:
        for line in describe_errors(exc):
            sys.stderr.write(f"mail-selfcheck: configuration error: {line}\n")
        return EXIT_CONFIG
    if not settings.enabled:
        log.info("selfcheck_skipped", reason="MESSAGES_SELFCHECK_FROM or MESSAGES_SELFCHECK_TO is empty")
        return EXIT_OK
    if loop and settings.timeout >= settings.interval:
        sys.stderr.write(
            "mail-selfcheck: configuration error: MESSAGES_SELFCHECK_TIMEOUT must be smaller than "
            "MESSAGES_SELFCHECK_INTERVAL with --loop\n"
        )
        return EXIT_CONFIG
    if not loop:
        run_once(settings, print_json, result_file)
        return EXIT_OK
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    next_run = time.monotonic()
    try:
        while not stop.is_set():
            run_once(settings, print_json, result_file)
            next_run += settings.interval
            stop.wait(max(0.0, next_run - time.monotonic()))
    except KeyboardInterrupt:
        pass
    return EXIT_OK
