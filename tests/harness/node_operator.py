"""The chart's operator installed with ``helm install`` on the real node, and helpers for
MailSelfchecks whose probe pods run there (used by ``tests/node/`` and ``make demo``)."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.harness import controlplane as cpmod
from tests.harness import node as nodemod
from tests.harness.chart_operator import CHART
from tests.harness.mailstack import MailStack, MailStackError
from tests.harness.waiting import wait_until

GROUP = "selfcheck.mail-selfcheck.dev"
UID = 65532


@dataclass
class NodeCluster:
    cp: cpmod.ControlPlane
    node: nodemod.Node
    image: str = nodemod.APP_IMAGE

    def diag(self) -> str:
        pods = self.cp.kubectl("get", "pods,jobs", "-A", "-o", "wide", check=False)
        return f"{pods.stdout}{pods.stderr}\n{self.node.logs(30)}"


class NodeMailStack(MailStack):
    """The test mail stack whose server certificate is also valid for the node IP (what pods
    dial), so probes verify TLS against the stack's CA exactly as on the host."""

    extra_ip = nodemod.NODE_IP

    def _make_tls(self) -> None:
        super()._make_tls()
        d = self.tls_dir
        ext = (d / "server.ext").read_text().replace(
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            f"subjectAltName=DNS:localhost,IP:127.0.0.1,IP:{self.extra_ip}")
        if f"IP:{self.extra_ip}" not in ext:
            raise MailStackError("unexpected server.ext in mailstack.py: update NodeMailStack")
        (d / "server.ext").write_text(ext)
        self._run(["openssl", "x509", "-req", "-in", str(d / "server.csr"),
                   "-CA", str(self.ca_file), "-CAkey", str(d / "ca.key"), "-CAcreateserial",
                   "-days", "3", "-extfile", str(d / "server.ext"), "-out",
                   str(self.cert_file)], "openssl sign (node IP)")


def expose_mail(node: nodemod.Node, stack: MailStack) -> None:
    """Make the stack's SMTP and IMAP ports reachable from pods at ``node.ip``."""
    node.expose(stack.smtp_port, stack.submission_port, stack.submissions_port,
                stack.submission_notls_port, stack.imap_port, stack.imaps_port)


def pod_env(stack: MailStack, **kw) -> dict[str, str]:
    """``stack.probe_env(**kw)`` with the SMTP/IMAP host pods use (the node IP)."""
    env = stack.probe_env(**kw)
    env["MESSAGES_SELFCHECK_SMTP_HOST"] = nodemod.NODE_IP
    env["MESSAGES_SELFCHECK_IMAP_HOST"] = nodemod.NODE_IP
    return env


def image_values() -> dict:
    return {"image": {"repository": "localhost/mail-selfcheck", "tag": "dev",
                      "pullPolicy": "Never"}}


def get(cp, ns: str, *what: str) -> dict:
    return json.loads(cp.kubectl("-n", ns, "get", *what, "-o", "json").stdout)


def apply(cp, ns: str, obj: dict) -> None:
    cp.kubectl("-n", ns, "apply", "-f", "-", input=yaml.safe_dump(obj))


class InstalledOperator:
    """A ``helm install`` of the chart on the node cluster and its operator pod."""

    def __init__(self, cluster, values: dict, tmp: Path, release_ns: str | None = None,
                 release: str | None = None):
        self.cluster, self.cp = cluster, cluster.cp
        self.ns = release_ns or f"ops-{uuid.uuid4().hex[:6]}"
        self.release = release or f"sc-{uuid.uuid4().hex[:4]}"
        self.values_file = tmp / f"{self.release}.values.yaml"
        self.values_file.write_text(yaml.safe_dump(values))
        self.installed_at = 0.0
        self.ready_after = 0.0

    def install(self, announce: bool = True) -> "InstalledOperator":
        self.installed_at = time.monotonic()
        self.cp.helm("install", self.release, str(CHART), "-n", self.ns, "--create-namespace",
                     "-f", str(self.values_file))
        self.pod = wait_until(self._ready_pod, 120, "the operator pod to be Running and Ready",
                              diag=self.diag)
        self.ready_after = time.monotonic() - self.installed_at
        if announce:
            print(f"\nhelm install -> operator pod Ready: {self.ready_after:.1f}s")
        return self

    def pods(self) -> list[dict]:
        return get(self.cp, self.ns, "pods", "-l", "app.kubernetes.io/component=operator")["items"]

    def _ready_pod(self) -> dict | None:
        for p in self.pods():
            conds = {c["type"]: c["status"] for c in p["status"].get("conditions", [])}
            if (p["status"].get("phase") == "Running" and conds.get("Ready") == "True"
                    and not p["metadata"].get("deletionTimestamp")):
                return p
        return None

    def logs(self) -> str:
        p = self.cp.kubectl("-n", self.ns, "logs", "-l", "app.kubernetes.io/component=operator",
                            "--tail=80", check=False)
        return p.stdout + p.stderr

    def diag(self) -> str:
        ev = self.cp.kubectl("-n", self.ns, "get", "events", check=False).stdout
        return f"{self.cluster.diag()}\nevents in {self.ns}:\n{ev}\noperator logs:\n{self.logs()}"

    def uninstall(self) -> None:
        self.cp.helm("uninstall", self.release, "-n", self.ns, "--wait", "--timeout=60s",
                     check=False)
        self.cp.kubectl("delete", "namespace", self.ns, "--wait=false", check=False)


