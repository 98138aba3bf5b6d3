"""The operator on the real control plane, with probe Jobs run against the real Postfix + Dovecot.

Everything is real: the CRD from ``crds/`` (schema, CEL rules, status subresource, printer
columns) in kube-apiserver, the Job and garbage-collector controllers, the operator of a
**default** ``helm install`` (every namespace watched: the rendered Deployment's command line,
environment and ServiceAccount, see :mod:`tests.harness.chart_operator`) in a release namespace
of its own, so the MailSelfchecks of each test live in a namespace the operator was never told
about; the probe as the Job's command run by the node agent (the kubelet stand-in), the mail
stack. Intervals are 10-20 s to keep the tier short.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from mail_selfcheck.models.spec import GROUP
from tests.harness.chart_operator import ChartOperator
from tests.harness.waiting import wait_until

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "mailselfchecks.yaml"
RUN_NOW = f"{GROUP}/run-now"


# ----------------------------------------------------------------------------- helpers




class Webhook:
    """A heartbeat receiver on loopback recording every request path."""

    def __init__(self) -> None:
        hits = self.hits = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                hits.append((self.path, self.rfile.read(length)))
                self.send_response(200)
                self.end_headers()

            do_GET = do_POST  # noqa: N815

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/heartbeat/tok-{os.urandom(6).hex()}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="session")
def crd(control_plane):
    """The CRD from crds/ (the generated file the tests and the chart use), Established."""
    control_plane.kubectl("apply", "-f", str(CRD_FILE))
    control_plane.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                          f"crd/mailselfchecks.{GROUP}")
    return CRD_FILE


@pytest.fixture
def operator(control_plane, crd, tmp_path):
    """The operator of ``helm install`` with the chart's default values, released in its own namespace."""
    op = ChartOperator(control_plane, f"ops-{uuid.uuid4().hex[:6]}", tmp_path / "operator.log").start()
    assert not [a for a in op.argv if a.startswith("--namespace")], "the default install watches every namespace"
    yield op
    op.uninstall()
    control_plane.kubectl("delete", "namespace", op.namespace, "--wait=false", check=False)


@pytest.fixture
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


def mail_secrets(cp, namespace: str, env: dict[str, str], webhook_url: str | None = None) -> dict[str, str]:
    """Create the Secrets/ConfigMap a MailSelfcheck refers to; returns the confidential values."""
    secret = {"smtp": env["MESSAGES_SELFCHECK_SMTP_PASSWORD"], "imap": env["MESSAGES_SELFCHECK_IMAP_PASSWORD"],
              "secret": env["MESSAGES_SELFCHECK_SECRET"]}
    if webhook_url:
        secret["webhook"] = webhook_url
    apply(cp, namespace, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mail"}, "stringData": secret})
    apply(cp, namespace, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "mail-ca"},
                          "data": {"ca.crt": Path(env["MESSAGES_SELFCHECK_TLS_CA_FILE"]).read_text()}})
    return secret


def selfcheck(env: dict[str, str], name: str = "demo", interval: int = 10, timeout: float = 8,
              webhook: bool = False, webhook_kind: dict | None = None, **spec) -> dict:
    body = {
        "apiVersion": f"{GROUP}/v1alpha1",
        "kind": "MailSelfcheck",
        "metadata": {"name": name},
        "spec": {
            "from": env["MESSAGES_SELFCHECK_FROM"],
            "to": env["MESSAGES_SELFCHECK_TO"],
            "interval": interval,
            "timeout": timeout,
            "smtp": {"host": env["MESSAGES_SELFCHECK_SMTP_HOST"], "port": int(env["MESSAGES_SELFCHECK_SMTP_PORT"]),
                     "security": env["MESSAGES_SELFCHECK_SMTP_SECURITY"],
                     "passwordSecretRef": {"name": "mail", "key": "smtp"}},
            "imap": {"host": env["MESSAGES_SELFCHECK_IMAP_HOST"], "port": int(env["MESSAGES_SELFCHECK_IMAP_PORT"]),
                     "security": env["MESSAGES_SELFCHECK_IMAP_SECURITY"],
                     "passwordSecretRef": {"name": "mail", "key": "imap"}},
            "secretRef": {"name": "mail", "key": "secret"},
            "tls": {"caBundle": {"configMapKeyRef": {"name": "mail-ca", "key": "ca.crt"}}},
            **spec,
        },
    }
    if webhook:
        body["spec"]["webhookUrlSecretRef"] = {"name": "mail", "key": "webhook"}
    if webhook_kind:
        body["spec"]["webhook"] = webhook_kind
    return body


def apply(cp, namespace: str, obj: dict, check: bool = True) -> subprocess.CompletedProcess:
    return cp.kubectl("-n", namespace, "apply", "-f", "-", input=yaml.safe_dump(obj), check=check)


def get(cp, namespace: str, *what: str) -> dict:
    return json.loads(cp.kubectl("-n", namespace, "get", *what, "-o", "json").stdout)


