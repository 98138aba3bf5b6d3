"""OAuth2 credentials: SASL encodings (RFC 7628, XOAUTH2) and the provider presets' request shapes.

The presets are checked against the providers' documentation without any network: the HTTP
client MSAL and google-auth use is replaced by a recorder that answers like the documented
endpoints and keeps every request for assertions.

* Microsoft identity platform, client credentials:
  https://learn.microsoft.com/entra/identity-platform/v2-oauth2-client-creds-grant-flow
  (POST https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token, ``scope=https://outlook.office365.com/.default``,
  https://learn.microsoft.com/exchange/client-developer/legacy-protocols/how-to-authenticate-an-imap-pop-smtp-application-by-using-oauth)
* Google service account with domain-wide delegation:
  https://developers.google.com/identity/protocols/oauth2/service-account#authorizingrequests
  (a JWT with ``iss`` = the service account, ``sub`` = the impersonated user, ``scope``,
  ``aud`` = the token URI, grant ``urn:ietf:params:oauth:grant-type:jwt-bearer``)
"""

from __future__ import annotations

import base64
import json
import urllib.parse

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mail_selfcheck.probe.auth import sasl
from mail_selfcheck.probe.auth.tokens import (
    GOOGLE_TOKEN_URL, MICROSOFT_APP_SCOPE, OAuth2Config, TokenError, _refusal, fetch,
)


def test_xoauth2_initial_response_is_the_google_microsoft_format():
    assert sasl.xoauth2("someuser@example.com", "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg") == (
        b"user=someuser@example.com\x01auth=Bearer ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg\x01\x01")


def test_oauthbearer_initial_response_follows_rfc7628():
    # RFC 7628 section 4.1 example: n,a=user@example.com,^Ahost=server.example.com^Aport=143^Aauth=Bearer ...^A^A
    assert sasl.oauthbearer("user@example.com", "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==", "server.example.com", 143) == (
        b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01"
        b"auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01")
    assert sasl.oauthbearer("a,b=c", "t", "h", 1).startswith(b"n,a=a=2Cb=3Dc,")  # RFC 5801 saslname escaping


def test_mechanism_choice_prefers_oauthbearer_and_honours_a_forced_one():
    assert sasl.choose(["PLAIN", "XOAUTH2", "OAUTHBEARER"]) == "OAUTHBEARER"
    assert sasl.choose(["plain", "xoauth2"]) == "XOAUTH2"
    assert sasl.choose(["XOAUTH2", "OAUTHBEARER"], forced="xoauth2") == "XOAUTH2"
    assert sasl.choose(["XOAUTH2"], forced="OAUTHBEARER") is None
    assert sasl.choose(["PLAIN", "LOGIN"]) is None


def test_error_challenge_is_decoded_without_the_token():
    challenge = base64.b64encode(json.dumps(
        {"status": "401", "schemes": "bearer", "scope": "https://mail.google.com/"}).encode())
    assert sasl.describe_error_challenge(challenge) == "status 401, scope https://mail.google.com/, schemes bearer"
    assert sasl.describe_error_challenge(b"not base64 at all!") == "not base64 at all!"


@pytest.mark.parametrize("error, error_class", [
    ("invalid_client", "oauth2_invalid_client"),
    ("unauthorized_client", "oauth2_invalid_client"),
    ("invalid_grant", "oauth2_invalid_grant"),
    ("invalid_scope", "oauth2_error"),
])
def test_token_endpoint_errors_have_their_own_class(error, error_class):
    exc = _refusal("login.example", error, "AADSTS7000215: Invalid client secret provided.")
    assert exc.error_class == error_class and error in str(exc) and "AADSTS7000215" in str(exc)


