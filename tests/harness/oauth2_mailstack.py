"""The real Postfix + Dovecot stack of :mod:`tests.harness.mailstack`, authenticating OAuth2 bearer tokens.

A :class:`MailStack` whose Dovecot also has the ``oauth2`` passdb
(https://doc.dovecot.org/2.3/configuration_manual/authentication/oauth2/), validating the
tokens of a real authorization server (:class:`tests.harness.oauth2server.OAuth2Server`,
started with the stack on its TLS certificate) by RFC 7662 introspection, for IMAP and,
through Dovecot SASL, for Postfix submission; ``auth_mechanisms`` offers XOAUTH2 and
OAUTHBEARER besides PLAIN/LOGIN. Dovecot 2.3.19 facts this relies on:

* the oauth2 passdb sends only the token (with the resource client's credentials in the URL)
  to the introspection URL and requires the introspected ``username`` to equal the login
  after ``username_format``: delegated tokens (``username`` = the address) pass the first
  passdb (``%Lu``); app-only tokens (``username`` = the domain) the second (``%Ld``);
* ``scope = mail`` requires that scope in the token;
* ``auth_cache_size = 0`` (the base stack's): an expired or revoked token fails at the next login.

Extra user ``oauthonly``: its password login is refused with the reason
``BasicAuthenticationDisabled`` (a static ``deny`` passdb with
a ``reason``, as a tenant that turned basic auth off answers), while OAuth2
logins work.

Use::

    with OAuth2MailStack() as stack:
        stack.oauth2.add_client(...)
"""

from __future__ import annotations

import os
import textwrap

from tests.harness.mailstack import DOMAIN, MailStack, User
from tests.harness.oauth2server import RESOURCE_CLIENT, OAuth2Server

#: The reason Dovecot gives for a password login of ``oauthonly``.
#: (Dovecot cuts a reason at its first space: no spaces.)
BASIC_AUTH_DISABLED = "BasicAuthenticationDisabled"
#: Scope the mailboxes require (Dovecot ``scope``).
MAIL_SCOPE = "mail"
#: The OAuth2 client of the probe (app-only tokens for the whole domain) and its secret.
CLIENT_ID = "selfcheck-probe"


class OAuth2MailStack(MailStack):
    """:class:`MailStack` + ``oauth2`` passdb + :attr:`oauth2` (the authorization server)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.users["oauthonly"] = User(f"oauthonly@{DOMAIN}", f"oauthonly-pw-{os.urandom(4).hex()}")
        self._initial_passwords["oauthonly"] = self.users["oauthonly"].password
        self.client_secret = "probe-secret-" + os.urandom(6).hex()
        self.oauth2: OAuth2Server | None = None

    def _write_dovecot(self) -> None:
        super()._write_dovecot()
        if self.oauth2 is None:
            self.oauth2 = OAuth2Server(str(self.cert_file), str(self.key_file)).start()
            self.oauth2.add_client(CLIENT_ID, self.client_secret, scope=f"{MAIL_SCOPE} other", domain=DOMAIN)
        url = self.oauth2.introspection_url.replace("https://", f"https://{RESOURCE_CLIENT}:{self.oauth2.resource_secret}@")
        for name, fmt in (("user", "%Lu"), ("domain", "%Ld")):
            (self.dv_dir / f"oauth2-{name}.conf.ext").write_text(textwrap.dedent(f"""\
                introspection_mode = post
                introspection_url = {url}
                username_attribute = username
                username_format = {fmt}
                active_attribute = active
                active_value = true
                scope = {MAIL_SCOPE}
                tls_ca_cert_file = {self.ca_file}
                """))
        conf = self.dv_conf.read_text()
        conf = conf.replace("auth_mechanisms = plain login", "auth_mechanisms = plain login xoauth2 oauthbearer")
        oauth_passdbs = textwrap.dedent(f"""\
            passdb {{
              driver = oauth2
              mechanisms = xoauth2 oauthbearer
              args = {self.dv_dir}/oauth2-user.conf.ext
              result_failure = continue
              result_internalfail = continue
            }}
            passdb {{
              driver = oauth2
              mechanisms = xoauth2 oauthbearer
              args = {self.dv_dir}/oauth2-domain.conf.ext
            }}
            # oauthonly: password logins refused with a reason, as a tenant without basic auth.
            passdb {{
              driver = static
              deny = yes
              mechanisms = plain login
              username_filter = {self.users["oauthonly"].address}
              args = nopassword=y
              override_fields = "reason={BASIC_AUTH_DISABLED}"
            }}
            """)
        first = conf.index("passdb {")
        conf = conf[:first] + oauth_passdbs + conf[first:]
        self.dv_conf.write_text(conf)

    def stop(self, _remove: bool = True) -> None:
        super().stop(_remove)
        if self.oauth2 is not None:
            self.oauth2.stop()
            self.oauth2 = None

    def probe_env(self, from_user: str = "sender", to_user: str = "receiver", **kwargs) -> dict[str, str]:
        """The base stack's probe environment with both sides on OAuth2 (app-only, generic provider):
        ``SMTP_AUTH``/``IMAP_AUTH`` = ``oauth2``, no passwords, the probe client's ID and secret."""
        security = {k: kwargs.pop(k) for k in ("smtp_security", "imap_security") if k in kwargs}
        env = super().probe_env(from_user, to_user, **security)
        for name in ("MESSAGES_SELFCHECK_SMTP_PASSWORD", "MESSAGES_SELFCHECK_IMAP_PASSWORD"):
            env.pop(name, None)
        env.update({
            "MESSAGES_SELFCHECK_SMTP_AUTH": "oauth2",
            "MESSAGES_SELFCHECK_IMAP_AUTH": "oauth2",
            "MESSAGES_SELFCHECK_OAUTH2_PROVIDER": "generic",
            "MESSAGES_SELFCHECK_OAUTH2_TOKEN_URL": self.oauth2.token_url,
            "MESSAGES_SELFCHECK_OAUTH2_CLIENT_ID": CLIENT_ID,
            "MESSAGES_SELFCHECK_OAUTH2_CLIENT_SECRET": self.client_secret,
            "MESSAGES_SELFCHECK_OAUTH2_SCOPE": MAIL_SCOPE,
        })
        p = "MESSAGES_SELFCHECK_"
        for key, value in kwargs.items():  # overrides, as MailStack.probe_env applies them
            name = key if key.upper().startswith(p) else p + key.upper()
            if value is None:
                env.pop(name, None)
            else:
                env[name] = str(value)
        return env