def status(cp, namespace: str, name: str = "demo") -> dict:
    return get(cp, namespace, "mailselfcheck", name).get("status") or {}


def ready(st: dict) -> dict:
    return next((c for c in st.get("conditions") or [] if c["type"] == "Ready"), {})


def events(cp, namespace: str, reason: str | None = None) -> list[dict]:
    items = get(cp, namespace, "events")["items"]
    items = [e for e in items if e["involvedObject"]["kind"] == "MailSelfcheck"]
    return [e for e in items if reason is None or e["reason"] == reason]


def diag(cp, namespace: str, op: ChartOperator):
    def text() -> str:
        out = cp.kubectl("-n", namespace, "get", "mailselfchecks,jobs,pods", "-o", "wide", check=False)
        st = cp.kubectl("-n", namespace, "get", "mailselfchecks", "-o", "jsonpath={.items[*].status}", check=False)
        return f"{out.stdout}{out.stderr}\nstatus: {st.stdout}\noperator log tail:\n{op.text()[-3000:]}"
    return text


def assert_no_secrets(cp, namespace: str, op: ChartOperator, secrets: dict[str, str]) -> None:
    """No confidential value in the operator log, the status, the Events or the Job specs."""
    places = {
        "operator log": op.text(),
        "MailSelfcheck (status included)": cp.kubectl("-n", namespace, "get", "mailselfchecks", "-o", "json").stdout,
        "Events": cp.kubectl("-n", namespace, "get", "events", "-o", "json").stdout,
        "Jobs": cp.kubectl("-n", namespace, "get", "jobs", "-o", "json").stdout,
        "Pods": cp.kubectl("-n", namespace, "get", "pods", "-o", "json").stdout,
    }
    for key, value in secrets.items():
        for where, text in places.items():
            assert value not in text, f"the {key} value leaked into the {where}"


# ----------------------------------------------------------------------------- tests


def test_success_status_webhook_metrics_and_no_leak(control_plane, mail_stack, operator, k8s_namespace, webhook):
    cp, ns = control_plane, k8s_namespace
    env = mail_stack.probe_env()
    secrets = mail_secrets(cp, ns, env, webhook.url)
    apply(cp, ns, selfcheck(env, interval=10, webhook=True))
    d = diag(cp, ns, operator)

    st = wait_until(lambda: (s := status(cp, ns)).get("success") is True and s, 2 * 10 + 10,
                    "a successful check within two intervals", diag=d)
    assert st["sendTime"] > 0 and st["receptionTime"] > 0 and st["consecutiveFailures"] == 0
    assert st["imapCommands"] > 0 and st["imapSessionSeconds"] > 0, st  # the check's IMAP load
    assert ready(st)["status"] == "True" and ready(st)["observedGeneration"] == 1
    job = get(cp, ns, "job", st["lastHarvestedJob"])
    assert any(c["type"] == "Complete" and c["status"] == "True" for c in job["status"]["conditions"])
    assert job["metadata"]["ownerReferences"][0]["name"] == "demo"
    wait_until(lambda: webhook.hits, 10, "the heartbeat webhook")

    table = cp.kubectl("-n", ns, "get", "mailselfchecks", "-o", "wide").stdout
    print(table)
    header, row = table.splitlines()[:2]
    assert header.split()[:4] == ["NAME", "SUCCESS", "SEND", "RECEPTION"] and "ERROR" in header
    assert row.split()[1] == "true"

    # a second run follows on the schedule; the history grows and the metrics count it
    history = wait_until(lambda: len(h := status(cp, ns).get("history") or []) >= 2 and h, 10 + 10,
                         "the second scheduled check", diag=d)
    # its Job was told the reception times known when it was launched (oldest first), to plan detection
    second = get(cp, ns, "job", history[0]["job"])["spec"]["template"]["spec"]["containers"][0]["env"]
    known = [f"{e['receptionTime']:g}" for e in reversed(history[1:]) if e["success"]]
    assert {"name": "MESSAGES_SELFCHECK_IMAP_EXPECTED_ARRIVAL", "value": ",".join(known)} in second, second
    text = operator.metrics()
    assert f'mail_selfcheck_success{{name="demo",namespace="{ns}"}} 1.0' in text
    assert f'mail_selfcheck_checks_total{{error_class="",name="demo",namespace="{ns}",outcome="success"}}' in text
    assert "mail_selfcheck_reception_time_seconds_bucket" in text
    assert f'mail_selfcheck_imap_commands{{name="demo",namespace="{ns}"}} ' in text
    assert f'mail_selfcheck_interval_seconds{{name="demo",namespace="{ns}"}} ' in text
    assert "_created" not in text
    assert [e["reason"] for e in events(cp, ns)] == ["CheckSucceeded"], "Events on transitions only"
    event = events(cp, ns)[0]  # signed by the operator, with its pod name (the chart's POD_NAME)
    assert event["reportingComponent"] == event["source"]["component"] == "mail-selfcheck-operator", event
    assert event["reportingInstance"] == operator.pod_name, event
    assert ns != operator.namespace  # watched without being named: the default install is cluster-wide
    assert_no_secrets(cp, ns, operator, secrets)


