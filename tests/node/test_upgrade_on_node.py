"""``helm upgrade`` (changed values, a new image tag) and ``helm uninstall`` on the real node.

The Deployment's ``Recreate`` strategy: the old operator pod is gone before the new one
starts (never two operators launching Jobs), checks go on with one Job per schedule slot,
and ``helm uninstall`` leaves nothing that hangs (the namespace then deletes completely).
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.harness.chart_operator import CHART
from tests.harness.node_fixtures import pod_env
from tests.harness.node_operator import (
    InstalledOperator, apply, get, image_values, mail_objects, selfcheck, status,
)
from tests.harness.waiting import wait_until

pytestmark = [pytest.mark.node, pytest.mark.timeout(1800)]

CRD = CHART / "crds" / "mailselfchecks.yaml"
SLOT = "selfcheck.mail-selfcheck.dev/schedule-time"


def test_upgrade_recreates_the_operator_and_uninstall_leaves_nothing(node_cluster, node_mail,
                                                                      node_namespace, tmp_path):
    cp, ns = node_cluster.cp, node_namespace
    # A second tag of the same image in containerd: the upgrade changes the pod template.
    node_cluster.node.ctr("images", "tag", "--force", node_cluster.image,
                          "localhost/mail-selfcheck:dev-upgraded")
    values = {**image_values(), "watchNamespaces": ["{{ .Release.Namespace }}"]}
    op = InstalledOperator(node_cluster, values, tmp_path, release_ns=ns)
    uninstalled = False
    try:
        # The MailSelfcheck exists before the operator: time from `helm install` to the first
        # successful check. The CRD, unless an earlier install of this session made it, from
        # the chart's crds/ (what `helm install` would create; helm skips an existing CRD).
        if cp.kubectl("get", "crd", "mailselfchecks.selfcheck.mail-selfcheck.dev",
                      check=False).returncode != 0:
            cp.kubectl("create", "-f", str(CRD))
        cp.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                   "crd/mailselfchecks.selfcheck.mail-selfcheck.dev")
        env = pod_env(node_mail)
        mail_objects(cp, ns, env)
        apply(cp, ns, selfcheck(env, name="steady", interval=10, timeout=8))
        op.install()
        wait_until(lambda: status(cp, ns, "steady").get("success") is True, 120,
                   "a first successful check", diag=op.diag)
        print(f"helm install -> first successful check: "
              f"{time.monotonic() - op.installed_at:.1f}s")
        old = op.pod["metadata"]["uid"]

        running_at_once: list[int] = []
        stop = threading.Event()

        def watch_pods() -> None:
            while not stop.is_set():
                with_status = [p for p in op.pods() if p["status"].get("phase") == "Running"]
                running_at_once.append(len(with_status))
                time.sleep(0.3)
        watcher = threading.Thread(target=watch_pods, daemon=True)
        watcher.start()
        try:
            out = cp.helm("upgrade", op.release, str(CHART), "-n", ns, "--reuse-values", "--set", "image.tag=dev-upgraded",
                          "--set", "operator.verbose=true")
            assert "REVISION: 2" in out.stdout, out.stdout
            new = wait_until(lambda: (p := op._ready_pod()) and p["metadata"]["uid"] != old and p,
                             120, "the upgraded operator pod to be Ready", diag=op.diag)
        finally:
            stop.set()
            watcher.join(5)
        (c,) = new["spec"]["containers"]
        assert c["image"] == "localhost/mail-selfcheck:dev-upgraded" and "--verbose" in c["args"]
        assert max(running_at_once) == 1, "Recreate: never two operator pods running"

        # Checks go on under the new operator, one Job per slot.
        before = status(cp, ns, "steady").get("lastCompletionTime")
        wait_until(lambda: (s := status(cp, ns, "steady")).get("lastCompletionTime") != before
                   and s.get("success") is True, 90, "a check completed by the new operator",
                   diag=op.diag)
        jobs = get(cp, ns, "jobs")["items"]
        slots = [j["metadata"]["annotations"].get(SLOT) for j in jobs]
        assert len(slots) == len(set(slots)), f"duplicate Jobs for a slot: {sorted(slots)}"

        t0 = time.monotonic()
        cp.helm("uninstall", op.release, "-n", ns, "--wait", "--timeout=60s")
        uninstalled = True
        wait_until(lambda: not op.pods(), 60, "the operator pod to be gone", diag=op.diag)
        cp.kubectl("delete", "namespace", ns, "--timeout=90s")
        print(f"\nhelm uninstall + namespace deletion: {time.monotonic() - t0:.1f}s")
    finally:
        if not uninstalled:
            op.uninstall()
