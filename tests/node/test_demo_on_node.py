"""The README's demo command works on the real node (`make demo` runs `python -m tests.harness.demo`),
and it runs **while the session's node is up**: two nodes on one machine (their own network
namespaces, containerd roots and sockets, cgroup roots, CNI state) do not disturb each other.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness import node as nodemod
from tests.harness.node_operator import pod, run_pod

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.node, pytest.mark.timeout(1800)]


def test_demo_reaches_a_successful_check_beside_another_node(node_cluster, node_namespace):
    t0 = time.monotonic()
    # The image the session built (the working tree may have changed since: other builds are
    # not what this test is about).
    env = {**os.environ, "MAIL_SELFCHECK_NODE_IMAGE_BUILD": "0"}
    proc = subprocess.run([sys.executable, "-m", "tests.harness.demo", "--once", "--timeout", "120"],
                          cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    print(f"\nmake demo --once beside the session's node: {time.monotonic() - t0:.0f}s")
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    # What the user sees: the operator pod, the probe pod that ran the check, the table.
    assert "demo: operator pod mail-selfcheck/selfcheck-" in out, out
    assert "Running and Ready" in out
    assert "ran on node localhost as a real container (containerd://" in out, out
    assert '"success":true' in out  # the probe's termination message, read by the kubelet
    table = out.split("NAME ", 1)[1]
    row = [line for line in table.splitlines() if line.startswith("local-stack")][0].split()
    assert row[1] == "true", table
    # The demo's node was its own: a different network namespace, now released.
    netns = [line for line in out.splitlines() if "in the network namespace " in line][0]
    assert str(node_cluster.node.netns) not in netns
    # The session's node is untouched: it still runs a pod.
    p = run_pod(node_cluster, node_namespace, pod("after-demo", ["true"], node_cluster.image))
    assert p["status"]["phase"] == "Succeeded", p["status"]
    assert nodemod._registry_file(node_cluster.node.id).exists()  # still registered as running