def get_in_netns(node: nodemod.Node, url: str, check: bool = True, timeout: float = 10
                 ) -> subprocess.CompletedProcess:
    """HTTP GET ``url`` from inside the node's network namespace (the body on stdout)."""
    return node.in_netns("python3", "-c", "import sys, urllib.request; sys.stdout.write("
                         f"urllib.request.urlopen({url!r}, timeout={timeout}).read().decode())",
                         check=check)


def metrics_via_pod_ip(cluster, pod: dict, port: int = 9090) -> str:
    """GET /metrics on the pod IP, from inside the node's network namespace."""
    return get_in_netns(cluster.node, f"http://{pod['status']['podIP']}:{port}/metrics").stdout


def mail_objects(cp, ns: str, env: dict[str, str]) -> None:
    apply(cp, ns, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mail"},
                   "stringData": {"smtp": env["MESSAGES_SELFCHECK_SMTP_PASSWORD"],
                                  "imap": env["MESSAGES_SELFCHECK_IMAP_PASSWORD"],
                                  "secret": env["MESSAGES_SELFCHECK_SECRET"]}})
    apply(cp, ns, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "mail-ca"},
                   "data": {"ca.crt": Path(env["MESSAGES_SELFCHECK_TLS_CA_FILE"]).read_text()}})


def selfcheck(env: dict[str, str], name: str = "demo", interval: int = 30,
              timeout: float = 20) -> dict:
    return {
        "apiVersion": f"{GROUP}/v1alpha1", "kind": "MailSelfcheck", "metadata": {"name": name},
        "spec": {
            "from": env["MESSAGES_SELFCHECK_FROM"], "to": env["MESSAGES_SELFCHECK_TO"],
            "interval": interval, "timeout": timeout,
            "smtp": {"host": env["MESSAGES_SELFCHECK_SMTP_HOST"],
                     "port": int(env["MESSAGES_SELFCHECK_SMTP_PORT"]),
                     "security": env["MESSAGES_SELFCHECK_SMTP_SECURITY"],
                     "passwordSecretRef": {"name": "mail", "key": "smtp"}},
            "imap": {"host": env["MESSAGES_SELFCHECK_IMAP_HOST"],
                     "port": int(env["MESSAGES_SELFCHECK_IMAP_PORT"]),
                     "security": env["MESSAGES_SELFCHECK_IMAP_SECURITY"],
                     "passwordSecretRef": {"name": "mail", "key": "imap"}},
            "secretRef": {"name": "mail", "key": "secret"},
            "tls": {"caBundle": {"configMapKeyRef": {"name": "mail-ca", "key": "ca.crt"}}},
        },
    }


def status(cp, ns: str, name: str) -> dict:
    return get(cp, ns, "mailselfcheck", name).get("status") or {}


def pod(name: str, command: list[str], image: str, **spec) -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "main", "image": image, "imagePullPolicy": "Never", "command": command,
                "securityContext": {"readOnlyRootFilesystem": True,
                                    "allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"]}}}],
            **spec,
        },
    }


def run_pod(cluster, ns: str, body: dict, timeout: float = 90) -> dict:
    cp = cluster.cp
    cp.kubectl("-n", ns, "apply", "-f", "-", input=json.dumps(body))
    name = body["metadata"]["name"]

    def done():
        p = json.loads(cp.kubectl("-n", ns, "get", "pod", name, "-o", "json").stdout)
        return p if p.get("status", {}).get("phase") in ("Succeeded", "Failed") else None
    return wait_until(done, timeout, f"pod {ns}/{name} to finish", diag=cluster.diag)