class Recorder:
    """The HTTP client of MSAL (get/post) and google-auth (request): answers as ``routes`` say, keeps requests."""

    def __init__(self, routes: dict[str, dict]) -> None:
        self.routes, self.calls = routes, []

    def _answer(self, method: str, url: str, **kwargs) -> requests.Response:
        self.calls.append({"method": method, "url": url, **kwargs})
        body = next((v for k, v in self.routes.items() if url.split("?")[0].endswith(k)), None)
        resp = requests.Response()
        resp.status_code = 200 if body is not None else 404
        resp._content = json.dumps(body or {"error": "not_found"}).encode()
        resp.headers["Content-Type"] = "application/json"
        resp.url = url
        return resp

    def get(self, url, **kwargs):
        return self._answer("GET", url, **kwargs)

    def post(self, url, **kwargs):
        return self._answer("POST", url, **kwargs)

    def request(self, method, url, **kwargs):
        return self._answer(method, url, **kwargs)

    def close(self):
        pass

    verify = True


def _form(data) -> dict:
    if isinstance(data, bytes):
        data = data.decode()
    if isinstance(data, str):
        return dict(urllib.parse.parse_qsl(data))
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in dict(data).items()}


TENANT = "contoso.onmicrosoft.com"
ENTRA = f"https://login.microsoftonline.com/{TENANT}"


def _entra(monkeypatch, token_answer: dict) -> Recorder:
    """The Microsoft identity platform's discovery document and token endpoint, as documented."""
    recorder = Recorder({
        "/v2.0/.well-known/openid-configuration": {
            "token_endpoint": f"{ENTRA}/oauth2/v2.0/token", "authorization_endpoint": f"{ENTRA}/oauth2/v2.0/authorize",
            "issuer": f"{ENTRA}/v2.0"},
        "/oauth2/v2.0/token": token_answer,
    })
    import mail_selfcheck.probe.auth.tokens as tokens

    monkeypatch.setattr(tokens, "_TimeoutSession", lambda http, timeout: recorder)
    return recorder


def test_microsoft_app_only_preset(monkeypatch):
    tenant, base = TENANT, ENTRA
    recorder = _entra(monkeypatch, {"access_token": "eyJ0-access", "expires_in": 3599, "token_type": "Bearer"})
    config = OAuth2Config(provider="microsoft", tenant=tenant, client_id="11111111-2222", client_secret="s3cr3t~value")
    token = fetch(config, "imap", "monitor@contoso.com", timeout=10)
    assert token.value == "eyJ0-access" and token.expires_in == 3599
    (post,) = [c for c in recorder.calls if c["method"] == "POST"]
    assert post["url"] == f"{base}/oauth2/v2.0/token"
    form = _form(post["data"])
    assert form["grant_type"] == "client_credentials" and form["scope"] == MICROSOFT_APP_SCOPE
    assert form["client_id"] == "11111111-2222" and form["client_secret"] == "s3cr3t~value"


def test_microsoft_refusal_is_reported_with_its_aadsts_code(monkeypatch):
    _entra(monkeypatch, {"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided."})
    with pytest.raises(TokenError) as info:
        fetch(OAuth2Config(provider="microsoft", tenant=TENANT, client_id="c", client_secret="wrong"), "smtp", "m@x", 10)
    assert info.value.error_class == "oauth2_invalid_client" and "AADSTS7000215" in str(info.value)
    assert "wrong" not in str(info.value)


def test_google_service_account_preset(monkeypatch):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    account = {"type": "service_account", "client_email": "monitor@proj.iam.gserviceaccount.com",
               "private_key": pem, "private_key_id": "k1", "token_uri": GOOGLE_TOKEN_URL, "client_id": "123"}
    recorder = Recorder({"/token": {"access_token": "ya29.access", "expires_in": 3599, "token_type": "Bearer"}})
    import mail_selfcheck.probe.auth.tokens as tokens

    monkeypatch.setattr(tokens, "_TimeoutSession", lambda http, timeout: recorder)
    config = OAuth2Config(provider="google", service_account_json=json.dumps(account))
    assert fetch(config, "imap", "probe@example.com", 10).value == "ya29.access"
    (post,) = recorder.calls
    assert post["url"] == GOOGLE_TOKEN_URL
    form = _form(post["data"])
    assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    from google.auth import jwt

    claims = jwt.decode(form["assertion"], certs=key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), audience=GOOGLE_TOKEN_URL)
    assert claims["iss"] == "monitor@proj.iam.gserviceaccount.com" and claims["sub"] == "probe@example.com"
    assert claims["scope"] == "https://mail.google.com/"
    assert pem not in json.dumps(OAuth2Config.__repr__(config)) and pem in config.secrets()


