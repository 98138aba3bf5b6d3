"""Operator scale benchmark: N MailSelfchecks on the real control plane (issue 4). Not a test.

The probe command is swapped (``spec.job.command``) for a shell one-liner writing a fixed
result to the termination log: this measures the operator, the API server and the Job
machinery, not mail. The exact commands (a control plane of its own, with its node agent, in a
throw-away run directory; N = 100, 300, 1000)::

    export MAIL_SELFCHECK_RUN_DIR=/tmp/msc-bench-run
    .venv/bin/python -m tests.harness.controlplane up
    export KUBECONFIG=$MAIL_SELFCHECK_RUN_DIR/kubeconfig
    export KUBECTL=~/.cache/mail-selfcheck/k8s-v1.36.3/kubectl
    .venv/bin/python benchmarks/operator_scale.py -n 1000 --interval 60 --intervals 3 \
        --state $MAIL_SELFCHECK_RUN_DIR/state.json
    .venv/bin/python -m tests.harness.controlplane down

All N resources are created at once (as fast as the API accepts them), so their slots are
bunched within the creation window: a harsher load than resources created over time.

Prints a table and the same figures as JSON. Units: seconds (s), MiB, % of one core.

* lateness: Job seen by a watch minus its slot time (``schedule-time`` annotation), steady
  state (every run but each resource's first, which is due at creation and measured apart);
* status delay: the Job's ``Complete`` condition seen by a watch to the resource's status
  naming it (``lastHarvestedJob``) seen by a watch; steady state and first runs (which
  share the API server with the creation of the N resources) apart;
* jobs: Jobs created during the run vs. the ideal ``N * (intervals + 1)`` (a Job held back
  by Forbid because the previous one had not finished is missing, not late);
* operator peak RSS and average CPU; average CPU of each control-plane component (from
  ``--state``, the control plane's ``state.json``); whole-host CPU busy and the busiest other
  processes (the machine is shared: read component figures against them);
* saturation evidence, sampled every 5 s: the Job controller's workqueue depth and the
  controller-manager's client-side rate-limiter wait per request (its ``/metrics``), the API
  server's in-flight requests and APF queued requests (its ``/metrics``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import ssl
import urllib.request

import psutil
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


class Sampler(threading.Thread):
    """Every ``period`` s: controller-manager and API server ``/metrics`` (admin client cert)."""

    def __init__(self, state: dict, run_dir: Path, period: float = 5.0):
        super().__init__(daemon=True)
        self.period = period
        self.server = state["server"]
        self.ctx = ssl.create_default_context(cafile=str(run_dir / "pki" / "ca.crt"))
        self.ctx.load_cert_chain(str(run_dir / "pki" / "admin.crt"), str(run_dir / "pki" / "admin.key"))
        self.kcm_ctx = ssl.create_default_context()  # the controller-manager's serving cert is self-signed
        self.kcm_ctx.check_hostname = False
        self.kcm_ctx.verify_mode = ssl.CERT_NONE
        self.kcm_ctx.load_cert_chain(str(run_dir / "pki" / "admin.crt"), str(run_dir / "pki" / "admin.key"))
        self.kcm = None
        kcm = state["pids"].get("kube-controller-manager")
        if kcm:
            ports = [c.laddr.port for c in psutil.Process(kcm["pid"]).net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN]
            self.kcm = f"https://127.0.0.1:{ports[0]}" if ports else None
        self.samples: list[dict] = []
        self.stop = threading.Event()

    def _metrics(self, url: str, ctx) -> str:
        with urllib.request.urlopen(url + "/metrics", context=ctx, timeout=5) as r:
            return r.read().decode()

    @staticmethod
    def _sum(text: str, prefix: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))

    def run(self):
        while not self.stop.wait(self.period):
            row = {"t": time.time()}
            try:
                if self.kcm:
                    m = self._metrics(self.kcm, self.kcm_ctx)
                    row["job_queue"] = self._sum(m, 'workqueue_depth{name="job"}')
                    row["rl_count"] = self._sum(m, "rest_client_rate_limiter_duration_seconds_count")
                    row["rl_sum"] = self._sum(m, "rest_client_rate_limiter_duration_seconds_sum")
                m = self._metrics(self.server, self.ctx)
                row["inflight"] = self._sum(m, "apiserver_current_inflight_requests{")
                row["apf_queued"] = self._sum(m, "apiserver_flowcontrol_current_inqueue_requests{")
            except Exception as exc:  # noqa: BLE001 - a missed sample is not fatal
                print("metrics sample failed:", exc, file=sys.stderr)
            self.samples.append(row)

    def summary(self) -> dict:
        rows = self.samples
        out = {}
        for key in ("job_queue", "inflight", "apf_queued"):
            vals = [r[key] for r in rows if key in r]
            if vals:
                out[f"{key}_max"] = max(vals)
        rl = [r for r in rows if "rl_count" in r]
        if len(rl) >= 2:
            calls = rl[-1]["rl_count"] - rl[0]["rl_count"]
            span = rl[-1]["t"] - rl[0]["t"]
            out["kcm_requests_per_s"] = round(calls / span, 1)
            out["kcm_ratelimit_wait_per_request_s"] = round((rl[-1]["rl_sum"] - rl[0]["rl_sum"]) / max(calls, 1), 3)
        return out


def _busiest_others(before: dict, exclude: set[int], elapsed: float, top: int = 3) -> list[tuple[str, float]]:
    """The ``top`` other processes by CPU % since ``before`` (pid -> (name, cpu seconds))."""
    usage = []
    for p in psutil.process_iter(["pid", "name", "cpu_times"]):
        if p.info["pid"] in exclude or p.info["pid"] not in before or not p.info["cpu_times"]:
            continue
        name, c0 = before[p.info["pid"]]
        c = p.info["cpu_times"]
        usage.append((name, 100 * (c.user + c.system - c0) / elapsed))
    agg: dict[str, float] = {}
    for name, pct_ in usage:
        agg[name] = agg.get(name, 0.0) + pct_
    return sorted(((n, round(v, 1)) for n, v in agg.items()), key=lambda x: -x[1])[:top]


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
    for _ in range(300):  # a previous run's namespace may still be terminating
        try:
            core.read_namespace(ns)
        except client.ApiException as exc:
            if exc.status == 404:
                break
            raise
        time.sleep(1)
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

    pod_added: dict[str, float] = {}
    pod_running: dict[str, float] = {}
    pod_done: dict[str, float] = {}

    def on_pod(ev, now):
        pod = ev["object"]
        job = (pod.metadata.labels or {}).get("job-name")
        if not job or ev["type"] == "DELETED":
            return
        phase = pod.status.phase if pod.status else None
        with lock:
            pod_added.setdefault(job, now)
            if phase in ("Running", "Succeeded", "Failed"):
                pod_running.setdefault(job, now)
            if phase in ("Succeeded", "Failed"):
                pod_done.setdefault(job, now)

    def on_msc(ev, now):
        st = ev["object"].get("status") or {}
        job = st.get("lastHarvestedJob")
        with lock:
            if job and job not in harvested_at:
                harvested_at[job] = now

    Watcher(batch.list_namespaced_job, ns, on_job).start()
    Watcher(core.list_namespaced_pod, ns, on_pod).start()
    Watcher(lambda namespace, **kw: custom.list_namespaced_custom_object(GROUP, "v1alpha1", namespace,
                                                                        "mailselfchecks", **kw), ns, on_msc).start()

    log = open(f"/tmp/bench-operator-{args.n}.log", "w")
    # Every namespace, as the chart's default install runs it.
    op = subprocess.Popen([str(Path(sys.executable).parent / "mail-selfcheck"), "operator",
                           "--metrics-port", "0", "--liveness", ""], stdout=log, stderr=subprocess.STDOUT)
    oproc = psutil.Process(op.pid)
    comps = {}
    sampler = None
    if args.state:
        state = json.loads(Path(args.state).read_text())
        for name, info in state["pids"].items():
            try:
                comps[name] = psutil.Process(info["pid"])
            except psutil.NoSuchProcess:
                pass
        sampler = Sampler(state, Path(args.state).parent)
    time.sleep(3)
    t_create = time.time()
    for i in range(args.n):
        custom.create_namespaced_custom_object(GROUP, "v1alpha1", ns, "mailselfchecks", body(i, args.interval))
    print(f"created {args.n} MailSelfchecks in {time.time() - t_create:.1f}s", flush=True)

    cpu0 = {k: p.cpu_times() for k, p in comps.items()}
    me = psutil.Process()
    ocpu0, mecpu0, t0 = oproc.cpu_times(), me.cpu_times(), time.time()
    host0 = psutil.cpu_times()
    others0 = {p.info["pid"]: (p.info["name"], p.info["cpu_times"].user + p.info["cpu_times"].system)
               for p in psutil.process_iter(["pid", "name", "cpu_times"]) if p.info["cpu_times"]}
    if sampler:
        sampler.start()
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
    bench_cpu = cpu_pct(me, mecpu0)
    comp_cpu = {k: cpu_pct(p, cpu0[k]) for k, p in comps.items()}
    host1 = psutil.cpu_times()
    host_busy = 100 * (1 - (host1.idle - host0.idle) / max(1e-9, sum(host1) - sum(host0)))
    mine = {os.getpid(), op.pid, *(p.pid for p in comps.values())}
    others = _busiest_others(others0, mine, elapsed)
    if sampler:
        sampler.stop.set()
    with lock:
        first = {}
        for j in seen_job:
            owner = j.rsplit("-", 1)[0]
            if j in slot_of and (owner not in first or slot_of[j] < slot_of[first[owner]]):
                first[owner] = j
        firsts = set(first.values())
        lateness = [seen_job[j] - slot_of[j] for j in seen_job if j in slot_of and j not in firsts]
        lateness_first = [seen_job[j] - slot_of[j] for j in firsts]
        delay = [harvested_at[j] - complete_at[j] for j in complete_at if j in harvested_at and j not in firsts]
        delay_first = [harvested_at[j] - complete_at[j] for j in complete_at if j in harvested_at and j in firsts]

        def stage(a: dict, b: dict) -> list[float]:
            return [b[j] - a[j] for j in a if j in b]
        stages = {  # where a Job's time goes, each stage seen by watches (s)
            "job_to_pod (Job controller)": stage(seen_job, pod_added),
            "pod_to_running (node agent: bind, start)": stage(pod_added, pod_running),
            "running_to_succeeded (command, node agent)": stage(pod_running, pod_done),
            "pod_succeeded_to_complete (Job controller)": stage(pod_done, complete_at),
            "complete_to_status (operator)": delay + delay_first,
        }
    result = {
        "N": args.n, "interval_s": args.interval, "jobs": len(seen_job),
        "jobs_ideal": args.n * (args.intervals + 1), "harvested": len(harvested_at),
        "lateness_p50_s": round(pct(lateness, .5), 3), "lateness_p99_s": round(pct(lateness, .99), 3),
        "first_run_lateness_p50_s": round(pct(lateness_first, .5), 3),
        "first_run_lateness_p99_s": round(pct(lateness_first, .99), 3),
        "status_delay_p50_s": round(pct(delay, .5), 3), "status_delay_p99_s": round(pct(delay, .99), 3),
        "first_run_status_delay_p50_s": round(pct(delay_first, .5), 3),
        "first_run_status_delay_p99_s": round(pct(delay_first, .99), 3),
        "operator_peak_rss_mb": round(peak / 2**20, 1), "operator_avg_cpu_pct": round(op_cpu, 1),
        "component_avg_cpu_pct": {k: round(v, 1) for k, v in comp_cpu.items()},
        "benchmark_watchers_avg_cpu_pct": round(bench_cpu, 1),
        "host_busy_pct_of_all_cores": round(host_busy, 1), "cores": psutil.cpu_count(),
        "others_avg_cpu_pct": round(host_busy * psutil.cpu_count() - op_cpu - bench_cpu - sum(comp_cpu.values()), 1),
        "stages_p50_p99_s": {k: [round(pct(v, .5), 3), round(pct(v, .99), 3)] for k, v in stages.items()},
        "busiest_other_processes_cpu_pct": dict(others),
        "saturation": sampler.summary() if sampler else {},
    }
    print_table(result)
    print(json.dumps(result, indent=1), flush=True)
    # Clean-up: no finalizer, the resources go at once; the operator stops their loops.
    t_del = time.time()
    subprocess.run([kubectl, "-n", ns, "delete", "mailselfchecks", "--all", "--wait=false"],
                   check=False, stdout=subprocess.DEVNULL)
    while time.time() - t_del < 600:
        left = custom.list_namespaced_custom_object(GROUP, "v1alpha1", ns, "mailselfchecks")["items"]
        if not left:
            break
        time.sleep(2)
    print(f"deleted {args.n} MailSelfchecks in {time.time() - t_del:.1f}s", flush=True)
    op.terminate()
    op.wait(30)
    subprocess.run([kubectl, "delete", "namespace", ns, "--wait=false"], check=False)
    return 0


def print_table(r: dict) -> None:
    """The figures of one run as an aligned two-column table."""
    comp = r["component_avg_cpu_pct"]
    sat = r["saturation"]
    rows = [
        ("N / interval", f"{r['N']} / {r['interval_s']} s"),
        ("Jobs created / ideal", f"{r['jobs']} / {r['jobs_ideal']} ({r['jobs'] / r['jobs_ideal']:.0%})"),
        ("lateness p50 / p99", f"{r['lateness_p50_s']:.3f} / {r['lateness_p99_s']:.3f} s"),
        ("first-run lateness p50 / p99", f"{r['first_run_lateness_p50_s']:.3f} / {r['first_run_lateness_p99_s']:.3f} s"),
        ("Complete -> status p50 / p99", f"{r['status_delay_p50_s']:.3f} / {r['status_delay_p99_s']:.3f} s"),
        ("first-run Complete -> status p50 / p99",
         f"{r['first_run_status_delay_p50_s']:.3f} / {r['first_run_status_delay_p99_s']:.3f} s"),
        ("operator peak RSS", f"{r['operator_peak_rss_mb']:.1f} MiB"),
        ("operator avg CPU", f"{r['operator_avg_cpu_pct']:.1f} %"),
        *((f"{k} avg CPU", f"{v:.1f} %") for k, v in comp.items()),
        ("benchmark's watchers avg CPU", f"{r['benchmark_watchers_avg_cpu_pct']:.1f} %"),
        ("host busy (all cores)", f"{r['host_busy_pct_of_all_cores']:.1f} % of {r['cores']} cores"),
        ("other processes avg CPU", f"{r['others_avg_cpu_pct']:.1f} % (host busy minus the above)"),
        ("busiest long-lived others", ", ".join(f"{n} {v:.0f} %" for n, v in r["busiest_other_processes_cpu_pct"].items())),
        *((f"stage {k} p50 / p99", f"{v[0]:.3f} / {v[1]:.3f} s") for k, v in r["stages_p50_p99_s"].items()),
        *((k, str(v)) for k, v in sat.items()),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    sys.exit(main())