def test_failure_error_events_and_recovery(control_plane, mail_stack, operator, k8s_namespace):
    cp, ns = control_plane, k8s_namespace
    env = mail_stack.probe_env()
    secrets = mail_secrets(cp, ns, env)
    good_imap = secrets["imap"]
    d = diag(cp, ns, operator)

    # wrong IMAP password in the Secret
    cp.kubectl("-n", ns, "patch", "secret", "mail", "-p", json.dumps({"stringData": {"imap": "wrong-pw"}}))
    apply(cp, ns, selfcheck(env, interval=10))
    st = wait_until(lambda: (s := status(cp, ns)).get("consecutiveFailures", 0) >= 2 and s, 3 * 10 + 10,
                    "two failed checks", diag=d)
    assert st["success"] is False and st["errorClass"] == "mailbox_unavailable", st
    assert "login" in st["error"].lower() or "auth" in st["error"].lower(), st["error"]
    assert ready(st)["status"] == "False" and ready(st)["reason"] == "CheckFailed"
    assert log_lines(operator, "WARNING", ns, "demo", "failure (mailbox_unavailable)"), "a failed check is a WARNING"
    print(cp.kubectl("-n", ns, "get", "mailselfchecks", "-o", "wide").stdout)
    assert len(events(cp, ns, "CheckFailing")) == 1 and events(cp, ns, "CheckFailing")[0]["type"] == "Warning"
    assert f'mail_selfcheck_success{{name="demo",namespace="{ns}"}} 0.0' in operator.metrics()
    assert f'mail_selfcheck_consecutive_failures{{name="demo",namespace="{ns}"}} ' in operator.metrics()

    # repaired: recovery Event, Ready=True; run-now annotation triggers the next check at once
    cp.kubectl("-n", ns, "patch", "secret", "mail", "-p", json.dumps({"stringData": {"imap": good_imap}}))
    cp.kubectl("-n", ns, "annotate", "mailselfcheck", "demo", f"{RUN_NOW}=1")
    st = wait_until(lambda: (s := status(cp, ns)).get("success") is True and s, 10 + 10, "recovery", diag=d)
    assert ready(st)["status"] == "True" and st["consecutiveFailures"] == 0
    assert len(events(cp, ns, "CheckRecovered")) == 1

    # Dovecot down: the precise error, then recovery when it is back
    mail_stack.stop_dovecot()
    try:
        st = wait_until(lambda: (s := status(cp, ns)).get("success") is False and s, 2 * 10 + 10,
                        "a failure with Dovecot stopped", diag=d)
        assert st["errorClass"] in ("mailbox_unavailable", "imap_connect"), st
        assert "refused" in st["error"].lower() or "connect" in st["error"].lower(), st["error"]
    finally:
        mail_stack.start_dovecot()
    wait_until(lambda: status(cp, ns).get("success") is True, 2 * 10 + 10, "recovery after Dovecot restart", diag=d)
    assert len(events(cp, ns, "CheckFailing")) == 2 and len(events(cp, ns, "CheckRecovered")) == 2
    assert_no_secrets(cp, ns, operator, {**secrets, "wrong imap password": "wrong-pw"})


