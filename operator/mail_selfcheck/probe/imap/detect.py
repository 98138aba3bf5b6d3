"""Arrival detection (``imap_detection``) and fetching the arrived message.

* ``adaptive`` (default): NOOP every 10 ms for the first 2 s (a NOOP is one loopback round
  trip; RFC 3501 6.1.2 lets the server report new mail as an untagged EXISTS), a
  ``UID SEARCH UID <uidnext>:* HEADER X-Selfcheck-Token <nonce>`` only when EXISTS grows
  (and once a second regardless). After 2 s it waits in IDLE (RFC 2177) where offered,
  re-issued every 5 s, else NOOP with exponential backoff up to 2 s: fast in the common
  case, quiet on long waits.
* ``idle``: IDLE from the start (Dovecot notifies about 0.5 s after delivery).
* ``poll``: NOOP + search at a fixed ``imap_poll_interval``.

Every search follows a NOOP: some servers' SEARCH reflects the mailbox as of the last
NOOP/SELECT, not as announced during IDLE (Gmail; MailKit issue 835). A FETCH that comes back
empty (maddy answers a UID it has not announced yet with nothing) is retried after a NOOP:
it is never an integrity verdict. A final search runs before a timeout is declared. The
junk folder is checked with ``STATUS (UIDNEXT)`` every few seconds and at the end: a message
there is reported as ``delivered to junk``.

A session that breaks or stops answering (per-command timeout, :mod:`.session`) is
reopened and detection goes on, within the run's deadline.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from imapclient.exceptions import IMAPClientError

from ..errors import ProbeFailure
from ..message import TOKEN_HEADER

if TYPE_CHECKING:
    from .session import Found, Mailbox

FAST_PHASE = 2.0  # seconds of fast NOOP polling in adaptive mode
FAST_POLL = 0.01  # seconds between NOOPs in the fast phase
SLOW_POLL_MAX = 2.0  # seconds, NOOP backoff cap without IDLE
IDLE_RENEW = 5.0  # seconds an IDLE lasts before it is re-issued
JUNK_CHECK_EVERY = 3.0  # seconds between STATUS checks of the junk folder
EMPTY_FETCH_RETRY = 0.05  # seconds before the first retry of an empty FETCH (doubles, max 1 s)


def _found(folder: str, uid: int) -> "Found":
    from .session import Found

    return Found(folder, uid, time.monotonic())


def search(box: "Mailbox", uidnext: int, nonce: str) -> list[int]:
    """UIDs >= ``uidnext`` in the selected folder whose token header contains ``nonce``.

    No ``CHARSET`` is sent (the criteria are ASCII; Exchange refuses ``CHARSET`` with
    ``NO [BADCHARSET]``)."""
    uids = box.client.search(["UID", f"{uidnext}:*", "HEADER", TOKEN_HEADER, nonce])
    return sorted(u for u in uids if u >= uidnext)


def _grown(box: "Mailbox", responses) -> bool:
    grown = False
    for item in responses:
        if isinstance(item, tuple) and len(item) == 2 and item[1] == b"EXISTS":
            if int(item[0]) > box.exists:
                grown = True
            box.exists = int(item[0])
    return grown


def _idle(box: "Mailbox", seconds: float, deadline: float) -> bool:
    try:
        early = box.client.idle()
    except IMAPClientError as exc:
        if not str(exc).startswith("IDLE failed"):
            raise
        box.idle_refused = True  # advertised but refused: poll from now on
        return _noop(box)
    box.idling = True
    try:
        responses = box.client.idle_check(timeout=seconds)
    finally:
        box.arm(deadline)
        box.idling = False
        done = box.client.idle_done()
    return _grown(box, list(early) + list(responses) + list(done[1] if done else []))


def _noop(box: "Mailbox") -> bool:
    return _grown(box, box.client.noop()[1])


def _check_junk(box: "Mailbox", nonce: str, every_uid: bool = False) -> "Found | None":
    """Look for the message in the junk folders (new UIDs only, unless ``every_uid``)."""
    for junk, uidnext in box.junk_uidnext.items():
        if not every_uid and box.status_uidnext(junk) <= uidnext:
            continue
        box.client.select_folder(junk, readonly=True)
        try:
            uids = search(box, 1 if every_uid else uidnext, nonce)
            if uids:
                return _found(junk, uids[0])
        finally:
            box.reselect()
    return None


def wait_for(box: "Mailbox", nonce: str, deadline: float) -> "Found":
    """Wait until the message whose token header contains ``nonce`` is in the folder.

    Args:
        box: an open :class:`~.session.Mailbox`.
        nonce: the token's random part (searched as a substring of the token header).
        deadline: ``time.monotonic()`` value at which to give up.

    Returns:
        Where and when the message was seen (the watched folder, or the junk folder).

    Raises:
        ProbeFailure: ``timeout`` (not received; the message says within how many seconds),
            ``imap_connect`` / ``imap_tls`` when the session breaks and cannot be reopened.
    """
    strategy = box.settings.imap_detection
    start = time.monotonic()
    delay = box.settings.imap_poll_interval if strategy == "poll" else FAST_POLL
    last_search = start
    next_junk = start + 1.0
    while True:
        try:
            found = _wait_session(box, nonce, deadline, strategy, start, delay, last_search, next_junk)
            if found is not None:
                return found
            break
        except (OSError, IMAPClientError) as exc:
            if time.monotonic() >= deadline - 0.2:
                raise box.fail_network(exc, "lost connection to") from exc
            try:
                box.reconnect(deadline)
            except ProbeFailure as failure:
                raise box.fail_network(exc, "lost connection to") from failure
            last_search = 0.0  # search at once on the new session
    budget = box.settings.timeout
    raise ProbeFailure("timeout", f"Message not received within {budget:g} seconds")


def _wait_session(box, nonce, deadline, strategy, start, delay, last_search, next_junk) -> "Found | None":
    """Detection on the current session; ``None`` at the deadline. Network errors propagate."""
    while True:
        has_idle = box.client.has_capability("IDLE") and not box.idle_refused
        now = time.monotonic()
        remaining = deadline - now
        if remaining <= 0:
            break
        box.arm(deadline)
        use_idle = has_idle and (strategy == "idle" or (strategy == "adaptive" and now - start >= FAST_PHASE))
        if use_idle:
            grown = _idle(box, min(IDLE_RENEW, remaining, max(0.05, next_junk - now)), deadline)
        else:
            grown = _noop(box)
        now = time.monotonic()
        if grown or strategy == "poll" or now - last_search >= 1.0:
            last_search = now
            if use_idle:
                _noop(box)  # SEARCH may only see what the last NOOP/SELECT saw
            uids = search(box, box.uidnext, nonce)
            if uids:
                return _found(box.folder, uids[0])
        if now >= next_junk:
            next_junk = now + JUNK_CHECK_EVERY
            found = _check_junk(box, nonce)
            if found:
                return found
        if not use_idle:
            if strategy == "adaptive" and now - start >= FAST_PHASE:
                delay = min(SLOW_POLL_MAX, max(delay, 0.1) * 1.5)
            time.sleep(max(0.0, min(delay, deadline - time.monotonic())))
    # final explicit search before declaring a timeout
    box.arm(deadline + 2.0)
    _noop(box)
    uids = search(box, box.uidnext, nonce)
    if uids:
        return _found(box.folder, uids[0])
    return _check_junk(box, nonce, every_uid=True)


def _moved(box: "Mailbox", found: "Found", nonce: str) -> "Found | None":
    box.reselect()
    return _check_junk(box, nonce, every_uid=True)


def fetch(box: "Mailbox", found: "Found", deadline: float, nonce: str = "") -> bytes:
    """Return the full message (``BODY.PEEK[]``, RFC 3501 6.4.5) as the server holds it.

    An empty answer is retried after a NOOP (with a short backoff) until ``deadline``. When
    the UID is gone meanwhile (Exchange Online files spam into ``Junk Email`` after delivering
    to INBOX), the junk folders are searched for ``nonce``.

    Raises:
        ProbeFailure: ``junk`` (moved to a junk folder after delivery; ``folder`` set),
            ``timeout`` when the server still returned no body at the deadline,
            ``imap_connect`` / ``imap_tls`` when the session breaks.
    """
    client = box.client
    pause = EMPTY_FETCH_RETRY
    try:
        if found.folder != box.folder:
            client.select_folder(found.folder, readonly=True)
        while True:
            box.arm(max(deadline, time.monotonic() + 1.0))
            data = client.fetch([found.uid], [b"BODY.PEEK[]"]).get(found.uid, {})
            body = data.get(b"BODY[]")
            if body:
                return bytes(body)
            if time.monotonic() + pause > deadline:
                break
            time.sleep(pause)
            pause = min(1.0, pause * 2)
            client.noop()
            if not client.search(["UID", str(found.uid)]):  # gone: moved after delivery?
                moved = _moved(box, found, nonce)
                if moved is not None:
                    raise ProbeFailure(
                        "junk",
                        f"delivered to junk: the message arrived in {found.folder!r} and was moved to "
                        f"{moved.folder!r} (UID {found.uid} vanished before it could be fetched)",
                        folder=moved.folder,
                    )
    except (OSError, IMAPClientError) as exc:
        raise box.fail_network(exc, "fetch failed at") from exc
    except ProbeFailure:
        raise
    finally:
        if found.folder != box.folder and box.client is not None:
            try:
                box.reselect()
            except Exception:
                pass
    raise ProbeFailure(
        "timeout",
        f"IMAP server {box.server} found the message (UID {found.uid} in {found.folder!r}) but returned no body "
        f"for it within {box.settings.timeout:g} seconds",
    )
