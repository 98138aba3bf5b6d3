"""One-command demo (``make demo``): the whole product working on this machine.

Starts, with the same harness code the tests use: the real Kubernetes control plane
(:mod:`tests.harness.controlplane`, with the node agent standing in for the kubelet) and
the real Postfix + Dovecot stack (:mod:`tests.harness.mailstack`); installs the chart's CRD
and the chart's ServiceAccount + RBAC (``helm template --show-only``); runs the operator on
this host authenticated as that ServiceAccount; applies a MailSelfcheck that probes the
local mail stack; waits for the first result and prints ``kubectl get mailselfchecks -o wide``.

Then it keeps everything running until Ctrl-C or SIGTERM (``--once``: stop right away; exit
status 0 only if the first check succeeded). Its working directory (etcd data, throw-away
PKI, logs) is removed at the end unless the demo failed or ``--keep`` is given.

    .venv/bin/python -m tests.harness.demo [--once] [--keep] [--interval 30] [--timeout 180]
    make demo ARGS="--once"
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml

from tests.harness.controlplane import ControlPlane, build_all, find_binaries, free_port, terminate
from tests.harness.mailstack import MailStack

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "selfcheck"
NAMESPACE = "mail-selfcheck-demo"
RELEASE = "selfcheck"


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def install_crd_and_rbac(cp: ControlPlane, namespace: str) -> str:
    """Apply the chart's CRD and its ServiceAccount + RBAC for a namespaced install; returns the SA name."""
    cp.kubectl("create", "namespace", namespace)
    crds = cp.helm("show", "crds", str(CHART)).stdout
    cp.kubectl("apply", "--server-side", "-f", "-", input=crds)
    group_plural = yaml.safe_load(crds)["metadata"]["name"]
    cp.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{group_plural}")
    rendered = cp.helm(
        "template", RELEASE, str(CHART), "-n", namespace, "--set-json", f'watchNamespaces=["{namespace}"]',
        "--show-only", "templates/serviceaccount.yaml", "--show-only", "templates/rbac.yaml",
    ).stdout
    cp.kubectl("apply", "-f", "-", input=rendered)
    accounts = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "ServiceAccount"]
    return accounts[0]["metadata"]["name"]


def sample_resources(stack: MailStack, namespace: str, interval: int) -> list[dict]:
    """A Secret, a CA ConfigMap and a MailSelfcheck probing ``stack`` (sender -> receiver)."""
    env = stack.probe_env()
    secret = {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mail-selfcheck-credentials", "namespace": namespace},
        "stringData": {
            "smtp-password": env["MESSAGES_SELFCHECK_SMTP_PASSWORD"],
            "imap-password": env["MESSAGES_SELFCHECK_IMAP_PASSWORD"],
            "secret": env["MESSAGES_SELFCHECK_SECRET"],
        },
    }
    ca = {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "mail-ca", "namespace": namespace},
        "data": {"ca.crt": Path(stack.ca_file).read_text()},
    }
    check = {
        "apiVersion": "selfcheck.mail-selfcheck.dev/v1alpha1", "kind": "MailSelfcheck",
        "metadata": {"name": "local-stack", "namespace": namespace},
        "spec": {
            "from": env["MESSAGES_SELFCHECK_FROM"],
            "to": env["MESSAGES_SELFCHECK_TO"],
            "smtp": {"host": env["MESSAGES_SELFCHECK_SMTP_HOST"], "port": int(env["MESSAGES_SELFCHECK_SMTP_PORT"]),
                     "security": "starttls",
                     "passwordSecretRef": {"name": "mail-selfcheck-credentials", "key": "smtp-password"}},
            "imap": {"host": env["MESSAGES_SELFCHECK_IMAP_HOST"], "port": int(env["MESSAGES_SELFCHECK_IMAP_PORT"]),
                     "security": "tls",
                     "passwordSecretRef": {"name": "mail-selfcheck-credentials", "key": "imap-password"}},
            "secretRef": {"name": "mail-selfcheck-credentials", "key": "secret"},
            "tls": {"caBundle": {"configMapKeyRef": {"name": "mail-ca", "key": "ca.crt"}}},
            "interval": interval,
            "timeout": 20,
        },
    }
    return [secret, ca, check]


