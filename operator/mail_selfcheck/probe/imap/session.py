"""One IMAP4rev1 session (RFC 3501) on TO's mailbox with IMAPClient: connect, TLS, log in,
select, per-command timeouts, reconnect; the :class:`Mailbox` the run works with.

TLS: implicit (``tls``, RFC 8314 3.2), ``STARTTLS`` (RFC 3501 6.2.1; credentials are never
sent if it fails) or ``plain`` (lab stacks only).

Timeouts (seconds): the server's greeting must come within :data:`GREETING_TIMEOUT` (a
port that expects implicit TLS stays silent; this is said in the error); every later command
must be answered within :data:`COMMAND_TIMEOUT`, LOGIN/AUTHENTICATE within :data:`LOGIN_TIMEOUT`
(servers delay a refusal on purpose), never beyond the run's deadline. A command
that goes unanswered (a NAT that dropped the flow, a hung server) breaks only the session:
:mod:`.detect` reconnects and goes on while the run's deadline lasts.

Untagged responses are accepted at any time (RFC 3501 7), also before IDLE's continuation
request (RFC 2177; GreenMail sends ``* n EXISTS`` before ``+``).
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError, LoginError
from imapclient.imap4 import IMAP4WithTimeout
from imapclient.imapclient import SocketTimeout, _parse_untagged_response
from imapclient.tls import IMAP4_TLS

from ...models.result import TlsFacts
from ...models.settings import ProbeSettings
from ..errors import ProbeFailure, describe_oserror, describe_starttls_error
from ..tls import client_context
from ..tls import facts as tls_facts
from . import cleanup as _cleanup
from . import detect as _detect
from .folders import Folders, classify

GREETING_TIMEOUT = 5.0  # seconds for TCP connect + the server's greeting
COMMAND_TIMEOUT = 5.0  # seconds for the answer to one IMAP command
#: Seconds for the answer to LOGIN/AUTHENTICATE. Servers delay a refusal on purpose: Courier
#: imapd answers a wrong password after about 5 s, Dovecot after ``auth_failure_delay`` (2 s)
#: growing with its auth penalty for repeated failures from one IP (up to 15 s).
LOGIN_TIMEOUT = 20.0


@dataclass(frozen=True)
class Found:
    """A probe message seen in ``folder`` under ``uid`` at ``seen_at`` (``time.monotonic()``)."""

    folder: str
    uid: int
    seen_at: float


class _GreetingCapabilities:
    """imaplib asks ``CAPABILITY`` right after the greeting; a greeting that already carries
    ``[CAPABILITY ...]`` (RFC 3501 7.1; Dovecot, Cyrus and Courier send it) answers that
    without a round trip. Only at connect: after STARTTLS the list is asked for again, over
    TLS (RFC 3501 6.2.1: what came before TLS is discarded)."""

    def _get_capabilities(self):
        sent = self.untagged_responses.pop("CAPABILITY", None)
        if sent and sent[-1] and not self._tls_established:
            self.capabilities = tuple(str(sent[-1], self._encoding).upper().split())
            return
        super()._get_capabilities()


class _Counted:
    """Counts the commands sent on this connection (``commands``): every command gets a new
    tag (RFC 3501 2.2.1), IMAPClient's raw commands too; ``DONE`` (IDLE's end) has none."""

    commands = 0

    def _new_tag(self):
        self.commands += 1
        return super()._new_tag()


class _PlainIMAP4(_Counted, _GreetingCapabilities, IMAP4WithTimeout):
    """Plain TCP (then maybe STARTTLS); ``on_tcp()`` is called once the TCP connection is up,
    before the greeting (to tell a silent server from an unreachable one)."""

    def __init__(self, host: str, port: int, timeout: float | None, on_tcp=None):
        self._on_tcp = on_tcp
        super().__init__(host, port, timeout)

    def _create_socket(self, timeout=None):
        sock = super()._create_socket(timeout)
        if self._on_tcp is not None:
            self._on_tcp()
        return sock


class _TlsIMAP4(_Counted, _GreetingCapabilities, IMAP4_TLS):
    """Implicit TLS (RFC 8314 3.2)."""


class _Client(IMAPClient):
    """IMAPClient that tells a silent server from an unreachable one, takes the capabilities
    from the greeting, remembers the selected folder (``selected``: ``(folder, readonly)`` or
    ``None``) and accepts untagged responses before IDLE's continuation."""

    def __init__(self, *args, on_tcp=None, **kwargs):
        self._on_tcp = on_tcp  # called once the TCP connection is up (before the greeting)
        self.selected: tuple[str, bool] | None = None
        super().__init__(*args, **kwargs)

    def _create_IMAP4(self):  # noqa: N802 (IMAPClient's name)
        timeout = getattr(self._timeout, "connect", None)
        if self.stream:
            return super()._create_IMAP4()
        if self.ssl:
            return _TlsIMAP4(self.host, self.port, self.ssl_context, timeout)
        return _PlainIMAP4(self.host, self.port, timeout, on_tcp=self._on_tcp)

    @property
    def commands(self) -> int:
        """Commands sent on this connection so far."""
        return getattr(self._imap, "commands", 0)

    def select_folder(self, folder, readonly=False):
        """IMAPClient's ``select_folder``, remembering what is selected."""
        self.selected = None
        info = super().select_folder(folder, readonly)
        self.selected = (folder, bool(readonly))
        return info

    def keep_capabilities(self) -> None:
        """Cache the capabilities a LOGIN/AUTHENTICATE response carried (``[CAPABILITY ...]``,
        RFC 3501 7.1), before the next SELECT flushes them (else IMAPClient asks again);
        sends ``CAPABILITY`` only when the response had none."""
        self.capabilities()

    def idle(self):
        """Start IDLE (RFC 2177); returns the untagged responses (parsed) that came before
        the continuation request. IMAPClient's own ``idle()`` raises on them.

        Raises:
            IMAPClientError: the server answered IDLE with a tagged NO/BAD.
        """
        tag = self._imap._command("IDLE")
        self._idle_tag = tag
        early = []
        while True:
            line = self._imap._get_response()
            if line is None:  # the continuation request
                return early
            if self._imap.tagged_commands.get(tag):
                typ, data = self._imap.tagged_commands.pop(tag)
                self._idle_tag = None
                text = data[0].decode("utf-8", "replace") if data and isinstance(data[0], bytes) else str(data)
                raise IMAPClientError(f"IDLE failed: {typ} {text}")
            early.append(_parse_untagged_response(line))


