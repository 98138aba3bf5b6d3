"""Arrival detection (``imap_detection``) and fetching the arrived message.

Sources: RFC 3501 (NOOP 6.1.2: the server reports new mail as an untagged ``* n EXISTS``
in any command's response; UID SEARCH 6.4.4), RFC 2177 (IDLE). All durations are seconds;
elapsed times are counted from the SMTP submission's 250 reply to DATA (before QUIT).

* ``adaptive`` (default) follows a :class:`Plan`:

  - **No history** (the first check): NOOP polls whose gap grows with the time waited,
    ``max(FAST_POLL, POLL_GROWTH * elapsed)``: every 10 ms for the first 0.1 s, then 10 % of
    the time waited, at most :data:`SLOW_POLL_MAX` (a 2 s delivery is seen within ~0.2 s, a
    10 ms one within ~10 ms): paced polling. Once this server's IDLE (RFC 2177) has pushed
    something in this process, waits longer than :data:`IDLE_MIN` are IDLEs of up to
    :data:`IDLE_RENEW` instead (a push ends them at once).
  - **History** (``imap_expected_arrival``: recent reception times, from the controller or
    from earlier runs of this process, ``run --loop``): a short fast start (until
    :data:`FAST_START_PLANNED`), then one IDLE (or a plain sleep) until the *lead-in*, NOOPs
    whose gap shrinks towards the earliest recent arrival (``DENSE_POLL`` +
    :data:`LEAD_IN_GROWTH` x the distance to it), NOOP every :data:`DENSE_POLL` through the
    window of recent arrivals (up to :data:`WINDOW_LEAD` + :data:`WINDOW_LEAD_SHARE` of the
    median after the latest), then gaps growing with the time past the window. The lead-in
    is as long as the history is unsure: :data:`LEAD_IN_SHARE` of the median divided by the
    number of recent arrivals (a single one says little about the spread), at least the
    window's lead: an earlier delivery than ever seen is still timed within a fraction of
    how much earlier it came, not at the window's start.

  Dovecot notifies an IDLE about 0.5 s after delivery (``NOTIFY_DELAY_MSECS`` in its
  ``mailbox-watch.c``); a NOOP is answered from the current state. Courier-IMAP (Debian's
  ``IMAP_ENHANCEDIDLE=0``) and Cyrus without ``idled`` never push during IDLE, and Dovecot's
  completion of ``DONE`` does not report what it has not pushed yet. So IDLE is only a cheap
  way to wait (before the window, or once the server is known to push), never the clock: the
  checks that time the arrival are NOOPs.
* ``idle``: IDLE from the start (re-issued every :data:`IDLE_RENEW`).
* ``poll``: NOOP + search at a fixed ``imap_poll_interval``.

``reception_time`` is the moment the server's state first showed a new message: the
response (NOOP, an IDLE push, or the completion of ``DONE``) that announced the ``EXISTS``
growth that the following ``UID SEARCH UID <uidnext>:* HEADER X-Selfcheck-Token <nonce>``
confirmed; the search, NOOP and ``DONE`` round trips after it are not counted. The search
runs only when ``EXISTS`` grew, plus a safety search with each junk check.

Every search follows a NOOP: some servers' SEARCH reflects the mailbox as of the last
NOOP/SELECT, not as announced during IDLE (Gmail; MailKit issue 835). A FETCH that comes back
empty (maddy answers a UID it has not announced yet with nothing) is retried after a NOOP:
it is never an integrity verdict. A final search runs before a timeout is declared. The
junk folder is checked with ``STATUS (UIDNEXT)`` (without history 1 s after the start, with
history :data:`JUNK_AFTER_WINDOW` after the window, so that a delivery just behind the window
costs no junk check; then every :data:`JUNK_CHECK_EVERY` and at the end): a message there is
reported as ``delivered to junk``.

A session that breaks or stops answering (per-command timeout, :mod:`.session`) is
reopened and detection goes on, within the run's deadline.
"""

from __future__ import annotations

import socket
import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from imapclient.exceptions import IMAPClientError

from ..errors import ProbeFailure
from ..message import TOKEN_HEADER

if TYPE_CHECKING:
    from .session import Found, Mailbox

