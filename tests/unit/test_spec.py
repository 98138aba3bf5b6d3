"""The MailSelfcheck models and the CRD generated from them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from mail_selfcheck.models.spec import (
    GROUP,
    MailSelfcheckSpec,
    MailSelfcheckStatus,
    crd_manifest,
    crd_yaml,
    openapi_schema,
)

REPO = Path(__file__).resolve().parents[2]

VALID = {
    "from": "sender@example.com",
    "to": "receiver@example.com",
    "smtp": {"host": "smtp.example.com", "passwordSecretRef": {"name": "mail", "key": "smtp"}},
    "imap": {"host": "imap.example.com", "passwordSecretRef": {"name": "mail", "key": "imap"}},
    "secretRef": {"name": "mail", "key": "secret"},
}


def test_crd_file_is_generated_from_the_models():
    assert (REPO / "crds" / "mailselfchecks.yaml").read_text() == crd_yaml(), "run: mail-selfcheck crd > crds/mailselfchecks.yaml"


def test_crd_shape():
    crd = crd_manifest()
    assert crd["metadata"]["name"] == f"mailselfchecks.{GROUP}"
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    assert crd["spec"]["names"]["shortNames"]
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert {"Success", "Send", "Reception", "Last Check", "Error"} <= set(columns)
    assert columns["Error"]["priority"] == 1  # -o wide only


def _walk(node):
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def test_schema_is_structural():
    schema = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for node in _walk(schema):
        if isinstance(node, dict) and ("properties" in node or "items" in node):
            assert not {"$ref", "anyOf", "allOf", "oneOf", "title"} & set(node), node
            assert "type" in node


def test_schema_rules():
    spec = openapi_schema(MailSelfcheckSpec)
    props = spec["properties"]
    assert props["interval"]["minimum"] == 10 and props["interval"]["default"] == 600
    assert props["timeout"]["default"] == 60 and props["timeout"]["exclusiveMinimum"] is True
    assert props["smtp"]["properties"]["security"]["enum"] == ["starttls", "tls", "plain"]
    assert props["imap"]["properties"]["security"]["enum"] == ["tls", "starttls", "plain"]
    assert "secretRef" in spec["required"] and props["imap"]["required"] == ["host"]
    imap_rules = [r["message"] for r in props["imap"]["x-kubernetes-validations"]]
    assert imap_rules == ["passwordSecretRef is required unless auth is oauth2"]
    rules = [r["message"] for r in spec["x-kubernetes-validations"]]
    assert "timeout must be smaller than interval" in rules
    assert props["from"]["x-kubernetes-validations"][0]["message"].startswith("must be a mail address")
    quantity = props["job"]["properties"]["resources"]["properties"]["limits"]["additionalProperties"]
    assert quantity["x-kubernetes-int-or-string"] is True and "type" not in quantity
    assert quantity["x-kubernetes-validations"][0]["message"].startswith("must be a Kubernetes quantity")


def test_status_schema_has_the_documented_fields():
    props = openapi_schema(MailSelfcheckStatus)["properties"]
    for name in ("lastScheduleTime", "lastCompletionTime", "lastSuccessTime", "success", "error", "sendTime",
                 "receptionTime", "consecutiveFailures", "active", "history", "conditions"):
        assert name in props
    assert "observedGeneration" in props["conditions"]["items"]["properties"]


def test_valid_spec_defaults():
    spec = MailSelfcheckSpec.model_validate(VALID)
    assert (spec.interval, spec.timeout, spec.suspend) == (600, 60, False)
    assert spec.smtp.security == "starttls" and spec.imap.security == "tls" and spec.imap.folder == "INBOX"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"from": "not-an-address"}, "must be a mail address"),
        ({"interval": 0}, "greater than or equal to 10"),
        ({"interval": 20, "timeout": 20}, "timeout must be smaller than interval"),
        ({"smtp": {"host": "h", "security": "ssl", "passwordSecretRef": {"name": "a", "key": "b"}}}, "starttls"),
        ({"smtp": {"host": "h"}}, "passwordSecretRef is required"),
        ({"job": {"resources": {"limits": {"cpu": "lots"}}}}, "must be a Kubernetes quantity"),
        ({"job": {"nodeSelector": {"disktype": "fast ssd"}}}, "must be a label value"),
        ({"job": {"serviceAccountName": "Not_Valid"}}, "should match pattern"),
        ({"job": {"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}}, "must not have a value"),
        ({"job": {"tolerations": [{"operator": "Equal", "value": "v"}]}}, "without a key must have operator Exists"),
    ],
)
def test_invalid_specs_are_refused_like_the_api_server_does(change, message):
    with pytest.raises(ValidationError, match=message):
        MailSelfcheckSpec.model_validate({**VALID, **change})


def test_valid_job_settings_pass():
    spec = MailSelfcheckSpec.model_validate({**VALID, "job": {
        "resources": {"requests": {"cpu": "50m", "memory": 67108864}, "limits": {"example.com/gpu": "1", "memory": "64Mi"}},
        "nodeSelector": {"kubernetes.io/os": "linux", "empty": ""},
        "tolerations": [{"operator": "Exists"}, {"key": "mail", "operator": "Equal", "value": "yes"}],
        "serviceAccountName": "probe.sa-1"}})
    assert spec.job.resources.requests["cpu"] == "50m"


OAUTH2 = {"provider": "microsoft", "tenant": "contoso.onmicrosoft.com", "clientId": "app",
          "clientSecretRef": {"name": "m", "key": "client-secret"}}


def test_oauth2_spec_replaces_passwords():
    data = {**VALID, "smtp": {"host": "smtp.office365.com", "auth": "oauth2"},
            "imap": {"host": "outlook.office365.com", "auth": "oauth2", "junkFolders": ["Junk Email"]}, "oauth2": OAUTH2}
    spec = MailSelfcheckSpec.model_validate(data)
    assert spec.smtp.auth == spec.imap.auth == "oauth2" and spec.oauth2.provider == "microsoft"
    assert MailSelfcheckSpec.model_validate({**VALID, "smtp": {"host": "mx", "port": 25, "auth": "none"}}).smtp.auth == "none"


@pytest.mark.parametrize("change, message", [
    ({"imap": {"host": "h", "auth": "oauth2"}}, "oauth2 is required when smtp.auth or imap.auth is oauth2"),
    ({"imap": {"host": "h"}}, "passwordSecretRef is required unless auth is oauth2"),
    ({"oauth2": {**OAUTH2, "tenant": None}}, "provider microsoft needs tenant"),
    ({"oauth2": {"provider": "generic", "clientId": "c", "clientSecretRef": {"name": "a", "key": "b"}}},
     "provider generic needs tokenUrl"),
    ({"oauth2": {"provider": "google", "clientId": "c"}}, "oauth2 needs clientSecretRef"),
])
def test_invalid_oauth2_specs(change, message):
    data = {k: v for k, v in {**VALID, **change}.items()}
    if "oauth2" in change:
        data["oauth2"] = {k: v for k, v in change["oauth2"].items() if v is not None}
    with pytest.raises(ValidationError, match=message):
        MailSelfcheckSpec.model_validate(data)


@pytest.mark.parametrize("webhook, message", [
    ({"kind": "gatus"}, "kind gatus needs tokenSecretRef"),
    ({"kind": "healthchecks", "failureUrlSecretRef": {"name": "a", "key": "b"}}, "failureUrlSecretRef is for kind generic"),
    ({"kind": "pagerduty"}, "generic"),
])
def test_invalid_webhook_settings(webhook, message):
    with pytest.raises(ValidationError, match=message):
        MailSelfcheckSpec.model_validate({**VALID, "webhook": webhook})


def test_missing_secret_ref():
    data = dict(VALID)
    del data["secretRef"]
    with pytest.raises(ValidationError, match="secretRef"):
        MailSelfcheckSpec.model_validate(data)


def test_yaml_round_trip():
    assert yaml.safe_load(crd_yaml()) == crd_manifest()


def _undescribed(node, path="") -> list[str]:
    missing = []
    for name, sub in (node.get("properties") or {}).items():
        where = f"{path}.{name}"
        if where in (".apiVersion", ".kind", ".metadata"):
            continue
        if not sub.get("description"):
            missing.append(where)
        missing += _undescribed(sub, where)
        if "items" in sub:
            missing += _undescribed(sub["items"], where + "[]")
        if isinstance(sub.get("additionalProperties"), dict):
            missing += _undescribed(sub["additionalProperties"], where + "{}")
    return missing


def test_every_field_is_described_for_kubectl_explain():
    schema = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert _undescribed(schema) == []


def test_conditions_are_a_map_and_times_are_date_time():
    status = openapi_schema(MailSelfcheckStatus)["properties"]
    assert status["conditions"]["x-kubernetes-list-type"] == "map"
    assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
    for name in ("lastScheduleTime", "lastCompletionTime", "lastSuccessTime"):
        assert status[name]["format"] == "date-time", name
    assert status["conditions"]["items"]["properties"]["lastTransitionTime"]["format"] == "date-time"
    resources = openapi_schema(MailSelfcheckSpec)["properties"]["job"]["properties"]["resources"]
    assert "{requests: {cpu: 100m, memory: 64Mi}" in resources["description"]
