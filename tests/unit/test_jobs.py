"""The probe Job manifest, reading its outcome, and history limits (pure functions)."""

from __future__ import annotations

import datetime as dt
import json

from mail_selfcheck.controller.jobs import (
    IMAGE_PULL,
    JOB_CONFIG,
    JOB_FAILED,
    UNSCHEDULABLE,
    Outcome,
    blocked_pod,
    expected_arrival,
    job_manifest,
    jobs_to_delete,
    outcome_from,
    parse_result,
)
from mail_selfcheck.models.settings import ProbeSettings
from mail_selfcheck.models.spec import MailSelfcheckSpec

SLOT = dt.datetime(2025, 1, 1, 12, 0, tzinfo=dt.timezone.utc)
SPEC = {
    "from": "sender@example.com",
    "to": "receiver@example.com",
    "smtp": {"host": "smtp.example.com", "port": 2587, "passwordSecretRef": {"name": "mail", "key": "smtp"}},
    "imap": {"host": "imap.example.com", "passwordSecretRef": {"name": "mail", "key": "imap"}},
    "secretRef": {"name": "mail", "key": "secret"},
    "webhookUrlSecretRef": {"name": "hook", "key": "url"},
    "tls": {"caBundle": {"configMapKeyRef": {"name": "ca", "key": "ca.crt"}}},
    "interval": 20,
    "timeout": 8,
    "job": {"image": "example/probe:1", "nodeSelector": {"a": "b"}, "resources": {"limits": {"memory": "64Mi"}}},
}


def manifest(**over):
    spec = MailSelfcheckSpec.model_validate({**SPEC, **over})
    return job_manifest(name="demo-1", namespace="ns", owner_name="demo", owner_uid="uid-1", spec=spec, slot=SLOT)


def test_job_spec_follows_cronjob_conventions():
    job = manifest()
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert job["metadata"]["ownerReferences"][0] == {
        "apiVersion": "selfcheck.mail-selfcheck.dev/v1alpha1", "kind": "MailSelfcheck", "name": "demo",
        "uid": "uid-1", "controller": True, "blockOwnerDeletion": True,
    }
    assert pod["restartPolicy"] == "Never" and spec["backoffLimit"] <= 2
    assert 8 < spec["activeDeadlineSeconds"] <= 8 + 45
    assert spec["ttlSecondsAfterFinished"] >= 3600
    container = pod["containers"][0]
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert container["command"] == ["mail-selfcheck", "run", "--json", "--result-file", "/dev/termination-log"]
    assert container["image"] == "example/probe:1" and container["resources"] == {"limits": {"memory": "64Mi"}}
    assert pod["nodeSelector"] == {"a": "b"}
    # exit 1 (failed check) and 2 (invalid configuration) are verdicts: no second pod
    assert spec["podFailurePolicy"] == {"rules": [{"action": "FailJob", "onExitCodes": {
        "containerName": "probe", "operator": "In", "values": [1, 2]}}]}


