"""Probe settings, read from ``MESSAGES_SELFCHECK_*`` environment variables.

The names of the seed (``_FROM``, ``_TO``, ``_SECRET``, ``_INTERVAL``, ``_TIMEOUT``,
``_WEBHOOK_URL``) are accepted as they are; the SMTP/IMAP/TLS variables follow the same
scheme. All durations are seconds. Every variable is documented in README.md
("Configuration reference").

The model is a plain pydantic ``BaseModel`` that reads the environment itself
(:func:`_from_environ`), as pydantic-settings' ``BaseSettings`` did with ``env_prefix``,
``env_ignore_empty`` and case-insensitive names: importing pydantic-settings (and asyncio
with it) cost the probe ~40 ms per start.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from .common import (
    ADDRESS_PATTERN,
    DEFAULT_IMAP_PORTS,
    DEFAULT_INTERVAL,
    DEFAULT_SMTP_PORTS,
    DEFAULT_TIMEOUT,
    DOMAIN_PATTERN,
    Detection,
    ImapSecurity,
    SmtpSecurity,
    WebhookKind,
)

ENV_PREFIX = "MESSAGES_SELFCHECK_"

#: Heartbeat services the probe speaks to (``MESSAGES_SELFCHECK_WEBHOOK_KIND``).
WEBHOOK_KINDS: tuple[str, ...] = WebhookKind.__args__
_ADDRESS = re.compile(ADDRESS_PATTERN)
#: An EHLO argument (RFC 5321 4.1.1.1): a domain name, or an address literal in brackets.
_EHLO_NAME = re.compile(rf"^{DOMAIN_PATTERN}$|^\[(IPv6:)?[0-9A-Fa-f.:]+\]$")


class ProbeSettings(BaseModel):
    """Configuration of one probe run.

    Each field ``x`` is read from ``MESSAGES_SELFCHECK_X`` (``from_address`` and
    ``to_address`` from ``MESSAGES_SELFCHECK_FROM`` / ``_TO``; names in any case). Empty
    strings count as unset. Keyword arguments (field names or those variable names) win over
    the environment.

    Raises:
        pydantic.ValidationError: on an invalid value; :func:`describe_errors` turns it into
        lines that name the environment variable.
    """

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    def __init__(self, **values) -> None:
        given = {_FIELD_OF_ENV.get(key.upper(), key) for key in values}
        super().__init__(**{field: value for field, value in _from_environ().items() if field not in given}, **values)

    from_address: str = Field(
        "", validation_alias="MESSAGES_SELFCHECK_FROM", description="Sender address (header From and envelope sender)."
    )
    to_address: str = Field("", validation_alias="MESSAGES_SELFCHECK_TO", description="Recipient address whose mailbox is watched.")
    secret: SecretStr = Field(SecretStr(""), description="Secret string carried in the test message (token prefix).")
    interval: float = Field(DEFAULT_INTERVAL, ge=1, description="Seconds between runs (``run --loop``).")
    timeout: float = Field(DEFAULT_TIMEOUT, gt=0, description="Seconds the whole run may take, reception included.")
    webhook_url: SecretStr | None = Field(
        None, description="Heartbeat URL (holds a token); what is sent depends on ``webhook_kind``."
    )
    # Heartbeat services, both directions (issue 12): see probe/report.py for each kind's API.
    webhook_kind: WebhookKind = Field(
        "generic", description="API the heartbeat URL speaks: generic, healthchecks, uptime-kuma, gatus, betterstack, cronitor."
    )
    webhook_failure_url: SecretStr | None = Field(
        None, description="generic only: URL POSTed {error, error_class, send_time, reception_time} on failure."
    )
    webhook_token: SecretStr | None = Field(
        None, description="gatus: the external endpoint's bearer token (Authorization: Bearer <token>)."
    )

    smtp_host: str = Field("localhost", min_length=1)
    smtp_port: int | None = Field(None, ge=1, le=65535, description="Default: 587 (starttls, plain) or 465 (tls).")
    smtp_security: SmtpSecurity = "starttls"
    smtp_username: str | None = Field(None, description="Default: the FROM address.")
    smtp_password: SecretStr | None = None
    smtp_ehlo_name: str | None = Field(
        None, description="Name given in EHLO (RFC 5321 4.1.1.1). Default: the FROM address's domain (no DNS lookup)."
    )

    imap_host: str = Field("localhost", min_length=1)
    imap_port: int | None = Field(None, ge=1, le=65535, description="Default: 993 (tls) or 143 (starttls, plain).")
    imap_security: ImapSecurity = "tls"
    imap_username: str | None = Field(None, description="Default: the TO address.")
    imap_password: SecretStr | None = None
    imap_folder: str = Field("INBOX", min_length=1)
    imap_detection: Detection = "adaptive"
    imap_poll_interval: float = Field(0.1, gt=0, le=60, description="Seconds between polls for detection=poll.")
    imap_expected_arrival: str | None = Field(
        None,
        description="Recent reception times in seconds, comma-separated (one value: the expected arrival); "
        "detection=adaptive polls densely around them and waits cheaply before (the controller passes them).",
    )
    imap_junk_folders: str | None = Field(
        None,
        description="Comma-separated extra junk folder names, looked at besides \\Junk and the known names.",
    )

    # Authentication per side (issue 10): password (default), oauth2 (a bearer token with SASL
    # XOAUTH2 or OAUTHBEARER), or for SMTP none (an MX or a relay that authorises by IP).
    smtp_auth: Literal["password", "oauth2", "none"] = "password"
    imap_auth: Literal["password", "oauth2"] = "password"
    oauth2_provider: Literal["generic", "microsoft", "google"] = "generic"
    oauth2_mechanism: Literal["XOAUTH2", "OAUTHBEARER"] | None = Field(
        None, description="Force one SASL mechanism (default: OAUTHBEARER when offered, else XOAUTH2)."
    )
    oauth2_token_url: str | None = Field(None, description="generic: the token endpoint (RFC 6749 3.2).")
    oauth2_tenant: str | None = Field(None, description="microsoft: tenant ID or domain.")
    oauth2_client_id: str | None = None
    oauth2_client_secret: SecretStr | None = None
    oauth2_client_certificate_pem: SecretStr | None = Field(
        None, description="microsoft: PEM private key + certificate of the app (instead of a secret)."
    )
    oauth2_scope: str | None = Field(None, description="Space-separated scopes (default per provider).")
    oauth2_service_account_json: SecretStr | None = Field(None, description="google: the service account key (JSON text).")
    smtp_oauth2_refresh_token: SecretStr | None = Field(None, description="Refresh token of FROM (delegated grant).")
    imap_oauth2_refresh_token: SecretStr | None = Field(None, description="Refresh token of TO (delegated grant).")

    tls_ca_file: Path | None = Field(None, description="PEM CA bundle to verify servers with (default: system CAs).")
    tls_ca_pem: str | None = Field(
        None, description="PEM CA certificates as text (the Job passes a ConfigMap/Secret key this way)."
    )
    tls_insecure_skip_verify: bool = False

    @field_validator("from_address", "to_address")
    @classmethod
    def _address(cls, value: str) -> str:
        value = value.strip()
        if value and not _ADDRESS.match(value):
            raise ValueError(f"{value!r} is not a mail address like user@example.com")
        return value

    @field_validator("smtp_ehlo_name")
    @classmethod
    def _ehlo_name(cls, value: str | None) -> str | None:
        if value is not None and not _EHLO_NAME.match(value.strip()):
            raise ValueError(f"{value!r} is not a host name like probe.example.com or an address literal like [192.0.2.1]")
        return value.strip() if value is not None else None

    @field_validator("webhook_url", "webhook_failure_url")
    @classmethod
    def _webhook(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not re.match(r"^https?://[^\s/]+", value.get_secret_value()):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("imap_expected_arrival")
    @classmethod
    def _expected_arrival(cls, value: str | None) -> str | None:
        for part in (value or "").split(","):
            if part.strip():
                try:
                    seconds = float(part)
                except ValueError:
                    raise ValueError(f"{part.strip()!r} is not a number of seconds") from None
                if not 0 <= seconds < 86400:
                    raise ValueError(f"{part.strip()} is not a number of seconds between 0 and 86400")
        return value

    @field_validator("tls_ca_file")
    @classmethod
    def _ca_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"CA bundle {str(value)!r} does not exist or is not a file")
        return value

    @field_validator("tls_ca_pem")
    @classmethod
    def _ca_pem(cls, value: str | None) -> str | None:
        if value is not None and "-----BEGIN CERTIFICATE-----" not in value:
            raise ValueError("must hold PEM certificates (-----BEGIN CERTIFICATE-----)")
        return value

    @model_validator(mode="after")
    def _complete(self) -> "ProbeSettings":
        self._check_webhook()
        if not self.enabled:
            return self
        if not self.secret.get_secret_value():
            raise ValueError("MESSAGES_SELFCHECK_SECRET must be set when FROM and TO are set")
        if self.smtp_auth == "password" and self.smtp_security != "plain" and not self.smtp_password:
            raise ValueError(
                f"MESSAGES_SELFCHECK_SMTP_PASSWORD must be set (AUTH is required with smtp_security={self.smtp_security}; "
                "or set MESSAGES_SELFCHECK_SMTP_AUTH=oauth2 or none)"
            )
        if self.imap_auth == "password" and not self.imap_password:
            raise ValueError("MESSAGES_SELFCHECK_IMAP_PASSWORD must be set (or MESSAGES_SELFCHECK_IMAP_AUTH=oauth2)")
        if "oauth2" in (self.smtp_auth, self.imap_auth):
            self._check_oauth2()
        return self

    def _check_webhook(self) -> None:
        """Heartbeat settings that cannot work; messages name variables, never the URL."""
        if self.webhook_failure_url is not None and self.webhook_kind != "generic":
            raise ValueError(
                "MESSAGES_SELFCHECK_WEBHOOK_FAILURE_URL is for WEBHOOK_KIND=generic only; "
                f"{self.webhook_kind} signals failures on MESSAGES_SELFCHECK_WEBHOOK_URL"
            )
        if self.webhook_kind == "generic" or self.webhook_url is None:
            return  # a kind without a URL: no heartbeat, as without a kind
        if self.webhook_kind == "gatus":
            path = urlsplit(self.webhook_url.get_secret_value()).path
            if not re.fullmatch(r".*/api/v1/endpoints/[^/]+/external/?", path):
                raise ValueError("MESSAGES_SELFCHECK_WEBHOOK_URL must be Gatus' push URL "
                                 "https://<gatus>/api/v1/endpoints/<group>_<name>/external for WEBHOOK_KIND=gatus")
            if self.webhook_token is None or not self.webhook_token.get_secret_value():
                raise ValueError("MESSAGES_SELFCHECK_WEBHOOK_TOKEN must be set for WEBHOOK_KIND=gatus "
                                 "(the external endpoint's token)")

    def _check_oauth2(self) -> None:
        if not self.oauth2_client_id and not (self.oauth2_provider == "google" and self.oauth2_service_account_json):
            raise ValueError("MESSAGES_SELFCHECK_OAUTH2_CLIENT_ID must be set for oauth2")
        if self.oauth2_provider == "generic" and not self.oauth2_token_url:
            raise ValueError("MESSAGES_SELFCHECK_OAUTH2_TOKEN_URL must be set for OAUTH2_PROVIDER=generic")
        if self.oauth2_provider == "microsoft" and not self.oauth2_tenant:
            raise ValueError("MESSAGES_SELFCHECK_OAUTH2_TENANT must be set for OAUTH2_PROVIDER=microsoft")
        has_refresh = bool(self.smtp_oauth2_refresh_token or self.imap_oauth2_refresh_token)
        if self.oauth2_provider == "google":
            if not self.oauth2_service_account_json and not (has_refresh and self.oauth2_client_secret):
                raise ValueError("OAUTH2_PROVIDER=google needs MESSAGES_SELFCHECK_OAUTH2_SERVICE_ACCOUNT_JSON, or refresh "
                                 "tokens with MESSAGES_SELFCHECK_OAUTH2_CLIENT_SECRET")
        elif not self.oauth2_client_secret and not self.oauth2_client_certificate_pem:
            raise ValueError("oauth2 needs MESSAGES_SELFCHECK_OAUTH2_CLIENT_SECRET (or, for microsoft, "
                             "MESSAGES_SELFCHECK_OAUTH2_CLIENT_CERTIFICATE_PEM)")

    @property
    def enabled(self) -> bool:
        """False when FROM or TO is empty: the run is skipped (as in the seed)."""
        return bool(self.from_address and self.to_address)

    @property
    def smtp_port_effective(self) -> int:
        return self.smtp_port or DEFAULT_SMTP_PORTS[self.smtp_security]

    @property
    def imap_port_effective(self) -> int:
        return self.imap_port or DEFAULT_IMAP_PORTS[self.imap_security]

    @property
    def smtp_login(self) -> str:
        return self.smtp_username or self.from_address

    @property
    def smtp_ehlo(self) -> str:
        """What the probe says in EHLO: ``smtp_ehlo_name``, else the FROM address's domain (a
        fixed name: ``socket.getfqdn()``, smtplib's default, may do a DNS lookup)."""
        return self.smtp_ehlo_name or self.from_address.rpartition("@")[2] or "localhost"

    @property
    def imap_login(self) -> str:
        return self.imap_username or self.to_address

    @property
    def imap_junk_folder_names(self) -> list[str]:
        """``imap_junk_folders`` split at commas, blanks removed."""
        return [n.strip() for n in (self.imap_junk_folders or "").split(",") if n.strip()]

    @property
    def imap_expected_arrivals(self) -> list[float]:
        """``imap_expected_arrival`` as seconds (oldest first), blanks removed."""
        return [float(p) for p in (self.imap_expected_arrival or "").split(",") if p.strip()]

    def secret_values(self) -> list[str]:
        """Every confidential string of this configuration, for redaction."""
        values = [self.secret, self.smtp_password, self.imap_password, self.webhook_url, self.webhook_failure_url,
                  self.webhook_token, self.oauth2_client_secret,
                  self.oauth2_client_certificate_pem, self.oauth2_service_account_json,
                  self.smtp_oauth2_refresh_token, self.imap_oauth2_refresh_token]
        return [v.get_secret_value() for v in values if v is not None and v.get_secret_value()]


