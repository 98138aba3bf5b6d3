"""The Helm chart ``charts/selfcheck`` (issue 5): lint, render, install on the real control plane.

* Pure checks (no cluster): the chart's CRD is byte-identical to the repo's ``crds/`` file
  (a copy, not a symlink: Argo CD and other GitOps tools refuse symlinks leaving the chart
  directory), and every value in ``values.yaml`` carries a ``# --`` comment.
* ``helm lint --strict`` and ``helm template`` for the default and every optional value set,
  with structural checks of the rendered objects: Deployment hardening, least-privilege RBAC
  (nothing on Secrets, no wildcards), Service/ServiceMonitor wiring, alert and dashboard
  expressions using exactly the series that ``controller/metrics.py`` exposes, the sample
  MailSelfcheck valid for the spec model. ServiceMonitor and PrometheusRule are rendered
  only: the prometheus-operator CRDs are not available offline.
* A value of the wrong type makes ``helm install`` fail with the schema's message.
* ``helm install`` (cluster-wide), ``helm upgrade`` (to namespaced) and ``helm uninstall``
  against the real kube-apiserver, with the operator's effective permissions checked by
  ``kubectl auth can-i --as=system:serviceaccount:...``.
* The real operator process, started from the rendered Deployment and authenticated with a
  token of the chart's ServiceAccount, reconciles a MailSelfcheck end to end in both install
  modes (Job created by the real Job controller, result harvested into status, transition
  Event posted, deletion) without any permission error in its log: the RBAC is sufficient,
  not only well-formed.
* A failed upgrade (a watched namespace that does not exist) creates nothing.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.chart_operator import ChartOperator
from tests.harness.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "selfcheck"
GROUP = "selfcheck.mail-selfcheck.dev"

# The operator's permissions, derived from operator/mail_selfcheck/controller and kopf.
OPERATOR_RULES = {
    (GROUP, "mailselfchecks"): {"get", "list", "watch", "patch"},
    (GROUP, "mailselfchecks/status"): {"get", "patch"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "delete"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "events"): {"create"},
}

ALL_OPTIONAL = {
    "metrics": {"service": {"enabled": True}, "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
    "prometheusRule": {"enabled": True, "labels": {"release": "prom"}, "alertLabels": {"team": "mail"}},
    "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "Mail"}},
    "sample": {"enabled": True},
}

# name -> (values, extra helm args)
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "namespaced": {"watchNamespaces": ["{{ .Release.Namespace }}", "mail", "mail"]},
    "all-optional": ALL_OPTIONAL,
    "all-optional-namespaced": {**ALL_OPTIONAL, "watchNamespaces": ["{{ .Release.Namespace }}"]},
    "metrics-off": {"operator": {"metricsPort": 0}, **ALL_OPTIONAL},
    "no-cluster-scoped-rbac": {
        "watchNamespaces": ["mail"],
        "rbac": {"clusterDiscovery": False, "aggregateToDefaultRoles": False},
    },
    "existing-service-account": {"serviceAccount": {"create": False, "name": "ops-sa"}, "rbac": {"create": False}},
    "everything-set": {
        "fullnameOverride": "msc",
        "commonLabels": {"team": "mail"},
        "image": {"repository": "registry.local/msc", "digest": "sha256:" + "a" * 64, "pullPolicy": "Always"},
        "imagePullSecrets": ["regcred"],
        "probe": {"image": "registry.local/msc-probe:1"},
        "operator": {"verbose": True, "healthPort": 8081, "metricsPort": 9100,
                     "extraArgs": ["--all-namespaces"], "extraEnv": [{"name": "TZ", "value": "UTC"}]},
        "serviceAccount": {"annotations": {"iam": "x"}},
        "deploymentAnnotations": {"a": "b"},
        "podAnnotations": {"c": "d"},
        "podLabels": {"e": "f"},
        "priorityClassName": "system-cluster-critical",
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "mail", "operator": "Exists"}],
        "affinity": {"nodeAffinity": {}},
        "metrics": {"service": {"enabled": True, "port": 8443, "annotations": {"team": "mail"}},
                    "serviceMonitor": {"enabled": True, "namespace": "monitoring", "interval": "1m",
                                       "scrapeTimeout": "20s", "honorLabels": False,
                                       "relabelings": [{"action": "labeldrop", "regex": "pod"}],
                                       "metricRelabelings": [{"action": "labeldrop", "regex": "instance"}]}},
        "prometheusRule": {"enabled": True, "namespace": "monitoring",
                           "failing": {"consecutiveFailures": 5, "severity": "page"},
                           "noSuccess": {"intervals": 3, "severity": "page"},
                           "slowReception": {"thresholdSeconds": 12.5, "for": "30m", "severity": "info"},
                           "operatorDown": {"enabled": False},
                           "additionalRules": [{"record": "mail_selfcheck:success:min",
                                                "expr": "min(mail_selfcheck_success)"}]},
        "grafanaDashboard": {"enabled": True, "namespace": "monitoring", "labels": {"dash": "yes"}},
        "sample": {"enabled": True, "name": "other-example", "namespace": "mail"},
    },
}


# ----------------------------------------------------------------------------- helpers



def _values_file(tmp_path: Path, name: str, values: dict[str, Any]) -> Path:
    path = tmp_path / f"values-{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _render(cp, tmp_path: Path, values: dict[str, Any], *, release: str = "rel", namespace: str = "ops",
            name: str = "test") -> list[dict[str, Any]]:
    out = cp.helm("template", release, str(CHART), "-n", namespace, "-f", str(_values_file(tmp_path, name, values)))
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = _objects(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def _rules(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def _exposed_metric_names() -> set[str]:
    """Names of the series controller/metrics.py really exposes (after one observed check)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from mail_selfcheck.controller.metrics import Metrics

    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.set_resource("ns", "n", interval=600, suspended=False, created=1.0)
    metrics.observe("ns", "n", success=False, error_class="smtp_auth", send_time=None, reception_time=None,
                    consecutive_failures=1, timestamp=1.0)
    metrics.observe("ns", "n", success=True, error_class=None, send_time=0.1, reception_time=1.0,
                    consecutive_failures=0, timestamp=2.0)
    metrics.observe_details("ns", "n", timings={"imap_connect": 0.01}, tls={"smtp": {"not_after": 3.0}},
                            webhook_failed=True)
    text = generate_latest(registry).decode()
    return {m.group(1) for m in re.finditer(r"^(mail_selfcheck_\w+)[{ ]", text, re.M)}


