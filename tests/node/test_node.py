"""The real node itself: isolation of its network, a pod as a real container, the Service.

See tests/harness/node.py for what runs (kubelet v1.35 + containerd 1.6 + runc + CNI bridge
in a network namespace with no route out) and tests/harness/node_fixtures.py for fixtures.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.harness import node as nodemod
from tests.harness.node_operator import pod, run_pod

pytestmark = [pytest.mark.node, pytest.mark.timeout(1800)]


def test_node_network_has_no_route_out(node_cluster):
    """No packet can leave: the node's namespace has only lo, the pod bridge and pods' veths
    on it, and no route to anything outside (this test sends nothing)."""
    node = node_cluster.node
    for dest in ("1.1.1.1", "10.255.255.53", "192.168.1.1", "172.16.0.1"):
        out = node.in_netns("ip", "route", "get", dest, check=False)
        assert out.returncode != 0 and "Network is unreachable" in out.stderr, (dest, out)
    links = json.loads(node.in_netns("ip", "-j", "link", "show").stdout)
    for link in links:
        name = link["ifname"]
        assert name in ("lo", nodemod.BRIDGE) or link.get("master") == nodemod.BRIDGE, link
    routes = json.loads(node.in_netns("ip", "-j", "route", "show", "table", "all").stdout)
    assert not [r for r in routes if r.get("dst") == "default"], routes


def test_pod_runs_as_real_container_with_termination_message(node_cluster, node_namespace):
    """A pod from the locally built image (imported, never pulled), uid 65532, read-only
    root: the kubelet reads the termination message; kubectl logs goes through the kubelet."""
    script = ("import os, pathlib\n"
              "try:\n    pathlib.Path('/x').write_text('x'); ro = 'writable'\n"
              "except OSError as e:\n    ro = 'read-only'\n"
              "print('hello from', os.uname().nodename, flush=True)\n"
              "open('/dev/termination-log', 'w').write(f'uid={os.getuid()} root={ro}')\n")
    p = run_pod(node_cluster, node_namespace,
                pod("smoke", ["python3", "-c", script], node_cluster.image))
    assert p["status"]["phase"] == "Succeeded", p["status"]
    (cs,) = p["status"]["containerStatuses"]
    term = cs["state"]["terminated"]
    assert term["exitCode"] == 0 and term["reason"] == "Completed"
    assert term["message"] == "uid=65532 root=read-only"
    assert cs["containerID"].startswith("containerd://")
    assert p["spec"]["nodeName"] == node_cluster.node.name  # bound by kube-scheduler
    assert p["status"]["podIP"].startswith("10.244.0.")
    logs = node_cluster.cp.kubectl("-n", node_namespace, "logs", "smoke").stdout
    assert logs.strip() == "hello from smoke"


def test_pod_reaches_the_api_server_through_the_kubernetes_service(node_cluster, node_namespace):
    """In-cluster config as the operator uses it: KUBERNETES_SERVICE_HOST:PORT, the projected
    service-account token and CA."""
    cp = node_cluster.cp
    cp.kubectl("-n", node_namespace, "create", "rolebinding", "view", "--clusterrole=view",
               f"--serviceaccount={node_namespace}:default")
    script = ("import json, os, ssl, urllib.request\n"
              "sa = '/var/run/secrets/kubernetes.io/serviceaccount'\n"
              "host, port = os.environ['KUBERNETES_SERVICE_HOST'], os.environ['KUBERNETES_SERVICE_PORT']\n"
              "ctx = ssl.create_default_context(cafile=sa + '/ca.crt')\n"
              "req = urllib.request.Request(f'https://{host}:{port}/api/v1/namespaces/' + open(sa + '/namespace').read() + '/pods',\n"
              "    headers={'Authorization': 'Bearer ' + open(sa + '/token').read()})\n"
              "items = json.load(urllib.request.urlopen(req, context=ctx, timeout=10))['items']\n"
              "open('/dev/termination-log', 'w').write(f'{host}:{port} ' + ','.join(i['metadata']['name'] for i in items))\n")
    body = pod("incluster", ["python3", "-c", script], node_cluster.image)
    body["spec"]["automountServiceAccountToken"] = True
    body["spec"]["containers"][0]["terminationMessagePolicy"] = "FallbackToLogsOnError"
    p = run_pod(node_cluster, node_namespace, body)
    term = p["status"]["containerStatuses"][0]["state"]["terminated"]
    assert p["status"]["phase"] == "Succeeded", term
    assert term["message"] == f"{nodemod.SERVICE_IP}:443 incluster"


def test_a_node_that_cannot_start_fails_with_the_component_log(node_cluster, tmp_path):
    """The tier is never skipped: a node that does not come up raises NodeError carrying the
    failing component's log, and leaves nothing behind (namespaces, cgroups, registry)."""
    good = node_cluster.node.binaries
    broken = nodemod.NodeBinaries(kubelet=Path("/bin/false"), kube_scheduler=good.kube_scheduler,
                                  images=good.images[:1])  # the pause image only
    node = nodemod.Node(node_cluster.cp, tmp_path / "broken", binaries=broken,
                        name="broken-node", start_timeout=30)
    with pytest.raises(nodemod.NodeError) as err:
        node.start()
    text = str(err.value)
    assert "kubelet exited with 1 during start-up" in text, text
    assert "--- containerd.log (tail) ---" in text
    assert not nodemod._registry_file(node.id).exists()
    assert not nodemod._cgroup_dirs(node.cgroup_root)
    assert not any(f.is_mount() for f in (node.netns, node.mntns) if f.exists())


