"""pytest plugin: the real-node tier (``tests/node/``, marker ``node``), see :mod:`tests.harness.node`.

Fixtures:

``node_cluster`` (session)
    A :class:`NodeCluster`: its own control plane (etcd, kube-apiserver, kube-controller-manager;
    **no** node agent, which would race the scheduler for Job pods) plus kube-scheduler and a
    real node (kubelet + containerd + runc + CNI) in a network namespace with no route out.
    ``.cp`` is the :class:`~tests.harness.controlplane.ControlPlane` (``kubectl``/``helm``),
    ``.node`` the :class:`~tests.harness.node.Node`, ``.image`` the app image reference in
    containerd (``localhost/mail-selfcheck:dev``, built by ``hack/build-image.sh`` at session
    start from the working tree, imported; never pulled). Everything is built or found in the
    cache first (cold: minutes; warm: seconds). If anything fails the requesting tests FAIL
    with the component logs (never skipped).

``node_namespace`` (function)
    A fresh namespace on that cluster whose ``default`` service account exists.

``node_mail_stack`` (session) / ``node_mail`` (function, reset before each test)
    The real Postfix + Dovecot of :mod:`tests.harness.mailstack`, its server certificate also
    valid for the node IP, its ports reachable from pods at ``node.ip`` (the node's forwarder;
    the stack itself listens on the host's 127.0.0.1 as always). ``pod_env(stack)`` is
    ``stack.probe_env()`` with the host pods must use.
"""

from __future__ import annotations

import re
import time
import uuid

import pytest

from tests.harness import controlplane as cpmod
from tests.harness import node as nodemod
from tests.harness.mail_fixtures import reset_mail_stack
from tests.harness.mailstack import MailStackError
from tests.harness.node_operator import (  # noqa: F401 (pod_env: the fixtures' API)
    NodeCluster, NodeMailStack, expose_mail, pod_env,
)


@pytest.fixture(scope="session")
def node_cluster(tmp_path_factory: pytest.TempPathFactory):
    t0 = time.monotonic()
    error = None
    try:
        binaries = cpmod.build_all()
        node_binaries = nodemod.build_node()
    except (cpmod.BuildError, nodemod.NodeError) as e:
        error = f"building the node failed: {e}"
    if error:  # outside the except: the log is shown once, not again as a chained exception
        pytest.fail(error, pytrace=False)
    t_build = time.monotonic() - t0
    run = tmp_path_factory.mktemp("nodecluster")
    cp = cpmod.ControlPlane(binaries, run / "cp", node_agent=False)
    node = nodemod.Node(cp, run / "node", binaries=node_binaries)
    try:
        nodemod.start_cluster(cp, node)
    except (cpmod.ControlPlaneError, nodemod.NodeError) as e:
        error = f"the real node failed to start: {e}"
    if error:
        pytest.fail(error, pytrace=False)
    print(f"\nnode cluster: build/find {t_build:.0f}s, start "
          f"{time.monotonic() - t0 - t_build:.0f}s ({node.timings})")
    try:
        yield NodeCluster(cp, node)
    finally:
        node.stop()
        cp.stop()


@pytest.fixture
def node_namespace(node_cluster: NodeCluster, request: pytest.FixtureRequest):
    cp = node_cluster.cp
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"n-{base}-{uuid.uuid4().hex[:6]}"
    cp.kubectl("create", "namespace", name)
    end = time.monotonic() + 60
    while cp.kubectl("-n", name, "get", "serviceaccount", "default", check=False).returncode:
        if time.monotonic() > end:
            pytest.fail(f"no default service account in {name}", pytrace=False)
        time.sleep(0.2)
    try:
        yield name
    finally:
        cp.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def node_mail_stack(node_cluster: NodeCluster):
    stack = NodeMailStack()
    try:
        stack.start()
    except MailStackError as e:
        stack.stop()
        pytest.fail(f"the mail stack did not start:\n{e}", pytrace=False)
    try:
        expose_mail(node_cluster.node, stack)
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def node_mail(node_mail_stack: NodeMailStack) -> NodeMailStack:
    try:
        reset_mail_stack(node_mail_stack)
    except MailStackError as e:
        pytest.fail(f"could not reset the mail stack:\n{e}", pytrace=False)
    return node_mail_stack
