"""A real Prometheus inside the node's network scrapes the operator pod's /metrics through its
pod IP, found as a cluster's Prometheus finds it for the chart's ServiceMonitor: the endpoints of
the metrics Service (its EndpointSlice, kept by the ServiceMonitor's selector labels and its
`metrics` port), job = the Service's name, honor_labels. Debian's Prometheus 2.42 is built
without Kubernetes service discovery, so the test reads the EndpointSlice (what that discovery
reads) and hands its endpoints to Prometheus as a file_sd target file.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse

import pytest
import yaml

from tests.harness.chart_operator import CHART
from tests.harness.controlplane import free_port, terminate
from tests.harness.node_fixtures import pod_env
from tests.harness.node_operator import (
    InstalledOperator, apply, get, get_in_netns, image_values, mail_objects, selfcheck, status,
)
from tests.harness.waiting import wait_until

pytestmark = [pytest.mark.node, pytest.mark.timeout(1800)]


def servicemonitor_targets(cp, sm: dict) -> list[dict]:
    """The file_sd targets Kubernetes discovery would give for the ServiceMonitor ``sm`` (one
    endpoint, matchLabels only): ready endpoints of the Services it selects, on its port."""
    (ep,) = sm["spec"]["endpoints"]
    selector = ",".join(f"{k}={v}" for k, v in sm["spec"]["selector"]["matchLabels"].items())
    out = []
    for ns in sm["spec"]["namespaceSelector"]["matchNames"]:
        for svc in get(cp, ns, "services", "-l", selector)["items"]:
            name = svc["metadata"]["name"]
            for es in get(cp, ns, "endpointslices", "-l", f"kubernetes.io/service-name={name}")["items"]:
                (port,) = [p["port"] for p in es.get("ports") or [] if p["name"] == ep["port"]]
                out += [{"targets": [f"{addr}:{port}"],
                         "labels": {"job": name, "namespace": ns,
                                    "pod": e.get("targetRef", {}).get("name", "")}}
                        for e in es.get("endpoints") or [] if e["conditions"].get("ready")
                        for addr in e["addresses"]]
    return out


def test_prometheus_in_the_node_network_scrapes_the_operator_pod_ip(node_cluster, node_mail, node_namespace,
                                                                   tmp_path):
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus is missing: hack/install-system-deps.sh installs Debian's package"
    cp, node, ns = node_cluster.cp, node_cluster.node, node_namespace
    values = {**image_values(), "metrics": {"service": {"enabled": True}}}
    op = InstalledOperator(node_cluster, values, tmp_path).install()
    sm = yaml.safe_load(cp.helm("template", op.release, str(CHART), "-n", op.ns, "-f", str(op.values_file),
                                "--set", "metrics.serviceMonitor.enabled=true",
                                "--show-only", "templates/servicemonitor.yaml").stdout)
    (ep,) = sm["spec"]["endpoints"]
    targets = tmp_path / "targets.json"
    (tmp_path / "prometheus.yaml").write_text(yaml.safe_dump({
        "global": {"evaluation_interval": "1s"},
        "scrape_configs": [{
            "job_name": f"serviceMonitor/{sm['metadata']['namespace']}/{sm['metadata']['name']}/0",
            "honor_labels": ep["honorLabels"], "metrics_path": ep["path"],
            "scrape_interval": "1s", "scrape_timeout": "1s",
            "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "1s"}]}]}))
    wait_until(lambda: servicemonitor_targets(cp, sm), 30, "a ready endpoint of the metrics Service",
               diag=op.diag)
    targets.write_text(json.dumps(servicemonitor_targets(cp, sm)))
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(["nsenter", f"--net={node.netns}", "--", prometheus,
                             f"--config.file={tmp_path / 'prometheus.yaml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)

    def api(path: str, **params) -> dict | None:
        url = f"http://127.0.0.1:{port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        out = get_in_netns(node, url, check=False, timeout=5)
        return json.loads(out.stdout)["data"] if out.returncode == 0 else None

    def diag() -> str:
        return (tmp_path / "prometheus.log").read_text(errors="replace")[-2000:] + "\n" + op.diag()

    try:
        def target():
            data = api("targets")
            up = [t for t in (data or {}).get("activeTargets", []) if t["health"] == "up"]
            return up[0] if up else None
        t = wait_until(target, 60, "the operator pod as an up target", diag=diag)
        pod_ip = op.pods()[0]["status"]["podIP"]
        assert t["scrapeUrl"] == f"http://{pod_ip}:9090/metrics", t  # the pod IP, in the node network
        assert t["labels"]["pod"] == op.pod["metadata"]["name"]
        job = t["labels"]["job"]
        assert job == f"{sm['metadata']['name']}-metrics", t  # the metrics Service's name

        env = pod_env(node_mail)
        mail_objects(cp, ns, env)
        apply(cp, ns, selfcheck(env, name="scraped", interval=600))
        wait_until(lambda: status(cp, ns, "scraped").get("success") is True, 120, "a successful check",
                   diag=op.diag)

        def success():
            r = (api("query", query=f'mail_selfcheck_success{{namespace="{ns}",name="scraped"}}') or {})
            return r.get("result")
        (series,) = wait_until(success, 30, "mail_selfcheck_success in Prometheus", diag=diag)
        assert series["value"][1] == "1" and series["metric"]["job"] == job, series
    finally:
        terminate(proc, timeout=20)
        log.close()
        op.uninstall()
