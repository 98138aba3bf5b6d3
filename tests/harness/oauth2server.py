"""A real OAuth2 authorization server on loopback, built on Authlib's server classes (RFC 6749).

For the OAuth2 tests and the mail stack's Dovecot ``oauth2`` passdb. Everything is served by
Authlib's Flask integration (``authlib.integrations.flask_oauth2.AuthorizationServer``) in a
werkzeug server thread, over HTTPS with a certificate the caller provides (the mail stack's
throw-away CA), on 127.0.0.1 and a free port:

* ``POST /token``: grants ``client_credentials`` (RFC 6749 4.4; app-only tokens valid for a
  whole mail domain) and ``refresh_token`` (RFC 6749 6; tokens of one user); client
  authentication ``client_secret_basic`` or ``client_secret_post``. Errors are RFC 6749 5.2
  JSON (``invalid_client``, ``invalid_grant``, ``invalid_scope``...).
* ``POST /introspect``: RFC 7662 token introspection, what Dovecot's oauth2 passdb calls
  (``introspection_mode = post``), authenticated with the ``dovecot`` resource client. The
  answer carries ``active``, ``scope``, ``client_id``, ``username`` (the user of a delegated
  token, or ``@<domain>`` of an app-only one: see below) and ``exp``.
* ``POST /revoke``: RFC 7009 revocation.

Test controls: :meth:`add_client`, :meth:`issue_refresh_token` (a refresh token of a user, as
an authorization-code flow would have produced), :meth:`revoke` / :meth:`expire_all`
(revocation and expiry you can trigger), :meth:`set_down` (the token endpoint answers 503),
``requests`` (the grant requests received, secrets masked) for assertions.

Dovecot 2.3's oauth2 passdb applies its ``username_format`` to both the login and the
introspected ``username`` and requires them to be equal, so an app-only token (valid for any
mailbox of the domain) is introspected as ``@<domain>`` and checked by a passdb with
``username_format = %Ld`` (both sides become the domain; see
:mod:`tests.harness.oauth2_mailstack`).
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import ClientMixin, TokenMixin, grants
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7662 import IntrospectionEndpoint
from flask import Flask, jsonify
from werkzeug.serving import make_server

#: Client of the resource server (Dovecot) for the introspection endpoint.
RESOURCE_CLIENT = "dovecot"


@dataclass
class Client(ClientMixin):
    """A registered OAuth2 client; ``domain``: mail domain its app-only tokens may access
    (None: no client_credentials); ``scope``: the scopes it may get."""

    client_id: str
    client_secret: str = field(repr=False)
    scope: str = "mail"
    domain: str | None = None
    grant_types: tuple[str, ...] = ("client_credentials", "refresh_token")

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str:
        return ""

    def get_allowed_scope(self, scope: str | None) -> str:
        if not scope:
            return self.scope
        allowed = set(self.scope.split())
        return " ".join(s for s in scope.split() if s in allowed)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return False

    def check_client_secret(self, client_secret: str) -> bool:
        return secrets.compare_digest(client_secret, self.client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method in ("client_secret_basic", "client_secret_post")

    def check_response_type(self, response_type: str) -> bool:
        return False

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in self.grant_types


@dataclass
class Token(TokenMixin):
    """An issued access token (and its refresh token, for delegated grants)."""

    client_id: str
    access_token: str = field(repr=False)
    scope: str
    expires_at: float
    user: str | None = None  # delegated: the mail address; None for app-only
    domain: str | None = None  # app-only: the mail domain
    revoked: bool = False

    def check_client(self, client: Client) -> bool:
        return client.client_id == self.client_id

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return max(0, int(self.expires_at - time.time()))

    def is_expired(self) -> bool:
        return time.time() >= self.expires_at

    def is_revoked(self) -> bool:
        return self.revoked

    def get_user(self) -> str | None:
        return self.user

    def get_client(self) -> Client:  # pragma: no cover - not used by the endpoints we serve
        raise NotImplementedError


@dataclass
class RefreshToken:
    value: str = field(repr=False)
    client_id: str
    user: str
    scope: str
    revoked: bool = False
    expires_at: float = float("inf")

    def check_client(self, client: Client) -> bool:
        return client.client_id == self.client_id

    def get_scope(self) -> str:
        return self.scope

    def is_expired(self) -> bool:
        return time.time() >= self.expires_at

    def is_revoked(self) -> bool:
        return self.revoked


class OAuth2Server:
    """The authorization server (see the module docstring).

    Args:
        cert_file, key_file: PEM certificate (for 127.0.0.1) and key of the HTTPS listener.
        lifetime: seconds an access token is valid.
    """

    def __init__(self, cert_file: str, key_file: str, lifetime: float = 600) -> None:
        self.cert_file, self.key_file, self.lifetime = cert_file, key_file, lifetime
        self.clients: dict[str, Client] = {}
        self.tokens: dict[str, Token] = {}
        self.refresh_tokens: dict[str, RefreshToken] = {}
        self.requests: list[dict[str, Any]] = []
        self.introspections: list[dict[str, Any]] = []
        self.down = False
        #: True: tokens are issued already expired at the server (the client sees expires_in as usual).
        self.expire_on_issue = False
        #: Refresh grants: answer with a new refresh token (rotation), and/or announce the
        #: refresh token's remaining lifetime (seconds, ``refresh_token_expires_in``).
        self.rotate_refresh_tokens = False
        self.refresh_token_expires_in: int | None = None
        self.resource_secret = secrets.token_urlsafe(16)
        self.add_client(RESOURCE_CLIENT, self.resource_secret, grant_types=())
        self._lock = threading.Lock()
        self._server = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # ------------------------------------------------------------------ controls

    def add_client(self, client_id: str, client_secret: str, *, scope: str = "mail", domain: str | None = None,
                   grant_types: tuple[str, ...] = ("client_credentials", "refresh_token")) -> Client:
        client = Client(client_id, client_secret, scope=scope, domain=domain, grant_types=grant_types)
        self.clients[client_id] = client
        return client

    def issue_refresh_token(self, client_id: str, user: str, scope: str = "mail") -> str:
        """A refresh token of ``user`` for ``client_id`` (what a consent flow would have given)."""
        value = "rt-" + secrets.token_urlsafe(24)
        self.refresh_tokens[value] = RefreshToken(value, client_id, user, scope)
        return value

    def revoke(self, value: str) -> None:
        """Revoke a refresh or access token."""
        if value in self.refresh_tokens:
            self.refresh_tokens[value].revoked = True
        if value in self.tokens:
            self.tokens[value].revoked = True

    def expire_all(self) -> None:
        """Every access token issued so far is expired from now on."""
        for token in self.tokens.values():
            token.expires_at = time.time() - 1

    def reset(self) -> None:
        """Back to normal: up, tokens valid at issue, no recorded requests (clients and tokens stay)."""
        self.down = self.expire_on_issue = self.rotate_refresh_tokens = False
        self.refresh_token_expires_in = None
        self.requests.clear()
        self.introspections.clear()

    def set_down(self, down: bool = True) -> None:
        """``True``: /token answers HTTP 503 (a broken identity provider)."""
        self.down = down

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def token_url(self) -> str:
        return f"{self.url}/token"

    @property
    def introspection_url(self) -> str:
        return f"{self.url}/introspect"

    # ------------------------------------------------------------------ server

    def _app(self) -> Flask:
        app = Flask("oauth2server")
        app.config["OAUTH2_TOKEN_EXPIRES_IN"] = {"client_credentials": int(self.lifetime), "refresh_token": int(self.lifetime)}
        server = AuthorizationServer(app, query_client=self.clients.get, save_token=self._save_token)
        outer = self

        class ClientCredentials(grants.ClientCredentialsGrant):
            TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]

        class Refresh(grants.RefreshTokenGrant):
            TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]
            INCLUDE_NEW_REFRESH_TOKEN = False  # no rotation: a stateless Job could not store a new one

            def authenticate_refresh_token(self, refresh_token: str) -> RefreshToken | None:
                token = outer.refresh_tokens.get(refresh_token)
                if token and not token.is_revoked() and not token.is_expired():
                    return token
                return None

            def authenticate_user(self, refresh_token: RefreshToken) -> str:
                return refresh_token.user

            def revoke_old_credential(self, refresh_token: RefreshToken) -> None:
                pass

            def issue_token(self, user: str, refresh_token: RefreshToken) -> dict[str, Any]:
                token = super().issue_token(user, refresh_token)
                if outer.refresh_token_expires_in:
                    token["refresh_token_expires_in"] = outer.refresh_token_expires_in
                if outer.rotate_refresh_tokens:  # as Entra ID and others do: a new one each time
                    token["refresh_token"] = outer.issue_refresh_token(refresh_token.client_id, user, refresh_token.scope)
                return token

        class Introspect(IntrospectionEndpoint):
            CLIENT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]

            def query_token(self, token_string: str, token_type_hint: str | None) -> Token | None:
                return outer.tokens.get(token_string)

            def introspect_token(self, token: Token) -> dict[str, Any]:
                return {
                    "active": True,
                    "client_id": token.client_id,
                    "token_type": "Bearer",
                    "scope": token.scope,
                    # app-only: "@<domain>", which Dovecot's username_format %Ld turns into the
                    # domain, as it does the login (see the module docstring)
                    "username": token.user or f"@{token.domain}",
                    "exp": int(token.expires_at),
                }

            def check_permission(self, token: Token, client: Client, request: Any) -> bool:
                return client.client_id == RESOURCE_CLIENT

            def create_endpoint_response(self, request: Any) -> Any:
                status, body, headers = super().create_endpoint_response(request)
                outer.introspections.append({"active": body.get("active"), "username": body.get("username")})
                return status, body, headers

        class Revoke(RevocationEndpoint):
            CLIENT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]

            def query_token(self, token_string: str, token_type_hint: str | None) -> Any:
                return outer.tokens.get(token_string) or outer.refresh_tokens.get(token_string)

            def revoke_token(self, token: Any, request: Any) -> None:
                token.revoked = True

        server.register_grant(ClientCredentials)
        server.register_grant(Refresh)
        server.register_endpoint(Introspect)
        server.register_endpoint(Revoke)

        @app.post("/token")
        def token() -> Any:
            from flask import request

            self.requests.append({"grant_type": request.form.get("grant_type"), "scope": request.form.get("scope"),
                                  "basic_auth": request.authorization is not None})
            if self.down:
                return jsonify({"error": "temporarily_unavailable"}), 503
            return server.create_token_response()

        @app.post("/introspect")
        def introspect() -> Any:
            return server.create_endpoint_response(Introspect.ENDPOINT_NAME)

        @app.post("/revoke")
        def revoke() -> Any:
            return server.create_endpoint_response(Revoke.ENDPOINT_NAME)

        return app

    def _save_token(self, token: dict[str, Any], request: Any) -> None:
        client: Client = request.client
        user = request.user if isinstance(request.user, str) else None
        self.tokens[token["access_token"]] = Token(
            client_id=client.client_id, access_token=token["access_token"], scope=token.get("scope", ""),
            expires_at=time.time() - 1 if self.expire_on_issue else time.time() + token.get("expires_in", self.lifetime),
            user=user,
            domain=None if user else client.domain,
        )

    def start(self) -> "OAuth2Server":
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        self._server = make_server("127.0.0.1", 0, self._app(), threaded=True, ssl_context=context)
        self.port = self._server.socket.getsockname()[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="oauth2server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "OAuth2Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
