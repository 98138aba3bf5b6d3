"""Heartbeat request builders, settings and plugin output (pure logic; issue 12 items 1, 5).

End-to-end versions against the real mail stack, a real Gatus and the request-shape
receivers are in tests/integration/test_heartbeats.py.
"""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

import pytest
from pydantic import ValidationError

from mail_selfcheck.models.result import ProbeResult
from mail_selfcheck.models.settings import WEBHOOK_KINDS, ProbeSettings, describe_errors
from mail_selfcheck.probe.report import Heartbeat, build_signal, nagios_line, nagios_unknown

OK = ProbeResult(success=True, send_time=0.15, reception_time=2.34, duration=2.6)
BAD = ProbeResult(success=False, error="cannot reach IMAP server imap.example.test:993: timed out", error_class="imap_connect",
                  duration=0.4)
RID = "0f8fad5b-d9cb-469f-a165-70867728950e"


def _q(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query, keep_blank_values=True)


def test_every_kind_is_known_to_the_settings() -> None:
    assert set(WEBHOOK_KINDS) == {"generic", "healthchecks", "uptime-kuma", "gatus", "betterstack", "cronitor"}


def test_generic_success_body_is_the_seeds() -> None:
    req = build_signal("generic", "success", OK, url="https://h.example/x")
    assert (req.method, req.url) == ("POST", "https://h.example/x")
    assert json.loads(req.body) == {"send_time": 0.15, "reception_time": 2.34}
    assert build_signal("generic", "start", None, url="https://h.example/x") is None
    assert build_signal("generic", "failure", BAD, url="https://h.example/x") is None


def test_generic_failure_url_body() -> None:
    req = build_signal("generic", "failure", BAD, url=None, failure_url="https://h.example/f")
    assert req.method == "POST" and req.url == "https://h.example/f"
    assert json.loads(req.body) == {"error": BAD.error, "error_class": "imap_connect", "send_time": None,
                                    "reception_time": None}


@pytest.mark.parametrize(("signal", "path"), [("start", "/ping/u/start"), ("success", "/ping/u"), ("failure", "/ping/u/fail")])
def test_healthchecks_paths_and_run_id(signal, path) -> None:
    req = build_signal("healthchecks", signal, None if signal == "start" else (OK if signal == "success" else BAD),
                       url="https://hc-ping.example/ping/u", run_id=RID)
    assert req.method == "POST" and urlsplit(req.url).path == path and _q(req.url) == {"rid": [RID]}
    if signal == "failure":
        assert req.body.decode() == f"{BAD.error} (error_class=imap_connect)"
    if signal == "success":
        assert req.body.decode() == "send_time=0.150s reception_time=2.340s"
    slash = build_signal("healthchecks", "start", None, url="https://hc-ping.example/ping/u/")
    assert urlsplit(slash.url).path == "/ping/u/start"


def test_uptime_kuma_replaces_the_pasted_query() -> None:
    url = "https://kuma.example/api/push/T0K?status=up&msg=OK&ping="
    up = build_signal("uptime-kuma", "success", OK, url=url)
    assert up.method == "GET" and urlsplit(up.url).path == "/api/push/T0K"
    assert _q(up.url) == {"status": ["up"], "msg": ["OK send_time=0.150s reception_time=2.340s"], "ping": ["2340"]}
    down = build_signal("uptime-kuma", "failure", BAD, url=url)
    assert _q(down.url)["status"] == ["down"] and BAD.error in _q(down.url)["msg"][0]
    assert build_signal("uptime-kuma", "start", None, url=url) is None


def test_gatus_query_and_bearer_token() -> None:
    url = "https://gatus.example/api/v1/endpoints/mail_selfcheck/external"
    ok = build_signal("gatus", "success", OK, url=url, token="s3cr3t")
    assert ok.method == "POST" and ok.headers == {"Authorization": "Bearer s3cr3t"}
    assert _q(ok.url) == {"success": ["true"], "duration": ["2.340s"]}
    bad = build_signal("gatus", "failure", BAD, url=url, token="s3cr3t")
    assert _q(bad.url) == {"success": ["false"], "error": [f"{BAD.error} (error_class=imap_connect)"], "duration": ["0.400s"]}
    assert build_signal("gatus", "start", None, url=url, token="s3cr3t") is None


def test_betterstack_fail_path_and_no_start() -> None:
    url = "https://uptime.example/api/v1/heartbeat/XYZ"
    assert urlsplit(build_signal("betterstack", "success", OK, url=url).url).path == "/api/v1/heartbeat/XYZ"
    fail = build_signal("betterstack", "failure", BAD, url=url)
    assert urlsplit(fail.url).path == "/api/v1/heartbeat/XYZ/fail" and BAD.error in fail.body.decode()
    assert build_signal("betterstack", "start", None, url=url) is None


