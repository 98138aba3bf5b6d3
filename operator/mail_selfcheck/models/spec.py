"""The ``MailSelfcheck`` custom resource: spec and status models, and the CRD generated from them.

These pydantic models are the single source of truth: :func:`crd_manifest` derives the
CRD's structural OpenAPI v3 schema from them (``crds/mailselfchecks.yaml`` is its output,
checked by ``tests/unit/test_spec.py``), and the controller parses every resource with
:meth:`MailSelfcheckSpec.model_validate`, so the API server and the controller agree.

Cross-field rules are Kubernetes CEL validation rules (``x-kubernetes-validations`` with a
human ``message``), see
https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#validation-rules;
the same rules are re-checked by pydantic validators so a model built in Python cannot hold
what the API server would reject.

All durations are seconds. Secret values (passwords, the probe secret, the webhook URL,
which carries a token) appear only as references to Secret keys; the operator passes them
to the Job with ``env[].valueFrom.secretKeyRef`` and never reads them.
"""

from __future__ import annotations

import copy
import re
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator
from pydantic.alias_generators import to_camel

from .common import ADDRESS_PATTERN, DEFAULT_INTERVAL, DEFAULT_TIMEOUT, ImapSecurity, SmtpSecurity, WebhookKind

GROUP = "selfcheck.mail-selfcheck.dev"
VERSION = "v1alpha1"
KIND = "MailSelfcheck"
PLURAL = "mailselfchecks"
SINGULAR = "mailselfcheck"
SHORT_NAMES = ["msc", "selfcheck"]
API_VERSION = f"{GROUP}/{VERSION}"

#: Smallest accepted ``interval`` (seconds).
MIN_INTERVAL = 10
#: Number of results kept in ``status.history``.
STATUS_HISTORY_LIMIT = 10

_ADDRESS = re.compile(ADDRESS_PATTERN)
_ADDRESS_MESSAGE = "must be a mail address like user@example.com"


def _address_rule() -> dict[str, Any]:
    # CEL raw string: the pattern holds quotes and backslashes but no double quote.
    assert '"' not in ADDRESS_PATTERN
    return {"rule": f'self.matches(r"{ADDRESS_PATTERN}")', "message": _ADDRESS_MESSAGE}


Address = Annotated[
    str,
    Field(min_length=3, max_length=254, json_schema_extra={"x-kubernetes-validations": [_address_rule()]}),
]
Port = Annotated[int, Field(ge=1, le=65535)]
DNS_NAME = Annotated[str, Field(min_length=1, max_length=253)]

# What the Job API validates about the pod template, checked at admission so that a spec the
# API server would accept but the Job API refuse (HTTP 422) is refused with a readable
# message instead. Patterns are k8s.io/apimachinery's: resource.Quantity (its OpenAPI
# pattern), validation.IsValidLabelValue,
# IsDNS1123Subdomain (service account names). CEL regexes are RE2.
QUANTITY_PATTERN = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
_LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_QUANTITY_MESSAGE = "must be a Kubernetes quantity such as 100m, 0.5, 64Mi or 1G"
_LABEL_MESSAGE = "must be a label value: at most 63 letters, digits, -, _ or ., starting and ending with a letter or digit"
#: Most entries of a node selector or a requests/limits map, and longest quantity string:
#: they bound the estimated cost of the CEL rules, which the API server checks when the CRD
#: is applied. Map *keys* cannot be bounded in a structural schema, so a rule over them costs
#: too much (measured: 13x the budget); invalid keys are reported from the Job API instead
#: (``Ready=False``, reason ``InvalidJobSpec``).
MAX_MAP_ENTRIES = 32
MAX_QUANTITY_LENGTH = 64


def _cel(pattern: str) -> str:
    assert '"' not in pattern
    return f'r"{pattern}"'


def _check_quantity(value: int | str) -> int | str:
    if isinstance(value, str) and not re.match(QUANTITY_PATTERN, value):
        raise ValueError(_QUANTITY_MESSAGE)
    return value


