"""``helm install`` with ``watchNamespaces`` set, on the real node (its own module: the
cluster-wide operator of test_operator_on_node.py must be gone, or both would run Jobs)."""

from __future__ import annotations

import pytest

from tests.harness.node_fixtures import pod_env
from tests.harness.waiting import wait_until
from tests.harness.node_operator import (
    InstalledOperator, apply, image_values, mail_objects, selfcheck, status,
)

pytestmark = [pytest.mark.node, pytest.mark.timeout(1800)]


def test_namespaced_install_watches_only_its_namespace(node_cluster, node_mail, node_namespace,
                                                       tmp_path):
    cp, ns = node_cluster.cp, node_namespace
    values = {**image_values(), "watchNamespaces": [ns], "operator": {"metricsPort": 0}}
    op = InstalledOperator(node_cluster, values, tmp_path)
    try:
        op.install()
        (c,) = op.pod["spec"]["containers"]
        assert f"--namespace={ns}" in c["args"], c["args"]
        env = pod_env(node_mail)
        mail_objects(cp, ns, env)
        apply(cp, ns, selfcheck(env, name="scoped"))
        st = wait_until(lambda: (s := status(cp, ns, "scoped")).get("success") is not None and s,
                        120, "the namespaced operator's first result", diag=op.diag)
        assert st["success"] is True, st
    finally:
        op.uninstall()