def test_basic_auth_refusals_are_explained():
    from mail_selfcheck.probe.auth.login import basic_auth_hint

    assert "no longer accepts passwords: use oauth2" in basic_auth_hint(
        "535 5.7.139 Authentication unsuccessful, basic authentication is disabled.", ["LOGIN", "XOAUTH2"])
    assert "no longer accepts passwords" in basic_auth_hint(
        "550 5.7.30 Basic authentication is not supported for Client Submission", [])
    assert "also offers OAuth2" in basic_auth_hint("535 5.7.8 Error: authentication failed", ["PLAIN", "OAUTHBEARER"])
    assert basic_auth_hint("535 5.7.8 Error: authentication failed", ["PLAIN", "LOGIN"]) == ""


def test_refresh_warnings():
    from mail_selfcheck.probe.auth.tokens import refresh_warning

    assert refresh_warning({"refresh_token": "new"}, "old").startswith("the provider rotated")
    assert refresh_warning({"refresh_token": "old"}, "old") is None
    assert refresh_warning({"refresh_token_expires_in": 86400}, "old") == "the refresh token expires in 1.0 days"
    assert refresh_warning({"refresh_token": "x"}, None) is None, "app-only grants have no refresh token to worry about"


def test_microsoft_certificate_credential_signs_a_client_assertion(monkeypatch):
    """Certificate instead of a secret: MSAL sends a JWT client assertion (RFC 7523) whose x5t is the
    certificate's SHA-1 thumbprint, and no client_secret."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID
    from google.auth import jwt as gjwt

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mail-selfcheck")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=30)).sign(key, hashes.SHA256()))
    pem = (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()) + cert.public_bytes(serialization.Encoding.PEM)).decode()
    recorder = _entra(monkeypatch, {"access_token": "eyJ0-cert", "expires_in": 3599, "token_type": "Bearer"})
    config = OAuth2Config(provider="microsoft", tenant=TENANT, client_id="app-2", client_certificate_pem=pem)
    assert fetch(config, "imap", "monitor@contoso.com", 10).value == "eyJ0-cert"
    (post,) = [c for c in recorder.calls if c["method"] == "POST"]
    form = _form(post["data"])
    assert "client_secret" not in form
    assert form["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    header = json.loads(base64.urlsafe_b64decode(form["client_assertion"].split(".")[0] + "=="))
    thumbprint = base64.urlsafe_b64decode(header["x5t"] + "==")
    assert thumbprint == cert.fingerprint(hashes.SHA1())
    claims = gjwt.decode(form["client_assertion"], certs=cert.public_bytes(serialization.Encoding.PEM), verify=True,
                         audience=f"{ENTRA}/oauth2/v2.0/token", clock_skew_in_seconds=30)
    assert claims["iss"] == claims["sub"] == "app-2"


def test_google_refresh_token_preset(monkeypatch):
    recorder = Recorder({"/token": {"access_token": "ya29.delegated", "expires_in": 3599, "token_type": "Bearer"}})
    import mail_selfcheck.probe.auth.tokens as tokens

    monkeypatch.setattr(tokens, "_TimeoutSession", lambda http, timeout: recorder)
    config = OAuth2Config(provider="google", client_id="cid.apps.googleusercontent.com", client_secret="gsecret",
                          refresh_tokens={"smtp": "1//refresh"})
    assert fetch(config, "smtp", "probe@example.com", 10).value == "ya29.delegated"
    (post,) = recorder.calls
    form = _form(post["data"])
    assert post["url"] == GOOGLE_TOKEN_URL and form["grant_type"] == "refresh_token"
    assert form["refresh_token"] == "1//refresh" and form["client_id"] == "cid.apps.googleusercontent.com"
