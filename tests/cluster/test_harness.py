"""Tests of the control-plane harness itself (issue 3), against the real control plane.

Each test talks to the real kube-apiserver through kubectl or the official Python client;
Jobs are completed by the real Job controller, owned objects collected by the real garbage
collector, requests authorised by real RBAC. Only the kubelet is stood in for (node agent).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from tests.harness.waiting import wait_until

pytestmark = pytest.mark.cluster



def _job_pod(cp, namespace: str, job: str) -> dict:
    out = cp.kubectl("-n", namespace, "get", "pods", "-l", f"job-name={job}", "-o", "json")
    pods = json.loads(out.stdout)["items"]
    assert len(pods) >= 1, f"no pod for job {job}"
    return pods[0]


def test_kubectl_and_helm_report_pinned_versions(control_plane):
    out = control_plane.kubectl("version", "-o", "json")
    v = json.loads(out.stdout)
    assert v["serverVersion"]["gitVersion"] == control_plane.version
    assert v["clientVersion"]["gitVersion"] == control_plane.version
    assert v["serverVersion"]["minor"] == control_plane.version.split(".")[1]
    helm = control_plane.helm("version", "--short")
    assert helm.stdout.startswith("v4."), helm.stdout
    # helm reaches the API server with the same kubeconfig.
    control_plane.helm("list", "--all-namespaces")


CRD = """\
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.harness.mail-selfcheck.dev
spec:
  group: harness.mail-selfcheck.dev
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    additionalPrinterColumns:
    - {name: Size, type: integer, jsonPath: .spec.size}
    - {name: Phase, type: string, jsonPath: .status.phase}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {type: integer, minimum: 1}
          status:
            type: object
            properties:
              phase: {type: string}
