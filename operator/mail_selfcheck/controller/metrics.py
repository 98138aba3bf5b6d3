"""Prometheus series of the MailSelfchecks, labelled ``namespace`` and ``name`` (prometheus_client).

Series (times in seconds, timestamps in Unix seconds):

* ``mail_selfcheck_success``: 1 when the last check succeeded, 0 when it failed (a failed
  send sets it to 0 too);
* ``mail_selfcheck_last_send_time_seconds`` / ``mail_selfcheck_last_reception_time_seconds``:
  the value measured by the last check; absent when the last check did not measure it (a
  failed check never leaves a healthy-looking delivery time behind); restored from status
  after an operator restart;
* ``mail_selfcheck_send_time_seconds`` / ``mail_selfcheck_reception_time_seconds``:
  histograms, buckets from 5 ms to 10 min (:data:`BUCKETS`; a local delivery takes 3-25 ms);
* ``mail_selfcheck_checks_total{outcome="success"|"failure", error_class}``;
* ``mail_selfcheck_last_success_timestamp_seconds``; ``mail_selfcheck_creation_timestamp_seconds``
  (the resource's ``metadata.creationTimestamp``: "no success since" for a check that never
  succeeded);
* ``mail_selfcheck_tls_cert_expiry_timestamp_seconds{endpoint="smtp"|"imap"}``: earliest
  certificate expiry of the last check's handshake (blackbox_exporter's
  ``probe_ssl_earliest_cert_expiry``); ``mail_selfcheck_step_duration_seconds{step}``: a
  histogram per step; ``mail_selfcheck_webhook_failures_total``: heartbeats not delivered;
* ``mail_selfcheck_leftover_messages``: the probe's own messages the last check left (could not delete);
* ``mail_selfcheck_imap_commands`` / ``mail_selfcheck_imap_session_seconds``: the IMAP load of the
  last check (commands sent; seconds its sessions stayed open); absent when it opened no session;
  restored from status after an operator restart;
* ``mail_selfcheck_consecutive_failures``; ``mail_selfcheck_interval_seconds``;
  ``mail_selfcheck_suspended`` (1 while ``spec.suspend``: the alerts leave it alone).

Operator self-metrics (no resource labels): ``mail_selfcheck_build_info{version}``,
``mail_selfcheck_operator_jobs_launched_total``, ``mail_selfcheck_operator_reconcile_errors_total``
(API errors the loops retried), ``mail_selfcheck_operator_skipped_slots_total`` (slots missed
while a check ran long or the operator was down: only the latest one runs).

:meth:`Metrics.forget` removes every series of a deleted resource. Exposition:
https://prometheus.io/docs/instrumenting/exposition_formats/.
"""

from __future__ import annotations

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)

from .. import __version__

# No ``*_created`` series: they double the exposition and no dashboard or alert reads them.
disable_created_metrics()

#: Histogram buckets (seconds): a 3 ms local delivery up to slow, greylisted delivery.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)

_LABELS = ("namespace", "name")


