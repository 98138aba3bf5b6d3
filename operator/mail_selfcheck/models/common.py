"""Types shared by the probe settings and the MailSelfcheck spec (one name for one thing)."""

from __future__ import annotations

from typing import Literal

#: A DNS domain name (labels of letters, digits and inner hyphens; no anchors).
DOMAIN_PATTERN = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"

#: A mailbox address (RFC 5321 4.1.2 ``Mailbox``, restricted to the dot-atom local parts
#: and DNS domain names that submission servers accept in practice). Used by the probe's
#: settings validation and, verbatim, as the CRD's OpenAPI ``pattern``.
ADDRESS_PATTERN = r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@" + DOMAIN_PATTERN + "$"

#: How the probe secures SMTP submission.
#: ``starttls``: RFC 3207 on the submission port (587), AUTH refused without it;
#: ``tls``: implicit TLS, RFC 8314 (465); ``plain``: no TLS, for lab stacks only.
SmtpSecurity = Literal["starttls", "tls", "plain"]

#: How the probe secures IMAP: ``tls``: implicit TLS, RFC 8314 (993);
#: ``starttls``: RFC 3501 6.2.1 STARTTLS (143); ``plain``: no TLS, for lab stacks only.
ImapSecurity = Literal["tls", "starttls", "plain"]

#: How the probe notices the message's arrival (see ``mail_selfcheck.probe.imap``):
#: ``adaptive``: NOOP + UID SEARCH polling, fast at first, backing off on long waits;
#: ``idle``: RFC 2177 IDLE (re-issued periodically) plus a final search;
#: ``poll``: NOOP + UID SEARCH at a fixed ``poll_interval``.
Detection = Literal["adaptive", "idle", "poll"]

DEFAULT_SMTP_PORTS: dict[str, int] = {"starttls": 587, "tls": 465, "plain": 587}
DEFAULT_IMAP_PORTS: dict[str, int] = {"tls": 993, "starttls": 143, "plain": 143}

DEFAULT_INTERVAL = 600.0
DEFAULT_TIMEOUT = 60.0

#: Heartbeat service APIs the probe speaks (``MESSAGES_SELFCHECK_WEBHOOK_KIND``, ``spec.webhook.kind``).
WebhookKind = Literal["generic", "healthchecks", "uptime-kuma", "gatus", "betterstack", "cronitor"]
