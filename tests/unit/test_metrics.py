"""Operator metrics: no stale last values, restore after restart, suspended and creation series."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from mail_selfcheck import __version__
from mail_selfcheck.controller.metrics import BUCKETS, Metrics


def _text(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_a_failed_check_clears_the_last_delivery_times():
    m = Metrics(CollectorRegistry())
    m.observe("ns", "a", success=True, error_class=None, send_time=0.2, reception_time=1.5, consecutive_failures=0,
              timestamp=10.0)
    assert 'mail_selfcheck_last_reception_time_seconds{name="a",namespace="ns"} 1.5' in _text(m)
    m.observe("ns", "a", success=False, error_class="timeout", send_time=0.3, reception_time=None,
              consecutive_failures=1, timestamp=20.0)
    text = _text(m)
    assert "mail_selfcheck_last_reception_time_seconds{" not in text, "a stale healthy delivery time"
    assert 'mail_selfcheck_last_send_time_seconds{name="a",namespace="ns"} 0.3' in text


def test_restore_republishes_the_last_values():
    m = Metrics(CollectorRegistry())
    m.restore("ns", "a", success=True, consecutive_failures=0, last_success=5.0, send_time=0.1, reception_time=0.7)
    text = _text(m)
    assert 'mail_selfcheck_last_send_time_seconds{name="a",namespace="ns"} 0.1' in text
    assert 'mail_selfcheck_last_reception_time_seconds{name="a",namespace="ns"} 0.7' in text


def test_resource_series_and_self_metrics():
    m = Metrics(CollectorRegistry())
    m.set_resource("ns", "a", interval=600, suspended=True, created=1700000000.0)
    m.jobs_launched.inc()
    text = _text(m)
    assert 'mail_selfcheck_suspended{name="a",namespace="ns"} 1.0' in text
    assert 'mail_selfcheck_creation_timestamp_seconds{name="a",namespace="ns"} 1.7e+09' in text
    assert f'mail_selfcheck_build_info{{version="{__version__}"}} 1.0' in text
    assert "mail_selfcheck_operator_jobs_launched_total 1.0" in text
    m.forget("ns", "a")
    assert 'name="a"' not in _text(m)
    assert BUCKETS[0] == 0.005


def test_leftover_messages_follow_the_last_check():
    m = Metrics(CollectorRegistry())
    m.observe("ns", "a", success=True, error_class=None, send_time=0.1, reception_time=0.2, consecutive_failures=0,
              timestamp=1.0, leftover_count=2)
    assert 'mail_selfcheck_leftover_messages{name="a",namespace="ns"} 2.0' in _text(m)
    m.observe("ns", "a", success=True, error_class=None, send_time=0.1, reception_time=0.2, consecutive_failures=0,
              timestamp=2.0, leftover_count=None)
    assert "mail_selfcheck_leftover_messages{" not in _text(m), "unknown is absent, not a stale count"


def test_certificate_expiry_step_histogram_and_webhook_failures():
    m = Metrics(CollectorRegistry())
    m.observe_details("ns", "a", timings={"imap_connect": 0.004, "cleanup": 0.03},
                      tls={"smtp": {"not_after": 1767225600.0}, "imap": {"not_after": 1767312000.0}}, webhook_failed=True)
    text = _text(m)
    assert 'mail_selfcheck_tls_cert_expiry_timestamp_seconds{endpoint="smtp",name="a",namespace="ns"} 1.7672256e+09' in text
    assert 'mail_selfcheck_step_duration_seconds_bucket{le="0.005",name="a",namespace="ns",step="imap_connect"} 1.0' in text
    assert 'mail_selfcheck_webhook_failures_total{name="a",namespace="ns"} 1.0' in text
    m.observe_details("ns", "a", timings=None, tls={"imap": {"not_after": 1767312000.0}}, webhook_failed=False)
    assert 'endpoint="smtp"' not in _text(m), "an endpoint without TLS this time loses its expiry"
    m.forget("ns", "a")
    assert 'name="a"' not in _text(m)


def test_imap_load_of_the_last_check_restored_and_forgotten():
    m = Metrics(CollectorRegistry())
    m.observe_details("ns", "a", timings=None, tls=None, webhook_failed=False, imap_commands=21,
                      imap_session_seconds=5.25)
    text = _text(m)
    assert 'mail_selfcheck_imap_commands{name="a",namespace="ns"} 21.0' in text
    assert 'mail_selfcheck_imap_session_seconds{name="a",namespace="ns"} 5.25' in text
    m.observe_details("ns", "a", timings=None, tls=None, webhook_failed=False)  # no IMAP session this time
    assert "mail_selfcheck_imap_commands{" not in _text(m), "no stale load"
    m.restore("ns", "a", success=True, consecutive_failures=0, last_success=5.0, imap_commands=19,
              imap_session_seconds=0.05)
    assert 'mail_selfcheck_imap_commands{name="a",namespace="ns"} 19.0' in _text(m)
    m.forget("ns", "a")
    assert 'name="a"' not in _text(m)