Quantity = Annotated[
    int | str,
    AfterValidator(_check_quantity),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "maxLength": MAX_QUANTITY_LENGTH,
            "x-kubernetes-validations": [
                {"rule": f"type(self) == int || string(self).matches({_cel(QUANTITY_PATTERN)})", "message": _QUANTITY_MESSAGE}
            ],
        }
    ),
]


def _check_label_value(value: str) -> str:
    if not re.match(_LABEL_VALUE, value):
        raise ValueError(_LABEL_MESSAGE)
    return value


LabelValue = Annotated[
    str,
    Field(
        max_length=63,
        json_schema_extra={"x-kubernetes-validations": [{"rule": f"self.matches({_cel(_LABEL_VALUE)})", "message": _LABEL_MESSAGE}]},
    ),
    AfterValidator(_check_label_value),
]


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class SecretKeyRef(_Model):
    """A key of a Secret in the resource's namespace (``core/v1 SecretKeySelector``)."""

    name: DNS_NAME = Field(description="Name of the Secret, in the MailSelfcheck's namespace.")
    key: str = Field(min_length=1, max_length=253, description="Key within the Secret.")


class ConfigMapKeyRef(_Model):
    """A key of a ConfigMap in the resource's namespace (``core/v1 ConfigMapKeySelector``)."""

    name: DNS_NAME = Field(description="Name of the ConfigMap, in the MailSelfcheck's namespace.")
    key: str = Field(min_length=1, max_length=253, description="Key within the ConfigMap.")


class CaBundleRef(_Model):
    """PEM CA certificates to verify the servers with, from exactly one ConfigMap or Secret key."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.configMapKeyRef) != has(self.secretKeyRef)",
                    "message": "set exactly one of configMapKeyRef or secretKeyRef",
                }
            ]
        }
    )

    config_map_key_ref: ConfigMapKeyRef | None = None
    secret_key_ref: SecretKeyRef | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "CaBundleRef":
        if (self.config_map_key_ref is None) == (self.secret_key_ref is None):
            raise ValueError("set exactly one of configMapKeyRef or secretKeyRef")
        return self


class SmtpEndpoint(_Model):
    """Where and how the probe submits its message (RFC 6409 submission)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.auth != 'password' || self.security == 'plain' || has(self.passwordSecretRef)",
                    "message": "passwordSecretRef is required unless security is plain (SMTP AUTH needs TLS) or auth is "
                    "oauth2 or none",
                }
            ]
        }
    )

    host: DNS_NAME = Field(description="Submission server host name or IP address.")
    port: Port | None = Field(None, description="Default: 587 for starttls and plain, 465 for tls.")
    security: SmtpSecurity = Field("starttls", description="starttls (RFC 3207), tls (implicit, RFC 8314) or plain.")
    auth: Literal["password", "oauth2", "none"] = Field(
        "password",
        description="password (SASL PLAIN/LOGIN), oauth2 (a token from spec.oauth2, SASL OAUTHBEARER or XOAUTH2), "
        "or none (no AUTH: an MX port 25, a relay that authorises by IP).",
    )
    username: str | None = Field(None, max_length=254, description="AUTH user name. Default: the from address.")
    password_secret_ref: SecretKeyRef | None = Field(None, description="Secret key holding the SMTP AUTH password.")
    oauth2_refresh_token_ref: SecretKeyRef | None = Field(
        None, description="oauth2, delegated: Secret key holding FROM's refresh token (else app-only)."
    )

    @model_validator(mode="after")
    def _password(self) -> "SmtpEndpoint":
        if self.auth == "password" and self.security != "plain" and self.password_secret_ref is None:
            raise ValueError(
                "passwordSecretRef is required unless security is plain (SMTP AUTH needs TLS) or auth is oauth2 or none"
            )
        return self


