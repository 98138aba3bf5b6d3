"""``mail-selfcheck run`` exit status and flags (issue 12 item 5), without a mail server.

The probe's verdict is replaced by a fixed result (``run_probe`` monkeypatched): these test
the mapping from verdict to exit code and output, which is pure logic. The same paths against
the real mail stack are in tests/integration/test_heartbeats.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mail_selfcheck import cli
from mail_selfcheck.models.result import ProbeResult
from mail_selfcheck.probe import main as probe_main

CLI = str(Path(sys.executable).with_name("mail-selfcheck"))


@pytest.fixture
def env(monkeypatch):
    for key, value in {"MESSAGES_SELFCHECK_FROM": "s@example.test", "MESSAGES_SELFCHECK_TO": "r@example.test",
                       "MESSAGES_SELFCHECK_SECRET": "s", "MESSAGES_SELFCHECK_SMTP_PASSWORD": "p",
                       "MESSAGES_SELFCHECK_IMAP_PASSWORD": "p"}.items():
        monkeypatch.setenv(key, value)
    for key in ("MESSAGES_SELFCHECK_WEBHOOK_URL", "MESSAGES_SELFCHECK_WEBHOOK_KIND", "MESSAGES_SELFCHECK_WEBHOOK_FAILURE_URL"):
        monkeypatch.delenv(key, raising=False)


def _verdict(monkeypatch, result: ProbeResult) -> None:
    monkeypatch.setattr(probe_main, "run_probe", lambda settings: result)


OK = ProbeResult(success=True, send_time=0.15, reception_time=2.34)
FAILED = ProbeResult(success=False, error="Message not received within 60 seconds", error_class="timeout")


def test_success_exits_0_and_failure_exits_1(env, monkeypatch, capsys) -> None:
    _verdict(monkeypatch, OK)
    assert cli.main(["run", "--json"]) == 0
    _verdict(monkeypatch, FAILED)
    assert cli.main(["run", "--json"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["success"] for line in lines] == [True, False]


def test_format_json_is_the_same_as_json(env, monkeypatch, capsys) -> None:
    _verdict(monkeypatch, OK)
    assert cli.main(["run", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["reception_time"] == 2.34


@pytest.mark.parametrize(("result", "flags", "code", "start"), [
    (OK, [], 0, "MAIL OK - delivered in 2.340s | send_time=0.150s;;;0 reception_time=2.340s;;;0"),
    (OK, ["-w", "1", "-c", "5"], 1, "MAIL WARNING - delivered in 2.340s (warning above 1s)"),
    (OK, ["--warning", "1", "--critical", "2"], 2, "MAIL CRITICAL - delivered in 2.340s (critical above 2s)"),
    (FAILED, [], 2, "MAIL CRITICAL - Message not received within 60 seconds (timeout)"),
    (ProbeResult(success=False, error="boom", error_class="internal"), [], 3, "MAIL UNKNOWN - boom"),
])
def test_nagios_exit_codes_and_one_line(env, monkeypatch, capsys, result, flags, code, start) -> None:
    _verdict(monkeypatch, result)
    assert cli.main(["run", "--format", "nagios", *flags]) == code
    out = capsys.readouterr()
    assert out.out.startswith(start) and out.out.count("\n") == 1
    assert out.err == ""  # quiet log in plugin mode


def test_nagios_result_file_still_gets_the_json(env, monkeypatch, tmp_path, capsys) -> None:
    _verdict(monkeypatch, FAILED)
    target = tmp_path / "termination-log"
    assert cli.main(["run", "--format", "nagios", "--result-file", str(target)]) == 2
    assert json.loads(target.read_text())["error_class"] == "timeout"


def test_nagios_with_loop_is_unknown(env, capsys) -> None:
    assert cli.main(["run", "--format", "nagios", "--loop"]) == 3
    assert capsys.readouterr().out.startswith("MAIL UNKNOWN - configuration error: --format nagios")


def test_json_and_nagios_exclude_each_other() -> None:
    proc = subprocess.run([CLI, "run", "--json", "--format", "nagios"], capture_output=True, text=True)
    assert proc.returncode == 3 and proc.stdout.startswith("MAIL UNKNOWN - usage error")


def test_bad_threshold_is_a_usage_error_exit_2_or_unknown_in_plugin_mode() -> None:
    plain = subprocess.run([CLI, "run", "--warning", "-1"], capture_output=True, text=True)
    assert plain.returncode == 2 and "seconds must be >= 0" in plain.stderr
    plugin = subprocess.run([CLI, "run", "--format", "nagios", "--critical", "soon"], capture_output=True, text=True)
    assert plugin.returncode == 3 and plugin.stdout.startswith("MAIL UNKNOWN - usage error")


def test_help_documents_every_exit_code(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    out = capsys.readouterr().out
    for text in ("0  the check succeeded", "1  the check failed", "2  invalid configuration",
                 "0 OK, 1 WARNING", "2 CRITICAL", "3 UNKNOWN", "--format", "--warning", "--critical",
                 "MESSAGES_SELFCHECK_WEBHOOK_KIND"):
        assert text in out, text


def test_watchdog_exit_is_a_failure(env, monkeypatch) -> None:
    """The watchdog's last-resort exit is a failed check (1), UNKNOWN (3) in plugin mode."""
    codes = []
    monkeypatch.setattr(probe_main.os, "_exit", codes.append)
    monkeypatch.setattr(probe_main, "WATCHDOG_GRACE", 0.0)
    for output in (probe_main.Output(), probe_main.Output(nagios=True)):
        timer = probe_main._watchdog(0.01, output, None)
        timer.join(5)
    assert codes == [1, 3]
