"""Operator scale benchmark: N MailSelfchecks on the real control plane (issue 4). Not a test.

The probe command is swapped (``spec.job.command``) for a shell one-liner writing a fixed
result to the termination log: this measures the operator, the API server and the Job
machinery, not mail. Usage (a control plane must be up, e.g. ``python -m
tests.harness.controlplane up``, with its node agent)::

    KUBECONFIG=... .venv/bin/python benchmarks/operator_scale.py -n 100 --interval 60 --intervals 3

Prints, for the run: p50/p99 schedule lateness (Job seen by a watch minus its slot time),
p50/p99 delay from the Job's ``Complete`` condition (seen by a watch) to the status naming it
(seen by a watch), operator peak RSS and average CPU, and the average CPU of each component
(from ``$MAIL_SELFCHECK_RUN_DIR/state.json`` when given with ``--state``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import yaml
from kubernetes import client, config, watch

GROUP = "selfcheck.mail-selfcheck.dev"
ROOT = Path(__file__).resolve().parents[1]
RESULT = '{"success":true,"error":null,"send_time":0.1,"reception_time":0.2}'


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def body(i: int, interval: int) -> dict:
    return {
        "apiVersion": f"{GROUP}/v1alpha1", "kind": "MailSelfcheck", "metadata": {"name": f"bench-{i:04d}"},
        "spec": {
            "from": "a@example.test", "to": "b@example.test", "interval": interval, "timeout": 5,
            "smtp": {"host": "127.0.0.1", "security": "plain"},
            "imap": {"host": "127.0.0.1", "passwordSecretRef": {"name": "x", "key": "y"}},
            "secretRef": {"name": "x", "key": "z"},
            "successfulJobsHistoryLimit": 1,
            "job": {"command": ["sh", "-c", f"printf '%s' '{RESULT}' > /dev/termination-log"]},
        },
    }


class Watcher(threading.Thread):
    def __init__(self, fn, ns, record):
        super().__init__(daemon=True)
        self.fn, self.ns, self.record = fn, ns, record

    def run(self):
        while True:
            try:
                for ev in watch.Watch().stream(self.fn, self.ns, timeout_seconds=600):
                    self.record(ev, time.time())
            except Exception as exc:  # noqa: BLE001 - keep watching
                print("watch error:", exc, file=sys.stderr)
                time.sleep(1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=100)
    ap.add_argument("--interval", type=int, default=60)
    ap.add_argument("--intervals", type=int, default=3)
    ap.add_argument("--namespace", default="bench")
    ap.add_argument("--state", help="control plane state.json (component PIDs)")
    args = ap.parse_args()
    config.load_kube_config()
    api = client.ApiClient()
    core, batch, custom = client.CoreV1Api(api), client.BatchV1Api(api), client.CustomObjectsApi(api)
    ns = args.namespace
    kubectl = os.environ.get("KUBECTL", "kubectl")
    subprocess.run([kubectl, "apply", "-f", str(ROOT / "crds" / "mailselfchecks.yaml")], check=True)
    subprocess.run([kubectl, "create", "namespace", ns], check=False)
    subprocess.run([kubectl, "-n", ns, "create", "secret", "generic", "x", "--from-literal=y=bench",
                    "--from-literal=z=bench"], check=False)

    seen_job: dict[str, float] = {}
    slot_of: dict[str, float] = {}
    complete_at: dict[str, float] = {}
    harvested_at: dict[str, float] = {}
    lock = threading.Lock()

    def on_job(ev, now):
        job = ev["object"]
        name = job.metadata.name
        with lock:
            if name not in seen_job and ev["type"] == "ADDED":
                seen_job[name] = now
                ann = (job.metadata.annotations or {}).get(f"{GROUP}/schedule-time")
                if ann:
                    slot_of[name] = dt.datetime.fromisoformat(ann.replace("Z", "+00:00")).timestamp()
            conds = (job.status and job.status.conditions) or []
            if name not in complete_at and any(c.type == "Complete" and c.status == "True" for c in conds):
                complete_at[name] = now

    def on_msc(ev, now):
        st = ev["object"].get("status") or {}
        job = st.get("lastHarvestedJob")
        with lock:
            if job and job not in harvested_at:
                harvested_at[job] = now

    Watcher(batch.list_namespaced_job, ns, on_job).start()
    Watcher(lambda namespace, **kw: custom.list_namespaced_custom_object(GROUP, "v1alpha1", namespace,
                                                                        "mailselfchecks", **kw), ns, on_msc).start()

    log = open(f"/tmp/bench-operator-{args.n}.log", "w")
    op = subprocess.Popen([str(Path(sys.executable).parent / "mail-selfcheck"), "operator", "-n", ns,
                           "--metrics-port", "0", "--liveness", ""], stdout=log, stderr=subprocess.STDOUT)
    oproc = psutil.Process(op.pid)
    comps = {}
    if args.state:
        for name, info in json.loads(Path(args.state).read_text())["pids"].items():
            try:
                comps[name] = psutil.Process(info["pid"])
            except psutil.NoSuchProcess:
                pass
    time.sleep(3)
    t_create = time.time()
    for i in range(args.n):
        custom.create_namespaced_custom_object(GROUP, "v1alpha1", ns, "mailselfchecks", body(i, args.interval))
    print(f"created {args.n} MailSelfchecks in {time.time() - t_create:.1f}s", flush=True)

    cpu0 = {k: p.cpu_times() for k, p in comps.items()}
    ocpu0, t0 = oproc.cpu_times(), time.time()
    peak = 0
    end = t0 + args.interval * args.intervals + 10
    while time.time() < end:
        peak = max(peak, oproc.memory_info().rss)
        time.sleep(1)
    elapsed = time.time() - t0

    def cpu_pct(p, c0):
        c = p.cpu_times()
        return 100 * ((c.user - c0.user) + (c.system - c0.system)) / elapsed

    op_cpu = cpu_pct(oproc, ocpu0)
    comp_cpu = {k: cpu_pct(p, cpu0[k]) for k, p in comps.items()}
    with lock:
        first = {}
        for j in seen_job:
            owner = j.rsplit("-", 1)[0]
            if j in slot_of and (owner not in first or slot_of[j] < slot_of[first[owner]]):
                first[owner] = j
        firsts = set(first.values())
        lateness = [seen_job[j] - slot_of[j] for j in seen_job if j in slot_of and j not in firsts]
        lateness_first = [seen_job[j] - slot_of[j] for j in firsts]
        delay = [harvested_at[j] - complete_at[j] for j in complete_at if j in harvested_at]
    print(json.dumps({
        "N": args.n, "interval_s": args.interval, "jobs": len(seen_job), "harvested": len(harvested_at),
        "lateness_p50_s": round(pct(lateness, .5), 3), "lateness_p99_s": round(pct(lateness, .99), 3),
        "first_run_lateness_p50_s": round(pct(lateness_first, .5), 3),
        "first_run_lateness_p99_s": round(pct(lateness_first, .99), 3),
        "status_delay_p50_s": round(pct(delay, .5), 3), "status_delay_p99_s": round(pct(delay, .99), 3),
        "operator_peak_rss_mb": round(peak / 2**20, 1), "operator_avg_cpu_pct": round(op_cpu, 1),
        "component_avg_cpu_pct": {k: round(v, 1) for k, v in comp_cpu.items()},
    }, indent=1))
    subprocess.run([kubectl, "-n", ns, "delete", "mailselfchecks", "--all", "--timeout=300s"], check=False)
    op.terminate()
    op.wait(30)
    subprocess.run([kubectl, "delete", "namespace", ns, "--wait=false"], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
