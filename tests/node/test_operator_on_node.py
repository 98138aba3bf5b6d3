"""The chart's operator and its probe Jobs as real pods on the real node.

``helm install charts/selfcheck`` with the chart's default values except the image (the local
build: ``image.repository=localhost/mail-selfcheck``, ``tag=dev``, ``pullPolicy=Never``; the
probe image defaults to the same), so the Deployment's pod runs from the image with the
chart's own arguments, security context, liveness probe and volumes, authenticated with its
projected service-account token through the ``kubernetes`` Service. MailSelfchecks then run
their probe Job pods as real containers against the real Postfix + Dovecot.
"""

from __future__ import annotations

import http.server
import json
import os
import threading
import time

import pytest

from tests.harness.node_fixtures import pod_env
from tests.harness.node_operator import (
    UID, InstalledOperator, apply, get, image_values, mail_objects, metrics_via_pod_ip,
    selfcheck, status,
)
from tests.harness.waiting import wait_until

pytestmark = [pytest.mark.node, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def operator(node_cluster, tmp_path_factory):
    op = InstalledOperator(node_cluster, image_values(), tmp_path_factory.mktemp("op")).install()
    yield op
    op.uninstall()


def test_default_install_runs_the_operator_pod_from_the_image(node_cluster, operator):
    cp, pod = node_cluster.cp, operator.pod
    spec = pod["spec"]
    (c,) = spec["containers"]
    assert c["image"] == "localhost/mail-selfcheck:dev" and c["imagePullPolicy"] == "Never"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["securityContext"]["runAsUser"] == UID
    assert not [a for a in c["args"] if a.startswith("--namespace")], "default: every namespace"
    # The process really runs as 65532 on a read-only root (kubectl exec through the kubelet).
    out = cp.kubectl("-n", operator.ns, "exec", pod["metadata"]["name"], "--", "python3", "-c",
                     "import os\ntry:\n open('/probe-ro','w')\nexcept OSError as e:\n r=e.errno\n"
                     "print(os.getuid(), os.getgid(), r)").stdout.split()
    assert out == [str(UID), str(UID), "30"], out  # 30 = EROFS
    # kubectl logs: the API server -> the kubelet (through the node's forwarder) -> the file
    # the container runtime wrote.
    logs = wait_until(lambda: (t := operator.logs()) and "metrics on :9090/metrics" in t and t,
                      30, "the operator's start-up lines in kubectl logs", diag=operator.diag)
    assert "metrics on :9090/metrics" in logs
    # /metrics through the pod IP (inside the node's network).
    assert "# TYPE" in metrics_via_pod_ip(node_cluster, pod)
    # The liveness probe (initialDelay 10 s, every 20 s) passes: after two periods the
    # kubelet has probed at least once and restarted nothing.
    wait_until(lambda: time.monotonic() - operator.installed_at > 35, 60, "two probe periods",
               interval=1)
    p = get(cp, operator.ns, "pod", pod["metadata"]["name"])
    assert p["status"]["containerStatuses"][0]["restartCount"] == 0, p["status"]
    unhealthy = [e for e in get(cp, operator.ns, "events")["items"] if e["reason"] == "Unhealthy"]
    assert not unhealthy, unhealthy


class Webhook:
    """A heartbeat receiver on the host's 127.0.0.1, reached by probe pods through the node's
    forwarder at ``node.ip``."""

    def __init__(self, node) -> None:
        self.hits: list[str] = []
        hits = self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hits.append(self.path)
                self.send_response(200)
                self.end_headers()

            do_GET = do_POST  # noqa: N815

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://{node.expose(port)}:{port}/heartbeat/tok-{os.urandom(4).hex()}"

    def close(self) -> None:
        self.server.shutdown()


def test_check_succeeds_with_the_probe_job_as_a_real_container(node_cluster, operator,
                                                                 node_mail, node_namespace):
    cp, ns = node_cluster.cp, node_namespace
    env = pod_env(node_mail)
    mail_objects(cp, ns, env)
    hook = Webhook(node_cluster.node)
    cp.kubectl("-n", ns, "patch", "secret", "mail", "--type=merge",
               "-p", json.dumps({"stringData": {"webhook": hook.url}}))
    body = selfcheck(env)
    body["spec"]["webhookUrlSecretRef"] = {"name": "mail", "key": "webhook"}
    t0 = time.monotonic()
    apply(cp, ns, body)
    st = wait_until(lambda: (s := status(cp, ns, "demo")).get("success") is not None and s, 120,
                    "the first check's result", diag=operator.diag)
    first = time.monotonic() - t0
    print(f"\nMailSelfcheck applied -> first result: {first:.1f}s; helm install -> operator "
          f"Ready was {operator.ready_after:.1f}s")
    assert st["success"] is True, st
    pods = get(cp, ns, "pods", "-l", "app.kubernetes.io/component=probe")["items"]
    assert pods, "the probe Job's pod"
    p = pods[0]
    assert p["spec"]["nodeName"] == node_cluster.node.name
    assert p["spec"]["automountServiceAccountToken"] is False
    assert not [v for v in p["spec"].get("volumes", []) if "projected" in v], "no token volume"
    (c,) = p["spec"]["containers"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["image"] == "localhost/mail-selfcheck:dev"
    assert any(e.get("valueFrom", {}).get("secretKeyRef") for e in c["env"])
    term = p["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0, term
    assert p["status"]["containerStatuses"][0]["containerID"].startswith("containerd://")
    result = json.loads(term["message"])  # written by the probe, read by the kubelet
    assert result.get("success") is True, result
    wait_until(lambda: hook.hits, 10, "the heartbeat webhook from the probe pod")
    hook.close()
    # The operator's own view, scraped through its pod IP; its Events carry its pod name
    # (POD_NAME from the downward API, resolved by the kubelet).
    text = metrics_via_pod_ip(node_cluster, operator.pod)
    assert f'mail_selfcheck_success{{name="demo",namespace="{ns}"}} 1.0' in text
    ev = [e for e in get(cp, ns, "events")["items"] if e["reason"] == "CheckSucceeded"]
    assert ev and ev[0]["reportingInstance"] == operator.pod["metadata"]["name"], ev


def test_missing_secret_key_shows_the_kubelets_message(node_cluster, operator, node_mail,
                                                       node_namespace):
    cp, ns = node_cluster.cp, node_namespace
    env = pod_env(node_mail)
    mail_objects(cp, ns, env)
    body = selfcheck(env, name="typo", interval=120, timeout=60)
    body["spec"]["imap"]["passwordSecretRef"]["key"] = "imap-pasword"
    t0 = time.monotonic()
    apply(cp, ns, body)
    st = wait_until(lambda: (s := status(cp, ns, "typo")).get("success") is False and s, 90,
                    "the failed check", diag=operator.diag)
    elapsed = time.monotonic() - t0
    assert st["errorClass"] == "job_config", st
    # The real kubelet's own wording (pkg/kubelet/kubelet_pods.go makeEnvironmentVariables).
    assert f"couldn't find key imap-pasword in Secret {ns}/mail" in st["error"], st["error"]
    assert "CreateContainerConfigError" in st["error"], st["error"]
    assert elapsed < 60 + 30, "ended by the Job's deadline, not by the pod's status"
    print(f"\nmissing Secret key reported {elapsed:.1f}s after apply")
