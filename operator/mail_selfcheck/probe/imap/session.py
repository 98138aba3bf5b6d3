"""TO's mailbox over IMAP4rev1 (RFC 3501) with IMAPClient: open, detect arrival, fetch, clean up.

Arrival detection (``imap_detection``):

* ``adaptive`` (default): NOOP every 10 ms for the first 2 s (a NOOP is one loopback round
  trip; RFC 3501 6.1.2 lets the server report new mail as an untagged EXISTS), a
  ``UID SEARCH UID <uidnext>:* HEADER X-Selfcheck-Token <nonce>`` only when EXISTS grows
  (and once a second regardless). After 2 s it waits in IDLE (RFC 2177) where offered,
  re-issued every 5 s, else NOOP with exponential backoff up to 2 s: fast in the common
  case, quiet on long waits.
* ``idle``: IDLE from the start (Dovecot notifies about 0.5 s after delivery).
* ``poll``: NOOP + search at a fixed ``imap_poll_interval``.

A final explicit search runs before a timeout is declared. The ``\\Junk`` special-use folder
(RFC 6154, or a common name) is checked with ``STATUS (UIDNEXT)`` every few seconds and at the
end: a message there is reported as ``delivered to junk``.

Cleanup removes exactly the probe's messages, by UID: ``UID EXPUNGE`` (RFC 4315) with
UIDPLUS, else ``UID MOVE`` (RFC 6851) to ``\\Trash``, else only ``\\Deleted`` is set and a
warning returned. A bare EXPUNGE, which would also remove other clients' ``\\Deleted``
messages, is never sent. Mailboxes are never deleted.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from imapclient.imapclient import JUNK, TRASH
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError, LoginError

from ...models.settings import ProbeSettings
from ..errors import ProbeFailure, describe_oserror
from ..message import TOKEN_HEADER
from ..tls import client_context

FAST_PHASE = 2.0  # seconds of fast NOOP polling in adaptive mode
FAST_POLL = 0.01  # seconds between NOOPs in the fast phase
SLOW_POLL_MAX = 2.0  # seconds, NOOP backoff cap without IDLE
IDLE_RENEW = 5.0  # seconds an IDLE lasts before it is re-issued
JUNK_CHECK_EVERY = 3.0  # seconds between STATUS checks of the Junk folder


@dataclass(frozen=True)
class Found:
    """A probe message seen in ``folder`` under ``uid`` at ``seen_at`` (``time.monotonic()``)."""

    folder: str
    uid: int
    seen_at: float


class Mailbox:
    """One IMAP session on TO's mailbox for one probe run.

    Use :meth:`open` before sending (it records UIDNEXT), :meth:`wait_for` after,
    then :meth:`fetch`, :meth:`cleanup` and :meth:`close`.
    """

    def __init__(self, settings: ProbeSettings):
        self.settings = settings
        self.server = f"{settings.imap_host}:{settings.imap_port_effective}"
        self.client: IMAPClient | None = None
        self.folder = settings.imap_folder
        self.uidvalidity = 0
        self.uidnext = 1
        self.exists = 0
        self.junk: str | None = None
        self.junk_uidnext = 1
        self.idling = False
        self.ready = False  # logged in and the folder selected

    # -- connection --------------------------------------------------------------------------
    def _fail_network(self, exc: BaseException, what: str) -> ProbeFailure:
        if isinstance(exc, ssl.SSLError):
            return ProbeFailure("imap_tls", f"TLS error with IMAP server {self.server}: {describe_oserror(exc)}")
        return ProbeFailure("imap_connect", f"{what} IMAP server {self.server}: {describe_oserror(exc)}")

    def open(self, deadline: float) -> None:
        """Connect, log in as TO, SELECT the watched folder, record UIDVALIDITY/UIDNEXT.

        Raises:
            ProbeFailure: ``mailbox_unavailable`` (login or SELECT refused, with the server's
                reply), ``imap_connect`` or ``imap_tls``.
        """
        s = self.settings
        timeout = max(0.5, min(30.0, deadline - time.monotonic()))
        try:
            client = IMAPClient(
                s.imap_host,
                port=s.imap_port_effective,
                ssl=s.imap_security == "tls",
                ssl_context=client_context(s) if s.imap_security == "tls" else None,
                timeout=timeout,
            )
        except (OSError, IMAPClientError) as exc:
            raise self._fail_network(exc, "mailbox unavailable: cannot reach") from exc
        client.normalise_times = False  # keep INTERNALDATE timezone-aware
        self.client = client
        try:
            if s.imap_security == "starttls":
                client.starttls(client_context(s))
        except (OSError, IMAPClientError) as exc:
            if isinstance(exc, ssl.SSLError):
                raise self._fail_network(exc, "") from exc
            raise ProbeFailure(
                "imap_tls", f"IMAP server {self.server} refused STARTTLS: {exc}; refusing to log in in clear text"
            ) from exc
        try:
            client.login(s.imap_login, s.imap_password.get_secret_value() if s.imap_password else "")
        except LoginError as exc:
            raise ProbeFailure(
                "mailbox_unavailable",
                f"mailbox unavailable: {s.imap_login} cannot log in at IMAP server {self.server}: {_text(exc)}",
            ) from exc
        except (OSError, IMAPClientError) as exc:
            raise self._fail_network(exc, "mailbox unavailable: login failed at") from exc
        try:
            self._select(self.folder)
        except IMAPClientError as exc:
            raise ProbeFailure(
                "mailbox_unavailable",
                f"mailbox unavailable: folder {self.folder!r} of {s.imap_login} cannot be opened at IMAP server "
                f"{self.server}: {_text(exc)}",
            ) from exc
        try:
            junk = client.find_special_folder(JUNK)
        except (IMAPClientError, OSError):
            junk = None
        if junk and junk != self.folder:
            self.junk = junk
            self.junk_uidnext = self._status_uidnext(junk)
        self.ready = True

    def _select(self, folder: str) -> None:
        info = self.client.select_folder(folder)
        uidvalidity = int(info.get(b"UIDVALIDITY", 0))
        if uidvalidity != self.uidvalidity:
            self.uidvalidity = uidvalidity
            self.uidnext = int(info.get(b"UIDNEXT", 1))
        self.exists = int(info.get(b"EXISTS", 0))

    def _status_uidnext(self, folder: str) -> int:
        return int(self.client.folder_status(folder, [b"UIDNEXT"]).get(b"UIDNEXT", 1))

    def close(self) -> None:
        """Log out; never raises."""
        if self.client is None:
            return
        try:
            if self.idling:
                self.client.idle_done()
            self.client.logout()
        except Exception:
            try:
                self.client.shutdown()
            except Exception:
                pass
        self.client = None
        self.ready = False

    # -- detection ---------------------------------------------------------------------------
    def _search(self, folder_uidnext: int, nonce: str) -> list[int]:
        uids = self.client.search(["UID", f"{folder_uidnext}:*", "HEADER", TOKEN_HEADER, nonce])
        return sorted(u for u in uids if u >= folder_uidnext)

    def _grown(self, responses: list) -> bool:
        grown = False
        for item in responses:
            if isinstance(item, tuple) and len(item) == 2 and item[1] == b"EXISTS":
                if int(item[0]) > self.exists:
                    grown = True
                self.exists = int(item[0])
        return grown

    def _idle(self, seconds: float) -> bool:
        self.client.idle()
        self.idling = True
        try:
            responses = self.client.idle_check(timeout=seconds)
        finally:
            self.idling = False
            done = self.client.idle_done()
        return self._grown(list(responses) + list(done[1] if done else []))

    def _check_junk(self, nonce: str) -> Found | None:
        if not self.junk:
            return None
        if self._status_uidnext(self.junk) <= self.junk_uidnext:
            return None
        self.client.select_folder(self.junk, readonly=True)
        try:
            uids = self._search(self.junk_uidnext, nonce)
            return Found(self.junk, uids[0], time.monotonic()) if uids else None
        finally:
            self._select(self.folder)

    def wait_for(self, nonce: str, deadline: float) -> Found:
        """Wait until the message whose token header contains ``nonce`` is in the folder.

        Args:
            nonce: the token's random part (searched as a substring of the token header).
            deadline: ``time.monotonic()`` value at which to give up.

        Returns:
            Where and when the message was seen (the watched folder, or Junk).

        Raises:
            ProbeFailure: ``timeout`` (not received; the message says within how many
                seconds), ``imap_connect`` / ``imap_tls`` when the session breaks.
        """
        strategy = self.settings.imap_detection
        has_idle = self.client.has_capability("IDLE")
        start = time.monotonic()
        delay = self.settings.imap_poll_interval if strategy == "poll" else FAST_POLL
        last_search = start
        next_junk = start + 1.0
        try:
            while True:
                now = time.monotonic()
                remaining = deadline - now
                if remaining <= 0:
                    break
                use_idle = has_idle and (strategy == "idle" or (strategy == "adaptive" and now - start >= FAST_PHASE))
                if use_idle:
                    grown = self._idle(min(IDLE_RENEW, remaining, max(0.05, next_junk - now)))
                else:
                    grown = self._grown(self.client.noop()[1])
                now = time.monotonic()
                if grown or strategy == "poll" or now - last_search >= 1.0:
                    last_search = now
                    uids = self._search(self.uidnext, nonce)
                    if uids:
                        return Found(self.folder, uids[0], time.monotonic())
                if now >= next_junk:
                    next_junk = now + JUNK_CHECK_EVERY
                    found = self._check_junk(nonce)
                    if found:
                        return found
                if not use_idle:
                    if strategy == "adaptive" and now - start >= FAST_PHASE:
                        delay = min(SLOW_POLL_MAX, max(delay, 0.1) * 1.5)
                    time.sleep(max(0.0, min(delay, deadline - time.monotonic())))
            # final explicit search before declaring a timeout
            self.client.noop()
            uids = self._search(self.uidnext, nonce)
            if uids:
                return Found(self.folder, uids[0], time.monotonic())
            if self.junk:
                found = self._check_junk(nonce)
                if found:
                    return found
        except (OSError, IMAPClientError) as exc:
            raise self._fail_network(exc, "lost connection to") from exc
        budget = self.settings.timeout
        raise ProbeFailure("timeout", f"Message not received within {budget:g} seconds")

    # -- fetch and cleanup -------------------------------------------------------------------
    def fetch(self, found: Found) -> bytes:
        """Return the full message (``BODY.PEEK[]``, RFC 3501 6.4.5) as the server holds it.

        Raises:
            ProbeFailure: ``integrity`` when the server returns no body, ``imap_connect``.
        """
        try:
            if found.folder != self.folder:
                self.client.select_folder(found.folder, readonly=True)
            data = self.client.fetch([found.uid], [b"BODY.PEEK[]"]).get(found.uid, {})
        except (OSError, IMAPClientError) as exc:
            raise self._fail_network(exc, "fetch failed at") from exc
        finally:
            if found.folder != self.folder and self.client is not None:
                try:
                    self._select(self.folder)
                except Exception:
                    pass
        body = data.get(b"BODY[]")
        if not body:
            raise ProbeFailure("integrity", f"IMAP server {self.server} returned no body for UID {found.uid}")
        return bytes(body)

    def _delete_in(self, folder: str, criteria: list, older_than: float | None = None) -> tuple[int, str | None]:
        """Delete the messages matching ``criteria`` in ``folder``; returns (count, warning)."""
        client = self.client
        client.select_folder(folder)
        uids = client.search(criteria)
        if uids and older_than is not None:
            dates = client.fetch(uids, [b"INTERNALDATE"])
            now = datetime.now(timezone.utc)
            uids = [
                uid
                for uid, item in dates.items()
                if (now - _aware(item[b"INTERNALDATE"])).total_seconds() > older_than
            ]
        if not uids:
            return 0, None
        if client.has_capability("UIDPLUS"):
            client.delete_messages(uids)
            client.uid_expunge(uids)
            return len(uids), None
        trash = client.find_special_folder(TRASH)
        if client.has_capability("MOVE") and trash and trash != folder:
            client.move(uids, trash)
            return len(uids), None
        client.delete_messages(uids)
        return len(uids), (
            f"IMAP server {self.server} offers neither UIDPLUS nor MOVE: {len(uids)} probe message(s) in "
            f"{folder!r} only flagged \\Deleted (not expunged)"
        )

    def cleanup(self, nonce: str, secret: str, sweep_older_than: float) -> str | None:
        """Delete this run's message(s) and earlier runs' leftovers; never the mailbox.

        Deletes, in the watched folder and in Junk, every message whose token header contains
        ``nonce``, and every message whose token header contains ``secret + "/"`` and whose
        INTERNALDATE is more than ``sweep_older_than`` seconds old (left by failed runs).

        Returns:
            ``None`` when clean, else a warning (cleanup problems never fail the check).
        """
        if self.client is None:
            return "cleanup skipped: no IMAP session"
        warnings = []
        folders = [self.folder] + ([self.junk] if self.junk else [])
        try:
            if self.idling:
                self.client.idle_done()
                self.idling = False
            for folder in folders:
                for criteria, older in (
                    (["HEADER", TOKEN_HEADER, nonce], None),
                    (["HEADER", TOKEN_HEADER, secret + "/"], sweep_older_than),
                ):
                    _, warning = self._delete_in(folder, criteria, older)
                    if warning:
                        warnings.append(warning)
        except (OSError, IMAPClientError) as exc:
            warnings.append(f"cleanup failed at IMAP server {self.server}: {_text(exc)}")
        return "; ".join(dict.fromkeys(warnings)) or None


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _text(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    return text.removeprefix("b'").removesuffix("'") or type(exc).__name__