INVALID = [
    ({"from": "not-an-address"}, "must be a mail address like user@example.com"),
    ({"interval": 0}, "should be greater than or equal to 10"),
    ({"interval": 20, "timeout": 20}, "timeout must be smaller than interval"),
    ({"smtp": {"host": "h", "security": "ssl", "passwordSecretRef": {"name": "a", "key": "b"}}},
     'Unsupported value: "ssl"'),
    ({"smtp": {"host": "h", "security": "starttls"}}, "passwordSecretRef is required unless security is plain"),
    ({"secretRef": None}, "spec.secretRef: Required value"),
    # What the Job API would refuse, refused at admission instead (issue 8)
    ({"job": {"resources": {"limits": {"cpu": "lots"}}}}, "must be a Kubernetes quantity such as 100m"),
    ({"job": {"nodeSelector": {"disktype": "fast ssd"}}}, "must be a label value"),
    ({"job": {"serviceAccountName": "Not_Valid"}}, "spec.job.serviceAccountName in body should match"),
    ({"job": {"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}},
     "a toleration with operator Exists must not have a value"),
    # OAuth2 (issue 10)
    ({"imap": {"host": "h", "auth": "oauth2"}}, "oauth2 is required when smtp.auth or imap.auth is oauth2"),
    ({"imap": {"host": "h", "auth": "password"}}, "passwordSecretRef is required unless auth is oauth2"),
    ({"imap": {"host": "h", "auth": "oauth2"}, "oauth2": {"provider": "generic", "clientId": "c",
                                                         "clientSecretRef": {"name": "a", "key": "b"}}},
     "provider generic needs tokenUrl"),
    ({"imap": {"host": "h", "auth": "oauth2"}, "oauth2": {"provider": "microsoft", "tenant": "t", "clientId": "c"}},
     "oauth2 needs clientSecretRef, clientCertificateRef (microsoft) or serviceAccountKeyRef (google)"),
]


def test_invalid_resources_are_rejected_with_readable_messages(control_plane, mail_stack, operator, k8s_namespace):
    cp, ns = control_plane, k8s_namespace
    env = mail_stack.probe_env()
    for change, message in INVALID:
        body = selfcheck(env, name="invalid")
        body["spec"].update(change)
        body["spec"] = {k: v for k, v in body["spec"].items() if v is not None}
        out = apply(cp, ns, body, check=False)
        assert out.returncode != 0, f"{change} was accepted"
        assert message in out.stderr, out.stderr
    assert get(cp, ns, "mailselfchecks")["items"] == []
    assert operator.proc.poll() is None, "the operator died"
    assert "Traceback" not in operator.text()


def test_operator_restart_harvests_without_duplicate(control_plane, mail_stack, operator, k8s_namespace):
    """SIGKILL the operator while a Job runs; the restarted one records its result, no new Job for the slot."""
    cp, ns = control_plane, k8s_namespace
    env = mail_stack.probe_env(to_user="held")  # accepted, never delivered: the probe runs until its timeout
    mail_secrets(cp, ns, env)
    apply(cp, ns, selfcheck(env, interval=20, timeout=6))
    d = diag(cp, ns, operator)
    active = wait_until(lambda: status(cp, ns).get("active"), 20, "a running Job", interval=0.2, diag=d)
    operator.kill()
    # the Job finishes while no operator runs
    wait_until(lambda: any(c["type"] in ("Complete", "Failed") for c in
                           (get(cp, ns, "job", active["name"]).get("status") or {}).get("conditions") or []),
               30, "the Job to finish without operator")
    assert (status(cp, ns).get("active") or {}).get("name") == active["name"]
    operator.start()
    st = wait_until(lambda: (s := status(cp, ns)).get("lastHarvestedJob") == active["name"] and s, 20,
                    "the restarted operator to harvest the Job", diag=d)
    assert st["success"] is False and st["errorClass"] == "timeout", st
    assert st["history"][0]["job"] == active["name"]
    slots = [j["metadata"]["annotations"][f"{GROUP}/schedule-time"] for j in get(cp, ns, "jobs")["items"]]
    assert len(slots) == len(set(slots)), f"two Jobs for one slot: {slots}"
    assert slots.count(active["scheduleTime"]) == 1


def test_delete_collects_jobs_and_metrics(control_plane, mail_stack, operator, k8s_namespace):
    cp, ns = control_plane, k8s_namespace
    env = mail_stack.probe_env()
    mail_secrets(cp, ns, env)
    apply(cp, ns, selfcheck(env, interval=10, suspend=False))
    d = diag(cp, ns, operator)
    wait_until(lambda: status(cp, ns).get("success") is True, 20, "a first result", diag=d)
    assert get(cp, ns, "jobs")["items"] and get(cp, ns, "pods")["items"]
    series = f'name="demo",namespace="{ns}"'  # the operator watches every namespace: select ours
    assert series in operator.metrics()

    started = time.monotonic()
    cp.kubectl("-n", ns, "delete", "mailselfcheck", "demo", "--timeout=30s")  # finalizer must not hang
    assert time.monotonic() - started < 30
    wait_until(lambda: not get(cp, ns, "jobs")["items"] and not get(cp, ns, "pods")["items"], 60,
               "garbage collection of the Jobs and pods", diag=d)
    assert series not in operator.metrics(), "series of a deleted resource must go"


def test_suspend_stops_scheduling(control_plane, mail_stack, operator, k8s_namespace):
    cp, ns = control_plane, k8s_namespace
    env = mail_stack.probe_env()
    mail_secrets(cp, ns, env)
    apply(cp, ns, selfcheck(env, interval=10, suspend=True))
    time.sleep(12)
    assert get(cp, ns, "jobs")["items"] == [], "a suspended MailSelfcheck launched a Job"
    cp.kubectl("-n", ns, "patch", "mailselfcheck", "demo", "--type=merge", "-p", '{"spec":{"suspend":false}}')
    wait_until(lambda: status(cp, ns).get("success") is True, 20, "the first check after resuming",
               diag=diag(cp, ns, operator))


# ----------------------------------------------------------------------------- issue 8: the default install and what it found

#: kopf's text log line with the resource prefix: ``[time] logger [LEVEL   ] [namespace/name] message``.
def log_lines(op: ChartOperator, level: str, namespace: str, name: str, contains: str) -> list[str]:
    return [line for line in op.text().splitlines()
            if f"[{level}" in line and f"[{namespace}/{name}]" in line and contains in line]


def test_namespaced_install_watches_only_its_namespaces(control_plane, mail_stack, crd, k8s_namespace, tmp_path):
    """``watchNamespaces: [ns]``: the chart's `--namespace=ns` and Role; a check succeeds there and a
    MailSelfcheck elsewhere is left alone."""
    cp, ns = control_plane, k8s_namespace
    other = f"other-{uuid.uuid4().hex[:6]}"
    cp.kubectl("create", "namespace", other)
    op = ChartOperator(cp, f"ops-{uuid.uuid4().hex[:6]}", tmp_path / "operator.log", values={"watchNamespaces": [ns]})
    try:
        op.start()
        assert f"--namespace={ns}" in op.argv
        env = mail_stack.probe_env()
        mail_secrets(cp, ns, env)
        apply(cp, ns, selfcheck(env, interval=10))
        wait_until(lambda: status(cp, ns).get("success") is True, 30, "a check in the watched namespace",
                   diag=diag(cp, ns, op))
        apply(cp, other, selfcheck(env, name="ignored", interval=10))
        time.sleep(5)
        assert status(cp, other, "ignored") == {}, "a namespace that is not watched was reconciled"
        assert get(cp, other, "jobs")["items"] == []
        assert "Traceback" not in op.text() and "Forbidden" not in op.text()
    finally:
        op.uninstall()
        cp.kubectl("delete", "namespace", other, op.namespace, "--wait=false", check=False)


def test_dot_and_dash_names_keep_their_own_jobs(control_plane, mail_stack, operator, k8s_namespace):
    """``dot.name`` and ``dot-name`` are distinct resources: distinct Jobs, each its own results."""
    cp, ns = control_plane, k8s_namespace
    env = mail_stack.probe_env()
    mail_secrets(cp, ns, env)
    apply(cp, ns, selfcheck(env, name="dot.name", interval=10))
    apply(cp, ns, selfcheck(env, name="dot-name", interval=10))
    d = diag(cp, ns, operator)
    for name in ("dot.name", "dot-name"):
        wait_until(lambda: len(status(cp, ns, name).get("history") or []) >= 2, 45, f"two checks of {name}", diag=d)
    owners = {}
    for name in ("dot.name", "dot-name"):
        st = status(cp, ns, name)
        assert all(h["success"] for h in st["history"]), st["history"]
        uid = get(cp, ns, "mailselfcheck", name)["metadata"]["uid"]
        for h in st["history"]:
            job = get(cp, ns, "job", h["job"])
            assert job["metadata"]["ownerReferences"][0]["uid"] == uid, (name, h["job"])
            owners[h["job"]] = name
    assert len(owners) == len(status(cp, ns, "dot.name")["history"]) + len(status(cp, ns, "dot-name")["history"])
    assert "disappeared before its result was read" not in operator.text()


def test_job_refused_by_the_api_server_is_reported_once(control_plane, mail_stack, operator, k8s_namespace):
    """A spec the CRD accepts but the Job API refuses (requests above limits): Ready=False/InvalidJobSpec with
    the API server's message, one Warning Event, a backed-off retry; fixed spec -> checks run."""
    cp, ns = control_plane, k8s_namespace
    env = mail_stack.probe_env()
    mail_secrets(cp, ns, env)
    bad = {"resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}}
    apply(cp, ns, selfcheck(env, name="refused", interval=10, job=bad))
    d = diag(cp, ns, operator)
    st = wait_until(lambda: (s := status(cp, ns, "refused")) and ready(s).get("reason") == "InvalidJobSpec" and s, 20,
                    "Ready=False reason InvalidJobSpec", diag=d)
    assert ready(st)["status"] == "False"
    assert "must be less than or equal to cpu limit" in ready(st)["message"], ready(st)
    assert st["errorClass"] == "job_refused" and "must be less than or equal to cpu limit" in st["error"]
    time.sleep(25)  # ~5 retries at the old fixed 5 s pace
    warnings = events(cp, ns, "InvalidJobSpec")
    assert len(warnings) == 1 and warnings[0]["type"] == "Warning" and warnings[0].get("count", 1) == 1, warnings
    logged = log_lines(operator, "WARNING", ns, "refused", "InvalidJobSpec")
    assert len(logged) == 1, logged
    assert not [line for line in operator.text().splitlines() if "reconcile failed" in line]
    assert get(cp, ns, "jobs")["items"] == []

    cp.kubectl("-n", ns, "patch", "mailselfcheck", "refused", "--type=merge",
               "-p", json.dumps({"spec": {"job": {"resources": {"requests": {"cpu": "100m"}, "limits": {"cpu": "1"}}}}}))
    st = wait_until(lambda: (s := status(cp, ns, "refused")).get("success") is True and s, 30,
                    "a check once the spec is fixed", diag=d)
    assert ready(st)["status"] == "True" and ready(st)["observedGeneration"] == 2


def test_missing_secret_key_ends_the_check_early(control_plane, mail_stack, operator, k8s_namespace):
    """A misspelt Secret key: the kubelet's message in status within seconds, not a bare timeout after timeout+30 s."""
    cp, ns = control_plane, k8s_namespace
    env = mail_stack.probe_env()
    mail_secrets(cp, ns, env)
    body = selfcheck(env, name="typo", interval=120, timeout=60)
    body["spec"]["imap"]["passwordSecretRef"]["key"] = "imap-pasword"
    started = time.monotonic()
    apply(cp, ns, body)
    d = diag(cp, ns, operator)
    st = wait_until(lambda: (s := status(cp, ns, "typo")).get("success") is False and s, 40,
                    "the failed check", diag=d)
    elapsed = time.monotonic() - started
    assert st["errorClass"] == "job_config", st
    assert "CreateContainerConfigError: couldn't find key imap-pasword in Secret" in st["error"], st["error"]
    assert f"{ns}/mail" in st["error"]
    assert elapsed < 60 + 30, "ended by the Job's deadline, not by the pod's status"
    job = st["lastHarvestedJob"]
    wait_until(lambda: cp.kubectl("-n", ns, "get", "job", job, check=False).returncode != 0, 30,
               "the blocked Job to be deleted", diag=d)
    assert len(events(cp, ns, "CheckFailing")) == 1
    assert log_lines(operator, "WARNING", ns, "typo", "failure (job_config)")
    print(f"missing Secret key reported {elapsed:.1f}s after apply (deadline would be 90 s)")
    # The fix is checked at once (the spec changed after a failed check), not an interval (120 s) later.
    cp.kubectl("-n", ns, "patch", "mailselfcheck", "typo", "--type=json",
               "-p", '[{"op": "replace", "path": "/spec/imap/passwordSecretRef/key", "value": "imap"}]')
    wait_until(lambda: status(cp, ns, "typo").get("success") is True, 30, "a check of the fixed spec", diag=d)


def test_deletion_never_waits_for_the_operator(control_plane, mail_stack, operator, k8s_namespace):
    """No finalizer: after `helm uninstall`, deleting a MailSelfcheck and its namespace completes."""
    cp, ns = control_plane, k8s_namespace
    env = mail_stack.probe_env()
    mail_secrets(cp, ns, env)
    apply(cp, ns, selfcheck(env, interval=10))
    legacy = selfcheck(env, name="legacy", interval=10)
    legacy["metadata"]["finalizers"] = [f"{GROUP}/finalizer"]  # what round-1 operators added
    apply(cp, ns, legacy)
    d = diag(cp, ns, operator)
    wait_until(lambda: status(cp, ns).get("success") is True, 30, "a first result", diag=d)
    wait_until(lambda: not get(cp, ns, "mailselfcheck", "legacy")["metadata"].get("finalizers"), 30,
               "the operator to remove the legacy finalizer", diag=d)
    assert not get(cp, ns, "mailselfcheck", "demo")["metadata"].get("finalizers")

    operator.uninstall()  # the operator is gone, as after `helm uninstall`
    cp.kubectl("-n", ns, "delete", "mailselfcheck", "demo", "legacy", "--timeout=20s")
    cp.kubectl("delete", "namespace", ns, "--timeout=90s")


def test_a_job_owned_by_someone_else_is_never_adopted(control_plane, mail_stack, operator, k8s_namespace):
    """409 on create: the existing Job is adopted only if its controller owner is this resource's UID."""
    from mail_selfcheck.controller.schedule import job_name, parse_time

    cp, ns = control_plane, k8s_namespace
    env = mail_stack.probe_env()
    mail_secrets(cp, ns, env)
    apply(cp, ns, selfcheck(env, name="victim", interval=60, suspend=True))
    meta = get(cp, ns, "mailselfcheck", "victim")["metadata"]
    taken = job_name("victim", meta["uid"], parse_time(meta["creationTimestamp"]))  # its first slot's Job name
    foreign = {"apiVersion": "batch/v1", "kind": "Job",
               "metadata": {"name": taken, "labels": {"app.kubernetes.io/managed-by": "mail-selfcheck-operator"}},
               "spec": {"suspend": True, "template": {"spec": {"restartPolicy": "Never", "containers": [
                   {"name": "c", "image": "example.test/other:1", "command": ["true"]}]}}}}
    apply(cp, ns, foreign)
    cp.kubectl("-n", ns, "patch", "mailselfcheck", "victim", "--type=merge", "-p", '{"spec":{"suspend":false}}')
    d = diag(cp, ns, operator)
    st = wait_until(lambda: (s := status(cp, ns, "victim")) and ready(s).get("reason") == "JobNameConflict" and s, 20,
                    "Ready=False reason JobNameConflict", diag=d)
    assert f"Job {ns}/{taken} already exists and is not owned by this MailSelfcheck" in st["error"]
    assert not st.get("active") and not st.get("history"), "a foreign Job was adopted"
    assert len(events(cp, ns, "JobNameConflict")) == 1
    job = get(cp, ns, "job", taken)
    assert not job["metadata"].get("ownerReferences") and job["spec"]["suspend"] is True, "the foreign Job was touched"


def test_a_recreated_watched_namespace_does_not_stop_the_operator(control_plane, mail_stack, crd, k8s_namespace,
                                                                  tmp_path):
    """Namespaced install over two namespaces; one is deleted and re-created (its Role is gone, 403): the
    operator keeps running past kopf's default retry budget (~54 s) and checks go on in the other one."""
    cp, ns = control_plane, k8s_namespace
    other = f"other-{uuid.uuid4().hex[:6]}"
    cp.kubectl("create", "namespace", other)
    op = ChartOperator(cp, f"ops-{uuid.uuid4().hex[:6]}", tmp_path / "operator.log",
                       values={"watchNamespaces": [ns, other]})
    try:
        op.start()
        env = mail_stack.probe_env()
        mail_secrets(cp, ns, env)
        apply(cp, ns, selfcheck(env, interval=600))
        wait_until(lambda: status(cp, ns).get("success") is True, 30, "a first check", diag=diag(cp, ns, op))
        cp.kubectl("delete", "namespace", other, "--timeout=60s")
        cp.kubectl("create", "namespace", other)
        time.sleep(70)
        assert op.alive(), f"the operator exited:\n{op.text()[-3000:]}"
        cp.kubectl("-n", ns, "annotate", "mailselfcheck", "demo", f"{RUN_NOW}=1")
        wait_until(lambda: len(status(cp, ns).get("history") or []) >= 2, 30, "a check in the healthy namespace",
                   diag=diag(cp, ns, op))
    finally:
        op.uninstall()
        cp.kubectl("delete", "namespace", other, op.namespace, "--wait=false", check=False)


@pytest.fixture(scope="module")
def oauth_stack():
    from tests.harness.oauth2_mailstack import OAuth2MailStack

    with OAuth2MailStack() as stack:
        yield stack


def test_oauth2_check_end_to_end(control_plane, oauth_stack, operator, k8s_namespace):
    """smtp.auth / imap.auth = oauth2 (generic provider, app-only, client secret from a Secret): the Job gets
    the OAuth2 settings, obtains tokens from the real authorization server and logs in to Postfix and Dovecot;
    neither the client secret nor any token reaches status, Events, the Job or the operator log."""
    from tests.harness.oauth2_mailstack import CLIENT_ID, MAIL_SCOPE

    cp, ns, stack = control_plane, k8s_namespace, oauth_stack
    env = stack.probe_env()
    apply(cp, ns, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mail"},
                   "stringData": {"secret": env["MESSAGES_SELFCHECK_SECRET"], "client-secret": stack.client_secret}})
    apply(cp, ns, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "mail-ca"},
                   "data": {"ca.crt": Path(env["MESSAGES_SELFCHECK_TLS_CA_FILE"]).read_text()}})
    body = selfcheck(env, name="oauth", interval=20, timeout=10)
    body["spec"]["smtp"] = {"host": env["MESSAGES_SELFCHECK_SMTP_HOST"], "port": int(env["MESSAGES_SELFCHECK_SMTP_PORT"]),
                            "security": "starttls", "auth": "oauth2"}
    body["spec"]["imap"] = {"host": env["MESSAGES_SELFCHECK_IMAP_HOST"], "port": int(env["MESSAGES_SELFCHECK_IMAP_PORT"]),
                            "security": "tls", "auth": "oauth2"}
    body["spec"]["oauth2"] = {"provider": "generic", "tokenUrl": stack.oauth2.token_url, "clientId": CLIENT_ID,
                              "scope": MAIL_SCOPE, "clientSecretRef": {"name": "mail", "key": "client-secret"}}
    apply(cp, ns, body)
    st = wait_until(lambda: (s := status(cp, ns, "oauth")).get("success") is not None and s, 40,
                    "the OAuth2 check", diag=diag(cp, ns, operator))
    assert st["success"] is True, st
    assert st["leftoverCount"] == 0
    assert "client_credentials" in [r["grant_type"] for r in stack.oauth2.requests]
    job = get(cp, ns, "job", st["lastHarvestedJob"])
    env_names = {e["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert {"MESSAGES_SELFCHECK_SMTP_AUTH", "MESSAGES_SELFCHECK_OAUTH2_CLIENT_SECRET"} <= env_names
    assert_no_secrets(cp, ns, operator, {"client secret": stack.client_secret,
                                         **{f"token {i}": t for i, t in enumerate(stack.oauth2.tokens)}})


def test_a_real_prometheus_scrapes_the_operator_and_fires_the_charts_alert(control_plane, mail_stack, operator,
                                                                           k8s_namespace, tmp_path):
    """A live scrape (issue 12): Debian's Prometheus scrapes the operator's metrics port (as the chart's
    ServiceMonitor would: job = the metrics Service's name, honor_labels) and evaluates the chart's rules,
    rendered with a 1-failure threshold; a failing check fires MailSelfcheckFailing with the resource's
    labels, and it resolves once the check succeeds."""
    import shutil
    import urllib.parse
    import urllib.request

    from tests.harness.controlplane import free_port

    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus is missing: hack/install-system-deps.sh installs Debian's package"
    cp, ns = control_plane, k8s_namespace
    job = f"{operator.fullname}-metrics"
    rendered = cp.helm("template", operator.release, str(Path(__file__).resolve().parents[2] / "charts" / "selfcheck"),
                       "-n", operator.namespace, "--set", "prometheusRule.enabled=true", "--set",
                       "metrics.service.enabled=true", "--set", "prometheusRule.failing.consecutiveFailures=1",
                       "--set", "prometheusRule.failing.for=1s", "--show-only", "templates/prometheusrule.yaml").stdout
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": yaml.safe_load(rendered)["spec"]["groups"]}))
    (tmp_path / "prometheus.yaml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "rules.yaml")],
        "scrape_configs": [{"job_name": job, "honor_labels": True, "static_configs": [
            {"targets": [f"127.0.0.1:{operator.metrics_port}"], "labels": {"namespace": operator.namespace}}]}],
    }))
    port = free_port()
    log = open(tmp_path / "prometheus.log", "w")
    proc = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yaml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)

    def api(path: str, **params) -> dict:
        url = f"http://127.0.0.1:{port}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())["data"]

    def firing() -> list[dict]:
        try:
            alerts = api("alerts")["alerts"]
        except OSError:
            return []
        return [a for a in alerts if a["labels"]["alertname"] == "MailSelfcheckFailing" and a["state"] == "firing"
                and a["labels"].get("namespace") == ns]

    try:
        env = mail_stack.probe_env()
        secrets = mail_secrets(cp, ns, env)
        cp.kubectl("-n", ns, "patch", "secret", "mail", "-p", json.dumps({"stringData": {"imap": "wrong-pw"}}))
        apply(cp, ns, selfcheck(env, interval=600))
        d = diag(cp, ns, operator)
        wait_until(lambda: status(cp, ns).get("success") is False, 30, "a failed check", diag=d)
        (alert,) = wait_until(firing, 40, "MailSelfcheckFailing firing in Prometheus",
                              diag=lambda: (tmp_path / "prometheus.log").read_text()[-2000:])
        assert alert["labels"]["name"] == "demo" and alert["labels"]["job"] == job, alert
        assert alert["annotations"]["runbook_url"].endswith("#troubleshooting-by-error-message")
        value = api("query", query=f'mail_selfcheck_success{{namespace="{ns}",name="demo"}}')["result"]
        assert value and value[0]["value"][1] == "0"

        cp.kubectl("-n", ns, "patch", "secret", "mail", "-p", json.dumps({"stringData": {"imap": secrets["imap"]}}))
        cp.kubectl("-n", ns, "annotate", "mailselfcheck", "demo", f"{RUN_NOW}=1")
        wait_until(lambda: status(cp, ns).get("success") is True, 30, "recovery", diag=d)
        wait_until(lambda: not firing(), 30, "the alert to resolve")
        expiry = api("query", query=f'mail_selfcheck_tls_cert_expiry_timestamp_seconds{{namespace="{ns}"}}')["result"]
        assert {r["metric"]["endpoint"] for r in expiry} == {"smtp", "imap"}
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def test_a_failing_heartbeat_shows_in_status_metrics_and_one_event(control_plane, mail_stack, operator, k8s_namespace):
    """Issue 12: a heartbeat that cannot be delivered is not only a pod log line: status.webhook, the
    webhook-failures counter and one Warning Event say so (the check itself still succeeds); the URL never shows."""
    from tests.harness.controlplane import free_port

    cp, ns = control_plane, k8s_namespace
    env = mail_stack.probe_env()
    url = f"http://127.0.0.1:{free_port()}/ping/tok-{os.urandom(6).hex()}"  # nothing listens there
    secrets = mail_secrets(cp, ns, env, webhook_url=url)
    apply(cp, ns, selfcheck(env, interval=15, webhook=True, webhook_kind={"kind": "healthchecks"}))
    d = diag(cp, ns, operator)
    st = wait_until(lambda: len((s := status(cp, ns)).get("history") or []) >= 2 and s, 60, "two checks", diag=d)
    assert st["success"] is True, st
    assert st["webhook"]["kind"] == "healthchecks" and st["webhook"]["sent"] is False, st["webhook"]
    assert "connection failed" in st["webhook"]["error"]
    assert len(events(cp, ns, "HeartbeatFailing")) == 1, "one Event when it starts failing, not one per check"
    counter = [line for line in operator.metrics().splitlines()
               if line.startswith("mail_selfcheck_webhook_failures_total{") and f'namespace="{ns}"' in line]
    assert counter and float(counter[0].split()[-1]) >= 2, counter
    assert_no_secrets(cp, ns, operator, secrets)