class Mailbox:
    """One probe run's view of TO's mailbox.

    Use :meth:`open` before sending (it records UIDNEXT), :meth:`wait_for` after, then
    :meth:`fetch`, :meth:`cleanup` and :meth:`close`.
    """

    def __init__(self, settings: ProbeSettings):
        self.settings = settings
        self.server = f"{settings.imap_host}:{settings.imap_port_effective}"
        self.client: _Client | None = None
        self.folder = settings.imap_folder
        self.uidvalidity = 0
        self.uidnext = 1
        self.exists = 0
        self.folders = Folders()
        self.junk: str | None = None  # the first junk folder (for logs)
        self.junk_uidnext: dict[str, int] = {}  # junk folder -> UIDNEXT when the run began
        self.idling = False
        self.idle_refused = False  # the server advertised IDLE but answered it NO/BAD
        self.ready = False  # logged in and the folder selected
        self.reconnects = 0
        self._tcp_was_up = False
        #: Seconds of the first connection's steps: imap_connect (TCP, greeting, TLS), imap_login.
        self.timings: dict[str, float] = {}
        #: TLS facts of the first connection (None without TLS).
        self.tls: TlsFacts | None = None
        #: Commands sent and seconds connected, over every session of this Mailbox so far
        #: (a session counts once it is dropped or closed).
        self.commands = 0
        self.session_seconds = 0.0
        self._opened_at = 0.0

    # -- connection --------------------------------------------------------------------------
    def fail_network(self, exc: BaseException, what: str) -> ProbeFailure:
        """A :class:`ProbeFailure` (``imap_tls`` or ``imap_connect``) for a broken session."""
        if isinstance(exc, ssl.SSLError):
            return ProbeFailure("imap_tls", f"TLS error with IMAP server {self.server}: {describe_oserror(exc)}")
        return ProbeFailure("imap_connect", f"{what} IMAP server {self.server}: {text(exc)}")

    def arm(self, deadline: float, limit: float = COMMAND_TIMEOUT) -> None:
        """Let the next command wait at most ``limit`` seconds (default :data:`COMMAND_TIMEOUT`),
        never past ``deadline``."""
        if self.client is not None:
            self.client.socket().settimeout(max(0.2, min(limit, deadline - time.monotonic())))

    def _connect(self, deadline: float) -> None:
        s = self.settings
        greeting = max(0.5, min(GREETING_TIMEOUT, deadline - time.monotonic()))
        client = None
        started = time.monotonic()
        try:
            client = _Client(
                s.imap_host,
                port=s.imap_port_effective,
                ssl=s.imap_security == "tls",
                ssl_context=client_context(s) if s.imap_security == "tls" else None,
                timeout=SocketTimeout(connect=greeting, read=COMMAND_TIMEOUT),
                on_tcp=self._tcp_up,
            )
        except (OSError, IMAPClientError) as exc:
            raise self._connect_failure(exc, greeting) from exc
        client.normalise_times = False  # keep INTERNALDATE timezone-aware
        self.client = client
        self._opened_at = started
        self.arm(deadline)
        try:
            if s.imap_security == "starttls":
                client.starttls(client_context(s))
        except (OSError, IMAPClientError) as exc:
            if isinstance(exc, ssl.SSLError):
                raise ProbeFailure(
                    "imap_tls", f"TLS error with IMAP server {self.server}: {describe_starttls_error(exc)}"
                ) from exc
            if isinstance(exc, OSError):
                raise self.fail_network(exc, "STARTTLS failed at") from exc
            raise ProbeFailure(
                "imap_tls", f"IMAP server {self.server} refused STARTTLS: {exc}; refusing to log in in clear text"
            ) from exc
        connected = time.monotonic()
        if not self.timings:
            self.timings["imap_connect"] = round(connected - started, 4)
            self.tls = tls_facts(client.socket(), s.imap_host)
        if s.imap_auth == "oauth2":
            from ..auth.login import access_token, imap_oauth2

            token = access_token(s, "imap", s.imap_login, deadline)
            self.arm(deadline, LOGIN_TIMEOUT)
            try:
                imap_oauth2(client, s.imap_login, token, host=s.imap_host, port=s.imap_port_effective,
                            server=self.server, forced=s.oauth2_mechanism)
            except (OSError, socket.timeout) as exc:
                raise self.fail_network(exc, "login failed at") from exc
            try:
                client.keep_capabilities()
            except (OSError, IMAPClientError) as exc:
                raise self.fail_network(exc, "login failed at") from exc
            self.timings.setdefault("imap_login", round(time.monotonic() - connected, 4))
            self.arm(deadline)
            return
        self.arm(deadline, LOGIN_TIMEOUT)
        try:
            client.login(s.imap_login, s.imap_password.get_secret_value() if s.imap_password else "")
            client.keep_capabilities()
        except LoginError as exc:
            # RFC 5530 3 [UNAVAILABLE]: the auth backend failed, not the password; Courier says so in
            # words only ("NO Temporary problem, please try again later").
            reply = str(exc).upper()
            if "[UNAVAILABLE]" in reply or "TEMPORARY PROBLEM" in reply or "TRY AGAIN LATER" in reply:
                raise ProbeFailure(
                    "auth_temporary",
                    f"IMAP server {self.server} could not check the credentials of {s.imap_login} (temporary "
                    f"authentication failure): {text(exc)}",
                ) from exc
            from ..auth.login import basic_auth_hint

            try:
                offered = [c.decode().split("=", 1)[1] for c in client.capabilities() if c.upper().startswith(b"AUTH=")]
            except (OSError, IMAPClientError):
                offered = []
            raise ProbeFailure(
                "mailbox_unavailable",
                f"mailbox unavailable: {s.imap_login} cannot log in at IMAP server {self.server}: {text(exc)}"
                f"{basic_auth_hint(text(exc), offered)}",
            ) from exc
        except (OSError, IMAPClientError) as exc:
            raise self.fail_network(exc, "login failed at") from exc
        self.timings.setdefault("imap_login", round(time.monotonic() - connected, 4))
        self.arm(deadline)

    def _connect_failure(self, exc: BaseException, greeting: float) -> ProbeFailure:
        timed_out = isinstance(exc, (socket.timeout, TimeoutError))
        if timed_out and self.settings.imap_security != "tls" and self._tcp_was_up:
            return ProbeFailure(
                "imap_connect",
                f"IMAP server {self.server} accepted the connection but sent no greeting "
                f"within {greeting:g} seconds (does this port expect implicit TLS? try security tls)",
            )
        return self.fail_network(exc, "cannot reach")

    def open(self, deadline: float) -> None:
        """Connect, log in as TO, SELECT the watched folder, record UIDVALIDITY/UIDNEXT and
        find the special folders (:mod:`.folders`).

        Args:
            deadline: ``time.monotonic()`` value; no wait goes beyond it.

        Raises:
            ProbeFailure: ``mailbox_unavailable`` (login or SELECT refused, with the server's
                reply), ``auth_temporary`` (``NO [UNAVAILABLE]``, RFC 5530), ``imap_connect``
                (unreachable, or no greeting) or ``imap_tls``.
        """
        self._connect_tracked(deadline)
        try:
            self._select(self.folder)
        except IMAPClientError as exc:
            raise ProbeFailure(
                "mailbox_unavailable",
                f"mailbox unavailable: folder {self.folder!r} of {self.settings.imap_login} cannot be opened at IMAP "
                f"server {self.server}: {text(exc)}",
            ) from exc
        except OSError as exc:
            raise self.fail_network(exc, "lost connection to") from exc
        try:
            listing = self.client.list_folders()
        except (IMAPClientError, OSError):
            listing = []
        self.folders = classify(
            listing,
            gmail=self.client.has_capability("X-GM-EXT-1"),
            junk_names=tuple(self.settings.imap_junk_folder_names),
        )
        for junk in self.folders.junk_all:
            if junk != self.folder:
                try:
                    self.junk_uidnext[junk] = self.status_uidnext(junk)
                except (IMAPClientError, OSError):
                    continue
        self.junk = next(iter(self.junk_uidnext), None)
        self.ready = True

    def _connect_tracked(self, deadline: float) -> None:
        self._tcp_was_up = False
        self._connect(deadline)

    def _tcp_up(self) -> None:
        self._tcp_was_up = True

    def reconnect(self, deadline: float) -> None:
        """Drop the session and open a new one on the watched folder (same UIDNEXT unless the
        folder's UIDVALIDITY changed, then every UID is searched).

        Raises:
            ProbeFailure: as :meth:`open`.
        """
        self._drop()
        self.reconnects += 1
        self._connect_tracked(deadline)
        try:
            self._select(self.folder, reconnect=True)
        except (IMAPClientError, OSError) as exc:
            raise self.fail_network(exc, "reconnected, but cannot select the folder at") from exc
        self.ready = True

    def _select(self, folder: str, reconnect: bool = False) -> None:
        info = self.client.select_folder(folder)
        uidvalidity = int(info.get(b"UIDVALIDITY", 0))
        if uidvalidity != self.uidvalidity:
            self.uidnext = 1 if reconnect else int(info.get(b"UIDNEXT", 1))
            self.uidvalidity = uidvalidity
        self.exists = int(info.get(b"EXISTS", 0))

    def reselect(self) -> None:
        """SELECT the watched folder again (after looking into another one)."""
        self._select(self.folder)

    def status_uidnext(self, folder: str) -> int:
        """``STATUS folder (UIDNEXT)``."""
        return int(self.client.folder_status(folder, [b"UIDNEXT"]).get(b"UIDNEXT", 1))

    def _drop(self) -> None:
        if self.client is not None:
            self.commands += self.client.commands
            self.session_seconds += time.monotonic() - self._opened_at
            try:
                self.client.shutdown()
            except Exception:
                pass
        self.client = None
        self.idling = False
        self.ready = False

    def close(self) -> None:
        """Log out (at most :data:`COMMAND_TIMEOUT` seconds); never raises."""
        if self.client is None:
            return
        try:
            self.arm(time.monotonic() + COMMAND_TIMEOUT)
            if self.idling:
                self.client.idle_done()
            self.client.logout()  # closes the socket; _drop() counts the session and resets
        except Exception:
            pass
        self._drop()

    # -- the run's steps ---------------------------------------------------------------------
    def wait_for(self, nonce: str, deadline: float, since: float | None = None) -> Found:
        """Wait until the message whose token header contains ``nonce`` is in the folder
        (or in Junk); ``since``: ``time.monotonic()`` of the submission's 250 reply (default:
        now); see :func:`.detect.wait_for`."""
        return _detect.wait_for(self, nonce, deadline, since)

    def fetch(self, found: Found, deadline: float | None = None, nonce: str = "") -> bytes:
        """The full message (``BODY.PEEK[]``, RFC 3501 6.4.5); see :func:`.detect.fetch`."""
        limit = deadline if deadline is not None else time.monotonic() + COMMAND_TIMEOUT
        return _detect.fetch(self, found, limit, nonce)

    def cleanup(
        self, nonce: str, secret: str, sweep_older_than: float, message_id: str | None = None
    ) -> _cleanup.CleanupReport:
        """Delete this run's message(s) and earlier runs' leftovers; never the mailbox, never
        another client's or another monitor's mail (:mod:`.cleanup`).

        Args:
            nonce: this run's nonce; secret: the configured secret;
            sweep_older_than: seconds after which earlier runs' messages are leftovers;
            message_id: this run's Message-ID (absence from Gmail's ``\\All`` is checked).

        Returns:
            The warning (``None`` when clean) and the number of own messages left; cleanup
            problems never fail the check.
        """
        if self.client is None:
            return _cleanup.CleanupReport("cleanup skipped: no IMAP session", None)
        try:
            if self.idling:
                self.client.idle_done()
                self.idling = False
            return _cleanup.remove_probe_messages(
                self.client,
                server=self.server,
                folders_to_clean=[self.folder, *self.junk_uidnext],
                folders=self.folders,
                secret=secret,
                nonce=nonce,
                sweep_older_than=sweep_older_than,
                message_id=message_id,
            )
        except (OSError, IMAPClientError) as exc:
            return _cleanup.CleanupReport(f"cleanup failed at IMAP server {self.server}: {text(exc)}", None)


def text(exc: BaseException) -> str:
    """Short text of an IMAP or network exception."""
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError) and exc.strerror:
        return exc.strerror
    value = str(exc)
    return value.removeprefix("b'").removesuffix("'") or type(exc).__name__
