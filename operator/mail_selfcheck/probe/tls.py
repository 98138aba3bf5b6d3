"""TLS client context shared by SMTP and IMAP (RFC 8314 for implicit TLS, RFC 3207 / RFC 3501 for STARTTLS)."""

from __future__ import annotations

import ssl

from ..models.settings import ProbeSettings


def client_context(settings: ProbeSettings) -> ssl.SSLContext:
    """Build the client TLS context.

    Certificates and host names are verified by default against the system CAs, or only
    against ``tls_ca_file`` / ``tls_ca_pem`` when one is configured. With
    ``tls_insecure_skip_verify`` nothing is verified (explicit opt-in for labs).

    Raises:
        ssl.SSLError: the CA bundle cannot be loaded.
    """
    if settings.tls_insecure_skip_verify:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if settings.tls_ca_file or settings.tls_ca_pem:
        return ssl.create_default_context(
            cafile=str(settings.tls_ca_file) if settings.tls_ca_file else None, cadata=settings.tls_ca_pem
        )
    return ssl.create_default_context()