def test_pod_is_locked_down():
    pod = manifest()["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    sc = pod["containers"][0]["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False


def test_secrets_are_references_only():
    env = {e["name"]: e for e in manifest()["spec"]["template"]["spec"]["containers"][0]["env"]}
    for name, (secret, key) in {
        "MESSAGES_SELFCHECK_SECRET": ("mail", "secret"),
        "MESSAGES_SELFCHECK_SMTP_PASSWORD": ("mail", "smtp"),
        "MESSAGES_SELFCHECK_IMAP_PASSWORD": ("mail", "imap"),
        "MESSAGES_SELFCHECK_WEBHOOK_URL": ("hook", "url"),
    }.items():
        assert env[name] == {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
    assert env["MESSAGES_SELFCHECK_TLS_CA_PEM"]["valueFrom"]["configMapKeyRef"] == {"name": "ca", "key": "ca.crt"}
    assert env["MESSAGES_SELFCHECK_SMTP_PORT"]["value"] == "2587"


def test_env_names_are_the_probe_settings():
    """Every variable the Job sets is one the probe reads (one vocabulary)."""
    env = manifest()["spec"]["template"]["spec"]["containers"][0]["env"]
    known = {f"MESSAGES_SELFCHECK_{name.upper()}" for name in ProbeSettings.model_fields} | {
        "MESSAGES_SELFCHECK_FROM", "MESSAGES_SELFCHECK_TO"}
    assert {e["name"] for e in env} <= known


def _env(job) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_recent_reception_times_reach_the_probe_as_its_expected_arrival():
    """The newest 10 successful reception times of the watched folder, oldest first; a probe
    with those settings accepts them (one vocabulary)."""
    history = [{"job": "j-new", "success": True, "receptionTime": 5.2, "folder": "INBOX"},
               {"job": "j-failed", "success": False, "errorClass": "timeout"},
               {"job": "j-junk", "success": False, "receptionTime": 4.0, "folder": "Junk"},
               {"job": "j-other", "success": True, "receptionTime": 0.3, "folder": "Archive"},  # before a spec change
               {"job": "j-old", "success": True, "receptionTime": 4.75}]  # recorded before folders were
    history += [{"job": f"j{i}", "success": True, "receptionTime": 6.0 + i} for i in range(12)]
    recent = expected_arrival(history, "INBOX")
    assert recent == [13.0, 12.0, 11.0, 10.0, 9.0, 8.0, 7.0, 6.0, 4.75, 5.2]
    spec = MailSelfcheckSpec.model_validate(SPEC)
    job = job_manifest(name="demo-1", namespace="ns", owner_name="demo", owner_uid="uid-1", spec=spec, slot=SLOT,
                       recent=recent)
    value = _env(job)["MESSAGES_SELFCHECK_IMAP_EXPECTED_ARRIVAL"]
    assert value == "13,12,11,10,9,8,7,6,4.75,5.2"
    probe = ProbeSettings.model_construct(imap_expected_arrival=value)
    assert ProbeSettings._expected_arrival(value) == value and probe.imap_expected_arrivals == recent
    assert "MESSAGES_SELFCHECK_IMAP_EXPECTED_ARRIVAL" not in _env(manifest())  # no history: no variable
    assert expected_arrival(None, "INBOX") == [] and expected_arrival(history[:3], "INBOX") == [5.2]


def _job(conditions, name="demo-1", created="2025-01-01T12:00:00Z"):
    return {"metadata": {"name": name, "creationTimestamp": created},
            "status": {"conditions": [{"type": t, "status": "True", **extra} for t, extra in conditions]}}


def _pod(message, exit_code=0, reason="Completed", created="2025-01-01T12:00:01Z"):
    return {"metadata": {"creationTimestamp": created}, "status": {"containerStatuses": [{
        "name": "probe", "state": {"terminated": {"exitCode": exit_code, "reason": reason, "message": message}}}]}}


RESULT = {"success": True, "error": None, "send_time": 0.21, "reception_time": 1.5}


def test_outcome_from_termination_message():
    out = outcome_from(_job([("Complete", {})]), [_pod(json.dumps(RESULT))])
    assert out == Outcome(success=True, send_time=0.21, reception_time=1.5)
    failed = {"success": False, "error": "SMTP 535 authentication failed", "error_class": "smtp_rejected"}
    out = outcome_from(_job([("Complete", {})]), [_pod(json.dumps(failed))])
    assert (out.success, out.error, out.error_class) == (False, "SMTP 535 authentication failed", "smtp_rejected")
    loaded = {**RESULT, "folder": "INBOX", "imap_commands": 21, "imap_session_seconds": 1.62}
    out = outcome_from(_job([("Complete", {})]), [_pod(json.dumps(loaded))])
    assert (out.folder, out.imap_commands, out.imap_session_seconds) == ("INBOX", 21, 1.62)


def test_result_found_in_log_fallback():
    assert parse_result("starting\n" + json.dumps(RESULT)).success is True
    assert parse_result("garbage") is None


def test_failed_job_without_result_says_why():
    job = _job([("Failed", {"reason": "DeadlineExceeded", "message": "Job was active longer than specified deadline"})])
    out = outcome_from(job, [])
    assert not out.success and out.error_class == JOB_FAILED
    assert "DeadlineExceeded" in out.error and "demo-1" in out.error
    out = outcome_from(_job([("Failed", {"reason": "BackoffLimitExceeded"})]), [_pod("", 137, "OOMKilled")])
    assert "OOMKilled" in out.error and "137" in out.error
    waiting = {"metadata": {}, "status": {"containerStatuses": [
        {"name": "probe", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "pull failed"}}}]}}
    assert "ImagePullBackOff" in outcome_from(_job([("Failed", {"reason": "DeadlineExceeded"})]), [waiting]).error


def test_history_limits():
    jobs = [_job([("Complete", {})], name=f"j{i}", created=f"2025-01-01T12:00:{i:02d}Z") for i in range(6)]
    jobs.append({"metadata": {"name": "running", "creationTimestamp": "2025-01-01T12:01:00Z"}, "status": {}})
    results = {"j0": True, "j1": False, "j2": True, "j3": False, "j4": True, "j5": True}
    doomed = jobs_to_delete(jobs, results=results, successful_limit=2, failed_limit=1, keep=set())
    assert sorted(doomed) == ["j0", "j1", "j2"]
    assert "running" not in jobs_to_delete(jobs, results={}, successful_limit=0, failed_limit=0, keep=set())


def _pending_pod(waiting=None, scheduled=None):
    status = {"phase": "Pending", "conditions": []}
    if waiting:
        status["containerStatuses"] = [{"name": "probe", "state": {"waiting": waiting}}]
    if scheduled:
        status["conditions"].append({"type": "PodScheduled", "status": "False", **scheduled})
    return {"metadata": {"name": "demo-abc-1-xyz"}, "status": status}


