"""Heartbeat services both ways, exit status and plugin mode (issue 12 items 1 and 5).

Every test runs ``mail-selfcheck run`` as a user does (environment + flags, a subprocess)
against the real Postfix + Dovecot of the ``mail_stack`` fixture. Heartbeats go to a real
Gatus built from the Go module proxy (``tests/harness/gatus.py``) and, for the services
without an installable receiver, to loopback servers that check each documented request
shape (``tests/harness/heartbeat_receivers.py``). A failing check is made with a wrong IMAP
password: the probe stops at step 1, before anything is sent.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.harness.gatus import GatusServer
from tests.harness.heartbeat_receivers import ShapeServer

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).with_name("mail-selfcheck"))

#: Signals each kind sends for a success and for a failure, in order.
EXPECTED = {
    "healthchecks": (["start", "success"], ["start", "failure"]),
    "cronitor": (["start", "success"], ["start", "failure"]),
    "uptime-kuma": (["success"], ["failure"]),
    "betterstack": (["success"], ["failure"]),
    "generic": (["success"], ["failure"]),
}
NAGIOS_LINE = re.compile(
    r"MAIL (OK|WARNING|CRITICAL|UNKNOWN) - [^|\n]+ \| send_time=(\d+\.\d{3}s|U);;;0 "
    r"reception_time=(\d+\.\d{3}s|U);([\d.]*);([\d.]*);0"
)


def _token(kind: str) -> str:
    return str(uuid.uuid4()) if kind == "healthchecks" else f"tok{secrets.token_hex(8)}"


def _env(stack, **extra: str) -> dict[str, str]:
    env = stack.probe_env()
    env["MESSAGES_SELFCHECK_SECRET"] = "hb-" + secrets.token_hex(6)
    env.update(extra)
    return env


def _cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MESSAGES_SELFCHECK_")}
    full.update(env)
    return subprocess.run([CLI, "run", *args], env=full, capture_output=True, text=True, timeout=timeout)


def _heartbeat_env(server: ShapeServer, failure_url: bool = True) -> dict[str, str]:
    env = {"MESSAGES_SELFCHECK_WEBHOOK_KIND": server.kind, "MESSAGES_SELFCHECK_WEBHOOK_URL": server.url}
    if server.kind == "generic" and failure_url:
        env["MESSAGES_SELFCHECK_WEBHOOK_FAILURE_URL"] = server.failure_url
    return env


def _assert_no_secret(proc: subprocess.CompletedProcess, *secrets_: str) -> None:
    out = proc.stdout + proc.stderr
    for value in secrets_:
        assert value not in out, "a heartbeat token (or URL) leaked into the probe's output"


def _wrong_imap(stack) -> dict[str, str]:
    return {"MESSAGES_SELFCHECK_IMAP_PASSWORD": "wrong-" + secrets.token_hex(3)}


# -- each kind against its documented request shape ----------------------------------------


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_success_speaks_each_services_documented_api(mail_stack, kind) -> None:
    token = _token(kind)
    with ShapeServer(kind, token) as server:
        proc = _cli(_env(mail_stack, **_heartbeat_env(server)), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["success"] is True, result
    assert server.violations == [], server.violations
    assert server.signals() == EXPECTED[kind][0]
    assert result["webhook"] == {"kind": kind, "signal": "success", "sent": True, "error": None}
    last = server.requests[-1]
    reception = result["reception_time"]
    if kind == "healthchecks":
        rids = {r.q("rid") for r in server.requests}
        assert len(rids) == 1 and None not in rids, "start and success carry the same run ID"
        assert f"reception_time={reception:.3f}s" in last.body.decode()
    elif kind == "uptime-kuma":
        assert last.q("status") == "up" and last.q("ping") == str(round(reception * 1000))
        assert f"reception_time={reception:.3f}s" in last.q("msg")
    elif kind == "cronitor":
        assert [r.q("state") for r in server.requests] == ["run", "complete"]
        assert len({r.q("series") for r in server.requests}) == 1
        assert f"reception_time={reception:.3f}s" in last.q("message")
    elif kind == "betterstack":
        assert last.method == "POST" and f"reception_time={reception:.3f}s" in last.body.decode()
    else:  # the seed's body, exactly
        assert json.loads(last.body) == {"send_time": result["send_time"], "reception_time": reception}
    _assert_no_secret(proc, token, server.url)


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_failure_is_signalled_with_the_error_text(mail_stack, kind) -> None:
    token = _token(kind)
    with ShapeServer(kind, token) as server:
        proc = _cli(_env(mail_stack, **_heartbeat_env(server), **_wrong_imap(mail_stack)), "--json")
    assert proc.returncode == 1, proc.stderr
    result = json.loads(proc.stdout)
    assert result["success"] is False and result["error_class"] == "mailbox_unavailable", result
    assert server.violations == [], server.violations
    assert server.signals() == EXPECTED[kind][1]
    assert result["webhook"] == {"kind": kind, "signal": "failure", "sent": True, "error": None}
    last = server.requests[-1]
    error = result["error"]
    if kind in ("healthchecks", "betterstack"):
        assert last.path.endswith("/fail") and error in last.body.decode()
    elif kind == "uptime-kuma":
        assert last.q("status") == "down" and error in last.q("msg")
    elif kind == "cronitor":
        assert last.q("state") == "fail" and error in last.q("message")
    else:
        body = json.loads(last.body)
        assert body == {"error": error, "error_class": "mailbox_unavailable", "send_time": None,
                        "reception_time": None}
        assert last.path == f"/fail/{token}"
    _assert_no_secret(proc, token, server.url)


def test_generic_without_failure_url_sends_nothing_on_failure(mail_stack) -> None:
    with ShapeServer("generic", _token("generic")) as server:
        proc = _cli(_env(mail_stack, **_heartbeat_env(server, failure_url=False), **_wrong_imap(mail_stack)), "--json")
    assert proc.returncode == 1
    assert server.requests == [] and json.loads(proc.stdout)["webhook"] is None


@pytest.mark.parametrize(("behaviour", "reason"), [("error", "HTTP 500"), ("refuse", "HTTP 404"),
                                                   ("hang", "no answer within")])
def test_a_failing_heartbeat_is_in_the_result_and_a_warning_never_the_url(mail_stack, behaviour, reason) -> None:
    token = _token("healthchecks")
    with ShapeServer("healthchecks", token, behaviour=behaviour) as server:
        proc = _cli(_env(mail_stack, **_heartbeat_env(server)), "--json", timeout=180)
    assert proc.returncode == 0, proc.stderr  # the check succeeded; the heartbeat is no part of the verdict
    result = json.loads(proc.stdout)
    assert result["success"] is True
    webhook = result["webhook"]
    assert webhook["kind"] == "healthchecks" and webhook["signal"] == "success" and webhook["sent"] is False
    assert webhook["error"].startswith(reason), webhook
    warnings = [line for line in proc.stderr.splitlines() if "WARNING webhook_failed" in line]
    assert len(warnings) == 2 and "signal=start" in warnings[0] and "signal=success" in warnings[1], proc.stderr
    _assert_no_secret(proc, token, server.url, server.base)


def test_uptime_kuma_refusal_names_kumas_reason(mail_stack) -> None:
    token = _token("uptime-kuma")
    with ShapeServer("uptime-kuma", token, behaviour="refuse") as server:
        proc = _cli(_env(mail_stack, **_heartbeat_env(server)), "--json")
    webhook = json.loads(proc.stdout)["webhook"]
    assert webhook["sent"] is False and webhook["error"] == "HTTP 404"
    _assert_no_secret(proc, token)


# -- Gatus, the real one ----------------------------------------------------------------------


@pytest.fixture
def gatus(tmp_path):
    with GatusServer(tmp_path / "gatus", token="gt-" + secrets.token_hex(8)) as server:
        yield server


def test_gatus_external_endpoint_records_success_and_failure(mail_stack, gatus) -> None:
    env = {"MESSAGES_SELFCHECK_WEBHOOK_KIND": "gatus", "MESSAGES_SELFCHECK_WEBHOOK_URL": gatus.push_url,
           "MESSAGES_SELFCHECK_WEBHOOK_TOKEN": gatus.token}
    ok = _cli(_env(mail_stack, **env), "--json")
    bad = _cli(_env(mail_stack, **env, **_wrong_imap(mail_stack)), "--json")
    assert (ok.returncode, bad.returncode) == (0, 1), ok.stderr + bad.stderr
    good, failed = json.loads(ok.stdout), json.loads(bad.stdout)
    assert good["webhook"] == {"kind": "gatus", "signal": "success", "sent": True, "error": None}
    assert failed["webhook"] == {"kind": "gatus", "signal": "failure", "sent": True, "error": None}
    stored = gatus.results()
    assert [r["success"] for r in stored] == [True, False], stored
    assert abs(stored[0]["duration"] / 1e9 - good["reception_time"]) < 0.002, (stored[0], good)
    assert stored[0]["errors"] == []
    assert len(stored[1]["errors"]) == 1 and failed["error"] in stored[1]["errors"][0], stored[1]
    _assert_no_secret(ok, gatus.token)
    _assert_no_secret(bad, gatus.token)


def test_gatus_wrong_token_is_a_heartbeat_failure_without_the_token(mail_stack, gatus) -> None:
    wrong = "wrong-" + secrets.token_hex(8)
    env = {"MESSAGES_SELFCHECK_WEBHOOK_KIND": "gatus", "MESSAGES_SELFCHECK_WEBHOOK_URL": gatus.push_url,
           "MESSAGES_SELFCHECK_WEBHOOK_TOKEN": wrong}
    proc = _cli(_env(mail_stack, **env), "--json")
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["webhook"] == {"kind": "gatus", "signal": "success", "sent": False,
                                                  "error": "HTTP 401"}
    assert "WARNING webhook_failed kind=gatus signal=success reason=\"HTTP 401\"" in proc.stderr, proc.stderr
    assert gatus.results() == []
    _assert_no_secret(proc, wrong, gatus.token)


def test_gatus_without_token_is_a_configuration_error(mail_stack, gatus) -> None:
    env = {"MESSAGES_SELFCHECK_WEBHOOK_KIND": "gatus", "MESSAGES_SELFCHECK_WEBHOOK_URL": gatus.push_url}
    proc = _cli(_env(mail_stack, **env), "--json")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "MESSAGES_SELFCHECK_WEBHOOK_TOKEN must be set" in proc.stderr


# -- exit status -----------------------------------------------------------------------------


def test_a_failed_check_exits_1_with_its_result(mail_stack, tmp_path) -> None:
    """Issue 12: ``MESSAGES_SELFCHECK_IMAP_PORT=1 mail-selfcheck run`` exited 0."""
    result_file = tmp_path / "termination-log"
    proc = _cli(_env(mail_stack, MESSAGES_SELFCHECK_IMAP_PORT="1"), "--json", "--result-file", str(result_file))
    assert proc.returncode == 1, proc.stderr
    result = json.loads(proc.stdout)
    assert result["success"] is False and result["error_class"] == "imap_connect"
    assert json.loads(result_file.read_text()) == result
    assert " ERROR selfcheck_completed success=false" in proc.stderr


def test_cron_wrapper_run_and_curl_only_pings_on_success(mail_stack) -> None:
    """``mail-selfcheck run && curl $HC`` (the cron pattern from the issue) now works."""
    with ShapeServer("betterstack", "tok") as server:
        for env in (_env(mail_stack), _env(mail_stack, **_wrong_imap(mail_stack))):
            full = {k: v for k, v in os.environ.items() if not k.startswith("MESSAGES_SELFCHECK_")} | env
            subprocess.run(f"{CLI} run && {sys.executable} -c 'import urllib.request,sys; "
                           f"urllib.request.urlopen(sys.argv[1])' {server.url}",
                           shell=True, env=full, capture_output=True, timeout=120)
    assert server.signals() == ["success"]


# -- plugin mode -----------------------------------------------------------------------------


def test_nagios_ok_line_with_perfdata(mail_stack) -> None:
    proc = _cli(_env(mail_stack), "--format", "nagios", "--warning", "20", "--critical", "40")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and NAGIOS_LINE.fullmatch(lines[0]), proc.stdout
    assert lines[0].startswith("MAIL OK - delivered in ") and lines[0].endswith(";20;40;0")
    assert proc.stderr == ""  # Icinga 2 appends stderr to the plugin output: keep it clean


@pytest.mark.parametrize(("flags", "state", "code"), [(("-w", "0"), "WARNING", 1), (("-w", "0", "-c", "0"), "CRITICAL", 2)])
def test_nagios_thresholds_on_reception_time(mail_stack, flags, state, code) -> None:
    proc = _cli(_env(mail_stack), "--format", "nagios", *flags)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"MAIL {state} - delivered in ") and NAGIOS_LINE.fullmatch(proc.stdout.strip())
    assert "above 0s" in proc.stdout


def test_nagios_failed_check_is_critical_with_the_error(mail_stack) -> None:
    proc = _cli(_env(mail_stack, **_wrong_imap(mail_stack)), "--format", "nagios")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = proc.stdout.strip()
    assert NAGIOS_LINE.fullmatch(line) and line.startswith("MAIL CRITICAL - ") and "(mailbox_unavailable)" in line
    assert "send_time=U;;;0 reception_time=U;;;0" in line


def test_nagios_configuration_error_is_unknown(mail_stack) -> None:
    env = _env(mail_stack)
    del env["MESSAGES_SELFCHECK_SECRET"]
    proc = _cli(env, "--format", "nagios")
    assert proc.returncode == 3
    assert proc.stdout.startswith("MAIL UNKNOWN - configuration error: MESSAGES_SELFCHECK_SECRET")