def _metric_names_in(expr: str) -> set[str]:
    return set(re.findall(r"\bmail_selfcheck_[a-z_]+\b(?![:])", expr))


def _check_common(docs: list[dict[str, Any]], values: dict[str, Any]) -> None:
    """Invariants of every rendering."""
    for doc in docs:
        labels = doc["metadata"].get("labels") or {}
        assert labels.get("app.kubernetes.io/managed-by") == "Helm", doc["metadata"]["name"]
        assert labels.get("app.kubernetes.io/instance") == "rel"
        assert labels.get("helm.sh/chart") == "selfcheck-0.2.0"
        for key, value in (values.get("commonLabels") or {}).items():
            assert labels.get(key) == value

    # Deployment: one replica, Recreate, hardened, liveness on kopf's /healthz.
    deploy = _one(docs, "Deployment")
    spec = deploy["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert set(spec["selector"]["matchLabels"].items()) <= set(spec["template"]["metadata"]["labels"].items())
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert isinstance(pod["securityContext"]["runAsUser"], int) and pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["runAsNonRoot"] is True and sc["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert container["command"] == ["mail-selfcheck"] and container["args"][0] == "operator"
    health = next(p for p in container["ports"] if p["name"] == "health")
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert f"--liveness=http://0.0.0.0:{health['containerPort']}/healthz" in container["args"]
    metrics_port = (values.get("operator") or {}).get("metricsPort", 9090)
    assert f"--metrics-port={metrics_port}" in container["args"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MAIL_SELFCHECK_PROBE_IMAGE"]
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]

    # RBAC: least privilege, nothing on Secrets, no wildcards.
    for kind in ("Role", "ClusterRole"):
        for role in _objects(docs, kind):
            for rule in role["rules"]:
                for field in ("apiGroups", "resources", "verbs"):
                    assert "*" not in rule[field], (role["metadata"]["name"], rule)
                assert not {"secrets", "serviceaccounts/token", "pods/exec"} & set(rule["resources"]), rule
                assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule
    sa_values = values.get("serviceAccount") or {}
    sa_name = _one(docs, "ServiceAccount")["metadata"]["name"] if sa_values.get("create", True) else sa_values["name"]
    assert pod["serviceAccountName"] == sa_name
    if (values.get("rbac") or {}).get("create", True):
        for kind in ("RoleBinding", "ClusterRoleBinding"):
            for binding in _objects(docs, kind):
                assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa_name, "namespace": "ops"}]
    else:
        assert not _objects(docs, "Role") and not _objects(docs, "ClusterRoleBinding")


# ----------------------------------------------------------------------------- pure checks


def test_chart_crd_is_identical_to_repo_crd():
    chart_crd = CHART / "crds" / "mailselfchecks.yaml"
    assert not chart_crd.is_symlink(), "keep a copy: GitOps tools refuse symlinks leaving the chart"
    assert chart_crd.read_bytes() == (REPO / "crds" / "mailselfchecks.yaml").read_bytes(), (
        "charts/selfcheck/crds/mailselfchecks.yaml differs from crds/mailselfchecks.yaml: "
        "cp crds/mailselfchecks.yaml charts/selfcheck/crds/"
    )