FAST_POLL = 0.01  # seconds: the smallest gap between two NOOPs
POLL_GROWTH = 0.1  # share of the time waited used as the gap between checks
FAST_START_PLANNED = 0.02  # seconds of fast polling when history expects the message later (2 NOOPs)
DENSE_POLL = 0.025  # seconds between NOOPs inside the expected-arrival window
MAX_WINDOW_POLLS = 16  # a wider window polls less densely (at most 0.1 s apart)
WINDOW_SPREAD = 2.5  # robust standard deviations around the median that the window covers
WINDOW_LEAD = 0.05  # seconds added before the earliest and after the latest recent arrival...
WINDOW_LEAD_SHARE = 0.01  # ... plus this share of their median
LEAD_IN_SHARE = 0.1  # lead-in before the earliest recent arrival: this share of the median / n
LEAD_IN_GROWTH = 0.1  # in the lead-in, the gap grows by this share of the distance to the window
IDLE_MIN = 0.3  # seconds: shorter waits are sleeps, longer ones IDLE (where offered)
SLOW_POLL_MAX = 1.0  # seconds: longest wait between two checks while IDLE has never pushed
IDLE_RENEW = 5.0  # seconds: longest IDLE (once the server's IDLE has pushed)
JUNK_CHECK_EVERY = 3.0  # seconds between STATUS checks of the junk folder
JUNK_AFTER_WINDOW = 1.0  # seconds after the expected-arrival window of the first junk check
HISTORY = 10  # recent reception times kept per mailbox in this process (run --loop)
EMPTY_FETCH_RETRY = 0.05  # seconds before the first retry of an empty FETCH (doubles, max 1 s)

#: Reception times (seconds) seen by earlier runs of this process, per (server, login, folder).
_recent: dict[tuple, deque] = {}
#: Servers whose IDLE has pushed a response in this process (IDLE may then last IDLE_RENEW).
_pushing: set[str] = set()


@dataclass(frozen=True)
class Plan:
    """When to look, in seconds after the submission (see the module doc).

    ``fast_until``: end of the initial fast polling; ``window``: ``(start, end)`` of dense
    polling around the expected arrival, or ``None`` without history; ``dense``: the gap
    between NOOPs inside the window; ``lead_in``: when polling starts before the window (the
    gaps shrink towards ``window[0]``); nothing is expected before it."""

    fast_until: float
    window: tuple[float, float] | None = None
    dense: float = DENSE_POLL
    lead_in: float = 0.0


def plan(recent: list[float]) -> Plan:
    """The :class:`Plan` for recent reception times ``recent`` (seconds; any order).

    Values far from their median are ignored, so one outlier does not stretch the window:
    below half or above twice of it, and with 4 or more values those more than
    :data:`WINDOW_SPREAD` robust standard deviations (1.4826 x the median absolute
    deviation) away (e.g. a first check's time, measured by the coarser no-history pacing);
    an arrival there is still found by the lead-in or the pacing after the window."""
    values = [v for v in recent if v >= 0]
    if not values:
        return Plan(fast_until=0.0)
    median = statistics.median(values)
    near = [v for v in values if median / 2 <= v <= median * 2] or [median]
    lead = WINDOW_LEAD + WINDOW_LEAD_SHARE * median
    if len(near) >= 4:
        spread = WINDOW_SPREAD * 1.4826 * statistics.median(abs(v - median) for v in near)
        near = [v for v in near if abs(v - median) <= max(spread, lead)]
    start, end = min(near), max(near) + lead
    lead_in = max(0.0, start - max(lead, LEAD_IN_SHARE * median / len(near)))
    dense = min(0.1, max(DENSE_POLL, (end - start) / MAX_WINDOW_POLLS))
    return Plan(fast_until=min(FAST_START_PLANNED, lead_in), window=(start, end), dense=dense, lead_in=lead_in)


def next_check(p: Plan, elapsed: float, slow_max: float = SLOW_POLL_MAX) -> float:
    """Seconds to wait, ``elapsed`` seconds after the submission, before the next check
    (a NOOP, or the end of an IDLE); at most ``slow_max``."""
    if elapsed < p.fast_until:
        return min(max(FAST_POLL, POLL_GROWTH * elapsed), p.fast_until - elapsed + FAST_POLL)
    if p.window is None:
        return min(slow_max, max(FAST_POLL, POLL_GROWTH * elapsed))
    start, end = p.window
    paced = max(FAST_POLL, POLL_GROWTH * elapsed)  # a fast delivery keeps the fast gap
    if elapsed < p.lead_in:
        return p.lead_in - elapsed  # nothing expected before the lead-in: one wait
    if elapsed < start:
        return min(p.dense + LEAD_IN_GROWTH * (start - elapsed), paced)
    if elapsed <= end:
        return min(p.dense, paced)
    return min(slow_max, p.dense + POLL_GROWTH * (elapsed - end))