def start_operator(cp: ControlPlane, namespace: str, service_account: str, workdir: Path) -> tuple[subprocess.Popen, Path, int]:
    """Run ``mail-selfcheck operator -n namespace`` as ``service_account``; returns (process, log, metrics port)."""
    kubeconfig = cp.service_account_kubeconfig(namespace, service_account, workdir / "operator.kubeconfig", "24h")
    metrics_port, health_port = free_port(), free_port()
    log = workdir / "operator.log"
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "MAIL_SELFCHECK_PROBE_IMAGE": "mail-selfcheck:local"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mail-selfcheck")), "operator", "-n", namespace,
             "--metrics-port", str(metrics_port), "--liveness", f"http://127.0.0.1:{health_port}/healthz"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the operator exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=2):
                return proc, log, metrics_port
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"the operator's liveness endpoint did not answer within 60 s:\n{log.read_text()[-3000:]}")


def wait_for_result(cp: ControlPlane, namespace: str, name: str, timeout: float) -> dict:
    """Wait until ``status.success`` is set; returns the status. Raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = cp.kubectl("-n", namespace, "get", "mailselfcheck", name, "-o", "json", check=False)
        status = json.loads(out.stdout).get("status") or {} if out.returncode == 0 else {}
        if status.get("success") is not None:
            return status
        time.sleep(0.5)
    raise TimeoutError(f"no result within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--once", action="store_true", help="stop after the first result (exit 0 if it succeeded)")
    parser.add_argument("--interval", type=int, default=30, help="seconds between checks (default 30)")
    parser.add_argument("--timeout", type=float, default=180, help="seconds to wait for the first result")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (logs, etcd data)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    binaries = find_binaries()
    if binaries is None:
        say("building the control plane from Go modules (first time only, ~8 min)")
        binaries = build_all()
    workdir = Path(tempfile.mkdtemp(prefix="mail-selfcheck-demo-"))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):  # SIGINT too: it may have been ignored by our parent
        signal.signal(signum, lambda *_: stop.set())
    operator = None
    succeeded = False
    say("starting Postfix + Dovecot on loopback")
    with MailStack() as stack:
        say("starting etcd, kube-apiserver, kube-controller-manager and the node agent")
        cp = ControlPlane(binaries, workdir / "controlplane")
        cp.run_dir.mkdir(parents=True, exist_ok=True)
        cp.start()
        try:
            say(f"installing the chart's CRD and RBAC into namespace {NAMESPACE}")
            service_account = install_crd_and_rbac(cp, NAMESPACE)
            say(f"starting the operator as system:serviceaccount:{NAMESPACE}:{service_account}")
            operator, log, metrics_port = start_operator(cp, NAMESPACE, service_account, workdir)
            resources = sample_resources(stack, NAMESPACE, args.interval)
            cp.kubectl("apply", "-f", "-", input="\n---\n".join(yaml.safe_dump(r) for r in resources))
            say("applied this MailSelfcheck:\n" + yaml.safe_dump(resources[-1], sort_keys=False))
            status = wait_for_result(cp, NAMESPACE, "local-stack", args.timeout)
            print(cp.kubectl("-n", NAMESPACE, "get", "mailselfchecks", "-o", "wide").stdout, flush=True)
            say(f"first result after {time.monotonic() - started:.1f} s in all: "
                f"success={status['success']} sendTime={status.get('sendTime')} receptionTime={status.get('receptionTime')}"
                + (f" error={status.get('error')!r}" if not status["success"] else ""))
            succeeded = True
            if args.once:
                return 0 if status["success"] else 1
            say("running; in another shell:\n"
                f"  export KUBECONFIG={cp.kubeconfig} PATH={cp.kubectl_bin.parent}:$PATH\n"
                f"  kubectl -n {NAMESPACE} get mailselfchecks -o wide --watch\n"
                f"  curl -s localhost:{metrics_port}/metrics | grep mail_selfcheck_\n"
                f"operator log: {log}\n"
                "Press Ctrl-C to stop everything (control plane, mail stack, operator).")
            while not stop.wait(1):
                pass
            return 0
        finally:
            say("stopping")
            if operator is not None:
                terminate(operator, timeout=20)
            cp.stop()
            if succeeded and not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                say(f"kept {workdir} (logs, etcd data, kubeconfigs)")


if __name__ == "__main__":
    sys.exit(main())
