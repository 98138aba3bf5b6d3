"""The probe's start-up (issue 13): what a ``run`` imports, and the log lines of its event log."""

from __future__ import annotations

import json
import subprocess
import sys

from mail_selfcheck.probe import eventlog

#: Never needed by a password run without a webhook: the heartbeat client, OAuth2 libraries,
#: the operator's stack, the settings loader and the log library the probe used to import.
NOT_IN_A_PLAIN_RUN = ("requests", "urllib3", "authlib", "msal", "google", "kopf", "kubernetes", "prometheus_client",
                      "yaml", "structlog", "pydantic_settings", "asyncio")


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return {name.split(".")[0] for name in out.split()}


def test_a_plain_run_imports_no_webhook_oauth2_or_kubernetes_library() -> None:
    loaded = _modules_after(
        "from mail_selfcheck import cli\n"
        "from mail_selfcheck.probe import main, run, report\n"
        "from mail_selfcheck.models.settings import ProbeSettings\n"
        "report.configure_logging()\n"
        "report.log_result(main.ProbeResult(success=True, send_time=0.1, reception_time=0.2))\n"
        "ProbeSettings(from_address='a@example.test', to_address='b@example.test', secret='s', "
        "smtp_password='p', imap_password='q').model_dump()\n"
    )
    assert not loaded & set(NOT_IN_A_PLAIN_RUN), sorted(loaded & set(NOT_IN_A_PLAIN_RUN))


def test_a_heartbeat_loads_requests_when_it_is_sent() -> None:
    loaded = _modules_after(
        "from mail_selfcheck.probe.report import SignalRequest, send_signal\n"
        "send_signal(SignalRequest('POST', 'http://127.0.0.1:9/x'), timeout=0.5, retries=0)\n"
    )
    assert "requests" in loaded


def test_json_lines_keep_structlogs_key_order_and_the_traceback(capsys) -> None:
    eventlog.configure(verbose=True, log_format="json")
    log = eventlog.get_logger()
    try:
        raise ValueError("boom")
    except ValueError:
        log.debug("probe_internal_error", exc_info=True, step="x")
    line = capsys.readouterr().err.strip()
    record = json.loads(line)
    assert list(record) == ["step", "event", "level", "timestamp", "exception"]
    assert record["level"] == "debug" and record["timestamp"].endswith("Z")
    assert record["exception"].startswith("Traceback") and record["exception"].endswith("ValueError: boom")


def test_console_values_the_logfmt_way(capsys) -> None:
    eventlog.configure(verbose=True)
    eventlog.get_logger().debug("e", t=True, n=None, f=1.0, i=3, s="two words", q='a"b', e="", plain="x")
    line = capsys.readouterr().err.strip()
    assert line.split(" ", 1)[1] == 'DEBUG e t=true n=null f=1.000 i=3 s="two words" q="a\\"b" e="" plain=x'


def test_levels_quiet_and_verbose(capsys) -> None:
    log = eventlog.get_logger()
    eventlog.configure()
    log.debug("hidden")
    log.info("shown")
    eventlog.configure(quiet=True)
    log.error("hidden_too")
    eventlog.configure(verbose=True, quiet=True)  # verbose wins
    log.debug("shown_too")
    eventlog.configure()
    events = [line.split()[2] for line in capsys.readouterr().err.splitlines()]
    assert events == ["shown", "shown_too"]


def test_python_dash_m_runs_the_command() -> None:
    proc = subprocess.run([sys.executable, "-m", "mail_selfcheck", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("mail-selfcheck ")
