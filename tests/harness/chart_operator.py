"""The operator started exactly as the chart starts it, for the cluster tests and the demo.

A real install is ``helm install selfcheck charts/selfcheck`` followed by the kubelet running
the rendered Deployment's container. :class:`ChartOperator` does the same on the test control
plane, with nothing chosen by the test except what must differ on a shared host:

1. ``helm install`` of ``charts/selfcheck`` into a release namespace, with the values under
   test (default: the chart's defaults, i.e. every namespace watched, a ClusterRole), so the
   ServiceAccount, (Cluster)Roles and bindings are the chart's own objects;
2. the rendered Deployment's container (``helm get manifest``) gives ``command`` + ``args`` and
   ``env``; ``valueFrom.fieldRef`` entries are resolved as the kubelet's downward API would
   (``metadata.name`` = the pod name, ``metadata.namespace`` = the release namespace);
3. the process runs on the host, authenticated as the chart's ServiceAccount with a
   TokenRequest token (:meth:`ControlPlane.service_account_kubeconfig`), so every API call
   has exactly the RBAC the chart grants.

Only the container ports differ: ``operator.healthPort`` and ``operator.metricsPort`` are set
to free host ports (two operators may run at once on one host; in a pod they would not).
Every flag, environment variable and permission the chart passes is exercised: a chart value
that the code mishandles fails these tests. ``argv`` and ``env`` are kept for assertions.

(The Deployment's pod itself is not run by the node agent: it only runs Job pods. Running
the image on a real kubelet is the real-node issue's business.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import yaml

from tests.harness.controlplane import ControlPlane, free_port
from tests.harness.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "selfcheck"
#: The console script of the installed package (the image's ``mail-selfcheck``).
ENTRYPOINT = Path(sys.executable).parent / "mail-selfcheck"


class ChartOperatorError(RuntimeError):
    """The chart did not install, or the operator did not come up (message holds its log tail)."""


class ChartOperator:
    """``helm install`` + the rendered Deployment's command line, as a host process.

    Args:
        cp: the started control plane.
        release_namespace: namespace of the Helm release (created if missing).
        log: file receiving the operator's stdout and stderr.
        values: chart values (a dict, passed with ``-f``); ``{}`` = the chart's defaults.
        release: release name; default ``sc-<random>``.
    """

    def __init__(self, cp: ControlPlane, release_namespace: str, log: Path, values: dict[str, Any] | None = None,
                 release: str | None = None) -> None:
        self.cp, self.namespace, self.log = cp, release_namespace, log
        self.values = values or {}
        self.release = release or f"sc-{uuid.uuid4().hex[:6]}"
        self.fullname = f"{self.release}-selfcheck"
        self.health_port, self.metrics_port = free_port(), free_port()
        self.pod_name = f"{self.fullname}-{uuid.uuid4().hex[:10]}-{uuid.uuid4().hex[:5]}"
        self.proc: subprocess.Popen | None = None
        self.argv: list[str] = []
        self.env: dict[str, str] = {}
        self.deployment: dict[str, Any] = {}
        self.installed = False

    # ------------------------------------------------------------------ install

    def install(self) -> "ChartOperator":
        """``helm install`` with the values under test; derive argv/env from the rendered Deployment."""
        values_file = self.log.with_suffix(".values.yaml")
        ports = {"operator": {"healthPort": self.health_port, "metricsPort": self.metrics_port}}
        values_file.write_text(yaml.safe_dump(_merge(self.values, ports)))
        self.cp.helm("install", self.release, str(CHART), "-n", self.namespace, "--create-namespace",
                     "-f", str(values_file))
        self.installed = True
        manifest = self.cp.helm("get", "manifest", self.release, "-n", self.namespace).stdout
        (self.deployment,) = [d for d in yaml.safe_load_all(manifest) if d and d["kind"] == "Deployment"]
        pod = self.deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        if container["command"] != ["mail-selfcheck"]:
            raise ChartOperatorError(f"the chart's command is {container['command']}, not the image's mail-selfcheck")
        self.argv = [str(ENTRYPOINT), *container.get("args", [])]
        self.env = {e["name"]: self._env_value(e) for e in container.get("env", [])}
        kubeconfig = self.cp.service_account_kubeconfig(
            self.namespace, pod["serviceAccountName"], self.log.with_suffix(".kubeconfig"), duration="2h")
        self._process_env = {**_host_env(), **self.env, "KUBECONFIG": str(kubeconfig)}
        return self

    def _env_value(self, var: dict[str, Any]) -> str:
        if "value" in var:
            return str(var["value"])
        field = ((var.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
        if field == "metadata.name":
            return self.pod_name
        if field == "metadata.namespace":
            return self.namespace
        raise ChartOperatorError(f"the chart sets env {var['name']} from {var.get('valueFrom')}: "
                                 "teach tests/harness/chart_operator.py to resolve it as the kubelet does")

    # ------------------------------------------------------------------ process

    def start(self) -> "ChartOperator":
        """Install (first time only), then start the process and wait for kopf's ``/healthz``."""
        if not self.installed:
            self.install()
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=self._process_env,
                                         start_new_session=True)
        wait_until(self._live, 30, "the operator's liveness endpoint", diag=self.text)
        return self

    def _live(self) -> bool:
        if self.proc.poll() is not None:
            raise ChartOperatorError(f"the operator exited with {self.proc.returncode}:\n{self.text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def kill(self) -> None:
        """SIGKILL: a crash, no clean-up of any kind."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM (what the kubelet sends), SIGKILL after 20 s."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def uninstall(self) -> None:
        """Stop the process (the Deployment's pod goes with the release) and ``helm uninstall``."""
        self.stop()
        if self.installed:
            self.cp.helm("uninstall", self.release, "-n", self.namespace, "--wait", check=False)
            self.installed = False

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def __enter__(self) -> "ChartOperator":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(base))
    for key, value in extra.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def _host_env() -> dict[str, str]:
    """The host environment minus what would point the process elsewhere than the chart's config."""
    env = dict(os.environ)
    for name in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "KUBECONFIG"):
        env.pop(name, None)
    return env