class Metrics:
    """The operator's per-resource series in one registry."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.success = Gauge("mail_selfcheck_success", "1 if the last check succeeded, else 0.", _LABELS, registry=registry)
        self.last_send = Gauge(
            "mail_selfcheck_last_send_time_seconds", "SMTP submission time of the last check.", _LABELS, registry=registry
        )
        self.last_reception = Gauge(
            "mail_selfcheck_last_reception_time_seconds",
            "Time from submission to the message seen over IMAP, last check.",
            _LABELS,
            registry=registry,
        )
        self.send = Histogram(
            "mail_selfcheck_send_time_seconds", "SMTP submission time.", _LABELS, buckets=BUCKETS, registry=registry
        )
        self.reception = Histogram(
            "mail_selfcheck_reception_time_seconds",
            "Time from submission to the message seen over IMAP.",
            _LABELS,
            buckets=BUCKETS,
            registry=registry,
        )
        self.checks = Counter(
            "mail_selfcheck_checks", "Finished checks by outcome and error class.", (*_LABELS, "outcome", "error_class"),
            registry=registry,
        )
        self.last_success = Gauge(
            "mail_selfcheck_last_success_timestamp_seconds", "Unix time of the last successful check.", _LABELS,
            registry=registry,
        )
        self.consecutive_failures = Gauge(
            "mail_selfcheck_consecutive_failures", "Failed checks since the last success.", _LABELS, registry=registry
        )
        self.interval = Gauge(
            "mail_selfcheck_interval_seconds", "Configured seconds between checks (spec.interval).", _LABELS,
            registry=registry,
        )
        self.cert_expiry = Gauge(
            "mail_selfcheck_tls_cert_expiry_timestamp_seconds",
            "Earliest certificate expiry (notAfter) of the chain the server sent in the last check, Unix seconds.",
            (*_LABELS, "endpoint"), registry=registry,
        )
        self.steps = Histogram(
            "mail_selfcheck_step_duration_seconds", "Seconds per step of a check (imap_connect ... cleanup).",
            (*_LABELS, "step"), buckets=BUCKETS, registry=registry,
        )
        self.webhook_failures = Counter(
            "mail_selfcheck_webhook_failures", "Heartbeats that could not be delivered.", _LABELS, registry=registry
        )
        self._steps_seen: dict[tuple[str, str], set[str]] = {}
        self._endpoints_seen: dict[tuple[str, str], set[str]] = {}
        self.leftovers = Gauge(
            "mail_selfcheck_leftover_messages",
            "The probe's own messages the last check could not delete (absent when it could not look).", _LABELS,
            registry=registry,
        )
        self.imap_commands = Gauge(
            "mail_selfcheck_imap_commands", "IMAP commands the last check sent (absent: no IMAP session).", _LABELS,
            registry=registry,
        )
        self.imap_session = Gauge(
            "mail_selfcheck_imap_session_seconds", "Seconds the last check's IMAP sessions stayed open.", _LABELS,
            registry=registry,
        )
        self.suspended = Gauge(
            "mail_selfcheck_suspended", "1 while the MailSelfcheck is suspended (spec.suspend), else 0.", _LABELS,
            registry=registry,
        )
        self.created = Gauge(
            "mail_selfcheck_creation_timestamp_seconds", "Unix time the MailSelfcheck was created.", _LABELS,
            registry=registry,
        )
        self.build_info = Gauge(
            "mail_selfcheck_build_info", "Version of the running operator (always 1).", ("version",), registry=registry
        )
        self.build_info.labels(__version__).set(1)
        self.jobs_launched = Counter(
            "mail_selfcheck_operator_jobs_launched", "Probe Jobs created by the operator.", registry=registry
        )
        self.reconcile_errors = Counter(
            "mail_selfcheck_operator_reconcile_errors", "Reconcile passes that failed on an API error and were retried.",
            registry=registry,
        )
        self.skipped_slots = Counter(
            "mail_selfcheck_operator_skipped_slots", "Scheduled slots not run (missed while a check or the operator "
            "was busy or down; only the latest missed slot runs).", registry=registry,
        )
        self._outcomes: dict[tuple[str, str], set[tuple[str, str]]] = {}

    def set_resource(self, namespace: str, name: str, *, interval: float, suspended: bool, created: float) -> None:
        """Publish the resource's ``spec.interval`` (seconds), ``spec.suspend`` and creation time (Unix seconds)."""
        self.interval.labels(namespace, name).set(interval)
        self.suspended.labels(namespace, name).set(1 if suspended else 0)
        self.created.labels(namespace, name).set(created)

    def restore(self, namespace: str, name: str, *, success: bool | None, consecutive_failures: int,
                last_success: float | None, send_time: float | None = None,
                reception_time: float | None = None, imap_commands: int | None = None,
                imap_session_seconds: float | None = None) -> None:
        """Re-publish the gauges from a resource's persisted status (after an operator restart)."""
        if success is not None:
            self.success.labels(namespace, name).set(1 if success else 0)
        self.consecutive_failures.labels(namespace, name).set(consecutive_failures)
        if last_success is not None:
            self.last_success.labels(namespace, name).set(last_success)
        self._set_or_clear(self.last_send, namespace, name, send_time)
        self._set_or_clear(self.last_reception, namespace, name, reception_time)
        self._set_imap_load(namespace, name, imap_commands, imap_session_seconds)

    def _set_imap_load(self, namespace: str, name: str, commands: int | None, seconds: float | None) -> None:
        self._set_or_clear(self.imap_commands, namespace, name, commands)
        self._set_or_clear(self.imap_session, namespace, name, seconds)

    @staticmethod
    def _set_or_clear(gauge: Gauge, namespace: str, name: str, value: float | None) -> None:
        if value is None:
            try:
                gauge.remove(namespace, name)
            except KeyError:
                pass
        else:
            gauge.labels(namespace, name).set(value)

    def observe(self, namespace: str, name: str, *, success: bool, error_class: str | None,
                send_time: float | None, reception_time: float | None, consecutive_failures: int,
                timestamp: float, leftover_count: int | None = None) -> None:
        """Record one finished check (times in seconds, ``timestamp`` Unix seconds)."""
        self.success.labels(namespace, name).set(1 if success else 0)
        self._set_or_clear(self.leftovers, namespace, name, leftover_count)
        self._set_or_clear(self.last_send, namespace, name, send_time)
        self._set_or_clear(self.last_reception, namespace, name, reception_time)
        if send_time is not None:
            self.send.labels(namespace, name).observe(send_time)
        if reception_time is not None:
            self.reception.labels(namespace, name).observe(reception_time)
        outcome = ("success", "") if success else ("failure", error_class or "unknown")
        self.checks.labels(namespace, name, *outcome).inc()
        self._outcomes.setdefault((namespace, name), set()).add(outcome)
        if success:
            self.last_success.labels(namespace, name).set(timestamp)
        self.consecutive_failures.labels(namespace, name).set(consecutive_failures)

    def observe_details(self, namespace: str, name: str, *, timings: dict[str, float] | None,
                        tls: dict[str, dict] | None, webhook_failed: bool, imap_commands: int | None = None,
                        imap_session_seconds: float | None = None) -> None:
        """Record a check's step timings (seconds), TLS certificate expiry per endpoint (Unix
        seconds; an endpoint without TLS facts this time loses its series), a failed heartbeat
        and its IMAP load (commands; seconds connected; ``None`` removes the series)."""
        key = (namespace, name)
        self._set_imap_load(namespace, name, imap_commands, imap_session_seconds)
        for step, seconds in (timings or {}).items():
            self.steps.labels(namespace, name, step).observe(seconds)
            self._steps_seen.setdefault(key, set()).add(step)
        seen = self._endpoints_seen.setdefault(key, set())
        current = {ep: f.get("not_after") for ep, f in (tls or {}).items() if f.get("not_after")}
        for endpoint in seen - set(current):
            try:
                self.cert_expiry.remove(namespace, name, endpoint)
            except KeyError:
                pass
        for endpoint, not_after in current.items():
            self.cert_expiry.labels(namespace, name, endpoint).set(not_after)
        self._endpoints_seen[key] = set(current)
        if webhook_failed:
            self.webhook_failures.labels(namespace, name).inc()

    def forget(self, namespace: str, name: str) -> None:
        """Remove every series of the resource ``namespace/name``."""
        for metric in (self.success, self.last_send, self.last_reception, self.send, self.reception,
                       self.last_success, self.consecutive_failures, self.interval, self.suspended, self.created,
                       self.leftovers, self.imap_commands, self.imap_session):
            try:
                metric.remove(namespace, name)
            except KeyError:
                pass
        for step in self._steps_seen.pop((namespace, name), set()):
            try:
                self.steps.remove(namespace, name, step)
            except KeyError:
                pass
        for endpoint in self._endpoints_seen.pop((namespace, name), set()):
            try:
                self.cert_expiry.remove(namespace, name, endpoint)
            except KeyError:
                pass
        try:
            self.webhook_failures.remove(namespace, name)
        except KeyError:
            pass
        for outcome in self._outcomes.pop((namespace, name), set()):
            try:
                self.checks.remove(namespace, name, *outcome)
            except KeyError:
                pass


def serve(port: int, registry: CollectorRegistry = REGISTRY) -> None:
    """Serve ``/metrics`` on ``0.0.0.0:port`` in a background thread."""
    start_http_server(port, registry=registry)
