"""OAuth2 access tokens for SMTP and IMAP, fetched fresh on every run (a Job keeps no state).

Providers, each through its own maintained library:

* ``generic``: any RFC 6749 token endpoint, with Authlib's ``OAuth2Session``: grant
  ``client_credentials`` (RFC 6749 4.4), or ``refresh_token`` (RFC 6749 6) when the side has a
  refresh token. Client authentication ``client_secret_basic``.
* ``microsoft``: the Microsoft identity platform with MSAL
  (https://learn.microsoft.com/entra/identity-platform/v2-oauth2-client-creds-grant-flow):
  app-only ``acquire_token_for_client`` with scope ``https://outlook.office365.com/.default``
  (Exchange Online IMAP.AccessAsApp / SMTP.SendAsApp), or delegated
  ``acquire_token_by_refresh_token`` with ``IMAP.AccessAsUser.All`` / ``SMTP.Send``; client
  secret or certificate (PEM private key + certificate).
* ``google``: google-auth (https://developers.google.com/identity/protocols/oauth2/service-account):
  a service account key with domain-wide delegation impersonating the login
  (``subject``), scope ``https://mail.google.com/``; or a refresh token with client ID/secret.

One retry on a transient failure of the token endpoint (unreachable, timed out, HTTP 5xx),
inside the caller's time budget. Every failure is a :class:`TokenError` with an error class
and a message a person can act on; no message ever holds a client secret, refresh token,
private key or access token.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import requests

Provider = Literal["generic", "microsoft", "google"]
Side = Literal["smtp", "imap"]

#: Exchange Online scope for app-only (client credentials) access to IMAP and SMTP.
MICROSOFT_APP_SCOPE = "https://outlook.office365.com/.default"
#: Delegated scopes per side (a refresh token obtained with these and offline_access).
MICROSOFT_DELEGATED_SCOPES: dict[str, str] = {
    "imap": "https://outlook.office.com/IMAP.AccessAsUser.All",
    "smtp": "https://outlook.office.com/SMTP.Send",
}
MICROSOFT_AUTHORITY = "https://login.microsoftonline.com/{tenant}"
#: Full access scope Gmail requires for IMAP and SMTP.
GOOGLE_SCOPE = "https://mail.google.com/"
GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"
#: Seconds one token request may take at most (capped by the run's remaining budget).
REQUEST_TIMEOUT = 10.0


@dataclass(frozen=True)
class OAuth2Config:
    """How to obtain tokens (shared by both sides); credentials are plain strings held in memory only.

    ``refresh_tokens`` maps a side (``smtp``/``imap``) to its refresh token: FROM and TO are
    often different accounts. ``ca_file``: CA bundle for the token endpoint (None: system CAs);
    ``verify`` False: no certificate verification (the probe's lab opt-in).
    """

    provider: Provider = "generic"
    token_url: str | None = None
    tenant: str | None = None
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    client_certificate_pem: str | None = field(default=None, repr=False)
    scope: str | None = None
    refresh_tokens: dict[str, str] = field(default_factory=dict, repr=False)
    service_account_json: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    verify: bool = True

    def secrets(self) -> list[str]:
        """Every confidential value, for the redaction of logs and results."""
        values = [self.client_secret, self.client_certificate_pem, self.service_account_json, *self.refresh_tokens.values()]
        if self.service_account_json:
            try:
                values.append(json.loads(self.service_account_json).get("private_key"))
            except (ValueError, AttributeError):
                pass
        return [v for v in values if v]


class TokenError(Exception):
    """No access token: ``error_class`` is one of ``oauth2_endpoint`` (unreachable, timed out,
    5xx), ``oauth2_invalid_client`` (wrong client ID, secret or certificate),
    ``oauth2_invalid_grant`` (refresh token revoked or expired, consent missing, service account
    not allowed to impersonate) or ``oauth2_error`` (any other refusal: scope, configuration)."""

    def __init__(self, error_class: str, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.transient = transient


@dataclass(frozen=True)
class Token:
    """An access token (``value``, never logged) and its lifetime in seconds (None if unknown)."""

    value: str = field(repr=False)
    expires_in: float | None = None
    warning: str | None = None


def fetch(config: OAuth2Config, side: Side, login: str, timeout: float, session: requests.Session | None = None) -> Token:
    """A fresh access token for ``login`` on ``side``, within ``timeout`` seconds (one retry of a transient failure).

    ``session``: the HTTP session to use (tests record requests with it); default a new one.

    Raises:
        TokenError: no token (see its error classes).
    """
    deadline = time.monotonic() + timeout
    http = session or requests.Session()
    http.verify = config.ca_file if config.ca_file else config.verify
    fetcher = _FETCHERS[config.provider]
    for attempt in (1, 2):
        remaining = deadline - time.monotonic()
        if remaining <= 0.5:
            raise TokenError("oauth2_endpoint", f"no OAuth2 token within the time budget ({config.provider} provider)")
        try:
            return fetcher(config, side, login, min(REQUEST_TIMEOUT, remaining), http)
        except TokenError as exc:
            if not exc.transient or attempt == 2:
                raise
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic() - 0.5)))
    raise AssertionError("unreachable")  # pragma: no cover


# ----------------------------------------------------------------------------- errors


def _endpoint_error(where: str, exc: BaseException) -> TokenError:
    reason = type(exc).__name__
    response = getattr(exc, "response", None)
    if isinstance(exc, requests.exceptions.HTTPError) and response is not None:
        return TokenError("oauth2_endpoint", f"OAuth2 token endpoint {where} failed: HTTP {response.status_code} "
                                             f"{_short(response.reason, 60)}", transient=response.status_code >= 500)
    if isinstance(exc, requests.exceptions.SSLError):
        reason = "TLS error (certificate of the token endpoint?)"
    elif isinstance(exc, requests.exceptions.Timeout):
        reason = "timed out"
    elif isinstance(exc, requests.exceptions.ConnectionError):
        reason = "connection failed"
    return TokenError("oauth2_endpoint", f"OAuth2 token endpoint {where} unreachable: {reason}", transient=True)


def _refusal(where: str, error: str | None, description: str | None, status: int | None = None) -> TokenError:
    """A token endpoint's RFC 6749 5.2 error response as a :class:`TokenError`."""
    error = (error or "").strip() or "unknown_error"
    detail = f"{error}" + (f": {_short(description)}" if description else "")
    if status is not None and status >= 500:
        return TokenError("oauth2_endpoint", f"OAuth2 token endpoint {where} failed (HTTP {status}): {detail}", transient=True)
    if error in ("invalid_client", "unauthorized_client"):
        return TokenError(
            "oauth2_invalid_client",
            f"OAuth2 token endpoint {where} refused the client ({detail}): check the client ID and its secret or certificate",
        )
    if error == "invalid_grant":
        return TokenError(
            "oauth2_invalid_grant",
            f"OAuth2 token endpoint {where} refused the grant ({detail}): the refresh token is revoked or expired, "
            "consent is missing, or the account may not be impersonated; obtain a new one or use an app-only flow",
        )
    return TokenError("oauth2_error", f"OAuth2 token endpoint {where} refused the request ({detail})")


def _short(text: str | None, limit: int = 240) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _host(url: str | None) -> str:
    return requests.utils.urlparse(url or "").netloc or (url or "?")


def refresh_warning(response: dict[str, Any], used: str | None) -> str | None:
    """What a stateless probe must tell about a refresh-token grant's response: the provider
    rotated the refresh token (it returned a new one, which a Job cannot store: the old one
    may stop working), or it announced the refresh token's expiry (``refresh_token_expires_in``,
    seconds, as Google and Entra ID send for time-limited grants). None for app-only grants."""
    if not used:
        return None
    notes = []
    expires = response.get("refresh_token_expires_in")
    if isinstance(expires, (int, float)) and expires > 0:
        notes.append(f"the refresh token expires in {expires / 86400:.1f} days")
    new = response.get("refresh_token")
    if new and new != used:
        notes.append("the provider rotated the refresh token; the stored one may stop working (prefer an app-only flow)")
    return "; ".join(notes) or None


# ----------------------------------------------------------------------------- generic (Authlib)


def _generic(config: OAuth2Config, side: Side, login: str, timeout: float, http: requests.Session) -> Token:
    from authlib.integrations.base_client.errors import OAuthError
    from authlib.integrations.requests_client import OAuth2Session

    if not config.token_url:
        raise TokenError("oauth2_error", "OAuth2 provider generic needs MESSAGES_SELFCHECK_OAUTH2_TOKEN_URL")
    where = _host(config.token_url)
    client = OAuth2Session(config.client_id, config.client_secret, scope=config.scope)
    refresh = config.refresh_tokens.get(side)
    try:  # verify= explicitly: Authlib passes its own default (True) over the session's
        if refresh:
            token = client.refresh_token(config.token_url, refresh_token=refresh, timeout=timeout, verify=http.verify)
        else:
            token = client.fetch_token(config.token_url, grant_type="client_credentials", timeout=timeout,
                                       verify=http.verify)
    except OAuthError as exc:
        raise _refusal(where, exc.error, exc.description) from None
    except requests.exceptions.RequestException as exc:
        raise _endpoint_error(where, exc) from None
    except ValueError as exc:  # not JSON: an HTML error page, a proxy
        raise TokenError("oauth2_endpoint", f"OAuth2 token endpoint {where} sent no token response ({_short(str(exc), 80)})",
                         transient=True) from None
    if not token.get("access_token"):
        raise _refusal(where, token.get("error"), token.get("error_description"))
    return Token(token["access_token"], token.get("expires_in"), refresh_warning(token, refresh))


# ----------------------------------------------------------------------------- microsoft (MSAL)


def _microsoft_credential(config: OAuth2Config) -> Any:
    """MSAL's ``client_credential``: the secret, or a certificate credential (PEM holding the
    private key and the certificate registered on the Entra app; its SHA-1 thumbprint is the
    ``x5t`` Entra ID looks the certificate up by)."""
    if config.client_certificate_pem:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization

        try:
            cert = x509.load_pem_x509_certificate(config.client_certificate_pem.encode())
        except ValueError:
            raise TokenError("oauth2_invalid_client", "the client certificate PEM holds no valid certificate") from None
        return {
            "private_key": config.client_certificate_pem,
            "thumbprint": cert.fingerprint(hashes.SHA1()).hex(),  # noqa: S303 - the x5t Entra ID expects
            "public_certificate": cert.public_bytes(serialization.Encoding.PEM).decode(),
        }
    return config.client_secret


def _microsoft(config: OAuth2Config, side: Side, login: str, timeout: float, http: requests.Session) -> Token:
    import msal

    if not config.tenant:
        raise TokenError("oauth2_error", "OAuth2 provider microsoft needs MESSAGES_SELFCHECK_OAUTH2_TENANT (tenant ID or domain)")
    authority = config.token_url or MICROSOFT_AUTHORITY.format(tenant=config.tenant)
    where = _host(authority)
    refresh = config.refresh_tokens.get(side)
    try:
        app = msal.ConfidentialClientApplication(
            config.client_id, client_credential=_microsoft_credential(config), authority=authority,
            http_client=_TimeoutSession(http, timeout), token_cache=msal.TokenCache(),
            # A fresh cache per run: the alias lookup of instance discovery would only cost a round trip.
            instance_discovery=False,
        )
        if refresh:
            scopes = (config.scope or MICROSOFT_DELEGATED_SCOPES[side]).split()
            result = app.acquire_token_by_refresh_token(refresh, scopes=scopes)
        else:
            result = app.acquire_token_for_client(scopes=(config.scope or MICROSOFT_APP_SCOPE).split())
    except requests.exceptions.RequestException as exc:
        raise _endpoint_error(where, exc) from None
    except msal.exceptions.MsalError as exc:  # an HTTP error of a discovery request
        raise TokenError("oauth2_endpoint", f"Microsoft identity platform {where}: {_short(str(exc))}",
                         transient=True) from None
    except ValueError as exc:  # msal: authority discovery failed (unknown tenant, bad answer)
        raise TokenError("oauth2_error", f"Microsoft identity platform {where}: {_short(str(exc))}") from None
    if "access_token" not in result:
        raise _refusal(where, result.get("error"), result.get("error_description"))
    return Token(result["access_token"], result.get("expires_in"), refresh_warning(result, refresh))


class _TimeoutSession:
    """The HTTP client MSAL (``get``/``post``/``close``) and google-auth (``request``) call, with a
    timeout on every request."""

    def __init__(self, session: requests.Session, timeout: float) -> None:
        self.session, self.timeout = session, timeout

    def request(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        kwargs["timeout"] = min(kwargs.get("timeout") or self.timeout, self.timeout)
        return self.session.request(method, url, **kwargs)

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        return self.session.get(url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        return self.session.post(url, **kwargs)

    def close(self) -> None:
        self.session.close()


# ----------------------------------------------------------------------------- google (google-auth)


def _google(config: OAuth2Config, side: Side, login: str, timeout: float, http: requests.Session) -> Token:
    from google.auth import exceptions as gexc
    from google.auth.transport.requests import Request

    scopes = (config.scope or GOOGLE_SCOPE).split()
    token_url = config.token_url or GOOGLE_TOKEN_URL
    refresh = config.refresh_tokens.get(side)
    if config.service_account_json and not refresh:
        from google.oauth2 import service_account

        try:
            info = json.loads(config.service_account_json)
            if config.token_url:
                info["token_uri"] = config.token_url
            credentials = service_account.Credentials.from_service_account_info(info, scopes=scopes, subject=login)
        except (ValueError, KeyError, TypeError) as exc:
            raise TokenError("oauth2_invalid_client", f"the Google service account key is not a valid key JSON ({type(exc).__name__})") from None
        token_url = info.get("token_uri", token_url)
    elif refresh:
        from google.oauth2.credentials import Credentials

        credentials = Credentials(None, refresh_token=refresh, client_id=config.client_id,
                                  client_secret=config.client_secret, token_uri=token_url, scopes=scopes)
    else:
        raise TokenError("oauth2_error", "OAuth2 provider google needs a service account key "
                                         "(MESSAGES_SELFCHECK_OAUTH2_SERVICE_ACCOUNT_JSON) or a refresh token")
    where = _host(token_url)
    try:
        credentials.refresh(Request(session=_TimeoutSession(http, timeout)))  # type: ignore[arg-type]
    except gexc.RefreshError as exc:
        # google-auth: RefreshError("invalid_grant: Token has been expired or revoked.", {response body})
        body = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], dict) else {}
        error = body.get("error") or (str(exc.args[0]).split(":")[0] if exc.args else None)
        raise _refusal(where, error, body.get("error_description")) from None
    except gexc.TransportError as exc:
        raise TokenError("oauth2_endpoint", f"OAuth2 token endpoint {where} unreachable: {_short(str(exc), 120)}",
                         transient=True) from None
    return Token(credentials.token, None)


_FETCHERS: dict[str, Callable[[OAuth2Config, Side, str, float, requests.Session], Token]] = {
    "generic": _generic,
    "microsoft": _microsoft,
    "google": _google,
}