def test_everything_the_node_writes_is_its_own(node_cluster):
    """Two nodes may run at once (the tests and `make demo`, two test runs): every path in
    the node's containerd and kubelet configuration is under its own run dir, its cgroup
    root and registry entry carry its own id. (tests/node/test_demo_on_node.py runs a
    second node beside this one.)"""
    node = node_cluster.node
    run = str(node.run_dir)
    cfg = (node.cd_dir / "config.toml").read_text()
    paths = re.findall(r'(?m)^\s*(?:root|state|address|path|netns_mounts_under|Root|conf_dir)'
                       r'\s*=\s*"(/[^"]+)"', cfg)
    assert len(paths) >= 8, cfg
    assert [p for p in paths if not p.startswith(run + "/")] == [], cfg
    ipam = json.loads((node.run_dir / "cni" / "net.d" / "10-mail-selfcheck.conflist").read_text())
    assert ipam["plugins"][0]["ipam"]["dataDir"].startswith(run + "/")
    kubelet = json.loads((node.run_dir / "kubelet" / "config.yaml").read_text())
    for key in ("resolvConf", "podLogsDir"):
        assert kubelet[key].startswith(run + "/"), (key, kubelet[key])
    assert node.id in kubelet["cgroupRoot"] and node.id in nodemod._registry_file(node.id).name
    assert node.netns.is_relative_to(node.run_dir) and node.cd_sock.is_relative_to(node.run_dir)


def test_pod_netns_files_stay_in_the_node(node_cluster):
    """containerd 1.6 pins each pod's network namespace in /var/run/netns/cni-<uuid> (its
    netns_mounts_under is 1.7+): in the node's mount namespace that is a tmpfs of its own,
    so a node stopped with live sandboxes leaves no file on the host."""
    node = node_cluster.node
    out = subprocess.run(["nsenter", f"--mount={node.mntns}", "--", "findmnt", "-n", "-o", "FSTYPE",
                          "/run/netns"], capture_output=True, text=True, check=True).stdout.split()
    assert out[-1:] == ["tmpfs"], out
    # ... and only there: on the host /run/netns is no mount point (private propagation).
    host = subprocess.run(["findmnt", "-n", "--mountpoint", "/run/netns"], capture_output=True, text=True)
    assert host.returncode != 0, host.stdout