class ImapEndpoint(_Model):
    """Where and how the probe waits for its message (RFC 9051 / RFC 3501 IMAP)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.auth != 'password' || has(self.passwordSecretRef)",
                    "message": "passwordSecretRef is required unless auth is oauth2",
                }
            ]
        }
    )

    host: DNS_NAME = Field(description="IMAP server host name or IP address.")
    port: Port | None = Field(None, description="Default: 993 for tls, 143 for starttls and plain.")
    security: ImapSecurity = Field("tls", description="tls (implicit, RFC 8314), starttls or plain.")
    auth: Literal["password", "oauth2"] = Field(
        "password", description="password (LOGIN) or oauth2 (a token from spec.oauth2, SASL OAUTHBEARER or XOAUTH2)."
    )
    username: str | None = Field(None, max_length=254, description="LOGIN user name. Default: the to address.")
    password_secret_ref: SecretKeyRef | None = Field(None, description="Secret key holding the IMAP password.")
    oauth2_refresh_token_ref: SecretKeyRef | None = Field(
        None, description="oauth2, delegated: Secret key holding TO's refresh token (else app-only)."
    )
    folder: str = Field("INBOX", min_length=1, max_length=255, description="Folder the message is expected in.")
    junk_folders: list[Annotated[str, Field(min_length=1, max_length=255)]] | None = Field(
        None,
        max_length=16,
        description="Extra junk folder names, looked at besides \\Junk and the known names (Junk Email, Spam, ...).",
    )

    @model_validator(mode="after")
    def _password(self) -> "ImapEndpoint":
        if self.auth == "password" and self.password_secret_ref is None:
            raise ValueError("passwordSecretRef is required unless auth is oauth2")
        return self


class OAuth2Settings(_Model):
    """Where the probe gets OAuth2 access tokens (for smtp.auth / imap.auth = oauth2), fresh every run.

    microsoft: an Entra ID app (IMAP.AccessAsApp / SMTP.SendAsApp, admin consent) and the tenant;
    google: a service account key with domain-wide delegation (scope https://mail.google.com/);
    generic: any RFC 6749 token endpoint (client credentials, or refresh tokens per side).
    """

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "self.provider != 'generic' || has(self.tokenUrl)", "message": "provider generic needs tokenUrl"},
                {"rule": "self.provider != 'microsoft' || has(self.tenant)", "message": "provider microsoft needs tenant"},
                {
                    "rule": "has(self.clientSecretRef) || has(self.clientCertificateRef) || has(self.serviceAccountKeyRef)",
                    "message": "oauth2 needs clientSecretRef, clientCertificateRef (microsoft) or serviceAccountKeyRef (google)",
                },
                {
                    "rule": "has(self.clientId) || (self.provider == 'google' && has(self.serviceAccountKeyRef))",
                    "message": "oauth2 needs clientId (except google with a service account key)",
                },
            ]
        }
    )

    provider: Literal["generic", "microsoft", "google"] = Field("generic", description="generic, microsoft or google.")
    tenant: str | None = Field(None, max_length=253, description="microsoft: tenant ID or domain (contoso.onmicrosoft.com).")
    token_url: str | None = Field(None, max_length=2048, description="generic: the token endpoint URL (https).")
    client_id: str | None = Field(None, max_length=253, description="OAuth2 client (application) ID.")
    scope: str | None = Field(
        None, max_length=1024,
        description="Space-separated scopes. Default: https://outlook.office365.com/.default (microsoft app-only), "
        "https://mail.google.com/ (google); generic: none.",
    )
    mechanism: Literal["XOAUTH2", "OAUTHBEARER"] | None = Field(
        None, description="Force a SASL mechanism. Default: OAUTHBEARER (RFC 7628) when offered, else XOAUTH2."
    )
    client_secret_ref: SecretKeyRef | None = Field(None, description="Secret key holding the client secret.")
    client_certificate_ref: SecretKeyRef | None = Field(
        None, description="microsoft: Secret key holding the app's PEM private key and certificate."
    )
    service_account_key_ref: SecretKeyRef | None = Field(
        None, description="google: Secret key holding the service account key JSON."
    )

    @model_validator(mode="after")
    def _complete(self) -> "OAuth2Settings":
        if self.provider == "generic" and not self.token_url:
            raise ValueError("provider generic needs tokenUrl")
        if self.provider == "microsoft" and not self.tenant:
            raise ValueError("provider microsoft needs tenant")
        if not (self.client_secret_ref or self.client_certificate_ref or self.service_account_key_ref):
            raise ValueError("oauth2 needs clientSecretRef, clientCertificateRef (microsoft) or serviceAccountKeyRef (google)")
        if not self.client_id and not (self.provider == "google" and self.service_account_key_ref):
            raise ValueError("oauth2 needs clientId (except google with a service account key)")
        return self


class TlsSettings(_Model):
    """Server certificate verification, shared by SMTP and IMAP."""

    ca_bundle: CaBundleRef | None = Field(None, description="PEM CA bundle. Default: the image's system CAs.")
    insecure_skip_verify: bool = Field(False, description="Do not verify server certificates (lab use only).")


class ResourceRequirements(_Model):
    """Compute resources of the probe container (``core/v1 ResourceRequirements``), e.g.
    ``{requests: {cpu: 100m, memory: 64Mi}, limits: {memory: 128Mi}}``."""

    requests: dict[str, Quantity] | None = Field(
        None, max_length=MAX_MAP_ENTRIES, description="Requested amounts, e.g. {cpu: 50m, memory: 64Mi}."
    )
    limits: dict[str, Quantity] | None = Field(None, max_length=MAX_MAP_ENTRIES, description="Upper limits, e.g. {memory: 128Mi}.")


class Toleration(_Model):
    """A pod toleration (``core/v1 Toleration``)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
                    "message": "a toleration with operator Exists must not have a value",
                },
                {
                    "rule": "has(self.key) && self.key != '' || has(self.operator) && self.operator == 'Exists'",
                    "message": "a toleration without a key must have operator Exists",
                },
            ]
        }
    )

    key: str | None = Field(None, max_length=317, description="Taint key to tolerate; empty with operator Exists: every taint.")
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Equal (default: key and value match) or Exists.")
    value: str | None = Field(None, description="Taint value for operator Equal (none with Exists).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate; empty: every effect."
    )
    toleration_seconds: int | None = Field(
        None, description="NoExecute only: seconds the pod stays bound after the taint appears."
    )

    @model_validator(mode="after")
    def _value_rules(self) -> "Toleration":
        if self.operator == "Exists" and self.value:
            raise ValueError("a toleration with operator Exists must not have a value")
        if not self.key and self.operator != "Exists":
            raise ValueError("a toleration without a key must have operator Exists")
        return self