_FIELD_ENV = {"from_address": "MESSAGES_SELFCHECK_FROM", "to_address": "MESSAGES_SELFCHECK_TO"}


def env_name(field: str) -> str:
    """Environment variable that sets settings field ``field``."""
    return _FIELD_ENV.get(field, ENV_PREFIX + field.upper())


#: Upper-case variable name -> settings field.
_FIELD_OF_ENV = {env_name(field): field for field in ProbeSettings.model_fields}


def _from_environ() -> dict[str, str]:
    """The settings fields set by non-empty ``MESSAGES_SELFCHECK_*`` variables (any case)."""
    found = {}
    for key, value in os.environ.items():
        field = _FIELD_OF_ENV.get(key.upper())
        if field is not None and value != "":
            found[field] = value
    return found


def describe_errors(exc: Exception) -> list[str]:
    """Turn a settings ``ValidationError`` into one human line per problem, naming the variable.

    Values are never echoed for secret fields.
    """
    errors = getattr(exc, "errors", None)
    if errors is None:
        return [str(exc)]
    lines = []
    for err in errors():
        loc = [str(p) for p in err.get("loc", ())]
        field = loc[0] if loc else ""
        name = field if field.startswith(ENV_PREFIX) else (env_name(field) if field else "configuration")
        msg = err.get("msg", "invalid")
        msg = msg.removeprefix("Value error, ")
        lines.append(f"{name}: {msg}" if field else msg)
    return lines

