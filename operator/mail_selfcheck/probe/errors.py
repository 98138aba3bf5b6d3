"""The probe's failure type: one precise, secret-free message per failure, with a class."""

from __future__ import annotations

import socket
import ssl

from ..models.result import ErrorClass


class ProbeFailure(Exception):
    """A step failed; ``str(exc)`` is the ``error`` of the result, ``error_class`` its class.

    ``smtp_reply`` carries the server's reply when one explains the failure; ``folder`` the
    IMAP folder the message was found in, when the failure found it somewhere.
    """

    def __init__(
        self, error_class: ErrorClass, message: str, *, smtp_reply: str | None = None, folder: str | None = None
    ):
        super().__init__(message)
        self.error_class: ErrorClass = error_class
        self.smtp_reply = smtp_reply
        self.folder = folder


def describe_oserror(exc: BaseException) -> str:
    """Short text for a network exception (``OSError``, ``ssl.SSLError``, socket timeouts)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return f"name resolution failed: {exc.strerror or exc}"
    if isinstance(exc, ssl.SSLError):
        if exc.reason == "WRONG_VERSION_NUMBER":
            return "TLS error: WRONG_VERSION_NUMBER (the server did not answer in TLS: wrong port or security mode?)"
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def describe_starttls_error(exc: BaseException) -> str:
    """Like :func:`describe_oserror` for a TLS handshake that failed *after* the server accepted
    STARTTLS (RFC 3207 / RFC 3501 6.2.1): the port and mode are right, so no wrong-port hint."""
    if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLCertVerificationError) \
            and exc.reason == "WRONG_VERSION_NUMBER":
        return (
            "TLS error: WRONG_VERSION_NUMBER after the server accepted STARTTLS (it went on in clear text: "
            "a broken STARTTLS, or a middlebox on the path that strips it)"
        )
    return describe_oserror(exc)
