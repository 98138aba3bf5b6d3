"""One-command demo (``make demo``): the whole product working on this machine, on a real node.

Starts, with the same harness code the node tests use (``tests/node/``): the real Postfix +
Dovecot stack (:mod:`tests.harness.mailstack`), the real Kubernetes control plane
(:mod:`tests.harness.controlplane`, no node agent), kube-scheduler and a **real node**
(:mod:`tests.harness.node`: kubelet + containerd + runc + a CNI bridge, in a network namespace
of its own with no route out) with the image ``hack/build-image.sh`` builds imported into
containerd (built or found first: see :func:`tests.harness.node.build_node`; nothing is
pulled). Then ``helm install`` of the chart with its default values but the local image
(``image.repository=localhost/mail-selfcheck``, ``tag=dev``, ``pullPolicy=Never``) into
``mail-selfcheck``: the operator runs as the chart's Deployment pod. It applies a
MailSelfcheck that probes the local mail stack (reached from pods at the node IP) in another
namespace, waits for the first result and prints the probe pod that produced it and
``kubectl get mailselfchecks -o wide``.

Then it keeps everything running until Ctrl-C or SIGTERM (``--once``: stop right away; exit
status 0 only if the first check succeeded). Its working directory (etcd data, containerd
root, throw-away PKI, logs) is removed at the end unless the demo failed or ``--keep`` is given.
Every run has its own directory, network namespace and sockets, so it may run while the
test suite (or another demo) runs.

    .venv/bin/python -m tests.harness.demo [--once] [--keep] [--interval 30] [--timeout 180]
    make demo ARGS="--once"
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.harness import node as nodemod
from tests.harness.controlplane import BuildError, ControlPlane, ControlPlaneError, build_all, find_binaries
from tests.harness.mailstack import MailStackError
from tests.harness.node_operator import (
    InstalledOperator, NodeCluster, NodeMailStack, expose_mail, get, image_values, mail_objects,
    pod_env, selfcheck,
)

#: Where the chart is installed (the README's `helm install ... -n mail-selfcheck`).
RELEASE_NAMESPACE = "mail-selfcheck"
RELEASE = "selfcheck"
#: Where the sample MailSelfcheck lives (any namespace: the default install watches them all).
NAMESPACE = "mail-selfcheck-demo"
NAME = "local-stack"


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def wait_for_result(cp: ControlPlane, namespace: str, name: str, timeout: float) -> dict:
    """Wait until ``status.success`` is set; returns the status. Raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = cp.kubectl("-n", namespace, "get", "mailselfcheck", name, "-o", "json", check=False)
        status = json.loads(out.stdout).get("status") or {} if out.returncode == 0 else {}
        if status.get("success") is not None:
            return status
        time.sleep(0.3)
    raise TimeoutError(f"no result within {timeout:.0f} s")


def probe_pod(cp: ControlPlane, namespace: str) -> dict | None:
    """The most recent finished probe pod in ``namespace``."""
    done = [p for p in get(cp, namespace, "pods")["items"]
            if p["status"].get("phase") in ("Succeeded", "Failed")]
    return max(done, key=lambda p: p["metadata"]["creationTimestamp"], default=None)


