"""``mail-selfcheck run``: settings -> start signal -> run -> report, once or in a loop.

Exit status (issue 12 item 5): 0 when the check succeeded (or the run was skipped), 1 when
the check failed (the verdict is in the log line, ``--json`` and ``--result-file``), 2 on
invalid configuration (nothing attempted, no result). With ``--format nagios`` the codes are
the monitoring plugins' 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (configuration errors and skipped
runs are UNKNOWN), https://www.monitoring-plugins.org/doc/guidelines.html. ``--loop`` exits 0
when stopped.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from ..models.result import ProbeResult
from ..models.settings import ProbeSettings, describe_errors
from .eventlog import get_logger
from .report import NAGIOS_UNKNOWN, Heartbeat, configure_logging, log_result, nagios_line, nagios_unknown
from .run import CLEANUP_BUDGET, run_probe

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
WATCHDOG_GRACE = 2 * CLEANUP_BUDGET + 5.0  # seconds beyond `timeout` before the watchdog ends the run

log = get_logger()


@dataclass(frozen=True)
class Output:
    """Where a result goes besides the log line.

    ``print_json``: the result JSON on stdout; ``result_file``: the result JSON in a file
    (the Jobs' ``/dev/termination-log``); ``nagios``: one monitoring-plugins line on stdout
    instead, with ``warning`` / ``critical`` thresholds in seconds of reception time.
    """

    print_json: bool = False
    result_file: str | None = None
    nagios: bool = False
    warning: float | None = None
    critical: float | None = None


def exit_status(result: ProbeResult, output: Output = Output()) -> int:
    """The exit code for ``result``: 0 success, 1 failed check; in plugin mode 0-3 per
    :func:`~mail_selfcheck.probe.report.nagios_line`."""
    if output.nagios:
        return nagios_line(result, output.warning, output.critical)[1]
    return EXIT_OK if result.success else EXIT_FAILED


def _write_result(result: ProbeResult, output: Output) -> None:
    line = result.to_json()
    if output.nagios:
        sys.stdout.write(nagios_line(result, output.warning, output.critical)[0] + "\n")
        sys.stdout.flush()
    elif output.print_json:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    if output.result_file:
        Path(output.result_file).write_text(line)


def _watchdog(timeout: float, output: Output, heartbeat: Heartbeat | None) -> threading.Timer:
    """Last-resort overall deadline: if a run is still going ``timeout + WATCHDOG_GRACE``
    seconds after it started (e.g. a DNS lookup without timeout), report (failure signal
    included) and exit 1 (plugin mode: UNKNOWN)."""

    def fire() -> None:
        result = ProbeResult(
            success=False,
            error=f"probe exceeded its overall deadline of {timeout + WATCHDOG_GRACE:g} seconds",
            error_class="internal",
        )
        log_result(result)
        if heartbeat is not None:
            result.webhook = heartbeat.finish(result)
        _write_result(result, output)
        os._exit(exit_status(result, output))

    timer = threading.Timer(timeout + WATCHDOG_GRACE, fire)
    timer.daemon = True
    timer.start()
    return timer


def run_once(settings: ProbeSettings, print_json: bool = False, result_file: str | None = None,
             *, output: Output | None = None) -> ProbeResult:
    """Run one selfcheck and report it; returns the result (``result.webhook`` set when a
    heartbeat is configured).

    Order: start signal (kinds that have one), the run (under the watchdog), the
    ``selfcheck_completed`` log line, the success/failure signal, then the result (stdout /
    file), so the written result carries the heartbeat's outcome.
    """
    output = output or Output(print_json=print_json, result_file=result_file)
    heartbeat = Heartbeat.from_settings(settings)
    if heartbeat is not None:
        heartbeat.start()
    timer = _watchdog(settings.timeout, output, heartbeat)
    try:
        result = run_probe(settings)
    finally:
        timer.cancel()
    log_result(result)
    if heartbeat is not None:
        result.webhook = heartbeat.finish(result)
    _write_result(result, output)
    return result


def main(
    overrides: dict,
    *,
    verbose: bool = False,
    print_json: bool = False,
    result_file: str | None = None,
    log_format: str = "console",
    loop: bool = False,
    output_format: str | None = None,
    warning: float | None = None,
    critical: float | None = None,
) -> int:
    """Entry point of ``mail-selfcheck run``; see the module docstring for exit codes.

    ``output_format``: ``None`` (log only, or ``print_json``), ``json`` (as ``print_json``) or
    ``nagios`` (one plugin line on stdout, quiet log unless ``verbose``).
    """
    nagios = output_format == "nagios"
    output = Output(print_json=print_json or output_format == "json", result_file=result_file,
                    nagios=nagios, warning=warning, critical=critical)
    configure_logging(verbose, log_format, quiet=nagios)

    def config_error(lines: list[str]) -> int:
        for line in lines:
            sys.stderr.write(f"mail-selfcheck: configuration error: {line}\n")
        if nagios:
            sys.stdout.write(nagios_unknown("configuration error: " + "; ".join(lines)) + "\n")
            return NAGIOS_UNKNOWN
        return EXIT_CONFIG

    try:
        settings = ProbeSettings(**overrides)
    except ValidationError as exc:
        return config_error(describe_errors(exc))
    if not settings.enabled:
        log.info("selfcheck_skipped", reason="MESSAGES_SELFCHECK_FROM or MESSAGES_SELFCHECK_TO is empty")
        if nagios:
            sys.stdout.write(nagios_unknown("skipped: MESSAGES_SELFCHECK_FROM or MESSAGES_SELFCHECK_TO is empty") + "\n")
            return NAGIOS_UNKNOWN
        return EXIT_OK
    if loop and nagios:
        return config_error(["--format nagios runs one check; it cannot be combined with --loop"])
    if loop and settings.timeout >= settings.interval:
        return config_error(["MESSAGES_SELFCHECK_TIMEOUT must be smaller than MESSAGES_SELFCHECK_INTERVAL with --loop"])
    if not loop:
        return exit_status(run_once(settings, output=output), output)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    next_run = time.monotonic()
    try:
        while not stop.is_set():
            run_once(settings, output=output)
            next_run += settings.interval
            stop.wait(max(0.0, next_run - time.monotonic()))
    except KeyboardInterrupt:
        pass
    return EXIT_OK
