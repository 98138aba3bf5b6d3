"""The result of one probe run: the contract between the probe and the controller.

The probe prints it (``--json``), writes it to the termination-message file
(``--result-file``, read back by the controller from the pod status) and logs it.
Kubernetes truncates a termination message at 4096 bytes
(https://kubernetes.io/docs/tasks/debug/debug-application/determine-reason-pod-failure/),
so :meth:`ProbeResult.to_json` keeps the serialised form within :data:`MAX_RESULT_BYTES`.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

#: Upper bound of the serialised result, in bytes (Kubernetes termination-message limit).
MAX_RESULT_BYTES = 4096

#: Machine-readable failure classes, used as a metric label and in troubleshooting docs.
ErrorClass = Literal[
    "mailbox_unavailable",  # login / SELECT failed before sending (step 1)
    "auth_temporary",  # the server could not check the credentials (SMTP 454, IMAP [UNAVAILABLE])
    "oauth2_endpoint",  # OAuth2 token endpoint unreachable, timed out or failing (5xx)
    "oauth2_invalid_client",  # the token endpoint refused the client (ID, secret, certificate)
    "oauth2_invalid_grant",  # refresh token revoked/expired, consent missing, impersonation not allowed
    "oauth2_error",  # any other token endpoint refusal (scope, configuration)
    "oauth2_rejected",  # the mail server refused the token (scope, mailbox permission) or offers no bearer SASL
    "smtp_connect",  # SMTP server unreachable, refused, timed out
    "smtp_tls",  # STARTTLS missing or certificate verification failed
    "smtp_rejected",  # 5xx reply during the transaction
    "smtp_deferred",  # 4xx replies until the time budget ran out
    "imap_connect",  # IMAP server unreachable during reception
    "imap_tls",  # IMAP TLS failure
    "timeout",  # message not received within the timeout
    "junk",  # delivered, but into the Junk folder
    "integrity",  # received, but altered or structurally damaged
    "internal",  # a bug in the probe: an unexpected exception
]


class TlsFacts(BaseModel):
    """What the TLS handshake with one server showed (issue 12): for certificate-expiry alerts.

    ``not_after``: the earliest ``notAfter`` of the certificate chain the server sent, Unix
    seconds (blackbox_exporter's ``probe_ssl_earliest_cert_expiry``); ``hostname_matched``:
    whether the leaf certificate names the host (RFC 6125), also when verification is off.
    """

    model_config = ConfigDict(extra="ignore", defer_build=True)

    version: str | None = Field(default=None, description="Negotiated protocol, e.g. TLSv1.3.")
    cipher: str | None = Field(default=None, description="Negotiated cipher suite.")
    not_after: float | None = Field(default=None, description="Earliest notAfter of the chain, Unix seconds.")
    hostname_matched: bool | None = None


class WebhookOutcome(BaseModel):
    """What became of the heartbeat (issue 12). ``kind``: the heartbeat service's API; ``signal``:
    ``success`` | ``failure`` | ``start``; ``error``: why it was not delivered (never the URL)."""

    model_config = ConfigDict(extra="ignore", defer_build=True)

    kind: str = "generic"
    signal: str = "success"
    sent: bool = False
    error: str | None = None


class ProbeResult(BaseModel):
    """Outcome of one selfcheck.

    The four documented keys are ``success``, ``error``, ``send_time`` and
    ``reception_time``; times are seconds (float), ``None`` when that step did not complete.
    The other fields are diagnostics; none of them ever holds a password or the configured
    secret.
    """

    model_config = ConfigDict(extra="ignore", defer_build=True)

    success: bool
    error: str | None = None
    send_time: float | None = Field(default=None, description="Seconds from SMTP connect to the final 250 reply.")
    reception_time: float | None = Field(
        default=None, description="Seconds from the final 250 reply to the message being seen over IMAP."
    )
    sent_at: float | None = Field(
        default=None, description="Wall-clock time of the final 250 reply, Unix epoch seconds."
    )
    error_class: ErrorClass | None = None
    message_id: str | None = Field(default=None, description="Message-ID of the probe message (RFC 5322 3.6.4).")
    folder: str | None = Field(default=None, description="IMAP folder the message was found in.")
    smtp_reply: str | None = Field(default=None, description="Final reply of the SMTP server to DATA.")
    cleanup_warning: str | None = Field(default=None, description="Set when the probe message could not be removed.")
    leftover_count: int | None = Field(
        default=None,
        ge=0,
        description="The probe's own messages (this run's and earlier runs' past the sweep age) still in the "
        "mailbox after cleanup; 0 when clean, None when cleanup could not look.",
    )
    duration: float | None = Field(default=None, description="Seconds the whole run took.")
    token_time: float | None = Field(
        default=None, description="Seconds spent obtaining OAuth2 access tokens (oauth2 only), before anything is timed."
    )
    auth_warning: str | None = Field(
        default=None, description="OAuth2 token endpoint warnings: refresh token rotated or about to expire."
    )
    timings: dict[str, float] | None = Field(
        default=None,
        description="Seconds per step: imap_connect (TCP+TLS), imap_login, smtp_connect, smtp_tls, smtp_auth, "
        "smtp_transaction (MAIL..DATA), first_sight, fetch_verify, cleanup.",
    )
    imap_commands: int | None = Field(
        default=None, ge=0,
        description="IMAP commands the run sent (every tagged command of every session: login, detection, fetch, "
        "cleanup, logout); None when no IMAP session was opened.",
    )
    imap_session_seconds: float | None = Field(
        default=None, ge=0,
        description="Seconds the run's IMAP sessions stayed open, from connecting to logout (summed over sessions).",
    )
    tls: dict[str, TlsFacts] | None = Field(default=None, description="TLS facts per endpoint: smtp, imap.")
    webhook: WebhookOutcome | None = Field(default=None, description="The heartbeat's outcome, when one is configured.")

    def to_json(self) -> str:
        """Serialise to one compact JSON line of at most :data:`MAX_RESULT_BYTES` bytes.

        Long diagnostic strings are shortened (``error`` last) until the line fits.
        """
        data = self.model_dump(mode="json")
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=True)
        for key in ("smtp_reply", "cleanup_warning", "folder", "message_id", "error"):
            if len(text.encode()) <= MAX_RESULT_BYTES:
                break
            value = data.get(key)
            if isinstance(value, str):
                excess = len(text.encode()) - MAX_RESULT_BYTES
                keep = max(0, len(value) - excess - 3)
                data[key] = value[:keep] + "..." if keep else None
                text = json.dumps(data, separators=(",", ":"), ensure_ascii=True)
        return text

    @classmethod
    def from_json(cls, text: str) -> "ProbeResult":
        """Parse a result line written by :meth:`to_json`.

        Raises:
            pydantic.ValidationError: the text is not a result object.
        """
        return cls.model_validate_json(text.strip())
