"""A scripted IMAP proxy in front of the real Dovecot: provider behaviour no local server has.

The proxy listens on a free port of 127.0.0.1 only and relays every byte between the probe
(``MESSAGES_SELFCHECK_IMAP_SECURITY=plain``) and Dovecot's IMAP port of the
:class:`~tests.harness.mailstack.MailStack` (Dovecot counts loopback as secured, so LOGIN
works without TLS). A :class:`Personality` sees each client command and each server
response line and may rewrite it, answer it itself, or do a side action on the real Dovecot
(``doveadm``). Everything else is Dovecot's own behaviour: the messages, UIDs, flags,
SEARCH and EXPUNGE are real.

Personalities (each reproduces one documented behaviour; the tests cite the source):

* :class:`Gmail` -- ``X-GM-EXT-1``; INBOX is a label: the user ``gmail``'s Sieve script
  files a copy of each delivery into ``[Gmail]/All Mail``, so ``UID EXPUNGE`` in INBOX leaves
  the message in All Mail, exactly as Gmail does; moving (or copying) a message to
  ``[Gmail]/Bin`` (``\\Trash``, British English name) removes it from All Mail
  (https://developers.google.com/gmail/imap/imap-extensions, https://support.google.com/mail/answer/7401).
  LIST shows INBOX and ``[Gmail]/...`` only, with Gmail's special-use attributes (RFC 6154).
* :class:`MoveWithoutUidplus` -- advertises ``MOVE`` but not ``UIDPLUS`` (maddy 0.8) and
  answers ``UID EXPUNGE`` with ``BAD``.
* :class:`RefusedExpunge` -- ``EXPUNGE`` and ``UID EXPUNGE`` answered ``NO EXPUNGE failed.``
  (Microsoft 365 with a retention policy).
* :class:`StaleSearch` -- SEARCH sees only the messages that existed at the last
  NOOP/SELECT, not those announced during IDLE (Gmail; MailKit issue 835).
* :class:`EmptyFetchUntilNoop` -- ``UID FETCH ... BODY.PEEK[]`` of a UID that a SEARCH
  returned is answered with no data until the next NOOP (maddy).
* :class:`UntaggedBeforeIdle` -- ``* n EXISTS`` before IDLE's ``+`` continuation (GreenMail;
  RFC 3501 7 allows untagged data at any time).
* :class:`DeadIdle` -- on the first connection, the ``DONE`` that ends an IDLE in which new
  mail was announced goes unanswered forever (a NAT that dropped the flow).
* :class:`ExchangeJunkMove` -- no special-use attributes, ``Junk Email``, and spam moved
  there after delivery to INBOX, between the probe's SEARCH and its FETCH (Exchange Online).
* :class:`IdleRefused` -- ``IDLE`` advertised, but answered ``NO``.
* :class:`BadCharset` -- a SEARCH with ``CHARSET`` is refused ``NO [BADCHARSET (US-ASCII)]``
  (Exchange).
* :class:`SilentIdle` -- IDLE is accepted but nothing is ever pushed while it lasts: every
  untagged response between ``+`` and the client's ``DONE`` is dropped (what is pending is
  reported after ``DONE``, as RFC 3501 7 lets a server do at command completion); Courier-IMAP
  with Debian's ``IMAP_ENHANCEDIDLE=0``, Cyrus without ``idled``.
* :class:`Personality` itself changes nothing: a transparent proxy that counts commands.

Use::

    with ImapProxy(stack, Gmail()) as proxy:
        env = stack.probe_env(to_user="gmail", imap_security="plain", imap_port=proxy.port)

``proxy.commands`` lists every client command line (bytes, without CRLF; LOGIN redacted);
``proxy.command_count()`` counts them (``DONE`` is a continuation, not a command) and
``proxy.command_names()`` counts them per name (``NOOP``, ``UID SEARCH`` ...).
``ImapProxy(stack, personality, upstream_port=...)`` proxies another server's plain IMAP port
(default ``stack.imap_port``: Dovecot's, or the Cyrus/Courier stack's own). Both sockets have
``TCP_NODELAY``: without it every two-line answer waited for the client's delayed ACK (~40 ms).
"""

from __future__ import annotations

import re
import socket
import threading
from dataclasses import dataclass, field

HOST = "127.0.0.1"
_TAGGED = re.compile(rb"^(\S+) (OK|NO|BAD)\b", re.I)
_LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n$")
_EXISTS = re.compile(rb"^\* (\d+) EXISTS", re.I)


