"""When a server really stored a message: the truth that detection is timed against.

Dovecot: its ``mail_log`` line (``MailStack.delivery_time``, written just after the message
became visible). Courier (Postfix ``virtual`` into Maildir) and Cyrus (lmtpd's spool file
``<uid>.`` under ``spool/uuid/``, written before its index makes the message visible; its
``Delivered:`` log line comes after visibility): the message file's mtime, caught with inotify
(``inotify_simple``) on arrival, because the probe's cleanup removes the file right after.

Used by ``benchmarks/detection_overhead.py`` and ``tests/integration/test_detection.py``.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Callable

from inotify_simple import INotify, flags

_MESSAGE_ID = re.compile(rb"^Message-ID:\s*<([^>]+)>", re.M | re.I)


class SpoolWatch:
    """inotify (``IN_CREATE``, ``IN_MOVED_TO``) on the directories ``dirs()`` returns
    (asked again every 0.2 s for new ones): Message-ID -> the message file's mtime (epoch
    seconds) on arrival. ``close()`` stops the watch."""

    def __init__(self, dirs: Callable[[], list[Path]]):
        self._inotify = INotify()
        self._dirs_fn = dirs
        self._dirs: dict[int, Path] = {}
        self.mtimes: dict[str, float] = {}
        self._stop = threading.Event()
        self._rescan()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _rescan(self) -> None:
        for d in self._dirs_fn():
            if d not in self._dirs.values():
                try:
                    self._dirs[self._inotify.add_watch(d, flags.CREATE | flags.MOVED_TO)] = d
                except OSError:
                    pass  # gone again (a folder deleted meanwhile)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for event in self._inotify.read(timeout=200):
                d = self._dirs.get(event.wd)
                if d is None:
                    continue
                path = d / event.name
                try:
                    head = path.read_bytes()[:4096]
                    mtime = path.stat().st_mtime_ns / 1e9
                except OSError:
                    continue
                m = _MESSAGE_ID.search(head)
                if m:
                    self.mtimes.setdefault(m.group(1).decode(), mtime)
            self._rescan()

    def time_of(self, message_id: str, timeout: float = 2.0) -> float:
        """Epoch seconds of ``message_id``'s file (with or without ``<>``); ``LookupError``
        if no such file arrived within ``timeout`` seconds."""
        want, deadline = message_id.strip().strip("<>"), time.monotonic() + timeout
        while want not in self.mtimes:
            if time.monotonic() > deadline:
                raise LookupError(f"no message file seen for <{want}>")
            time.sleep(0.02)
        return self.mtimes[want]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._inotify.close()


def truth_function(name: str, stack, users: tuple[str, ...] = ("receiver", "held")) -> Callable[[str], float]:
    """``f(message_id) -> epoch seconds`` at which ``stack`` (server ``name``: ``dovecot``,
    ``cyrus`` or ``courier``) stored a message for one of ``users``. For Cyrus and Courier
    it starts a :class:`SpoolWatch` (``f.watch``; close it when done)."""
    if name == "dovecot":
        return lambda mid: stack.delivery_time(mid)
    if name == "cyrus":
        from imapclient import IMAPClient

        for user in users:  # Cyrus creates INBOX at the first login (autocreate)
            u = stack.users[stack._short(user)]
            with IMAPClient("127.0.0.1", port=stack.imap_port, ssl=False) as c:
                c.login(u.address, u.password)
        spool = stack.cy_dir / "spool" / "uuid"
        watch = SpoolWatch(lambda: [p for p in spool.glob("*/*/*") if p.is_dir()])
    elif name == "courier":
        maildirs = [stack.maildir(stack._short(u)) for u in users]
        for d in maildirs:
            for sub in ("new", "cur"):
                (d / sub).mkdir(parents=True, exist_ok=True)
        watch = SpoolWatch(lambda: [d / sub for d in maildirs for sub in ("new", "cur")])
    else:
        raise ValueError(f"no delivery truth for server {name!r}")
    def f(message_id: str) -> float:
        return watch.time_of(message_id)

    f.watch = watch  # type: ignore[attr-defined]
    return f