def before_window(p: Plan, elapsed: float) -> bool:
    """True between the fast start and the lead-in of the expected-arrival window (nothing
    expected yet: a cheap wait)."""
    return p.window is not None and p.fast_until <= elapsed < p.lead_in


def _key(box: "Mailbox") -> tuple:
    return (box.server, box.settings.imap_login, box.folder)


def recent_arrivals(box: "Mailbox") -> list[float]:
    """Reception times to plan with: ``imap_expected_arrival`` plus those of earlier runs of
    this process on the same mailbox (newest :data:`HISTORY`)."""
    configured = list(getattr(box.settings, "imap_expected_arrivals", []) or [])
    return (configured + list(_recent.get(_key(box), ())))[-HISTORY:]


def remember_arrival(box: "Mailbox", seconds: float) -> None:
    """Keep a reception time (seconds) for the next runs of this process."""
    _recent.setdefault(_key(box), deque(maxlen=HISTORY)).append(seconds)


class _Watch:
    """Detection state that outlives a reconnect."""

    def __init__(self, box: "Mailbox", strategy: str, start: float):
        self.strategy = strategy
        self.start = start
        self.plan = plan(recent_arrivals(box)) if strategy == "adaptive" else Plan(fast_until=0.0)
        first_junk = self.plan.window[1] + JUNK_AFTER_WINDOW if self.plan.window else 1.0
        self.next_junk = start + first_junk
        self.search_now = False  # search at the next check regardless of EXISTS (new session)
        self.grown_at: float | None = None  # when EXISTS last grew, not yet searched
        self.synced_at = start  # when the last NOOP/DONE completed

    def absorb(self, box: "Mailbox", responses, at: float) -> bool:
        """Track ``* n EXISTS`` / ``* n EXPUNGE`` in ``responses`` received at ``at``; True if
        EXISTS grew."""
        grown = False
        for item in responses:
            if not (isinstance(item, tuple) and len(item) >= 2 and item[1] in (b"EXISTS", b"EXPUNGE")):
                continue
            try:
                int(item[0])
            except (TypeError, ValueError):
                continue
            if item[1] == b"EXISTS":
                if int(item[0]) > box.exists:
                    grown = True
                box.exists = int(item[0])
            elif item[1] == b"EXPUNGE" and box.exists > 0:
                box.exists -= 1
        if grown and self.grown_at is None:
            self.grown_at = at
        return grown

    def found(self, folder: str, uid: int) -> "Found":
        """A :class:`~.session.Found` dated at the announcement (see the module doc)."""
        from .session import Found

        return Found(folder, uid, self.grown_at if self.grown_at is not None else self.synced_at)


def search(box: "Mailbox", uidnext: int, nonce: str) -> list[int]:
    """UIDs >= ``uidnext`` in the selected folder whose token header contains ``nonce``.

    No ``CHARSET`` is sent (the criteria are ASCII; Exchange refuses ``CHARSET`` with
    ``NO [BADCHARSET]``)."""
    uids = box.client.search(["UID", f"{uidnext}:*", "HEADER", TOKEN_HEADER, nonce])
    return sorted(u for u in uids if u >= uidnext)


def _noop(box: "Mailbox", w: _Watch) -> bool:
    responses = box.client.noop()[1]
    w.synced_at = time.monotonic()
    return w.absorb(box, responses, w.synced_at)


def _idle(box: "Mailbox", w: _Watch, seconds: float, deadline: float) -> bool:
    """One IDLE of at most ``seconds``, ended by DONE as soon as EXISTS grows; True if it grew
    (pushed, or reported at the completion of DONE)."""
    try:
        early = box.client.idle()
    except IMAPClientError as exc:
        if not str(exc).startswith("IDLE failed"):
            raise
        box.idle_refused = True  # advertised but refused: poll from now on
        return _noop(box, w)
    box.idling = True
    grown = w.absorb(box, early, time.monotonic())
    end = time.monotonic() + seconds
    try:
        while not grown:
            left = min(end, deadline) - time.monotonic()
            if left <= 0:
                break
            responses = box.client.idle_check(timeout=left)
            if responses:
                _pushing.add(box.server)  # this server's IDLE pushes: longer IDLEs are fine
                grown = w.absorb(box, responses, time.monotonic())
    finally:
        box.arm(deadline)
        box.idling = False
        done = box.client.idle_done()
    w.synced_at = time.monotonic()
    return w.absorb(box, list(done[1] if done else []), w.synced_at) or grown