@dataclass
class Session:
    """State of one proxied connection (``user``: login name once LOGIN succeeded)."""

    number: int
    user: str | None = None
    selected: str | None = None
    exists: int = 0  # as reported by Dovecot
    synced: int = 0  # EXISTS as of the last completed NOOP/SELECT/EXAMINE
    pending: dict = field(default_factory=dict)  # tag -> (command name, full line)
    idle_tag: bytes | None = None
    searched: set = field(default_factory=set)  # UIDs SEARCH returned, not yet announced by a NOOP
    announced: set = field(default_factory=set)  # UIDs a NOOP has announced since
    dead: bool = False
    idle_done: bool = False  # the client sent DONE; the IDLE's completion has not come yet


@dataclass(frozen=True)
class Reply:
    """Answer the client with these bytes instead of forwarding the command."""

    data: bytes


class Personality:
    """Hooks, all optional. ``proxy`` gives access to the stack (``proxy.stack``)."""

    proxy: "ImapProxy"

    def command(self, s: Session, tag: bytes, name: str, line: bytes) -> bytes | Reply | None:
        """A client command (``name`` upper case, ``UID X`` for UID commands). Return a new
        line to forward, a :class:`Reply`, or ``None`` to forward unchanged."""
        return None

    def response(self, s: Session, line: bytes) -> bytes | None:
        """A server response line (first line of a response; literals pass through).
        Return replacement bytes (may be several lines, or ``b""`` to drop) or ``None``."""
        return None

    def completed(self, s: Session, tag: bytes, name: str, line: bytes, status: str) -> None:
        """The server completed command ``name`` (``status`` OK/NO/BAD); before it is relayed."""

    def before_done(self, s: Session) -> bool:
        """Client ended IDLE; return True to swallow DONE and kill the connection's flow."""
        return False


def _caps_edit(line: bytes, drop: tuple[bytes, ...] = (), add: tuple[bytes, ...] = ()) -> bytes:
    """Rewrite the capability list in ``* CAPABILITY ...`` or ``[CAPABILITY ...]``."""

    def fix(words: list[bytes]) -> list[bytes]:
        kept = [w for w in words if w.upper() not in {d.upper() for d in drop}]
        return kept + [a for a in add if a.upper() not in {w.upper() for w in kept}]

    m = re.search(rb"\[CAPABILITY ([^\]]*)\]", line, re.I)
    if m:
        return line[: m.start(1)] + b" ".join(fix(m.group(1).split())) + line[m.end(1):]
    m = re.match(rb"^(\* CAPABILITY )(.*?)(\r\n)$", line, re.I | re.S)
    if m:
        return m.group(1) + b" ".join(fix(m.group(2).split())) + m.group(3)
    return line


class CapabilityEdit(Personality):
    drop: tuple[bytes, ...] = ()
    add: tuple[bytes, ...] = ()

    def response(self, s, line):
        if b"CAPABILITY" in line.upper():
            return _caps_edit(line, self.drop, self.add)
        return None


class MoveWithoutUidplus(CapabilityEdit):
    """maddy 0.8: MOVE, no UIDPLUS (so no UID EXPUNGE)."""

    drop = (b"UIDPLUS",)

    def command(self, s, tag, name, line):
        if name == "UID EXPUNGE":
            return Reply(tag + b" BAD Unknown command UID EXPUNGE (no UIDPLUS)\r\n")
        return None


class RefusedExpunge(Personality):
    """Microsoft 365 with a retention policy: every EXPUNGE is refused."""

    def command(self, s, tag, name, line):
        if name in ("EXPUNGE", "UID EXPUNGE"):
            return Reply(tag + b" NO EXPUNGE failed.\r\n")
        if name == "CLOSE":  # CLOSE would expunge silently
            return Reply(tag + b" OK Close completed.\r\n")
        return None


class StaleSearch(Personality):
    """SEARCH reflects the mailbox as of the last NOOP/SELECT (Gmail, MailKit issue 835)."""

    def command(self, s, tag, name, line):
        if name not in ("SEARCH", "UID SEARCH"):
            return None
        head = tag + (b" UID SEARCH " if name == "UID SEARCH" else b" SEARCH ")
        rest = line[len(head):]
        if s.synced == 0:
            return Reply(b"* SEARCH\r\n" + tag + b" OK Search completed (stale view).\r\n")
        charset = b""
        m = re.match(rb"(CHARSET \S+ )", rest, re.I)
        if m:
            charset, rest = m.group(1), rest[m.end():]
        return head + charset + b"1:%d " % s.synced + rest


