"""pytest plugin: a real Kubernetes control plane for the ``cluster`` test tier.

Registered by ``tests/conftest.py`` (``pytest_plugins``). Stable fixture API:

``control_plane`` (session scope)
    A started :class:`tests.harness.controlplane.ControlPlane`: real etcd,
    kube-apiserver (client-cert auth, RBAC) and kube-controller-manager of the pinned
    Kubernetes version, plus the node agent (:mod:`tests.harness.nodeagent`) that runs Job
    pods as local processes. Attributes and methods:

    * ``.kubeconfig`` -- ``pathlib.Path`` of the admin kubeconfig (``system:masters``);
    * ``.server`` -- ``"https://127.0.0.1:PORT"``;
    * ``.version`` -- the server's ``gitVersion``, e.g. ``"v1.36.3"``;
    * ``.kubectl(*args, check=True, input=None, timeout=120) -> subprocess.CompletedProcess``
      (text mode, stdout/stderr captured; ``CalledProcessError`` on failure if ``check``);
    * ``.helm(*args, check=True, timeout=300) -> subprocess.CompletedProcess``;
    * ``.kubectl_bin`` / ``.helm_bin`` -- ``pathlib.Path`` of the binaries;
    * ``.env()`` -- environment with ``KUBECONFIG`` set and the binaries first on ``PATH``;
    * ``.api_client()`` -- a new ``kubernetes.client.ApiClient`` (admin);
    * ``.run_dir`` -- logs of every component (``etcd.log``, ``kube-apiserver.log``,
      ``kube-controller-manager.log``, ``nodeagent.log``) and pod output (``pods/``).

    Started lazily: only a session that requests it pays for it (about 10 s). The binaries
    must already be built (``python -m tests.harness.controlplane build``; ``make test`` does
    it); if they are missing or a component fails to start, the requesting tests **fail**
    with the reason (never skip). Everything is stopped by PID at session end.

``k8s_namespace`` (function scope)
    The name (``str``) of a fresh namespace for the test, whose ``default`` service account
    already exists (so pods can be admitted at once). Deleted after the test, without
    waiting for the deletion to finish.
"""

from __future__ import annotations

import re
import time
import uuid

import pytest

from tests.harness.controlplane import (
    ControlPlane, ControlPlaneError, cache_root, find_binaries,
)


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory):
    """The session's real control plane (see the module docstring)."""
    binaries = find_binaries()
    if binaries is None:
        pytest.fail(f"control-plane binaries are not built in {cache_root()}: run "
                    "`python -m tests.harness.controlplane build` (or `make control-plane`)",
                    pytrace=False)
    cp = ControlPlane(binaries, tmp_path_factory.mktemp("controlplane"))
    try:
        cp.start()
    except ControlPlaneError as e:
        pytest.fail(f"the control plane failed to start: {e}", pytrace=False)
    try:
        yield cp
    finally:
        cp.stop()


def _wait_for_default_sa(cp: ControlPlane, namespace: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cp.kubectl("-n", namespace, "get", "serviceaccount", "default",
                      check=False).returncode == 0:
            return
        time.sleep(0.2)
    pytest.fail(f"the serviceaccount controller created no `default` service account in "
                f"{namespace} within {timeout:.0f}s", pytrace=False)


@pytest.fixture
def k8s_namespace(control_plane: ControlPlane, request: pytest.FixtureRequest):
    """A fresh namespace (its name) for one test; deleted afterwards."""
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"t-{base}-{uuid.uuid4().hex[:6]}"
    control_plane.kubectl("create", "namespace", name)
    try:
        _wait_for_default_sa(control_plane, name)
        yield name
    finally:
        control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)
