"""Shared parts of the server-matrix stacks: install cache, mount namespaces, syslog, IMAP views.

* ``CACHE``: ``~/.cache/mail-selfcheck/servers`` (``$MAIL_SELFCHECK_CACHE/servers``), filled by
  ``hack/install-servers.sh``; ``ensure_installed(part)`` runs that script (idempotent, ~10 ms
  when warm) and returns the part's directory.
* ``namespace_argv(mounts, argv)``: run ``argv`` in a private mount namespace
  (``unshare --mount --propagation private``) after bind/overlay mounts, so that servers with
  compiled-in paths (``/etc/courier``, ``/run/courier``, ``/dev/log``) see files of a
  temporary directory there; nothing is mounted or created outside the namespace.
* ``SyslogSink``: an ``AF_UNIX`` datagram socket in a temp dir, bound by a thread that appends
  every syslog datagram (RFC 3164 ``<PRI>...``) to a log file; mounted on ``/dev/log`` of the
  namespace for servers that log only to syslog (Cyrus).
* ``ImapView``: the test's own IMAP client view of a mailbox (``imapclient``, not the probe):
  list/plant/clear messages on any server, with the shapes documented on each method.
* ``PostfixFront``: a ``tests.harness.mailstack.MailStack`` whose Postfix (same ports, TLS,
  submission rules) delivers into another IMAP server instead of Dovecot, and authenticates
  SMTP AUTH through Cyrus SASL with a sasldb (``saslpasswd2``) instead of Dovecot's socket.

The ``probe_env()`` contract is the one of ``MailStack.probe_env`` (see mailstack.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import email
import email.policy
import os
import pathlib
import pwd
import shutil
import socket
import subprocess
import threading
import time
from datetime import datetime

from imapclient import IMAPClient

from tests.harness.mailstack import HOST, MailStack, MailStackError, _kill_wait, _tail

REPO = pathlib.Path(__file__).resolve().parents[3]
INSTALL_SCRIPT = REPO / "hack" / "install-servers.sh"
CACHE = pathlib.Path(os.environ.get("MAIL_SELFCHECK_CACHE",
                                    pathlib.Path.home() / ".cache" / "mail-selfcheck")) / "servers"
TOKEN_HEADER = "X-Selfcheck-Token"


class ServerStackError(MailStackError):
    """A server of the matrix could not be installed/started/controlled; message has log tails."""


def ensure_installed(part: str) -> pathlib.Path:
    """Run ``hack/install-servers.sh <part>`` (``cyrus`` | ``courier`` | ``greenmail``) and
    return ``CACHE / part``. Raises ``ServerStackError`` with the script's output on failure."""
    cp = subprocess.run(["bash", str(INSTALL_SCRIPT), part], capture_output=True, text=True,
                        timeout=900, stdin=subprocess.DEVNULL)
    if cp.returncode != 0:
        raise ServerStackError(f"hack/install-servers.sh {part} failed (exit {cp.returncode}):\n"
                               f"{cp.stdout}\n{cp.stderr}")
    return CACHE / part


def lib_path(root: pathlib.Path) -> str:
    """``LD_LIBRARY_PATH`` value for an unpacked Debian root (same list as the install script)."""
    return ":".join(str(root / d) for d in ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu",
                                            "usr/lib", "usr/lib/courier-authlib"))


def package_versions(part_dir: pathlib.Path) -> dict[str, str]:
    """``{debian package: version}`` unpacked for a part (from its ``.complete`` stamp)."""
    out = {}
    for line in (part_dir / ".complete").read_text().split():
        name, _, version = line.partition("=")
        out[name] = version
    return out


@dataclasses.dataclass(frozen=True)
class Bind:
    """Bind-mount ``source`` (a path on the host) onto ``target`` inside the namespace."""

    source: str
    target: str


@dataclasses.dataclass(frozen=True)
class Overlay:
    """Read-only overlay on ``target``: ``layer`` (a temp dir) on top of the original ``target``."""

    layer: str
    target: str


def namespace_argv(mounts: list[Bind | Overlay], argv: list[str]) -> list[str]:
    """argv running ``argv`` in a new private mount namespace after ``mounts`` (in order).

    ``/dev`` needs care: a ``Bind`` onto ``/dev`` should be recursive (``--rbind``) because it
    carries the device binds made beforehand; every ``Bind`` here is ``--rbind``."""
    script = ["set -e"]
    for m in mounts:
        if isinstance(m, Bind):
            script.append(f"mount --rbind '{m.source}' '{m.target}'")
        else:
            script.append(f"mount -t overlay overlay -o 'lowerdir={m.layer}:{m.target}' '{m.target}'")
    script.append('exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
            "\n".join(script), "ns", *argv]