class EmptyFetchUntilNoop(Personality):
    """maddy: a UID that SEARCH found is fetched as nothing until the next NOOP."""

    def command(self, s, tag, name, line):
        if name == "UID FETCH" and b"BODY.PEEK[]" in line.upper():
            m = re.match(rb"\S+ UID FETCH (\d+) ", line, re.I)
            if m and int(m.group(1)) in s.searched:
                return Reply(tag + b" OK Fetch completed.\r\n")
        return None


class UntaggedBeforeIdle(Personality):
    """GreenMail: ``* n EXISTS`` before IDLE's continuation request."""

    def response(self, s, line):
        if s.idle_tag is not None and line.startswith(b"+"):
            return b"* %d EXISTS\r\n" % s.exists + line
        return None


class DeadIdle(Personality):
    """The first connection's DONE after an IDLE that announced new mail is never answered."""

    def __init__(self):
        self.announced = False
        self.fired = False

    def response(self, s, line):
        if s.idle_tag is not None and _EXISTS.match(line):
            self.announced = True
        return None

    def before_done(self, s):
        if s.number == 1 and self.announced and not self.fired:
            self.fired = True
            return True
        return False


class IdleRefused(Personality):
    """IDLE advertised but answered ``NO`` (servers or proxies with IDLE disabled by policy)."""

    def command(self, s, tag, name, line):
        if name == "IDLE":
            return Reply(tag + b" NO IDLE is disabled.\r\n")
        return None


class BadCharset(Personality):
    """Exchange: SEARCH with a CHARSET is refused."""

    def command(self, s, tag, name, line):
        if name in ("SEARCH", "UID SEARCH") and b" CHARSET " in line.upper():
            return Reply(tag + b" NO [BADCHARSET (US-ASCII)] The specified charset is not supported.\r\n")
        return None


class SilentIdle(Personality):
    """IDLE that never pushes: untagged responses while IDLE lasts (before ``DONE``) are
    dropped; the server reports them again at the next command's completion (Dovecot re-sends
    ``* n EXISTS`` after ``DONE`` or at the next NOOP since the client has not seen it)."""

    def __init__(self):
        self.dropped = 0

    def response(self, s, line):
        if s.idle_tag is not None and not s.idle_done and line.startswith(b"* "):
            self.dropped += 1
            return b""
        return None


class Gmail(CapabilityEdit):
    """Gmail's labels, All Mail and Trash (see the module doc)."""

    add = (b"X-GM-EXT-1",)
    FOLDERS = {"INBOX": None, "[Gmail]/All Mail": b"\\All", "[Gmail]/Bin": b"\\Trash", "[Gmail]/Spam": b"\\Junk"}
    TRASH = "[Gmail]/Bin"
    ALL = "[Gmail]/All Mail"

    def __init__(self, trash_purges_all_mail: bool = True, all_mail_read_only: bool = False):
        self.trash_purges_all_mail = trash_purges_all_mail
        self.all_mail_read_only = all_mail_read_only  # MOVE/COPY/STORE refused in All Mail
        self._moving: dict[bytes, list[str]] = {}

    def response(self, s, line):
        if b"CAPABILITY" in line.upper():
            return _caps_edit(line, (), self.add)
        m = re.match(rb'^\* (LIST|LSUB) \(([^)]*)\) ("[^"]*"|NIL) (.*?)\r\n$', line, re.I | re.S)
        if m:
            name = m.group(4).decode().strip('"')
            if name not in self.FOLDERS and name != "[Gmail]":
                return b""
            flags = [f for f in m.group(2).split() if f.lower() not in
                     (b"\\junk", b"\\trash", b"\\sent", b"\\all", b"\\drafts", b"\\archive", b"\\flagged")]
            if self.FOLDERS.get(name):
                flags.append(self.FOLDERS[name])
            return b"* %s (%s) %s %s\r\n" % (m.group(1), b" ".join(flags), m.group(3), m.group(4))
        return None

    def command(self, s, tag, name, line):
        if self.all_mail_read_only and s.selected == self.ALL and name in (
                "UID MOVE", "UID COPY", "MOVE", "COPY", "UID STORE", "STORE"):
            return Reply(tag + b" NO [CANNOT] This folder is read-only here.\r\n")
        if name in ("UID MOVE", "UID COPY", "MOVE", "COPY") and s.user and s.selected:
            m = re.match(rb"\S+ (?:UID )?(?:MOVE|COPY) (\S+) (.+)$", line, re.I)
            if m and m.group(2).decode().strip('"') == self.TRASH and self.trash_purges_all_mail:
                self._moving[tag] = self.proxy.stack.message_ids(s.user, s.selected, m.group(1).decode(),
                                                                 uid=name.startswith("UID"))
        return None

    def completed(self, s, tag, name, line, status):
        ids = self._moving.pop(tag, None)
        if ids and status == "OK":
            for mid in ids:
                self.proxy.stack.expunge_by_message_id(s.user, self.ALL, mid)