def _check_junk(box: "Mailbox", nonce: str, every_uid: bool = False) -> "Found | None":
    """Look for the message in the junk folders (new UIDs only, unless ``every_uid``)."""
    for junk, uidnext in box.junk_uidnext.items():
        if not every_uid and box.status_uidnext(junk) <= uidnext:
            continue
        seen = time.monotonic()
        box.client.select_folder(junk, readonly=True)
        try:
            uids = search(box, 1 if every_uid else uidnext, nonce)
            if uids:
                from .session import Found

                return Found(junk, uids[0], seen)
        finally:
            box.reselect()
    return None


def wait_for(box: "Mailbox", nonce: str, deadline: float, since: float | None = None) -> "Found":
    """Wait until the message whose token header contains ``nonce`` is in the folder.

    Args:
        box: an open :class:`~.session.Mailbox`.
        nonce: the token's random part (searched as a substring of the token header).
        deadline: ``time.monotonic()`` value at which to give up.
        since: ``time.monotonic()`` of the submission's 250 reply, from which the plan's
            times and the remembered reception time count (default: now).

    Returns:
        Where the message was seen and ``seen_at``: the ``time.monotonic()`` moment the
        server's response first showed it (see the module doc), not when the search ended.
        The run's reception time (seconds) is remembered for later runs of this process.

    Raises:
        ProbeFailure: ``timeout`` (not received; the message says within how many seconds),
            ``imap_connect`` / ``imap_tls`` when the session breaks and cannot be reopened.
    """
    start = time.monotonic() if since is None else min(since, time.monotonic())
    w = _Watch(box, box.settings.imap_detection, start)
    while True:
        try:
            _no_delay(box)
            found = _wait_session(box, nonce, deadline, w)
            if found is not None:
                if found.folder == box.folder:
                    remember_arrival(box, found.seen_at - start)
                return found
            break
        except (OSError, IMAPClientError) as exc:
            if time.monotonic() >= deadline - 0.2:
                raise box.fail_network(exc, "lost connection to") from exc
            try:
                box.reconnect(deadline)
            except ProbeFailure as failure:
                raise box.fail_network(exc, "lost connection to") from failure
            w.search_now = True  # search at once on the new session
    budget = box.settings.timeout
    raise ProbeFailure("timeout", f"Message not received within {budget:g} seconds")


def _no_delay(box: "Mailbox") -> None:
    """``TCP_NODELAY`` on the IMAP socket: without it a command that follows a response of
    several TCP segments waits for the delayed ACK (~40 ms on Linux)."""
    try:
        box.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


def _wait_session(box: "Mailbox", nonce: str, deadline: float, w: _Watch) -> "Found | None":
    """Detection on the current session; ``None`` at the deadline. Network errors propagate."""
    settings = box.settings
    while True:
        has_idle = box.client.has_capability("IDLE") and not box.idle_refused
        now = time.monotonic()
        remaining = deadline - now
        if remaining <= 0:
            break
        box.arm(deadline)
        elapsed = now - w.start
        used_idle = False
        if w.search_now or w.strategy == "poll":
            wait = settings.imap_poll_interval if w.strategy == "poll" else 0.0
            grown = _noop(box, w)
        elif w.strategy == "idle" and has_idle:
            wait, used_idle = 0.0, True
            grown = _idle(box, w, min(IDLE_RENEW, remaining, max(0.05, w.next_junk - now)), deadline)
        else:
            slow_max = IDLE_RENEW if box.server in _pushing else SLOW_POLL_MAX
            wait = min(next_check(w.plan, elapsed, slow_max), remaining, max(0.01, w.next_junk - now))
            if has_idle and wait >= IDLE_MIN and (box.server in _pushing or before_window(w.plan, elapsed)):
                grown = _idle(box, w, wait, deadline)
                wait, used_idle = 0.0, True
            else:
                grown = _noop(box, w)
        now = time.monotonic()
        junk_due = now >= w.next_junk
        if grown or w.search_now or w.strategy == "poll" or junk_due:
            if used_idle:
                _noop(box, w)  # SEARCH may only see what the last NOOP/SELECT saw
            w.search_now = False
            uids = search(box, box.uidnext, nonce)
            if uids:
                return w.found(box.folder, uids[0])
            w.grown_at = None
        if junk_due:
            w.next_junk = now + JUNK_CHECK_EVERY
            found = _check_junk(box, nonce)
            if found:
                return found
        if wait > 0:
            time.sleep(max(0.0, min(wait, deadline - time.monotonic())))
    # final explicit search before declaring a timeout
    box.arm(deadline + 2.0)
    _noop(box, w)
    uids = search(box, box.uidnext, nonce)
    if uids:
        return w.found(box.folder, uids[0])
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