class JobSettings(_Model):
    """Settings of the probe Job's pod."""

    image: str | None = Field(
        None, min_length=1, description="Probe image. Default: the operator's MAIL_SELFCHECK_PROBE_IMAGE."
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        None, description="Image pull policy of the probe container. Default: Kubernetes' (IfNotPresent unless :latest)."
    )
    command: list[str] | None = Field(
        None,
        min_length=1,
        description="Container command. Default: mail-selfcheck run --json --result-file /dev/termination-log. "
        "It must write the result JSON to /dev/termination-log.",
    )
    resources: ResourceRequirements | None = None
    node_selector: dict[str, LabelValue] | None = Field(
        None, max_length=MAX_MAP_ENTRIES, description="Node labels the probe pod requires, e.g. {kubernetes.io/os: linux}."
    )
    tolerations: list[Toleration] | None = Field(
        None, max_length=MAX_MAP_ENTRIES, description="Tolerations of the probe pod (core/v1 Toleration list)."
    )
    service_account_name: str | None = Field(
        None,
        max_length=253,
        pattern=DNS_SUBDOMAIN_PATTERN,
        description="Default: the namespace's default (token not mounted). A DNS-1123 subdomain (lower case).",
    )


class WebhookSettings(_Model):
    """Which heartbeat service ``webhookUrlSecretRef`` points at, and what else it needs."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "self.kind != 'gatus' || has(self.tokenSecretRef)", "message": "kind gatus needs tokenSecretRef"},
                {
                    "rule": "self.kind == 'generic' || !has(self.failureUrlSecretRef)",
                    "message": "failureUrlSecretRef is for kind generic only (the others signal failure on their URL)",
                },
            ]
        }
    )

    kind: WebhookKind = Field(
        "generic",
        description="generic (POST timings on success; failures to failureUrlSecretRef), healthchecks, uptime-kuma, "
        "gatus, betterstack or cronitor: start, success and failure signals in that service's API.",
    )
    failure_url_secret_ref: SecretKeyRef | None = Field(
        None, description="generic: Secret key holding a URL that receives failures (JSON error, times)."
    )
    token_secret_ref: SecretKeyRef | None = Field(None, description="gatus: Secret key holding the endpoint's bearer token.")

    @model_validator(mode="after")
    def _complete(self) -> "WebhookSettings":
        if self.kind == "gatus" and self.token_secret_ref is None:
            raise ValueError("kind gatus needs tokenSecretRef")
        if self.kind != "generic" and self.failure_url_secret_ref is not None:
            raise ValueError("failureUrlSecretRef is for kind generic only (the others signal failure on their URL)")
        return self


class MailSelfcheckSpec(_Model):
    """``spec`` of a MailSelfcheck: one end-to-end probe, run every ``interval`` seconds."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "self.timeout < self.interval", "message": "timeout must be smaller than interval"},
                {
                    "rule": "(self.smtp.auth != 'oauth2' && self.imap.auth != 'oauth2') || has(self.oauth2)",
                    "message": "oauth2 is required when smtp.auth or imap.auth is oauth2",
                },
            ]
        }
    )

    from_address: Address = Field(alias="from", description="Sender address (header From and envelope sender).")
    to_address: Address = Field(alias="to", description="Recipient address whose mailbox is watched.")
    smtp: SmtpEndpoint
    imap: ImapEndpoint
    secret_ref: SecretKeyRef = Field(description="Secret key holding the secret string carried in the probe message.")
    webhook_url_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding the heartbeat URL (POSTed after each successful check by kind generic)."
    )
    webhook: WebhookSettings | None = Field(None, description="The heartbeat service's kind (default generic).")
    tls: TlsSettings | None = None
    oauth2: OAuth2Settings | None = None
    interval: int = Field(
        int(DEFAULT_INTERVAL), ge=MIN_INTERVAL, le=7 * 86400, description="Seconds between two checks (>= 10)."
    )
    timeout: float = Field(
        DEFAULT_TIMEOUT, gt=0, description="Seconds one check may take, reception included (< interval)."
    )
    suspend: bool = Field(False, description="Stop scheduling new checks (a running one finishes).")
    successful_jobs_history_limit: int = Field(3, ge=0, le=100, description="Finished successful Jobs kept.")
    failed_jobs_history_limit: int = Field(1, ge=0, le=100, description="Finished failed Jobs kept.")
    job: JobSettings | None = None

    @field_validator("from_address", "to_address")
    @classmethod
    def _address(cls, value: str) -> str:
        if not _ADDRESS.match(value):
            raise ValueError(_ADDRESS_MESSAGE)
        return value

    @model_validator(mode="after")
    def _timeout_below_interval(self) -> "MailSelfcheckSpec":
        if not self.timeout < self.interval:
            raise ValueError("timeout must be smaller than interval")
        if "oauth2" in (self.smtp.auth, self.imap.auth) and self.oauth2 is None:
            raise ValueError("oauth2 is required when smtp.auth or imap.auth is oauth2")
        return self