class ExchangeJunkMove(Personality):
    """Exchange Online: no special-use attributes, folders ``Junk Email`` / ``Deleted Items``
    (the user's Dovecot ``Junk``/``Trash``/``Sent`` are hidden), and spam filed into
    ``Junk Email`` *after* delivery to INBOX: the first time a SEARCH for the probe's token
    finds a message, it is moved there (doveadm) before the result reaches the client.
    The test creates ``Junk Email`` and ``Deleted Items``."""

    HIDDEN = ("Junk", "Trash", "Sent")
    SPECIAL = (b"\\junk", b"\\trash", b"\\sent", b"\\all", b"\\drafts", b"\\archive", b"\\flagged")
    JUNK = "Junk Email"

    def __init__(self):
        self.moved = False

    def response(self, s, line):
        if b"CAPABILITY" in line.upper():
            return _caps_edit(line, (b"SPECIAL-USE",))
        m = re.match(rb'^\* (LIST|LSUB) \(([^)]*)\) ("[^"]*"|NIL) (.*?)\r\n$', line, re.I | re.S)
        if m:
            if m.group(4).decode().strip('"') in self.HIDDEN:
                return b""
            flags = [f for f in m.group(2).split() if f.lower() not in self.SPECIAL]
            return b"* %s (%s) %s %s\r\n" % (m.group(1), b" ".join(flags), m.group(3), m.group(4))
        if (not self.moved and line.upper().startswith(b"* SEARCH ") and s.user and s.selected == "INBOX"
                and any(b"X-SELFCHECK-TOKEN" in cmd.upper() for _n, cmd in s.pending.values())):
            uids = [x.decode() for x in line[9:].split() if x.isdigit()]
            if uids:
                self.moved = True
                address = s.user
                self.proxy.stack.doveadm("move", "-u", address, self.JUNK, "mailbox", "INBOX", "uid", ",".join(uids))
        return None