def test_cronitor_states_series_and_message_limit() -> None:
    url = "https://cronitor.example/p/KEY/mail"
    states = [_q(build_signal("cronitor", s, r, url=url, run_id=RID).url)["state"][0]
              for s, r in (("start", None), ("success", OK), ("failure", BAD))]
    assert states == ["run", "complete", "fail"]
    long = ProbeResult(success=False, error="x" * 5000, error_class="timeout")
    query = _q(build_signal("cronitor", "failure", long, url=url, run_id=RID).url)
    assert len(query["message"][0]) <= 2000 and query["series"] == [RID]


def test_unknown_kind_or_signal_is_an_error() -> None:
    with pytest.raises(ValueError):
        build_signal("pagerduty", "success", OK, url="https://x.example")
    with pytest.raises(ValueError):
        build_signal("generic", "done", OK, url="https://x.example")


def test_heartbeat_from_settings_none_without_urls(monkeypatch) -> None:
    for key in ("MESSAGES_SELFCHECK_WEBHOOK_URL", "MESSAGES_SELFCHECK_WEBHOOK_FAILURE_URL"):
        monkeypatch.delenv(key, raising=False)
    assert Heartbeat.from_settings(ProbeSettings(webhook_kind="healthchecks")) is None


def test_heartbeat_unreachable_outcome_names_no_url(capsys) -> None:
    from mail_selfcheck.probe.report import configure_logging

    configure_logging()
    hb = Heartbeat("healthchecks", "http://127.0.0.1:9/ping/tok-secret-42")
    assert hb.start() is False
    outcome = hb.finish(OK)
    assert (outcome.kind, outcome.signal, outcome.sent, outcome.error) == ("healthchecks", "success", False,
                                                                          "connection failed")
    err = capsys.readouterr().err
    assert err.count("WARNING webhook_failed") == 2 and "tok-secret-42" not in err and "127.0.0.1:9" not in err


# -- settings ------------------------------------------------------------------------------


def _errors(**kw) -> list[str]:
    with pytest.raises(ValidationError) as exc:
        ProbeSettings(**kw)
    return describe_errors(exc.value)


def test_gatus_needs_its_push_url_and_token() -> None:
    assert any("WEBHOOK_TOKEN must be set" in e for e in _errors(
        webhook_kind="gatus", webhook_url="https://g.example/api/v1/endpoints/a_b/external"))
    assert any("Gatus' push URL" in e for e in _errors(
        webhook_kind="gatus", webhook_url="https://g.example/", webhook_token="t"))
    ProbeSettings(webhook_kind="gatus", webhook_url="https://g.example/api/v1/endpoints/a_b/external", webhook_token="t")


def test_failure_url_is_generic_only_and_must_be_http() -> None:
    assert any("generic only" in e for e in _errors(
        webhook_kind="healthchecks", webhook_url="https://h.example/ping/u", webhook_failure_url="https://h.example/f"))
    assert any("http:// or https://" in e for e in _errors(webhook_failure_url="ftp://nope"))


def test_unknown_kind_is_a_configuration_error() -> None:
    assert any(e.startswith("MESSAGES_SELFCHECK_WEBHOOK_KIND") for e in _errors(webhook_kind="pagerduty"))


def test_heartbeat_secrets_are_redacted_values() -> None:
    s = ProbeSettings(webhook_url="https://a.example/t1", webhook_failure_url="https://a.example/t2", webhook_token="t3")
    assert {"https://a.example/t1", "https://a.example/t2", "t3"} <= set(s.secret_values())


# -- plugin output -----------------------------------------------------------------------------


def test_nagios_ok_line_is_the_documented_example() -> None:
    assert nagios_line(OK) == ("MAIL OK - delivered in 2.340s | send_time=0.150s;;;0 reception_time=2.340s;;;0", 0)
    line, code = nagios_line(OK, 5, 30)
    assert code == 0 and line.endswith("reception_time=2.340s;5;30;0")


@pytest.mark.parametrize(("warning", "critical", "code"), [(2, None, 1), (2, 2.3, 2), (None, 2, 2), (2.34, 3, 0)])
def test_nagios_thresholds(warning, critical, code) -> None:
    assert nagios_line(OK, warning, critical)[1] == code


def test_nagios_failure_is_critical_and_internal_is_unknown() -> None:
    line, code = nagios_line(ProbeResult(success=False, error="a | b\nc", error_class="timeout"))
    assert code == 2 and line == "MAIL CRITICAL - a / b c (timeout) | send_time=U;;;0 reception_time=U;;;0"
    assert nagios_line(ProbeResult(success=False, error="bug", error_class="internal"))[1] == 3
    assert nagios_unknown("configuration error: X\nY") == "MAIL UNKNOWN - configuration error: X Y"