class JobReference(_Model):
    """The Job running the current check."""

    name: str = Field(description="Name of the Job.")
    uid: str | None = Field(None, description="metadata.uid of the Job.")
    schedule_time: str | None = Field(None, description="RFC 3339 time of the slot the Job runs for.", json_schema_extra={"format": "date-time"})


class HistoryEntry(_Model):
    """One finished check, newest first in ``status.history``."""

    job: str = Field(description="Name of the Job that ran the check.")
    schedule_time: str | None = Field(None, description="Slot the check ran for (RFC 3339).", json_schema_extra={"format": "date-time"})
    completion_time: str | None = Field(None, description="When its result was recorded (RFC 3339).", json_schema_extra={"format": "date-time"})
    success: bool = Field(description="Whether the check succeeded.")
    error: str | None = Field(None, description="What failed (see the README's troubleshooting table).")
    error_class: str | None = Field(None, description="Machine-readable class of the failure, e.g. timeout, junk, job_config.")
    send_time: float | None = Field(None, description="Seconds from SMTP connect to the final 250 reply.")
    reception_time: float | None = Field(None, description="Seconds from the 250 reply to the message seen over IMAP.")
    folder: str | None = Field(
        None, description="IMAP folder the message was found in: the watched one on success, a junk folder for errorClass junk."
    )