def private_dev(dev_dir: pathlib.Path, log_socket: pathlib.Path | None) -> list[Bind]:
    """Mounts that give the namespace a ``/dev`` made of ``dev_dir`` holding binds of the
    host's null/zero/random/urandom/full/tty and ``log`` = ``log_socket`` (a syslog sink).
    ``dev_dir`` must not exist yet or be empty."""
    dev_dir.mkdir(parents=True, exist_ok=True)
    mounts: list[Bind] = []
    for name in ("null", "zero", "random", "urandom", "full", "tty"):
        if os.path.exists(f"/dev/{name}"):
            (dev_dir / name).touch()
            mounts.append(Bind(f"/dev/{name}", str(dev_dir / name)))
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        (dev_dir / name).symlink_to(target)
    for name in ("shm", "pts"):
        (dev_dir / name).mkdir()
    if log_socket is not None and log_socket.parent != dev_dir:
        (dev_dir / "log").touch()
        mounts.append(Bind(str(log_socket), str(dev_dir / "log")))
    mounts.append(Bind(str(dev_dir), "/dev"))
    return mounts


class SyslogSink:
    """Receive syslog datagrams on ``socket_path`` and append them (one line each, with a
    local receive timestamp ``YYYY-mm-dd HH:MM:SS.ffffff``) to ``log_path``.

    ``start()`` binds the socket (mode 0666) and starts a daemon thread; ``stop()`` closes it."""

    def __init__(self, socket_path: pathlib.Path, log_path: pathlib.Path):
        self.socket_path = socket_path
        self.log_path = log_path
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(str(self.socket_path))
        os.chmod(self.socket_path, 0o666)
        s.settimeout(0.2)
        self._sock = s
        self._thread = threading.Thread(target=self._loop, name=f"syslog-{self.log_path.name}",
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        with open(self.log_path, "a", buffering=1, errors="replace") as out:
            while self._sock is not None:
                try:
                    data = self._sock.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    return
                stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")
                out.write(f"{stamp} {data.decode(errors='replace').rstrip()}\n")

    def stop(self) -> None:
        s, self._sock = self._sock, None
        if s is not None:
            s.close()
        if self._thread is not None:
            self._thread.join(2)
            self._thread = None


@dataclasses.dataclass
class Message:
    """One message as the test sees it over IMAP: ``uid`` (int), ``flags`` (tuple of ``str``,
    e.g. ``"\\\\Deleted"``), ``token`` (the ``X-Selfcheck-Token`` header value or ``None``),
    ``subject`` (``str``), ``raw`` (``bytes``, RFC 5322)."""

    uid: int
    flags: tuple[str, ...]
    token: str | None
    subject: str
    raw: bytes


class ImapView:
    """The test's IMAP client view of one server (``imapclient``; independent of the probe).

    ``ImapView(host, port, ssl_context=None, starttls=False)``: ``ssl_context`` given ->
    implicit TLS; ``starttls=True`` -> STARTTLS on a plain port with that context; neither ->
    plain IMAP (loopback only). Logins are ``(username, password)``.
    """

    def __init__(self, host: str, port: int, ssl_context=None, starttls: bool = False):
        self.host, self.port, self.ssl_context, self.starttls = host, port, ssl_context, starttls

    @contextlib.contextmanager
    def client(self, username: str, password: str):
        """A logged-in ``IMAPClient`` (logged out on exit); 10 s socket timeout."""
        use_ssl = self.ssl_context is not None and not self.starttls
        c = IMAPClient(self.host, port=self.port, ssl=use_ssl, ssl_context=self.ssl_context,
                       timeout=10)
        try:
            if self.starttls:
                c.starttls(self.ssl_context)
            c.login(username, password)
            yield c
        finally:
            with contextlib.suppress(Exception):
                c.logout()

    def messages(self, username: str, password: str, folder: str = "INBOX") -> list[Message]:
        """Every message in ``folder`` (``\\Deleted`` ones included), by UID. A folder that
        does not exist yields ``[]``."""
        with self.client(username, password) as c:
            if not c.folder_exists(folder):
                return []
            c.select_folder(folder, readonly=True)
            uids = c.search(["ALL"])
            if not uids:
                return []
            out = []
            for uid, data in sorted(c.fetch(uids, ["FLAGS", "BODY.PEEK[]"]).items()):
                raw = data[b"BODY[]"]
                msg = email.message_from_bytes(raw, policy=email.policy.compat32)
                tok = msg.get(TOKEN_HEADER)
                out.append(Message(uid=uid, flags=tuple(f.decode() for f in data[b"FLAGS"]),
                                   token=" ".join(tok.split()) if tok else None,
                                   subject=str(msg.get("Subject", "")), raw=raw))
            return out

    def folders(self, username: str, password: str) -> list[str]:
        """Names of every folder of the user (``LIST "" *``)."""
        with self.client(username, password) as c:
            return [name for _flags, _sep, name in c.list_folders()]

    def append(self, username: str, password: str, raw: bytes, folder: str = "INBOX",
               flags: tuple[str, ...] = (), msg_time: datetime | None = None) -> None:
        """APPEND ``raw`` (RFC 5322 bytes) to ``folder`` with ``flags`` and INTERNALDATE
        ``msg_time`` (aware ``datetime``; default now)."""
        with self.client(username, password) as c:
            c.append(folder, raw, flags=flags, msg_time=msg_time)

    def clear(self, username: str, password: str) -> None:
        """Delete every message in every selectable folder of the user (STORE \\Deleted +
        EXPUNGE)."""
        with self.client(username, password) as c:
            for flags, _sep, name in c.list_folders():
                if b"\\Noselect" in flags or b"\\NonExistent" in flags:
                    continue
                c.select_folder(name)
                uids = c.search(["ALL"])
                if uids:
                    c.add_flags(uids, [b"\\Deleted"], silent=True)
                    c.expunge()
                c.unselect_folder() if c.has_capability("UNSELECT") else c.close_folder()

    def wait_count(self, username: str, password: str, count: int, folder: str = "INBOX",
                   timeout: float = 10.0) -> list[Message]:
        """Wait until ``folder`` holds ``>= count`` messages; return them. Raises
        ``ServerStackError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            msgs = self.messages(username, password, folder)
            if len(msgs) >= count:
                return msgs
            if time.monotonic() > deadline:
                raise ServerStackError(f"{username}/{folder}: {len(msgs)} message(s) after "
                                       f"{timeout}s, wanted {count}")
            time.sleep(0.05)


class PostfixFront(MailStack):
    """``MailStack``'s Postfix (ports, TLS material, submission rules, queue control) in
    front of another IMAP server; no Dovecot, no postgrey.

    Subclasses implement ``_write_backend()`` (configuration, called once), ``start_backend()``,
    ``stop_backend()``, ``backend_running()``, ``backend_logs(lines) -> str`` and set
    ``self.virtual_overrides`` (``dict[str, str]`` of Postfix ``main.cf`` settings replacing
    the Dovecot LMTP delivery) before ``_configure`` runs. SMTP AUTH: Cyrus SASL
    (``smtpd_sasl_type = cyrus``) against ``self.sasldb`` (written by ``saslpasswd2`` of the
    unpacked Cyrus packages, mechanisms PLAIN LOGIN), with the users' passwords.

    Users: those of ``MailStack`` (``<name>@example.test``, full address as login; Postfix's
    ``recipient_access`` rules for ``held``/``tampered``/``greylisted`` stay, but only
    ``sender`` and ``receiver`` are used by the matrix: ``user_names``).
    """

    user_names = ("sender", "receiver")

    def __init__(self, base_dir=None, keep: bool = False):
        super().__init__(base_dir=base_dir, keep=keep)
        self.cyrus_dir = ensure_installed("cyrus")  # saslpasswd2 + SASL plugins
        # Unprivileged daemons (Postfix' smtpd, Cyrus as ``mail``) cannot read under /root:
        # they use copies of the unpacked packages in the stack's dir (12 MB, ~50 ms).
        self.pkg_dir = self.base / "pkg"
        self.cyrus_root = self.pkg_dir / "cyrus"
        # Debian's Postfix looks for smtpd.conf in $config_directory/sasl (whatever
        # cyrus_sasl_config_path says), so the SASL files live there.
        self.sasl_dir = self.pf_conf / "sasl"
        self.sasldb = self.sasl_dir / "sasldb2"
        self.virtual_overrides: dict[str, str] = {}
        self.imap_ssl_port = self.imaps_port

    # -- lifecycle (replaces MailStack's Dovecot + postgrey handling)
    def _starters(self) -> tuple:
        return (self.start_backend, self.start_postfix)

    def _stoppers(self) -> tuple:
        return (self.stop_postfix, self.stop_backend)

    def start_dovecot(self) -> None:  # the mail_stack fixture's reset never reaches here
        self.start_backend()

    def stop_dovecot(self) -> None:
        self.stop_backend()

    def dovecot_running(self) -> bool:
        return self.backend_running()

    def logs(self, lines: int = 60) -> str:
        return (f"----- {self.postfix_log} (last {lines} lines) -----\n"
                f"{_tail(self.postfix_log, lines)}\n{self.backend_logs(lines)}")

    def _fail(self, what: str, detail: str = "") -> ServerStackError:
        return ServerStackError(f"{what}\n{detail}\n{self.logs()}".strip())

    # -- configuration
    def _configure(self) -> None:
        os.chmod(self.base, 0o755)
        for d in (self.tls_dir, self.log_dir, self.pf_conf, self.pf_queue, self.pf_data,
                  self.mail_root, self.sasl_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._make_postfix_dirs()
        self._make_tls()
        self.copy_package(self.cyrus_dir, "cyrus")
        self._write_backend()
        self._write_sasl()
        self._write_postfix()
        self._configured = True

    def copy_package(self, part_dir: pathlib.Path, name: str) -> pathlib.Path:
        """Copy ``part_dir/root`` (an unpacked part of the cache) to ``pkg/<name>`` (mode
        bits kept, world-readable directories) and return the copy."""
        dest = self.pkg_dir / name
        if not dest.exists():
            self.pkg_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.pkg_dir, 0o755)
            shutil.copytree(part_dir / "root", dest, symlinks=True)
        return dest

    def _sasl_env(self) -> dict[str, str]:
        root = self.cyrus_root
        return {"LD_LIBRARY_PATH": lib_path(root),
                "SASL_PATH": str(root / "usr/lib/x86_64-linux-gnu/sasl2")}

    def _write_sasl(self) -> None:
        """sasldb with every user (``user@example.test`` as stored by ``saslpasswd2 -u``) and
        Postfix's ``smtpd.conf`` pointing at it."""
        self._write_passwd()
        (self.sasl_dir / "smtpd.conf").write_text(
            "pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN LOGIN\n"
            f"sasldb_path: {self.sasldb}\n")
        os.chmod(self.sasl_dir, 0o755)

    def _write_passwd(self) -> None:
        """(Re)write the sasldb from ``self.users``; ``_write_backend_passwords()`` of the
        subclass updates the IMAP server's own store. Effective for the next login."""
        if not self.sasl_dir.exists():
            return
        saslpasswd2 = self.cyrus_root / "usr/sbin/saslpasswd2"
        env = {**os.environ, **self._sasl_env()}
        for u in self.users.values():
            local, _, domain = u.address.partition("@")
            cp = subprocess.run([str(saslpasswd2), "-f", str(self.sasldb), "-p", "-c",
                                 "-u", domain, local], input=u.password, text=True,
                                capture_output=True, env=env, timeout=10)
            if cp.returncode != 0:
                raise ServerStackError(f"saslpasswd2 {u.address} failed: {cp.stderr}")
        os.chmod(self.sasldb, 0o644)
        self._write_backend_passwords()

    def _write_backend_passwords(self) -> None:
        pass

    def _write_postfix(self) -> None:
        super()._write_postfix()
        settings = {
            "smtpd_sasl_type": "cyrus",
            "smtpd_sasl_path": "smtpd",
            "cyrus_sasl_config_path": str(self.sasl_dir),
            "smtpd_sasl_local_domain": "",
            "import_environment": ("MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG "
                                   f"SASL_PATH={self._sasl_env()['SASL_PATH']}"),
            "smtpd_restriction_classes": "",
            **self.virtual_overrides,
        }
        argv = ["postconf", "-c", str(self.pf_conf), "-e"]
        argv += [f"{k}={v}" for k, v in settings.items()]
        self._run(argv, "postconf -e")
        past = time.time() - 10
        for f in self.pf_conf.iterdir():
            os.utime(f, (past, past))

    # -- backend hooks
    def _write_backend(self) -> None:
        raise NotImplementedError

    def start_backend(self) -> None:
        raise NotImplementedError

    def stop_backend(self) -> None:
        raise NotImplementedError

    def backend_running(self) -> bool:
        raise NotImplementedError

    def backend_logs(self, lines: int = 60) -> str:
        raise NotImplementedError


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM ``proc`` (a ``Popen`` we started), SIGKILL after ``timeout`` s; reap it."""
    if proc is None:
        return
    if proc.poll() is None:
        _kill_wait(proc.pid, timeout)
    with contextlib.suppress(Exception):
        proc.wait(5)


def mail_ids() -> tuple[int, int]:
    """``(uid, gid)`` of the system ``mail`` user, which owns the mail stores."""
    pw = pwd.getpwnam("mail")
    return pw.pw_uid, pw.pw_gid


__all__ = ["CACHE", "HOST", "Bind", "ImapView", "Message", "Overlay", "PostfixFront",
           "ServerStackError", "SyslogSink", "ensure_installed", "lib_path", "mail_ids",
           "namespace_argv", "package_versions", "private_dev", "stop_process"]
