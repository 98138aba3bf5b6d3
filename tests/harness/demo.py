"""One-command demo (``make demo``): the whole product working on this machine.

Starts, with the same harness code the tests use: the real Kubernetes control plane
(:mod:`tests.harness.controlplane`, with the node agent standing in for the kubelet) and
the real Postfix + Dovecot stack (:mod:`tests.harness.mailstack`); ``helm install`` of the
chart with its default values (every namespace watched) into ``mail-selfcheck``; runs the
rendered Deployment's command line on this host, authenticated as the chart's ServiceAccount
(:mod:`tests.harness.chart_operator`); applies a MailSelfcheck that probes the local mail
stack in another namespace; waits for the first result and prints
``kubectl get mailselfchecks -o wide``.

Then it keeps everything running until Ctrl-C or SIGTERM (``--once``: stop right away; exit
status 0 only if the first check succeeded). Its working directory (etcd data, throw-away
PKI, logs) is removed at the end unless the demo failed or ``--keep`` is given.

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

import yaml

from tests.harness.chart_operator import ChartOperator
from tests.harness.controlplane import ControlPlane, build_all, find_binaries
from tests.harness.mailstack import MailStack

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "selfcheck"
#: Where the chart is installed (the README's `helm install ... -n mail-selfcheck`).
RELEASE_NAMESPACE = "mail-selfcheck"
RELEASE = "selfcheck"
#: Where the sample MailSelfcheck lives (any namespace: the default install watches them all).
NAMESPACE = "mail-selfcheck-demo"


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


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
            say(f"helm install {RELEASE} charts/selfcheck -n {RELEASE_NAMESPACE} --create-namespace (default values)")
            operator = ChartOperator(cp, RELEASE_NAMESPACE, workdir / "operator.log", release=RELEASE,
                                     values={"probe": {"image": "mail-selfcheck:local"}}).install()
            say(f"starting the chart's command line as system:serviceaccount:{RELEASE_NAMESPACE}:{operator.fullname}:\n"
                f"  {' '.join(operator.argv)}")
            operator.start()
            log, metrics_port = operator.log, operator.metrics_port
            cp.kubectl("create", "namespace", NAMESPACE)
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
                operator.stop()
            cp.stop()
            if succeeded and not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                say(f"kept {workdir} (logs, etcd data, kubeconfigs)")


if __name__ == "__main__":
    sys.exit(main())
