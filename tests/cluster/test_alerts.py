"""The chart's alert rules, evaluated by the real Prometheus rule engine (``promtool test rules``).

The PrometheusRule is rendered by ``helm template`` with the default alert values; its
``spec.groups`` become a Prometheus rule file, and each alert is driven through a scenario
with the series ``controller/metrics.py`` exposes: firing only after its ``for:``, with the
resource's labels; never for a suspended MailSelfcheck; "no recent success" also for a check
that never succeeded; a certificate that expires within 14 days (counted from the resource's creation); OperatorDown with its ``job`` and
``namespace`` labels when the target is down and when it is gone. Annotations are checked
apart (every alert has a ``runbook_url``), and removed from the file given to promtool so the
scenarios state labels only. promtool is Debian's (package ``prometheus``, 2.42).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "selfcheck"
JOB = "rel-selfcheck-metrics"
R = 'namespace="mail",name="a",job="' + JOB + '",instance="10.0.0.1:9090"'
LABELS = {"namespace": "mail", "name": "a", "job": JOB, "instance": "10.0.0.1:9090"}


def _rules(control_plane, tmp_path: Path) -> list[dict]:
    out = control_plane.helm("template", "rel", str(CHART), "-n", "ops", "--set", "prometheusRule.enabled=true",
                             "--set", "metrics.service.enabled=true", "--show-only", "templates/prometheusrule.yaml")
    rule = yaml.safe_load(out.stdout)
    return rule["spec"]["groups"]


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: `make test` installs Debian's prometheus package (hack/install-system-deps.sh)",
                    pytrace=False)
    return path


def _alert(series: list[tuple[str, str]], checks: list[tuple[str, str, list[dict]]]) -> dict:
    return {
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in series],
        "alert_rule_test": [{"eval_time": t, "alertname": a, "exp_alerts": [{"exp_labels": e} for e in exp]}
                            for t, a, exp in checks],
    }


def sev(severity: str, **extra) -> dict:
    return {**LABELS, "severity": severity, **extra}


TESTS = [
    # Failing: 3 failures in a row, pending for 1m, then firing; never while suspended.
    _alert([(f"mail_selfcheck_consecutive_failures{{{R}}}", "0 3x10"), (f"mail_selfcheck_suspended{{{R}}}", "0x10")],
           [("1m", "MailSelfcheckFailing", []), ("3m", "MailSelfcheckFailing", [sev("critical")])]),
    _alert([(f"mail_selfcheck_consecutive_failures{{{R}}}", "0 3x10"), (f"mail_selfcheck_suspended{{{R}}}", "1x10")],
           [("5m", "MailSelfcheckFailing", [])]),
    # No recent success: interval 60 s, last success at t=0, then none: > 120 s, for 5m.
    _alert([(f"mail_selfcheck_last_success_timestamp_seconds{{{R}}}", "0x20"),
            (f"mail_selfcheck_creation_timestamp_seconds{{{R}}}", "0x20"),
            (f"mail_selfcheck_interval_seconds{{{R}}}", "60x20"), (f"mail_selfcheck_suspended{{{R}}}", "0x20")],
           [("4m", "MailSelfcheckNoRecentSuccess", []),
            ("8m", "MailSelfcheckNoRecentSuccess", [{"namespace": "mail", "name": "a", "severity": "critical"}])]),
    # ... also when it never succeeded (no last-success series at all), from its creation time.
    _alert([(f"mail_selfcheck_creation_timestamp_seconds{{{R}}}", "0x20"),
            (f"mail_selfcheck_interval_seconds{{{R}}}", "60x20"), (f"mail_selfcheck_suspended{{{R}}}", "0x20")],
           [("8m", "MailSelfcheckNoRecentSuccess", [{"namespace": "mail", "name": "a", "severity": "critical"}])]),
    # ... and never while suspended.
    _alert([(f"mail_selfcheck_creation_timestamp_seconds{{{R}}}", "0x20"),
            (f"mail_selfcheck_interval_seconds{{{R}}}", "60x20"), (f"mail_selfcheck_suspended{{{R}}}", "1x20")],
           [("15m", "MailSelfcheckNoRecentSuccess", [])]),
    # Slow reception: above 60 s for 15m.
    _alert([(f"mail_selfcheck_last_reception_time_seconds{{{R}}}", "90x30"), (f"mail_selfcheck_suspended{{{R}}}", "0x30")],
           [("10m", "MailSelfcheckSlowReception", []), ("20m", "MailSelfcheckSlowReception", [sev("warning")])]),
    # Certificate expiring: 10 days left (< 14) for 1h, with the endpoint label; 30 days left: nothing.
    _alert([(f'mail_selfcheck_tls_cert_expiry_timestamp_seconds{{{R},endpoint="imap"}}', "864000x100"),
            (f'mail_selfcheck_tls_cert_expiry_timestamp_seconds{{{R},endpoint="smtp"}}', "2592000x100"),
            (f"mail_selfcheck_suspended{{{R}}}", "0x100")],
           [("30m", "MailSelfcheckCertificateExpiring", []),
            ("70m", "MailSelfcheckCertificateExpiring", [sev("warning", endpoint="imap")])]),
    # Operator down: the target answers no more (up == 0) keeps its labels ...
    _alert([(f'up{{job="{JOB}",namespace="ops",instance="10.0.0.1:9090"}}', "1 0x20")],
           [("5m", "MailSelfcheckOperatorDown", []),
            ("15m", "MailSelfcheckOperatorDown",
             [{"job": JOB, "namespace": "ops", "instance": "10.0.0.1:9090", "severity": "warning"}])]),
    # ... and a target that is gone altogether still names the job and namespace.
    _alert([('up{job="something-else",namespace="ops"}', "1x20")],
           [("15m", "MailSelfcheckOperatorDown", [{"job": JOB, "namespace": "ops", "severity": "warning"}])]),
]


@pytest.mark.cluster
def test_alerts_fire_as_documented(control_plane, tmp_path):
    groups = _rules(control_plane, tmp_path)
    alerts = [r for g in groups for r in g["rules"] if "alert" in r]
    assert {a["alert"] for a in alerts} == {"MailSelfcheckFailing", "MailSelfcheckNoRecentSuccess",
                                            "MailSelfcheckSlowReception", "MailSelfcheckCertificateExpiring",
                                            "MailSelfcheckOperatorDown"}
    for alert in alerts:
        assert alert.get("for"), f"{alert['alert']} has no for: (no pending state)"
        assert alert["annotations"]["runbook_url"].startswith("https://"), alert["alert"]
        assert "#" in alert["annotations"]["runbook_url"]
        alert.pop("annotations")
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": groups}))
    promtool = _promtool()
    check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    tests = tmp_path / "tests.yaml"
    tests.write_text(yaml.safe_dump({"rule_files": [rules.name], "evaluation_interval": "1m", "tests": TESTS}))
    out = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