def describe_probe_pod(pod: dict) -> str:
    (cs,) = pod["status"]["containerStatuses"]
    term = cs["state"].get("terminated") or {}
    return (f"probe pod {pod['metadata']['namespace']}/{pod['metadata']['name']} ran on node "
            f"{pod['spec']['nodeName']} as a real container ({cs['containerID'][:25]}..., image "
            f"{cs['image']}, pod IP {pod['status'].get('podIP')}), exit code {term.get('exitCode')};"
            f"\n  its termination message, read by the kubelet: {term.get('message', '').strip()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--once", action="store_true", help="stop after the first result (exit 0 if it succeeded)")
    parser.add_argument("--interval", type=int, default=30, help="seconds between checks (default 30)")
    parser.add_argument("--timeout", type=float, default=180, help="seconds to wait for the first result")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (logs, etcd data)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    stop = threading.Event()
    starting = True

    def on_signal(*_):
        stop.set()
        if starting:  # Ctrl-C while starting: stop at once (the finally blocks clean up)
            raise KeyboardInterrupt
    for signum in (signal.SIGTERM, signal.SIGINT):  # SIGINT too: it may have been ignored by our parent
        signal.signal(signum, on_signal)
    try:
        if nodemod.build_lock_busy():
            say("another build holds the cache's build lock (a test run or another demo): waiting for it")
        if find_binaries() is None:
            say("building the control plane from Go modules (first time only, ~8 min)")
        binaries = build_all()
        if nodemod.find_node_binaries() is None:
            say(f"building kubelet {nodemod.NODE_K8S_VERSION} and kube-scheduler (first time only, ~8 min)")
        say(f"building or finding the image {nodemod.APP_IMAGE} (hack/build-image.sh; rebuilt only "
            "when its sources changed)")
        node_binaries = nodemod.build_node()
    except (BuildError, nodemod.NodeError) as e:
        say(f"build failed: {e}")
        return 1
    except KeyboardInterrupt:
        return 130
    say(f"built or found in {time.monotonic() - started:.0f} s")
    workdir = Path(tempfile.mkdtemp(prefix="mail-selfcheck-demo-"))
    succeeded = False
    cp = ControlPlane(binaries, workdir / "controlplane", node_agent=False)
    node = nodemod.Node(cp, workdir / "node", binaries=node_binaries)
    stack = NodeMailStack()
    try:
        say("starting Postfix + Dovecot on loopback")
        stack.start()
        say("starting etcd, kube-apiserver, kube-controller-manager, kube-scheduler and the node: "
            f"containerd + kubelet {nodemod.NODE_K8S_VERSION} in the network namespace {node.netns} "
            f"(only lo and the pod bridge, no route out), {nodemod.APP_IMAGE} in its image store")
        t0 = time.monotonic()
        nodemod.start_cluster(cp, node)
        say(f"node {node.name} Ready {time.monotonic() - t0:.1f} s later ({node.timings}); "
            f"pods reach the mail stack at {node.ip}")
        expose_mail(node, stack)
        cluster = NodeCluster(cp, node)
        say(f"helm install {RELEASE} charts/selfcheck -n {RELEASE_NAMESPACE} --create-namespace "
            "--set image.repository=localhost/mail-selfcheck,image.tag=dev,image.pullPolicy=Never")
        operator = InstalledOperator(cluster, image_values(), workdir, release_ns=RELEASE_NAMESPACE,
                                     release=RELEASE).install(announce=False)
        op_pod = operator.pod
        say(f"operator pod {RELEASE_NAMESPACE}/{op_pod['metadata']['name']} Running and Ready "
            f"{operator.ready_after:.1f} s after helm install (image {op_pod['spec']['containers'][0]['image']}, "
            f"uid {op_pod['spec']['securityContext'].get('runAsUser')}, pod IP {op_pod['status']['podIP']})")
        cp.kubectl("create", "namespace", NAMESPACE)
        env = pod_env(stack)
        mail_objects(cp, NAMESPACE, env)
        check = selfcheck(env, name=NAME, interval=args.interval)
        check["metadata"]["namespace"] = NAMESPACE
        cp.kubectl("apply", "-f", "-", input=yaml.safe_dump(check))
        say("applied this MailSelfcheck (with a Secret and a CA ConfigMap):\n"
            + yaml.safe_dump(check, sort_keys=False))
        status = wait_for_result(cp, NAMESPACE, NAME, args.timeout)
        first = time.monotonic() - operator.installed_at
        pod = probe_pod(cp, NAMESPACE)
        if pod:
            say(describe_probe_pod(pod))
        print(cp.kubectl("-n", NAMESPACE, "get", "mailselfchecks", "-o", "wide").stdout, flush=True)
        say(f"first result {first:.1f} s after helm install, {time.monotonic() - started:.1f} s in all: "
            f"success={status['success']} sendTime={status.get('sendTime')} receptionTime={status.get('receptionTime')}"
            + (f" error={status.get('error')!r}" if not status["success"] else ""))
        succeeded = True
        if args.once:
            return 0 if status["success"] else 1
        starting = False
        say("running; in another shell:\n"
            f"  export KUBECONFIG={cp.kubeconfig} PATH={cp.kubectl_bin.parent}:$PATH\n"
            f"  kubectl -n {NAMESPACE} get mailselfchecks -o wide --watch\n"
            f"  kubectl -n {NAMESPACE} get pods -o wide          # one probe pod per check\n"
            f"  kubectl -n {RELEASE_NAMESPACE} logs -l app.kubernetes.io/component=operator -f\n"
            f"  nsenter --net={node.netns} curl -s http://{op_pod['status']['podIP']}:9090/metrics"
            " | grep ^mail_selfcheck_\n"
            "Press Ctrl-C to stop everything (node, control plane, mail stack).")
        while not stop.wait(1):
            pass
        return 0
    except KeyboardInterrupt:
        return 130
    except (ControlPlaneError, nodemod.NodeError, MailStackError, TimeoutError,
            pytest.fail.Exception) as e:
        say(f"failed: {e}")
        return 1
    finally:
        starting = False  # Ctrl-C during the clean-up must not cut it short
        say("stopping")
        node.stop()
        cp.stop()
        stack.stop()
        if succeeded and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            say(f"kept {workdir} (logs: controlplane/*.log, node/*.log; etcd data, kubeconfigs)")


if __name__ == "__main__":
    sys.exit(main())