class ImapProxy:
    """Loopback IMAP proxy to ``stack.imap_port`` with one :class:`Personality`.

    ``start()``/``stop()`` or a context manager; ``port`` is the listening port (int).
    """

    def __init__(self, stack, personality: Personality, upstream_port: int | None = None):
        self.stack = stack
        self.upstream_port = upstream_port or stack.imap_port
        self.personality = personality
        personality.proxy = self
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, 0))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]
        self.commands: list[bytes] = []
        self.sessions: list[Session] = []
        self._socks: list[socket.socket] = []
        self._stopped = threading.Event()
        self._lock = threading.Lock()

    def __enter__(self) -> "ImapProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "ImapProxy":
        threading.Thread(target=self._accept, daemon=True, name="imapproxy-accept").start()
        return self

    def command_count(self) -> int:
        """Number of client commands so far (``DONE`` not included)."""
        return len(self.commands)

    def command_names(self) -> "dict[str, int]":
        """Commands so far per name (``UID X`` for UID commands), e.g. ``{"NOOP": 12, ...}``."""
        counts: dict[str, int] = {}
        for line in list(self.commands):
            words = line.split(b" ")
            name = words[1].upper().decode(errors="replace") if len(words) > 1 else ""
            if name == "UID" and len(words) > 2:
                name += " " + words[2].upper().decode(errors="replace")
            counts[name] = counts.get(name, 0) + 1
        return counts

    def stop(self) -> None:
        self._stopped.set()
        for sock in [self._listener, *self._socks]:
            try:
                sock.close()
            except OSError:
                pass

    # -- plumbing -----------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection((HOST, self.upstream_port), timeout=10)
            upstream.settimeout(None)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._socks += [client, upstream]
            with self._lock:
                session = Session(number=len(self.sessions) + 1)
                self.sessions.append(session)
            wlock = threading.Lock()
            threading.Thread(target=self._c2s, args=(session, client, upstream, wlock), daemon=True).start()
            threading.Thread(target=self._s2c, args=(session, client, upstream, wlock), daemon=True).start()

    def _c2s(self, s: Session, client, upstream, wlock) -> None:
        f = client.makefile("rb")
        try:
            while True:
                line = f.readline()
                if not line:
                    break
                chunks = [line]
                while _LITERAL.search(chunks[-1]):
                    n = int(_LITERAL.search(chunks[-1]).group(1))
                    if s.dead:
                        break
                    upstream.sendall(b"".join(chunks))  # the server's "+" goes back to the client
                    chunks = [f.read(n) + f.readline()]
                if s.dead:
                    continue
                data = b"".join(chunks)
                if s.idle_tag is not None and data.strip().upper() == b"DONE":
                    if self.personality.before_done(s):
                        s.dead = True
                        continue
                    s.idle_done = True
                    upstream.sendall(data)
                    continue
                words = data.split(b" ", 3)
                tag = words[0]
                name = (words[1] if len(words) > 1 else b"").strip().upper().decode(errors="replace")
                if name == "UID" and len(words) > 2:
                    name = "UID " + words[2].strip().upper().decode(errors="replace")
                self.commands.append(tag + b" LOGIN ***" if name == "LOGIN" else data.rstrip(b"\r\n"))
                if name == "LOGIN" and len(words) > 2:
                    s.pending[tag] = (name, data)
                    s.user = words[2].strip(b'"').decode()
                elif name in ("SELECT", "EXAMINE") and len(words) > 2:
                    s.selected = data.split(b" ", 2)[2].strip().strip(b'"').decode()
                action = self.personality.command(s, tag, name, data.rstrip(b"\r\n"))
                if isinstance(action, Reply):
                    with wlock:
                        client.sendall(action.data)
                    continue
                if action is not None:
                    data = action + b"\r\n"
                s.pending[tag] = (name, data)
                if name == "IDLE":
                    s.idle_tag = tag
                    s.idle_done = False
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _s2c(self, s: Session, client, upstream, wlock) -> None:
        f = upstream.makefile("rb")
        try:
            while True:
                line = f.readline()
                if not line:
                    break
                literal = b""
                m = _LITERAL.search(line)
                if m:
                    literal = f.read(int(m.group(1)))
                if s.dead:
                    continue
                self._observe(s, line)
                out = self.personality.response(s, line)
                if out is None:
                    out = line
                t = _TAGGED.match(line)
                if t and t.group(1) in s.pending:
                    name, _cmd = s.pending.pop(t.group(1))
                    status = t.group(2).decode().upper()
                    if name in ("NOOP", "SELECT", "EXAMINE") and status == "OK":
                        s.synced = s.exists
                    if name == "NOOP":
                        s.announced |= s.searched
                        s.searched.clear()
                    if name == "IDLE":
                        s.idle_tag = None
                        s.idle_done = False
                    self.personality.completed(s, t.group(1), name, line, status)
                with wlock:  # what follows a literal is read as the next "line"
                    client.sendall(out + literal)
        except OSError:
            pass
        finally:
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @staticmethod
    def _observe(s: Session, line: bytes) -> None:
        m = _EXISTS.match(line)
        if m:
            s.exists = int(m.group(1))
        if line.upper().startswith(b"* SEARCH"):
            s.searched |= {int(x) for x in line[8:].split() if x.isdigit()} - s.announced


class StarttlsStripper:
    """An SMTP middlebox in front of Postfix's submission port (loopback): it answers
    ``STARTTLS`` with ``220 2.0.0 Ready to start TLS`` itself and relays the client's TLS
    handshake to Postfix as if it were commands, so the client gets clear-text replies where
    it expects a ServerHello (like firewalls' "ESMTP inspection" that break STARTTLS).

    ``start()``/``stop()`` or a context manager; ``port`` is the listening port.
    """

    def __init__(self, stack):
        self.stack = stack
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, 0))
        self._listener.listen(8)
        self.port = self._listener.getsockname()[1]
        self._socks: list[socket.socket] = []

    def __enter__(self) -> "StarttlsStripper":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "StarttlsStripper":
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        for sock in [self._listener, *self._socks]:
            try:
                sock.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection((HOST, self.stack.submission_port), timeout=10)
            upstream.settimeout(None)
            self._socks += [client, upstream]
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
            threading.Thread(target=self._c2s, args=(client, upstream), daemon=True).start()

    @staticmethod
    def _pump(src, dst) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _c2s(self, client, upstream) -> None:
        f = client.makefile("rb")
        try:
            while True:
                line = f.readline()
                if not line:
                    break
                if line.strip().upper() == b"STARTTLS":
                    client.sendall(b"220 2.0.0 Ready to start TLS\r\n")
                    while True:  # the ClientHello and whatever follows go to Postfix as "commands"
                        data = f.read1(65536)
                        if not data:
                            return
                        upstream.sendall(data)
                upstream.sendall(line)
        except OSError:
            pass