def test_every_value_is_documented():
    """Each key of values.yaml, or an ancestor, has a ``# --`` comment right above it."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, bool]] = []  # (indent, documented)
    undocumented = []
    for i, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z_][\w.-]*):(.*)$", line)
        if not match:
            continue
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3).strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        j, documented = i - 1, False
        while j >= 0 and lines[j].strip().startswith("#"):
            documented = documented or lines[j].strip().startswith("# --")
            j -= 1
        covered = documented or any(d for _, d in stack)
        is_leaf = bool(rest) and not rest.startswith("#")
        if is_leaf and not covered:
            undocumented.append(f"line {i + 1}: {key}")
        stack.append((indent, covered))
    assert not undocumented, f"values without a '# --' comment: {undocumented}"


# ----------------------------------------------------------------------------- helm lint / template


@pytest.mark.cluster
def test_helm_lint_every_value_set(control_plane, tmp_path):
    for name, values in VALUE_SETS.items():
        out = control_plane.helm("lint", "--strict", str(CHART), "-f", str(_values_file(tmp_path, name, values)),
                                 check=False)
        assert out.returncode == 0, f"helm lint ({name}):\n{out.stdout}\n{out.stderr}"
        assert "0 chart(s) failed" in out.stdout


@pytest.mark.cluster
def test_template_default(control_plane, tmp_path):
    docs = _render(control_plane, tmp_path, {})
    _check_common(docs, {})
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["ServiceAccount", "ClusterRole", "ClusterRole", "ClusterRole",
                            "ClusterRoleBinding", "Deployment"]), kinds
    role = next(r for r in _objects(docs, "ClusterRole") if r["metadata"]["name"] == "rel-selfcheck")
    rules = _rules(role)
    assert {k: v for k, v in rules.items() if k in OPERATOR_RULES} == OPERATOR_RULES
    assert rules[("apiextensions.k8s.io", "customresourcedefinitions")] == {"list", "watch"}
    assert set(rules) == set(OPERATOR_RULES) | {("apiextensions.k8s.io", "customresourcedefinitions")}
    args = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not [a for a in args if a.startswith("--namespace")], "cluster-wide: no --namespace"
    image = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "ghcr.io/mail-selfcheck/mail-selfcheck:0.2.0"


@pytest.mark.cluster
def test_template_namespaced(control_plane, tmp_path):
    values = VALUE_SETS["namespaced"]
    docs = _render(control_plane, tmp_path, values)
    _check_common(docs, values)
    roles = _objects(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["mail", "ops"]  # templated, deduplicated
    for role in roles:
        assert _rules(role) == OPERATOR_RULES
    bindings = _objects(docs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["mail", "ops"]
    (discovery,) = [r for r in _objects(docs, "ClusterRole") if r["metadata"]["name"] == "rel-selfcheck-discovery"]
    assert _rules(discovery) == {("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
                                 ("", "namespaces"): {"list", "watch"}}
    args = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--namespace")] == ["--namespace=ops", "--namespace=mail"]

    minimal = _render(control_plane, tmp_path, VALUE_SETS["no-cluster-scoped-rbac"], name="minimal")
    _check_common(minimal, VALUE_SETS["no-cluster-scoped-rbac"])
    assert not [d for d in minimal if d["kind"].startswith("Cluster")], "namespaced + no discovery: no cluster scope"


@pytest.mark.cluster
@pytest.mark.parametrize("name", ["all-optional", "all-optional-namespaced", "metrics-off",
                                  "existing-service-account", "everything-set"])
def test_template_optional_value_sets(control_plane, tmp_path, name):
    values = VALUE_SETS[name]
    docs = _render(control_plane, tmp_path, values, name=name)
    _check_common(docs, values)
    exposed = _exposed_metric_names()
    assert {"mail_selfcheck_success", "mail_selfcheck_consecutive_failures",
            "mail_selfcheck_last_success_timestamp_seconds", "mail_selfcheck_checks_total"} <= exposed
    deploy = _one(docs, "Deployment")
    pod = deploy["spec"]["template"]
    container = pod["spec"]["containers"][0]
    metrics_on = (values.get("operator") or {}).get("metricsPort", 9090) != 0
    metrics_values = values.get("metrics") or {}
    service_on = metrics_on and any((metrics_values.get(k) or {}).get("enabled") for k in ("service", "serviceMonitor"))
    assert any(p["name"] == "metrics" for p in container["ports"]) is metrics_on

    if service_on:
        svc = _one(docs, "Service")
        assert set(svc["spec"]["selector"].items()) <= set(pod["metadata"]["labels"].items())
        (svc_port,) = svc["spec"]["ports"]
        assert svc_port["targetPort"] == "metrics"
        assert any(p["name"] == "metrics" for p in container["ports"])
        sm = _one(docs, "ServiceMonitor")
        assert sm["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(sm["spec"]["selector"]["matchLabels"].items()) <= set(svc["metadata"]["labels"].items())
        assert sm["spec"]["namespaceSelector"] == {"matchNames": ["ops"]}
        (endpoint,) = sm["spec"]["endpoints"]
        assert endpoint["port"] == svc_port["name"] and endpoint["path"] == "/metrics"
        sm_values = values["metrics"]["serviceMonitor"]
        assert endpoint["honorLabels"] is sm_values.get("honorLabels", True)
        assert sm["metadata"]["namespace"] == sm_values.get("namespace", "ops")
        for key, value in (sm_values.get("labels") or {}).items():
            assert sm["metadata"]["labels"][key] == value
    else:
        assert not _objects(docs, "Service") and not _objects(docs, "ServiceMonitor")

    rule_values = values.get("prometheusRule") or {}
    if rule_values.get("enabled"):
        rule = _one(docs, "PrometheusRule")
        (group,) = rule["spec"]["groups"]
        alerts = {r["alert"]: r for r in group["rules"] if "alert" in r}
        expected = {"MailSelfcheckFailing", "MailSelfcheckNoRecentSuccess", "MailSelfcheckSlowReception",
                    "MailSelfcheckCertificateExpiring"}
        if service_on and rule_values.get("operatorDown", {}).get("enabled", True):
            expected.add("MailSelfcheckOperatorDown")
            svc_name = _one(docs, "Service")["metadata"]["name"]
            assert f'job="{svc_name}"' in alerts["MailSelfcheckOperatorDown"]["expr"]
        assert set(alerts) == expected
        for r in group["rules"]:
            names = _metric_names_in(r["expr"])
            assert names <= exposed, f"{r.get('alert') or r.get('record')}: unknown series {names - exposed}"
            if "alert" in r:
                assert r["labels"]["severity"] and r["annotations"]["summary"] and r["annotations"]["description"]
                for key, value in (rule_values.get("alertLabels") or {}).items():
                    assert r["labels"][key] == value
        # The values reach the expressions (their semantics: tests/cluster/test_alerts.py, promtool).
        failing = rule_values.get("failing", {})
        assert (f"mail_selfcheck_consecutive_failures >= {failing.get('consecutiveFailures', 3)}"
                in alerts["MailSelfcheckFailing"]["expr"])
        assert alerts["MailSelfcheckFailing"]["for"] == failing.get("for", "1m")
        no_success = rule_values.get("noSuccess", {})
        assert (f"({no_success.get('intervals', 2)} * max by (namespace, name) (mail_selfcheck_interval_seconds))"
                in alerts["MailSelfcheckNoRecentSuccess"]["expr"])
        assert alerts["MailSelfcheckNoRecentSuccess"]["for"] == no_success.get("for", "5m")
        slow = rule_values.get("slowReception", {})
        assert (f"mail_selfcheck_last_reception_time_seconds > {slow.get('thresholdSeconds', 60)}"
                in alerts["MailSelfcheckSlowReception"]["expr"])
        assert alerts["MailSelfcheckSlowReception"]["for"] == slow.get("for", "15m")
        for alert in alerts.values():
            assert "unless on (namespace, name) mail_selfcheck_suspended == 1" in alert["expr"] or (
                alert["alert"] == "MailSelfcheckOperatorDown")
        if rule_values.get("additionalRules"):
            assert group["rules"][-1] == rule_values["additionalRules"][-1]
    else:
        assert not _objects(docs, "PrometheusRule")

    if (values.get("grafanaDashboard") or {}).get("enabled"):
        cm = _one(docs, "ConfigMap")
        for key, value in (values["grafanaDashboard"].get("labels") or {"grafana_dashboard": "1"}).items():
            assert cm["metadata"]["labels"][key] == value
        dashboard = json.loads(cm["data"]["mail-selfcheck.json"])
        assert dashboard["uid"] == "mail-selfcheck" and dashboard["panels"]
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                names = _metric_names_in(target["expr"])
                assert names and names <= exposed, f"panel {panel['title']!r}: {names - exposed}"

    if (values.get("sample") or {}).get("enabled"):
        from mail_selfcheck.models.spec import MailSelfcheckSpec

        sample = _one(docs, "MailSelfcheck")
        assert sample["apiVersion"] == f"{GROUP}/v1alpha1"
        assert sample["metadata"]["namespace"] == values["sample"].get("namespace", "ops")
        MailSelfcheckSpec.model_validate(sample["spec"])

    if name == "everything-set":
        assert deploy["metadata"]["name"] == "msc"
        assert container["image"] == "registry.local/msc@sha256:" + "a" * 64
        assert container["imagePullPolicy"] == "Always"
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["MAIL_SELFCHECK_PROBE_IMAGE"] == "registry.local/msc-probe:1" and env["TZ"] == "UTC"
        assert "--verbose" in container["args"] and container["args"][-1] == "--all-namespaces"
        assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
        assert pod["spec"]["priorityClassName"] == "system-cluster-critical"
        assert pod["spec"]["tolerations"] == [{"key": "mail", "operator": "Exists"}]
        assert pod["metadata"]["labels"]["e"] == "f" and pod["metadata"]["annotations"] == {"c": "d"}
        assert container["livenessProbe"]["httpGet"]["port"] == "health"
        assert {"name": "health", "containerPort": 8081, "protocol": "TCP"} in container["ports"]
    if name == "existing-service-account":
        assert not _objects(docs, "ServiceAccount")


@pytest.mark.cluster
@pytest.mark.parametrize("args, message", [
    (["--set", "operator.metricsPort=nine"], "at '/operator/metricsPort': got string, want integer"),
    (["--set-json", 'watchNamespaces="ops"'], "at '/watchNamespaces': got string, want array"),
    (["--set", "rbac.create=maybe"], "at '/rbac/create': got string, want boolean"),
    (["--set", "replicas=2"], "additional properties 'replicas' not allowed"),
    (["--set", "image.pullPolicy=Sometimes"], "at '/image/pullPolicy': value must be one of"),
])
def test_wrong_value_fails_install_with_schema_message(control_plane, k8s_namespace, args, message):
    release = f"bad-{uuid.uuid4().hex[:6]}"
    out = control_plane.helm("install", release, str(CHART), "-n", k8s_namespace, *args, check=False)
    assert out.returncode != 0
    assert "values don't meet the specifications of the schema" in out.stderr, out.stderr
    assert message in out.stderr, out.stderr
    assert control_plane.helm("status", release, "-n", k8s_namespace, check=False).returncode != 0


# ----------------------------------------------------------------------------- install on the API server


def _can_i(cp, sa: str, verb: str, resource: str, namespace: str | None) -> bool:
    args = ["auth", "can-i", verb, resource, f"--as={sa}"]
    args += ["-n", namespace] if namespace else ["--all-namespaces"]
    out = cp.kubectl(*args, check=False)
    assert out.stdout.strip() in ("yes", "no"), f"kubectl {' '.join(args)}: {out.stdout} {out.stderr}"
    return out.stdout.strip() == "yes"


def _assert_operator_permissions(cp, sa: str, namespace: str) -> None:
    allowed = [("patch", f"mailselfchecks.{GROUP}/status"), ("patch", f"mailselfchecks.{GROUP}"),
               ("watch", f"mailselfchecks.{GROUP}"), ("list", f"mailselfchecks.{GROUP}"),
               ("create", "jobs.batch"), ("delete", "jobs.batch"), ("watch", "jobs.batch"),
               ("list", "pods"), ("get", "pods"), ("create", "events")]
    denied = [("get", "secrets"), ("list", "secrets"), ("watch", "secrets"), ("create", "pods"),
              ("delete", "pods"), ("create", f"mailselfchecks.{GROUP}"), ("delete", f"mailselfchecks.{GROUP}"),
              ("update", "jobs.batch"), ("get", "configmaps"), ("create", "serviceaccounts/token"),
              ("update", "deployments.apps")]
    wrong = [f"{v} {r}: expected yes" for v, r in allowed if not _can_i(cp, sa, v, r, namespace)]
    wrong += [f"{v} {r}: expected no" for v, r in denied if _can_i(cp, sa, v, r, namespace)]
    assert not wrong, f"{sa} in {namespace}: {wrong}"


def _manifest_objects(cp, release: str, namespace: str) -> list[dict[str, Any]]:
    out = cp.helm("get", "manifest", release, "-n", namespace)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _exists(cp, obj: dict[str, Any], namespace: str) -> bool:
    kind = obj["kind"] if obj["apiVersion"] in ("v1",) else f"{obj['kind']}.{obj['apiVersion'].split('/')[0]}"
    ns = obj["metadata"].get("namespace") or namespace
    out = cp.kubectl("get", kind, obj["metadata"]["name"], "-n", ns, "-o", "name", check=False)
    return out.returncode == 0


@pytest.mark.cluster
def test_install_upgrade_uninstall(control_plane, k8s_namespace, tmp_path):
    """Cluster-wide install, upgrade to a namespaced install, uninstall: every object accepted."""
    cp, ns = control_plane, k8s_namespace
    release = f"sc-{uuid.uuid4().hex[:6]}"
    fullname = f"{release}-selfcheck"
    sa = f"system:serviceaccount:{ns}:{fullname}"
    values = {"sample": {"enabled": True}, "metrics": {"service": {"enabled": True}},
              "grafanaDashboard": {"enabled": True}}
    try:
        # Install the packaged chart (what users get): the CRD copy and the dashboard must be in it.
        cp.helm("package", str(CHART), "-d", str(tmp_path))
        (package,) = tmp_path.glob("selfcheck-*.tgz")
        with tarfile.open(package) as tar:
            assert {"selfcheck/crds/mailselfchecks.yaml", "selfcheck/dashboards/mail-selfcheck.json",
                    "selfcheck/values.schema.json"} <= set(tar.getnames())
        t0 = time.monotonic()
        out = cp.helm("install", release, str(package), "-n", ns, "-f", str(_values_file(tmp_path, "install", values)))
        install_s = time.monotonic() - t0
        assert "STATUS: deployed" in out.stdout, out.stdout
        assert "cluster-wide install" in out.stdout  # NOTES.txt
        crd = json.loads(cp.kubectl("get", "crd", f"mailselfchecks.{GROUP}", "-o", "json").stdout)
        assert any(c["type"] == "Established" and c["status"] == "True" for c in crd["status"]["conditions"])
        objects = _manifest_objects(cp, release, ns)
        assert {o["kind"] for o in objects} == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment",
                                                "Service", "ConfigMap", "MailSelfcheck"}
        missing = [f"{o['kind']}/{o['metadata']['name']}" for o in objects if not _exists(cp, o, ns)]
        assert not missing, f"not in the API server after install: {missing}"
        deploy = json.loads(cp.kubectl("-n", ns, "get", "deploy", fullname, "-o", "json").stdout)
        assert deploy["spec"]["strategy"]["type"] == "Recreate"

        # Cluster-wide: the same permissions in the release namespace and in any other.
        _assert_operator_permissions(cp, sa, ns)
        _assert_operator_permissions(cp, sa, "default")
        assert _can_i(cp, sa, "list", "customresourcedefinitions.apiextensions.k8s.io", None)
        assert not _can_i(cp, sa, "list", "secrets", None)
        assert not _can_i(cp, sa, "create", "customresourcedefinitions.apiextensions.k8s.io", None)
        # Aggregation: namespace `view` users read MailSelfchecks, `edit` users create them.
        assert wait_until(lambda: "mailselfchecks" in cp.kubectl("get", "clusterrole", "edit", "-o", "json").stdout,
                           30, "aggregation of the edit ClusterRole")

        # Upgrade: cluster-wide -> namespaced (Role in the release namespace only).
        t0 = time.monotonic()
        out = cp.helm("upgrade", release, str(CHART), "-n", ns, "--reuse-values",
                      "--set-json", 'watchNamespaces=["{{ .Release.Namespace }}"]', "--set", "operator.verbose=true")
        upgrade_s = time.monotonic() - t0
        assert "REVISION: 2" in out.stdout and f"It watches MailSelfchecks in: {ns}" in out.stdout
        args = json.loads(cp.kubectl("-n", ns, "get", "deploy", fullname, "-o", "json").stdout)[
            "spec"]["template"]["spec"]["containers"][0]["args"]
        assert f"--namespace={ns}" in args and "--verbose" in args
        assert cp.kubectl("get", "clusterrole", fullname, check=False).returncode != 0, "old ClusterRole kept"
        cp.kubectl("-n", ns, "get", "role", fullname)
        cp.kubectl("get", "clusterrole", f"{fullname}-discovery")
        _assert_operator_permissions(cp, sa, ns)
        assert not _can_i(cp, sa, "create", "jobs.batch", "default")
        assert not _can_i(cp, sa, "patch", f"mailselfchecks.{GROUP}/status", "default")
        assert _can_i(cp, sa, "watch", "namespaces", None)
        objects = _manifest_objects(cp, release, ns)
        missing = [f"{o['kind']}/{o['metadata']['name']}" for o in objects if not _exists(cp, o, ns)]
        assert not missing, f"not in the API server after upgrade: {missing}"

        t0 = time.monotonic()
        cp.helm("uninstall", release, "-n", ns, "--wait")
        uninstall_s = time.monotonic() - t0
        release = ""
        left = [f"{o['kind']}/{o['metadata']['name']}" for o in objects if _exists(cp, o, ns)]
        assert not left, f"left after uninstall: {left}"
        assert cp.kubectl("get", "crd", f"mailselfchecks.{GROUP}", check=False).returncode == 0, (
            "Helm keeps CRDs from crds/ on uninstall")
        print(f"helm install {install_s:.1f}s, upgrade {upgrade_s:.1f}s, uninstall {uninstall_s:.1f}s")
    finally:
        if release:
            cp.helm("uninstall", release, "-n", ns, check=False)


# ----------------------------------------------------------------------------- the real operator with the chart's RBAC


FORBIDDEN = re.compile(r"[Ff]orbidden|Not enough permissions|HTTP 403|status.{0,3}403|"
                       r"cannot (list|watch|get|patch|create|delete) resource")


@pytest.mark.cluster
@pytest.mark.parametrize("mode", ["default", "namespaced"])
def test_operator_reconciles_with_chart_rbac(control_plane, k8s_namespace, tmp_path, mode):
    """The real operator, as the chart's ServiceAccount, runs a check end to end without a single
    permission error in its log, in both install modes: ``default`` (the chart's default values:
    every namespace, ClusterRole; the MailSelfcheck lives in a namespace the operator was never
    told about) and ``namespaced`` (``watchNamespaces: ["{{ .Release.Namespace }}"]``, Roles).

    The process runs the rendered Deployment's own ``command`` + ``args`` + ``env`` (only the
    ports are chosen free; :mod:`tests.harness.chart_operator`), so the chart's command line,
    liveness endpoint and metrics port are exercised too.

    (With ``rbac.clusterDiscovery=false`` kopf retries its cluster-scoped Namespace/CRD listing
    9 times, logging ERRORs, and falls back after ~55 s; measured, not part of the tier.)
    """
    cp, ns = control_plane, k8s_namespace
    if mode == "default":
        op = ChartOperator(cp, f"ops-{uuid.uuid4().hex[:6]}", tmp_path / "operator.log",
                           values={"operator": {"verbose": True}})
    else:
        op = ChartOperator(cp, ns, tmp_path / "operator.log",
                           values={"watchNamespaces": ["{{ .Release.Namespace }}"], "operator": {"verbose": True}})
    try:
        op.install()
        kubeconfig = Path(op._process_env["KUBECONFIG"])
        whoami = subprocess.run([str(cp.kubectl_bin), f"--kubeconfig={kubeconfig}", "auth", "whoami", "-o", "json"],
                                capture_output=True, text=True, timeout=30)
        assert f"system:serviceaccount:{op.namespace}:{op.fullname}" in whoami.stdout, whoami.stderr
        if mode == "default":
            assert not [a for a in op.argv if a.startswith("--namespace")]
        else:
            assert f"--namespace={ns}" in op.argv
        assert op.env["POD_NAME"] == op.pod_name  # downward API, as the kubelet resolves it

        cp.kubectl("-n", ns, "create", "secret", "generic", "creds",
                   "--from-literal=secret=s3cr3t-probe", "--from-literal=imap-password=imap-pw")
        result = json.dumps({"success": True, "send_time": 0.05, "reception_time": 0.4})
        selfcheck = {
            "apiVersion": f"{GROUP}/v1alpha1", "kind": "MailSelfcheck",
            "metadata": {"name": "rbac", "namespace": ns},
            "spec": {
                "from": "probe@example.test", "to": "probe@example.test", "interval": 3600, "timeout": 10,
                "smtp": {"host": "127.0.0.1", "port": 2525, "security": "plain"},
                "imap": {"host": "127.0.0.1", "security": "plain",
                         "passwordSecretRef": {"name": "creds", "key": "imap-password"}},
                "secretRef": {"name": "creds", "key": "secret"},
                # The benchmark's trick: a trivial probe that writes a fixed result (this test is about RBAC).
                "job": {"command": [sys.executable, "-c", "import sys; open(sys.argv[1], 'w').write(sys.argv[2])",
                                    "/dev/termination-log", result]},
            },
        }
        # The liveness probe's endpoint answers (kopf's /healthz on the chart's health port).
        op.start()
        t0 = time.monotonic()
        cp.kubectl("apply", "-f", "-", input=json.dumps(selfcheck))

        def status():
            out = cp.kubectl("-n", ns, "get", "mailselfcheck", "rbac", "-o", "json", check=False)
            return (json.loads(out.stdout).get("status") or {}) if out.returncode == 0 else {}

        st = wait_until(lambda: op.alive() and status().get("success") is not None and status(),
                        90, "a harvested result", diag=lambda: op.text()[-1500:])
        check_s = time.monotonic() - t0
        assert st["success"] is True, st
        assert st["receptionTime"] == 0.4 and st["consecutiveFailures"] == 0
        jobs = json.loads(cp.kubectl("-n", ns, "get", "jobs", "-o", "json").stdout)["items"]
        assert len(jobs) == 1 and jobs[0]["metadata"]["ownerReferences"][0]["name"] == "rbac"
        assert jobs[0]["spec"]["template"]["spec"]["containers"][0]["image"] == op.env["MAIL_SELFCHECK_PROBE_IMAGE"]
        job_text = json.dumps(jobs[0])
        assert "s3cr3t-probe" not in job_text and "imap-pw" not in job_text
        events = json.loads(cp.kubectl("-n", ns, "get", "events", "-o", "json").stdout)["items"]
        assert any(e.get("reason") == "CheckSucceeded" and e["involvedObject"]["name"] == "rbac" for e in events), (
            "the operator could not post its transition Event")

        # The chart's metrics port serves the resource's series.
        scrape = op.metrics()
        success = [line for line in scrape.splitlines() if line.startswith("mail_selfcheck_success{")
                   and 'name="rbac"' in line and f'namespace="{ns}"' in line]
        assert success and success[0].endswith(" 1.0"), scrape[-2000:]

        # History limit 0 + run-now: a second check, then the operator deletes finished Jobs
        # (jobs delete) and removes the run-now annotation (mailselfchecks patch).
        cp.kubectl("-n", ns, "patch", "mailselfcheck", "rbac", "--type=merge",
                   "-p", json.dumps({"spec": {"successfulJobsHistoryLimit": 0}}))
        cp.kubectl("-n", ns, "annotate", "mailselfcheck", "rbac", f"{GROUP}/run-now=1")
        wait_until(lambda: len(status().get("history") or []) >= 2, 60, "the run-now check")
        wait_until(lambda: not json.loads(cp.kubectl("-n", ns, "get", "jobs", "-o", "json").stdout)["items"],
                   30, "the operator to delete Jobs beyond the history limit")
        annotations = json.loads(cp.kubectl("-n", ns, "get", "mailselfcheck", "rbac", "-o", "json").stdout)[
            "metadata"].get("annotations") or {}
        assert f"{GROUP}/run-now" not in annotations

        # Deletion: nothing holds the resource (no finalizer); the operator stops its loop.
        cp.kubectl("-n", ns, "delete", "mailselfcheck", "rbac", "--wait=true", timeout=60)
        wait_until(lambda: f"[{ns}/rbac] deleted: reconcile loop stopped" in op.text(), 20,
                   "the operator to stop the deleted resource's loop", diag=lambda: op.text()[-1500:])
        assert op.alive()
        denied = [line for line in op.text().splitlines() if FORBIDDEN.search(line)]
        assert not denied, "permission errors in the operator log:\n" + "\n".join(denied[:20])
        assert "Traceback" not in op.text()
        print(f"operator as {op.fullname} ({mode}): first result {check_s:.1f}s after apply")
    finally:
        op.uninstall()
        if op.namespace != ns:
            cp.kubectl("delete", "namespace", op.namespace, "--wait=false", check=False)


@pytest.mark.cluster
def test_failed_upgrade_creates_nothing(control_plane, k8s_namespace, tmp_path):
    """An upgrade to a watched namespace that does not exist fails before creating anything (no
    ``-discovery`` ClusterRole of the failed revision left behind), with a message saying what to do."""
    cp, ns = control_plane, k8s_namespace
    release = f"sc-{uuid.uuid4().hex[:6]}"
    fullname = f"{release}-selfcheck"
    missing = f"missing-{uuid.uuid4().hex[:6]}"
    try:
        cp.helm("install", release, str(CHART), "-n", ns)
        out = cp.helm("upgrade", release, str(CHART), "-n", ns, "--set-json", f'watchNamespaces=["{missing}"]',
                      check=False)
        assert out.returncode != 0
        assert f'watchNamespaces: namespace "{missing}" does not exist; create it first' in out.stderr, out.stderr
        assert cp.kubectl("get", "clusterrole", f"{fullname}-discovery", check=False).returncode != 0
        assert cp.kubectl("get", "clusterrolebinding", f"{fullname}-discovery", check=False).returncode != 0
        cp.kubectl("get", "clusterrole", fullname)  # revision 1 untouched
        history = json.loads(cp.helm("history", release, "-n", ns, "-o", "json").stdout)
        assert [h["status"] for h in history] == ["deployed"], history
        # once the namespace exists, the same upgrade goes through
        cp.kubectl("create", "namespace", missing)
        cp.helm("upgrade", release, str(CHART), "-n", ns, "--set-json", f'watchNamespaces=["{missing}"]')
        cp.kubectl("-n", missing, "get", "role", fullname)
    finally:
        cp.helm("uninstall", release, "-n", ns, check=False)
        cp.kubectl("delete", "namespace", missing, "--wait=false", check=False)