def test_blocked_pod_names_the_kubelets_reason():
    missing = _pending_pod({"reason": "CreateContainerConfigError",
                    "message": "couldn't find key imap-pasword in Secret mail/mail-selfcheck-credentials"})
    out = blocked_pod(missing)
    assert out.error_class == JOB_CONFIG and not out.success
    assert out.error == ("probe pod demo-abc-1-xyz cannot start: CreateContainerConfigError: "
                         "couldn't find key imap-pasword in Secret mail/mail-selfcheck-credentials")
    assert blocked_pod(_pending_pod({"reason": "ImagePullBackOff", "message": "Back-off pulling image"})).error_class == IMAGE_PULL
    unsched = blocked_pod(_pending_pod(scheduled={"reason": "Unschedulable", "message": "0/1 nodes are available"}))
    assert unsched.error_class == UNSCHEDULABLE and "0/1 nodes are available" in unsched.error


def test_pods_making_progress_are_not_blocked():
    assert blocked_pod(_pending_pod({"reason": "ContainerCreating"})) is None
    assert blocked_pod(_pending_pod()) is None
    assert blocked_pod(_pending_pod(scheduled={"reason": "SchedulingGated"})) is None
    running = {"metadata": {"name": "p"}, "status": {"containerStatuses": [{"name": "probe", "state": {"running": {}}}]}}
    assert blocked_pod(running) is None


def test_jobs_and_pods_name_their_mailselfcheck():
    from mail_selfcheck.controller.jobs import instance_label

    job = manifest()
    assert job["metadata"]["labels"]["app.kubernetes.io/instance"] == "demo"
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/instance"] == "demo"
    long = "a" * 70 + ".example"
    assert len(instance_label(long)) <= 63 and instance_label(long) != instance_label("a" * 71 + ".example")


def test_oauth2_spec_becomes_settings_the_probe_accepts(monkeypatch):
    """The Job env of an OAuth2 spec, Secret references resolved as a kubelet would, is a valid ProbeSettings."""
    over = {
        "smtp": {"host": "smtp.office365.com", "port": 587, "auth": "oauth2",
                 "oauth2RefreshTokenRef": {"name": "o", "key": "smtp-rt"}},
        "imap": {"host": "outlook.office365.com", "auth": "oauth2", "junkFolders": ["Junk Email", "Spam"]},
        "oauth2": {"provider": "microsoft", "tenant": "contoso.onmicrosoft.com", "clientId": "app-1",
                   "clientSecretRef": {"name": "o", "key": "client-secret"}, "mechanism": "XOAUTH2"},
    }
    env = manifest(**over)["spec"]["template"]["spec"]["containers"][0]["env"]
    names = {e["name"] for e in env}
    assert "MESSAGES_SELFCHECK_IMAP_PASSWORD" not in names and "MESSAGES_SELFCHECK_SMTP_PASSWORD" not in names
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]}
    assert secrets["MESSAGES_SELFCHECK_OAUTH2_CLIENT_SECRET"] == {"name": "o", "key": "client-secret"}
    assert secrets["MESSAGES_SELFCHECK_SMTP_OAUTH2_REFRESH_TOKEN"] == {"name": "o", "key": "smtp-rt"}
    for e in env:
        if e["name"] in ("MESSAGES_SELFCHECK_WEBHOOK_URL", "MESSAGES_SELFCHECK_TLS_CA_PEM"):
            continue  # values of a shape of their own, not what this test is about
        monkeypatch.setenv(e["name"], e.get("value") or f"resolved-{e['name'].lower()}")
    settings = ProbeSettings()
    assert (settings.smtp_auth, settings.imap_auth, settings.oauth2_provider) == ("oauth2", "oauth2", "microsoft")
    assert settings.oauth2_tenant == "contoso.onmicrosoft.com" and settings.oauth2_mechanism == "XOAUTH2"
    assert settings.imap_junk_folder_names == ["Junk Email", "Spam"]
    assert "resolved-messages_selfcheck_oauth2_client_secret" in settings.secret_values()


def test_webhook_kind_and_its_secrets_reach_the_probe():
    env = manifest(webhook={"kind": "gatus", "tokenSecretRef": {"name": "hook", "key": "token"}})[
        "spec"]["template"]["spec"]["containers"][0]["env"]
    by_name = {e["name"]: e for e in env}
    assert by_name["MESSAGES_SELFCHECK_WEBHOOK_KIND"]["value"] == "gatus"
    assert by_name["MESSAGES_SELFCHECK_WEBHOOK_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hook", "key": "token"}
    generic = manifest(webhook={"failureUrlSecretRef": {"name": "hook", "key": "fail"}})[
        "spec"]["template"]["spec"]["containers"][0]["env"]
    assert "MESSAGES_SELFCHECK_WEBHOOK_KIND" not in {e["name"] for e in generic}
    assert {e["name"] for e in generic} >= {"MESSAGES_SELFCHECK_WEBHOOK_URL", "MESSAGES_SELFCHECK_WEBHOOK_FAILURE_URL"}