class Condition(_Model):
    """``metav1.Condition`` (https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/object-meta/ ,
    KEP-1623): ``Ready`` is True after a successful check, False after a failed one."""

    type: str = Field(max_length=316, description="Condition type: Ready.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    observed_generation: int | None = Field(None, ge=0, description="metadata.generation the condition was set for.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).", json_schema_extra={"format": "date-time"})
    reason: str = Field(
        max_length=1024,
        description="CamelCase reason: CheckSucceeded, CheckFailed, Pending, Suspended, InvalidJobSpec, JobForbidden, "
        "JobNameConflict, InvalidSpec.",
    )
    message: str = Field("", max_length=32768, description="Human-readable detail (the error of a failed check).")


class TlsStatus(_Model):
    """The TLS handshake of the last check with one server."""

    version: str | None = Field(None, description="Negotiated protocol, e.g. TLSv1.3.")
    cipher: str | None = Field(None, description="Negotiated cipher suite.")
    not_after: str | None = Field(
        None, description="Earliest certificate expiry of the chain the server sent (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )
    hostname_matched: bool | None = Field(None, description="Whether the certificate names the configured host.")


class WebhookStatus(_Model):
    """The heartbeat of the last check."""

    kind: str | None = Field(None, description="Heartbeat service API: generic, healthchecks, uptime-kuma, ...")
    signal: str | None = Field(None, description="What was signalled: success, failure or start.")
    sent: bool | None = Field(None, description="Whether the heartbeat was delivered.")
    error: str | None = Field(None, description="Why it was not delivered (the URL is never shown).")


class MailSelfcheckStatus(_Model):
    """``status`` of a MailSelfcheck, written only by the operator (status subresource).

    Times ``*Time`` ending in ``Time`` and holding a date are RFC 3339 UTC strings;
    ``sendTime`` and ``receptionTime`` are seconds (float) of the last check.
    """

    last_schedule_time: str | None = Field(None, description="Slot time of the last launched check.", json_schema_extra={"format": "date-time"})
    last_completion_time: str | None = Field(None, description="When the last check's result was recorded.", json_schema_extra={"format": "date-time"})
    last_success_time: str | None = Field(None, description="When the last successful check was recorded.", json_schema_extra={"format": "date-time"})
    success: bool | None = Field(None, description="Whether the last finished check succeeded.")
    error: str | None = Field(None, description="Error of the last check, null on success.")
    error_class: str | None = Field(None, description="Machine-readable class of the last error (a metric label too).")
    send_time: float | None = Field(None, description="Seconds from SMTP connect to the final 250 reply.")
    reception_time: float | None = Field(None, description="Seconds from the 250 reply to the message seen in IMAP.")
    consecutive_failures: int = Field(0, description="Failed checks since the last success.")
    leftover_count: int | None = Field(
        None, description="The probe's own messages the last check could not delete (null: it could not look)."
    )
    cleanup_warning: str | None = Field(None, description="Why the last check's cleanup left something behind.")
    timings: dict[str, float] | None = Field(
        None,
        description="Seconds per step of the last check: imap_connect, imap_login, smtp_connect, smtp_tls, smtp_auth, "
        "smtp_transaction, first_sight, fetch_verify, cleanup.",
    )
    imap_commands: int | None = Field(
        None, description="IMAP commands the last check sent (login, detection, fetch, cleanup, logout: its load on "
        "the mailbox server)."
    )
    imap_session_seconds: float | None = Field(
        None, description="Seconds the last check's IMAP sessions stayed open (connect to logout)."
    )
    tls: dict[str, TlsStatus] | None = Field(None, description="TLS facts of the last check per endpoint (smtp, imap).")
    webhook: WebhookStatus | None = Field(None, description="The heartbeat of the last check, when one is configured.")
    auth_warning: str | None = Field(
        None, description="OAuth2 warning of the last check: a refresh token rotated by the provider or about to expire."
    )
    active: JobReference | None = Field(None, description="The running Job, if any.")
    last_harvested_job: str | None = Field(None, description="Name of the last Job whose result was recorded.")
    history: list[HistoryEntry] | None = Field(
        None, max_length=STATUS_HISTORY_LIMIT, description=f"The last {STATUS_HISTORY_LIMIT} finished checks, newest first."
    )
    conditions: list[Condition] | None = Field(
        None,
        description="Ready: True after a successful check, False after a failed one or a refused Job, Unknown before "
        "the first result and while suspended.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(None, description="metadata.generation of the spec the last check ran with.")


# --------------------------------------------------------------------------------------
# CRD generation
# --------------------------------------------------------------------------------------

_KEEP = {
    "type",
    "description",
    "properties",
    "required",
    "items",
    "additionalProperties",
    "enum",
    "default",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "maxProperties",
    "pattern",
    "format",
    "x-kubernetes-validations",
    "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    """Turn pydantic's JSON Schema (draft 2020-12) into a Kubernetes structural schema.

    Inlines ``$ref``, collapses ``anyOf [X, null]`` into ``X``, rewrites numeric
    ``exclusiveMinimum`` into the OpenAPI v3.0 boolean form, drops titles and ``null``
    defaults, and removes ``additionalProperties: false`` (unknown fields are pruned).
    """
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").split("/")[-1]])
        target.update(node)
        node = target
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express anyOf {options} in a structural schema")
        merged = _structural(options[0], defs)
        merged.update({k: v for k, v in node.items() if k != "default" or v is not None})
        node = merged
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key not in _KEEP:
            continue
        if key == "default" and value is None:
            continue
        if key == "description":
            value = " ".join(value.replace("``", "").split())
        if key == "properties":
            out[key] = {name: _structural(sub, defs) for name, sub in value.items()}
        elif key in ("items",):
            out[key] = _structural(value, defs)
        elif key == "additionalProperties":
            if isinstance(value, dict):
                out[key] = _structural(value, defs)
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        else:
            out[key] = value
    if "properties" in out:
        out["type"] = "object"
        out.pop("additionalProperties", None)
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
    return out


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """Structural OpenAPI v3 schema of ``model`` (by alias, i.e. camelCase field names)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _structural(raw, defs)


def _printer_columns() -> list[dict[str, Any]]:
    return [
        {"name": "Success", "type": "boolean", "jsonPath": ".status.success", "description": "Last check succeeded"},
        {"name": "Send", "type": "number", "jsonPath": ".status.sendTime", "description": "Seconds to submit (SMTP)"},
        {
            "name": "Reception",
            "type": "number",
            "jsonPath": ".status.receptionTime",
            "description": "Seconds until the message was seen over IMAP",
        },
        {"name": "Failures", "type": "integer", "jsonPath": ".status.consecutiveFailures"},
        {"name": "Suspended", "type": "boolean", "jsonPath": ".spec.suspend", "description": "No check is scheduled"},
        {"name": "Last Check", "type": "date", "jsonPath": ".status.lastCompletionTime"},
        {"name": "Interval", "type": "integer", "jsonPath": ".spec.interval", "priority": 1},
        {"name": "Active", "type": "string", "jsonPath": ".status.active.name", "priority": 1},
        {"name": "Error", "type": "string", "jsonPath": ".status.error", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


def crd_manifest() -> dict[str, Any]:
    """The ``apiextensions.k8s.io/v1`` CustomResourceDefinition of MailSelfcheck, as a dict."""
    spec_schema = openapi_schema(MailSelfcheckSpec)
    status_schema = openapi_schema(MailSelfcheckStatus)
    status_schema["description"] = "Written by the operator; see the status subresource."
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}", "labels": {"app.kubernetes.io/name": "mail-selfcheck"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": ["all"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": _printer_columns(),
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "An end-to-end mail delivery check (SMTP submission to IMAP mailbox) run "
                            "as a Job every spec.interval seconds.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def crd_yaml() -> str:
    """:func:`crd_manifest` as YAML (what ``mail-selfcheck crd`` prints and ``crds/`` holds)."""
    header = "# Generated by `mail-selfcheck crd` from mail_selfcheck/models/spec.py. Do not edit.\n"
    return header + yaml.safe_dump(crd_manifest(), sort_keys=False, width=120)