"""


def test_crd_status_subresource_and_printer_columns(control_plane, k8s_namespace):
    cp, ns = control_plane, k8s_namespace
    cp.kubectl("apply", "-f", "-", input=CRD)
    try:
        cp.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                   "crd/widgets.harness.mail-selfcheck.dev")
        widget = textwrap.dedent("""\
            apiVersion: harness.mail-selfcheck.dev/v1
            kind: Widget
            metadata: {name: w1}
            spec: {size: 3, unknownField: pruned}
            status: {phase: IgnoredOnCreate}
            """)
        # --validate=ignore: let the server, not kubectl, drop the unknown field.
        cp.kubectl("-n", ns, "apply", "--validate=ignore", "-f", "-", input=widget)
        obj = json.loads(cp.kubectl("-n", ns, "get", "widget", "w1", "-o", "json").stdout)
        assert obj["spec"] == {"size": 3}          # structural schema pruned the unknown field
        assert "status" not in obj                 # status is only written via the subresource
        cp.kubectl("-n", ns, "patch", "widget", "w1", "--subresource=status", "--type=merge",
                   "-p", '{"status": {"phase": "Ready"}}')
        table = cp.kubectl("-n", ns, "get", "widgets").stdout.splitlines()
        assert table[0].split() == ["NAME", "SIZE", "PHASE"], table
        assert table[1].split()[:3] == ["w1", "3", "Ready"], table
        # Schema validation is enforced by the server.
        bad = cp.kubectl("-n", ns, "apply", "--validate=ignore", "-f", "-", check=False,
                         input=widget.replace("name: w1", "name: w2").replace("size: 3", "size: 0"))
        assert bad.returncode != 0 and "spec.size" in bad.stderr, bad.stderr
    finally:
        cp.kubectl("delete", "crd", "widgets.harness.mail-selfcheck.dev", "--wait=false",
                   check=False)


def _job(name: str, script: str, *, env=None, backoff_limit=0, policy="File",
         owner=None) -> str:
    job = {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name},
        "spec": {"backoffLimit": backoff_limit, "ttlSecondsAfterFinished": 600,
                 "template": {"spec": {"restartPolicy": "Never", "containers": [{
                     "name": "main", "image": "example.invalid/not-pulled:1",
                     "command": ["python", "-c", script],
                     "env": env or [],
                     "terminationMessagePolicy": policy}]}}},
    }
    if owner:
        job["metadata"]["ownerReferences"] = [owner]
    return json.dumps(job)


def test_job_completes_with_termination_message(control_plane, k8s_namespace):
    cp, ns = control_plane, k8s_namespace
    cp.kubectl("-n", ns, "create", "secret", "generic", "creds",
               "--from-literal=password=s3cret")
    cp.kubectl("-n", ns, "create", "configmap", "settings", "--from-literal=host=mail.test")
    script = textwrap.dedent("""\
        import json, os, sys
        out = {k: os.environ.get(k) for k in ("PASSWORD", "HOST", "POD", "LITERAL", "OPT")}
        out["python"] = sys.executable
        open("/dev/termination-log", "w").write(json.dumps(out))
        print("done")
        """)
    env = [{"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds",
                                                              "key": "password"}}},
           {"name": "HOST", "valueFrom": {"configMapKeyRef": {"name": "settings",
                                                             "key": "host"}}},
           {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
           {"name": "LITERAL", "value": "x-$(HOST)"},
           {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k",
                                                         "optional": True}}}]
    cp.kubectl("-n", ns, "apply", "-f", "-", input=_job("ok", script, env=env))
    cp.kubectl("-n", ns, "wait", "--for=condition=Complete", "--timeout=120s", "job/ok")
    pod = _job_pod(cp, ns, "ok")
    assert pod["status"]["phase"] == "Succeeded"
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0 and term["reason"] == "Completed"
    got = json.loads(term["message"])
    assert got["PASSWORD"] == "s3cret" and got["HOST"] == "mail.test"
    assert got["POD"] == pod["metadata"]["name"] and got["LITERAL"] == "x-mail.test"
    assert got["OPT"] is None
    assert got["python"].startswith(sys.prefix), (got["python"], sys.prefix)
    job = json.loads(cp.kubectl("-n", ns, "get", "job", "ok", "-o", "json").stdout)
    assert job["status"]["succeeded"] == 1

    # Via the official Python client too.
    from kubernetes import client
    with cp.api_client() as api:
        p = client.CoreV1Api(api).read_namespaced_pod(pod["metadata"]["name"], ns)
        assert json.loads(p.status.container_statuses[0].state.terminated.message) == got


def test_failed_job_falls_back_to_logs(control_plane, k8s_namespace):
    cp, ns = control_plane, k8s_namespace
    script = "import sys; print('smtp said no'); sys.exit(3)"
    cp.kubectl("-n", ns, "apply", "-f", "-",
               input=_job("bad", script, policy="FallbackToLogsOnError"))
    cp.kubectl("-n", ns, "wait", "--for=condition=Failed", "--timeout=120s", "job/bad")
    pod = _job_pod(cp, ns, "bad")
    assert pod["status"]["phase"] == "Failed"
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 3 and term["reason"] == "Error"
    assert term["message"].strip() == "smtp said no"


def test_missing_secret_is_create_container_config_error(control_plane, k8s_namespace):
    cp, ns = control_plane, k8s_namespace
    env = [{"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "p"}}}]
    cp.kubectl("-n", ns, "apply", "-f", "-", input=_job("cfg", "print(1)", env=env))

    def waiting_reason():
        pods = json.loads(cp.kubectl("-n", ns, "get", "pods", "-l", "job-name=cfg",
                                     "-o", "json").stdout)["items"]
        for p in pods:
            for cs in p.get("status", {}).get("containerStatuses", []):
                w = cs.get("state", {}).get("waiting")
                if w and w.get("reason") == "CreateContainerConfigError":
                    return w
        return None
    w = wait_until(waiting_reason, 60, "CreateContainerConfigError")
    assert 'secret "nope" not found' in w["message"]


def test_deleting_owner_garbage_collects_job(control_plane, k8s_namespace):
    cp, ns = control_plane, k8s_namespace
    cp.kubectl("-n", ns, "create", "configmap", "owner")
    uid = cp.kubectl("-n", ns, "get", "configmap", "owner", "-o",
                     "jsonpath={.metadata.uid}").stdout
    owner = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid,
             "controller": True, "blockOwnerDeletion": True}
    cp.kubectl("-n", ns, "apply", "-f", "-", input=_job("owned", "print('hi')", owner=owner))
    cp.kubectl("-n", ns, "wait", "--for=condition=Complete", "--timeout=120s", "job/owned")
    cp.kubectl("-n", ns, "delete", "configmap", "owner")

    def gone():
        jobs = cp.kubectl("-n", ns, "get", "jobs", "-o", "name").stdout.split()
        pods = cp.kubectl("-n", ns, "get", "pods", "-o", "name").stdout.split()
        return not jobs and not pods
    wait_until(gone, 90, "the garbage collector to delete the owned Job and its pod")


def test_rbac_restricted_service_account_is_denied(control_plane, k8s_namespace, tmp_path):
    cp, ns = control_plane, k8s_namespace
    cp.kubectl("-n", ns, "create", "serviceaccount", "restricted")
    cp.kubectl("-n", ns, "create", "role", "pod-reader", "--verb=get,list,watch",
               "--resource=pods")
    cp.kubectl("-n", ns, "create", "rolebinding", "pod-reader", "--role=pod-reader",
               f"--serviceaccount={ns}:restricted")
    who = f"--as=system:serviceaccount:{ns}:restricted"

    def can_i(*args, namespace=ns):
        return cp.kubectl("auth", "can-i", *args, "-n", namespace, who, check=False)
    allowed = wait_until(lambda: can_i("list", "pods").returncode == 0, 30,
                          "the RoleBinding to take effect")
    assert allowed
    for verb, res in (("delete", "pods"), ("get", "secrets"), ("create", "jobs.batch")):
        r = can_i(verb, res)
        assert r.returncode != 0 and r.stdout.strip() == "no", (verb, res, r.stdout)
    assert can_i("list", "pods", namespace="default").stdout.strip() == "no"

    # A real token for the account (TokenRequest, signed with the service-account key) is
    # authenticated, then authorised by RBAC. A kubeconfig holding only that token, so the
    # admin client certificate cannot be what authenticates.
    token = cp.kubectl("-n", ns, "create", "token", "restricted").stdout.strip()
    kubeconfig = tmp_path / "restricted.kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {
            "server": cp.server, "certificate-authority": str(cp.run_dir / "pki" / "ca.crt")}}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u", "namespace": ns}}],
    }))

    def as_sa(*args):
        return subprocess.run([str(cp.kubectl_bin), f"--kubeconfig={kubeconfig}", *args],
                              capture_output=True, text=True, timeout=60)
    ok = as_sa("get", "pods")
    denied = as_sa("get", "secrets")
    assert ok.returncode == 0, ok.stderr
    assert denied.returncode != 0 and "Forbidden" in denied.stderr, denied.stderr
    assert f"system:serviceaccount:{ns}:restricted" in denied.stderr


def test_job_deadline_kills_the_process(control_plane, k8s_namespace, tmp_path):
    """The Job controller enforces activeDeadlineSeconds by deleting the pod; the node agent
    then kills the process (it must not live on) and confirms the deletion."""
    cp, ns = control_plane, k8s_namespace
    marker = tmp_path / "still-running"
    script = (f"import time, pathlib\n"
              f"p = pathlib.Path({str(marker)!r})\n"
              f"for _ in range(600):\n    p.write_text(str(time.time())); time.sleep(0.1)\n")
    job = json.loads(_job("slow", script))
    job["spec"]["activeDeadlineSeconds"] = 3
    cp.kubectl("-n", ns, "apply", "-f", "-", input=json.dumps(job))
    wait_until(marker.exists, 60, "the container process to start")
    cp.kubectl("-n", ns, "wait", "--for=condition=Failed", "--timeout=60s", "job/slow")
    job = json.loads(cp.kubectl("-n", ns, "get", "job", "slow", "-o", "json").stdout)
    failed = [c for c in job["status"]["conditions"] if c["type"] == "Failed"][0]
    assert failed["reason"] == "DeadlineExceeded"
    wait_until(lambda: not cp.kubectl("-n", ns, "get", "pods", "-o", "name").stdout.strip(),
                60, "the pod to be deleted")
    before = marker.read_text()
    time.sleep(1.0)
    assert marker.read_text() == before, "the container process survived its pod"
