"""Unit tests of the result contract, the log line and the webhook reporting."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from mail_selfcheck.cli import main as cli_main
from mail_selfcheck.models.result import MAX_RESULT_BYTES, ProbeResult
from mail_selfcheck.probe.report import configure_logging, log_result, post_heartbeat
from mail_selfcheck.probe.run import redact


def test_result_json_has_the_documented_keys() -> None:
    data = json.loads(ProbeResult(success=True, send_time=0.1, reception_time=0.2).to_json())
    assert {"success", "error", "send_time", "reception_time"} <= data.keys()


def test_result_json_fits_the_termination_message_limit() -> None:
    result = ProbeResult(success=False, error="x" * 10_000, smtp_reply="y" * 10_000, error_class="smtp_rejected")
    line = result.to_json()
    assert len(line.encode()) <= MAX_RESULT_BYTES
    parsed = ProbeResult.from_json(line)
    assert parsed.error.startswith("xxx") and parsed.success is False


def test_redact_removes_every_secret() -> None:
    assert redact("login pw=hunter2 token=abc/123", ["hunter2", "abc/123"]) == "login pw=*** token=***"


def test_log_line_success_and_failure(capsys) -> None:
    configure_logging()
    log_result(ProbeResult(success=True, send_time=0.15, reception_time=2.34))
    log_result(ProbeResult(success=False, error="Message not received within 60 seconds", error_class="timeout"))
    lines = capsys.readouterr().err.strip().splitlines()
    assert " INFO selfcheck_completed success=true send_time=0.150 reception_time=2.340" in lines[0]
    assert ' ERROR selfcheck_completed success=false error="Message not received within 60 seconds"' in lines[1]


def test_log_line_json_renderer(capsys) -> None:
    configure_logging(log_format="json")
    log_result(ProbeResult(success=True, send_time=0.15, reception_time=2.34))
    record = json.loads(capsys.readouterr().err)
    assert record["event"] == "selfcheck_completed" and record["success"] is True and record["level"] == "info"


class _Hook(BaseHTTPRequestHandler):
    status = 200
    bodies: list = []

    def do_POST(self):  # noqa: N802
        length = int(self.headers["Content-Length"])
        type(self).bodies.append(json.loads(self.rfile.read(length)))
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def hook_server():
    _Hook.bodies = []
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def test_webhook_500_is_retried_then_a_warning_without_the_url(hook_server, capsys) -> None:
    configure_logging()
    _Hook.status = 500
    url = f"http://127.0.0.1:{hook_server.server_port}/ping/tok-secret-999"
    assert post_heartbeat(url, ProbeResult(success=True, send_time=0.1, reception_time=0.2)) is False
    assert len(_Hook.bodies) == 3  # first try + 2 retries
    err = capsys.readouterr().err
    assert "webhook_failed" in err and "WARNING" in err and "tok-secret-999" not in err


def test_webhook_unreachable_is_a_warning(capsys) -> None:
    configure_logging()
    assert post_heartbeat("http://127.0.0.1:9/tok-secret-999", ProbeResult(success=True, send_time=0.1, reception_time=0.2)) is False
    err = capsys.readouterr().err
    assert "connection failed" in err and "tok-secret-999" not in err


def test_cli_config_error_exits_2_before_any_traffic(monkeypatch, capsys) -> None:
    monkeypatch.setenv("MESSAGES_SELFCHECK_FROM", "sender@example.test")
    monkeypatch.setenv("MESSAGES_SELFCHECK_TO", "receiver@example.test")
    monkeypatch.setenv("MESSAGES_SELFCHECK_SECRET", "s")
    monkeypatch.setenv("MESSAGES_SELFCHECK_IMAP_PASSWORD", "p")
    monkeypatch.delenv("MESSAGES_SELFCHECK_SMTP_PASSWORD", raising=False)
    assert cli_main(["run"]) == 2
    assert "MESSAGES_SELFCHECK_SMTP_PASSWORD" in capsys.readouterr().err


def test_cli_skips_when_from_or_to_empty(monkeypatch, capsys) -> None:
    monkeypatch.delenv("MESSAGES_SELFCHECK_FROM", raising=False)
    monkeypatch.delenv("MESSAGES_SELFCHECK_TO", raising=False)
    assert cli_main(["run"]) == 0
    assert "selfcheck_skipped" in capsys.readouterr().err


def test_cli_help_documents_exit_codes(capsys) -> None:
    with pytest.raises(SystemExit):
        cli_main(["run", "--help"])
    assert "exit status" in capsys.readouterr().out


def test_probe_package_imports_no_kubernetes() -> None:
    import subprocess
    import sys

    code = (
        "import sys, mail_selfcheck.cli, mail_selfcheck.probe.main;"
        "bad=[m for m in sys.modules if m.split('.')[0] in ('kopf','kubernetes','prometheus_client')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
