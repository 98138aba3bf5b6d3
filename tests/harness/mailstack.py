"""A real Postfix + Dovecot (+ postgrey) mail stack in a temporary directory, on loopback.

Used by the integration tests (``tests/harness/mail_fixtures.py``), the benchmark and the
demo. Everything lives under one temporary directory: configuration, Postfix queue and
data directory, Dovecot base/state directories, TLS material, Maildir storage, sockets,
logs. Nothing under ``/etc/postfix`` or ``/etc/dovecot`` is read for configuration (Postfix
only reads its read-only ``meta_directory`` /etc/postfix for ``postfix-files`` and
``dynamicmaps.cf``) and the system services are never used. All daemons listen on free
ports of 127.0.0.1 only. Must run as root (as the tests and CI do).

Quick use::

    from tests.harness.mailstack import MailStack

    with MailStack() as stack:                     # starts in ~0.3 s, stops in ~1.2 s
        env = stack.probe_env()                    # sender -> receiver, STARTTLS / IMAPS
        ...                                        # run the probe with env
        stack.messages("receiver")                 # -> [Path, ...] Maildir files in INBOX
        stack.delivery_times()                     # {message_id: epoch seconds}

    python -m tests.harness.mailstack up           # foreground; prints the probe env

Ports (attributes, ``int``), all on host ``127.0.0.1`` (``stack.host``):

* ``smtp_port``: plain SMTP (MX-style), no AUTH, accepts mail for ``example.test``.
* ``submission_port``: submission, STARTTLS required before MAIL (``encrypt``), SASL AUTH
  advertised only after STARTTLS (``smtpd_tls_auth_only=yes``); relays only authenticated.
* ``submissions_port``: implicit TLS (``smtpd_tls_wrappermode=yes``) + SASL AUTH.
* ``submission_notls_port``: offers **no** STARTTLS at all but still offers AUTH PLAIN/LOGIN
  (and accepts it): for the probe's "refuse AUTH without TLS" test and ``plain`` lab mode.
* ``imap_port``: IMAP with STARTTLS. ``disable_plaintext_auth = yes``, but Dovecot counts
  loopback connections as secured, so LOGIN without TLS works here (lab ``plain`` mode).
* ``imaps_port``: IMAP over implicit TLS.
* ``tamper_port``: internal re-injection smtpd used by the ``tampered`` personality.
* ``postgrey_port``: the postgrey policy server (``check_policy_service``).

TLS: a throw-away CA and a server certificate for ``localhost`` + IP ``127.0.0.1`` are
generated at start with the openssl CLI (EC P-256). ``stack.ca_file`` is the CA bundle path;
verification with it succeeds, with the system CAs it fails.

Users: ``stack.users`` maps short name -> ``User(address, password)``; every address is
``<name>@example.test`` and logs in with the full address:

* ``sender``, ``receiver``: normal mailboxes.
* ``junked``: a per-user Sieve script (LMTP, pigeonhole) files every message that has an
  ``X-Selfcheck-Token`` header into ``Junk`` (special-use ``\\Junk``).
* ``held``: Postfix accepts (250) and puts the message on HOLD (``check_recipient_access``
  -> ``HOLD``): never delivered, stays in ``mail_queue()`` with ``queue_name == "hold"``.
* ``greylisted``: real postgrey (Debian package, ``--delay=1``) applied only to this
  recipient through a restriction class: the first RCPT TO gets ``450 4.2.0 ... Greylisted``,
  the same sender/recipient retried >= 1 s later is accepted and delivered.
* ``legacy``: Dovecot advertises only ``IMAP4rev1`` to this user (userdb
  ``imap_capability``): no IDLE, UIDPLUS, MOVE or SPECIAL-USE, like an old IMAP server.
* ``gmail``: a Sieve script files a copy of every delivery into ``[Gmail]/All Mail`` (kept in
  INBOX too); ``[Gmail]/Bin`` and ``[Gmail]/Spam`` exist. Behind the ``Gmail`` personality of
  ``tests/harness/imapproxy.py`` this mailbox behaves like Gmail's labels.
* ``authbroken``: its password check fails *temporarily* (a checkpassword passdb exits 111):
  IMAP LOGIN gets ``NO [UNAVAILABLE] Temporary authentication failure``, SMTP AUTH
  ``454 4.7.0 Temporary authentication failure`` (a broken SASL backend). No mailbox.
* ``tampered``: ``check_recipient_access`` -> ``FILTER tamper:[127.0.0.1]:tamper_port``: the
  message is re-injected into a second smtpd whose dedicated cleanup service has a
  ``body_checks`` rule that REPLACEs any body line containing ``Selfcheck token: <code>``
  (the probe's HTML line) with ``<p>Selfcheck token: <code>TAMPERED</code></p>``. The text
  part line ``Selfcheck token: <TOKEN>`` is untouched. Other recipients are not filtered.

Timing: delivery (final 250 of DATA -> Dovecot stored it) takes ~3 ms (median, 20 runs);
``in_flow_delay = 0``, no error sleeps in smtpd, no Dovecot auth penalty. A failed login
(IMAP or SMTP AUTH) is answered after ~0.5 s (Dovecot's failure-reply tick, not tunable to 0);
smtplib's ``login`` tries PLAIN then LOGIN, so ~1 s. Greylisting state is per
(client IP, sender, recipient): ``reset_greylist()`` (done by the ``mail_stack`` fixture when
postgrey was queried) makes the next attempt 4xx again.

Mailboxes (every user): ``INBOX``, ``Junk`` (\\Junk), ``Trash`` (\\Trash), ``Sent`` (\\Sent),
all auto-created and subscribed. Maildir at ``stack.maildir(user)``.

Control API (all raise ``MailStackError`` with the relevant log tail on failure):

* ``start()`` / ``stop()`` (idempotent; ``stop`` never raises and kills by PID).
* ``stop_dovecot()`` / ``start_dovecot()`` (~1.2 s / ~0.05 s), ``stop_postfix()`` /
  ``start_postfix()`` (~0.05 s / ~0.1 s); ``dovecot_running()``, ``postfix_running()``.
  While Dovecot is down Postfix accepts and defers; it delivers within ~1-2 s of
  ``start_dovecot()`` (``queue_run_delay``/backoff 1-2 s).
* ``set_password(user, password)``: rewrites the passwd-file; effective for the next login
  (IMAP and SMTP AUTH; no auth cache). Takes up to 1 s (waits for the next second of
  Dovecot's clock, as Dovecot re-reads the file at most once a second).
  ``reset_passwords()`` restores the initial ones (same cost, only if one changed).
* ``messages(user, folder="INBOX") -> list[Path]``: Maildir files in ``cur`` + ``new``.
* ``clear_mailboxes()``: deletes every message of every user (``doveadm expunge``).
* ``mail_queue() -> list[dict]``: ``postqueue -j`` records (keys ``queue_name`` in
  ``active|deferred|hold|incoming|maildrop``, ``queue_id``, ``sender``, ``recipients`` ...).
* ``flush_queue()``: deletes every queued message (``postsuper -d ALL``).
* ``reset_greylist()``: restarts postgrey on an empty database (next attempt is 4xx again).
* ``delivery_times() -> dict[str, float]``: Message-ID (without ``<>``) -> epoch seconds
  (microsecond resolution) at which Dovecot's LMTP stored the message, from Dovecot's log.
  ``delivery_time(message_id, timeout=5.0) -> float`` waits for one.
* ``probe_env(from_user="sender", to_user="receiver", smtp_security="starttls",
  imap_security="tls", **overrides) -> dict[str, str]``: the probe's environment
  (``MESSAGES_SELFCHECK_*``); ports follow the security modes (``starttls`` -> submission,
  ``tls`` -> submissions, ``plain`` -> submission_notls; IMAP ``tls`` -> imaps, ``starttls``
  and ``plain`` -> imap). ``overrides`` use the suffix after ``MESSAGES_SELFCHECK_`` in any
  case (``smtp_port=1``, ``TIMEOUT="5"``) or full names; a value of ``None`` removes a key.
* ``logs(lines=60) -> str``: tails of the Postfix, Dovecot and postgrey logs (for failure
  messages); ``postfix_log``, ``dovecot_log``, ``postgrey_log`` are the paths.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import grp
import datetime as _dt
import json
import math
import os
import pathlib
import pwd
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

DOMAIN = "example.test"
HOST = "127.0.0.1"

_POSTFIX_DAEMON_DIR = "/usr/lib/postfix/sbin"
_TAMPER_MARK = "Selfcheck token: <code>"
TAMPERED_HTML_LINE = "<p>Selfcheck token: <code>TAMPERED</code></p>"


class MailStackError(RuntimeError):
    """A component of the mail stack could not be started/controlled; message has log tails."""


@dataclasses.dataclass(frozen=True)
class User:
    """A mailbox: ``address`` (``name@example.test``, also the login) and its ``password``."""

    address: str
    password: str


USER_NAMES = ("sender", "receiver", "junked", "held", "greylisted", "tampered", "legacy", "gmail", "authbroken")
#: Users whose password check fails *temporarily* (the checkpassword passdb exits 111).
TEMPFAIL_USERS = ("authbroken",)
#: Folders of the ``gmail`` user, created at Dovecot start (Gmail's British English names).
GMAIL_FOLDERS = ("[Gmail]/All Mail", "[Gmail]/Bin", "[Gmail]/Spam")
#: Per-user Dovecot settings (userdb extra fields of the passwd-file). ``legacy`` sees an IMAP
#: server that advertises nothing but IMAP4rev1: no IDLE, UIDPLUS, MOVE or SPECIAL-USE.
USER_SETTINGS = {"legacy": "userdb_imap_capability=IMAP4rev1"}


def free_port() -> int:
    """Return a currently free TCP port on 127.0.0.1 (int). Racy by nature, good enough."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.01)
    return False


def _imap_greeting(port: int, timeout: float = 2.0) -> bool:
    """True if an IMAP server on ``port`` sends its ``* OK`` greeting within ``timeout`` s."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.settimeout(timeout)
            data = b""
            while b"\n" not in data:
                chunk = s.recv(1024)
                if not chunk:
                    return False
                data += chunk
            ok = data.startswith(b"* OK")
            if ok:
                s.sendall(b"a LOGOUT\r\n")
                with contextlib.suppress(OSError):
                    s.recv(1024)
            return ok
    except OSError:
        return False


def _port_closed(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                pass
        except OSError:
            return True
        time.sleep(0.01)
    return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still "exists": reap it if we can.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(") ", 1)[1].startswith("Z"):
                return False
    except (OSError, IndexError):
        return False
    return True


def _kill_wait(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM ``pid``, wait up to ``timeout`` s, then SIGKILL. Never raises."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 2.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                return
            time.sleep(0.02)


def _tail(path: pathlib.Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"<{path}: {e}>"


def env_for(f: "User", t: "User", secret: str, ca_file, smtp: tuple[str, int], imap: tuple[str, int],
            overrides: dict) -> dict[str, str]:
    """The probe's ``MESSAGES_SELFCHECK_*`` environment (all ``str``) for FROM ``f`` and TO ``t``
    on loopback; ``smtp``/``imap``: ``(security, port)``; ``overrides`` as in
    :meth:`MailStack.probe_env` (suffix or full name; ``None`` deletes)."""
    p = "MESSAGES_SELFCHECK_"
    env = {
        p + "FROM": f.address, p + "TO": t.address, p + "SECRET": secret,
        p + "INTERVAL": "600", p + "TIMEOUT": "20", p + "WEBHOOK_URL": "",
        p + "SMTP_HOST": HOST, p + "SMTP_PORT": str(smtp[1]),
        p + "SMTP_SECURITY": smtp[0], p + "SMTP_USERNAME": f.address,
        p + "SMTP_PASSWORD": f.password,
        p + "IMAP_HOST": HOST, p + "IMAP_PORT": str(imap[1]),
        p + "IMAP_SECURITY": imap[0], p + "IMAP_USERNAME": t.address,
        p + "IMAP_PASSWORD": t.password, p + "IMAP_FOLDER": "INBOX",
        p + "TLS_CA_FILE": str(ca_file), p + "TLS_INSECURE_SKIP_VERIFY": "false",
    }
    for k, v in overrides.items():
        key = k if k.upper().startswith(p) else p + k.upper()
        if v is None:
            env.pop(key, None)
        else:
            env[key] = str(v).lower() if isinstance(v, bool) else str(v)
    return env


class MailStack:
    """A real Postfix + Dovecot + postgrey stack under a temporary directory (see module doc).

    ``MailStack(base_dir=None, keep=False)``: ``base_dir`` is created if given, else a new
    ``tempfile.mkdtemp``; ``keep=True`` leaves it on disk after ``stop()`` (for debugging).
    Not started by the constructor: call ``start()`` or use it as a context manager.
    """

    def __init__(self, base_dir: str | os.PathLike | None = None, keep: bool = False):
        if os.geteuid() != 0:
            raise MailStackError("MailStack must run as root (Postfix and Dovecot need it)")
        self.host = HOST
        self.domain = DOMAIN
        self._own_dir = base_dir is None
        self.base = pathlib.Path(base_dir or tempfile.mkdtemp(prefix="mailstack-"))
        self.keep = keep
        self.users: dict[str, User] = {
            n: User(f"{n}@{DOMAIN}", f"{n}-pw-{os.urandom(4).hex()}") for n in USER_NAMES
        }
        self._initial_passwords = {n: u.password for n, u in self.users.items()}
        self.secret = "selfcheck-" + os.urandom(4).hex()
        (self.smtp_port, self.submission_port, self.submissions_port,
         self.submission_notls_port, self.imap_port, self.imaps_port,
         self.tamper_port, self.postgrey_port) = self._distinct_ports(8)
        self.tls_dir = self.base / "tls"
        self.ca_file = self.tls_dir / "ca.pem"
        self.cert_file = self.tls_dir / "server.pem"
        self.key_file = self.tls_dir / "server.key"
        self.log_dir = self.base / "log"
        self.postfix_log = self.log_dir / "postfix.log"
        self.dovecot_log = self.log_dir / "dovecot.log"
        self.postgrey_log = self.log_dir / "postgrey.log"
        self.pf_conf = self.base / "postfix" / "etc"
        self.pf_queue = self.base / "postfix" / "spool"
        self.pf_data = self.base / "postfix" / "data"
        self.dv_dir = self.base / "dovecot"
        self.dv_conf = self.dv_dir / "dovecot.conf"
        self.dv_run = self.dv_dir / "run"
        self.passwd_file = self.dv_dir / "passwd"
        self.mail_root = self.base / "mail"
        self.pg_db = self.base / "postgrey"
        self._mail_pw = pwd.getpwnam("mail")
        self._dovecot: subprocess.Popen | None = None
        self._postgrey: subprocess.Popen | None = None
        self._pg_log_mark = 0
        self._pw_stamp = 0
        self._configured = False
        self._atexit = False
        self.started = False
        self.startup_seconds: float | None = None

    @staticmethod
    def _distinct_ports(n: int) -> list[int]:
        socks = []
        try:
            for _ in range(n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.bind((HOST, 0))
                socks.append(s)
            return [s.getsockname()[1] for s in socks]
        finally:
            for s in socks:
                s.close()

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "MailStack":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "MailStack":
        """Write all configuration (first time), start postgrey, Dovecot, Postfix; wait ready.

        Returns ``self``. Raises ``MailStackError`` (with log tails) if a component does not
        come up; whatever was started is stopped again before raising.
        """
        t0 = time.monotonic()
        try:
            if not self._configured:
                self._configure()
            for fn in self._starters():
                fn()
        except BaseException:
            self.stop(_remove=False)
            raise
        self.started = True
        self.startup_seconds = time.monotonic() - t0
        if not self._atexit:
            # Safety net if the owner never calls stop() (e.g. an exception in a script).
            atexit.register(self.stop)
            self._atexit = True
        return self

    def _starters(self) -> tuple:
        """What :meth:`start` calls, in order (a subclass with another backend overrides it)."""
        return (self.start_postgrey, self.start_dovecot, self.start_postfix)

    def _stoppers(self) -> tuple:
        """What :meth:`stop` calls, in order."""
        return (self.stop_postfix, self.stop_dovecot, self.stop_postgrey)

    def stop(self, _remove: bool = True) -> None:
        """Stop Postfix, Dovecot and postgrey (by PID; never raises); remove the temp dir
        unless ``keep`` or it was given by the caller."""
        for fn in self._stoppers():
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - stop must not raise
                print(f"{type(self).__name__}: {fn.__name__}: {e}", file=sys.stderr)
        self.started = False
        if _remove and self._own_dir and not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)

    def logs(self, lines: int = 60) -> str:
        """Tails (``lines`` each) of the Postfix, Dovecot and postgrey logs, as one string."""
        parts = []
        stderr = self.log_dir / "dovecot.stderr"
        extra = [stderr] if stderr.exists() and stderr.stat().st_size else []
        for p in (self.postfix_log, self.dovecot_log, self.postgrey_log, *extra):
            parts.append(f"----- {p} (last {lines} lines) -----\n{_tail(p, lines)}")
        return "\n".join(parts)

    def _fail(self, what: str, detail: str = "") -> "MailStackError":
        return MailStackError(f"{what}\n{detail}\n{self.logs()}".strip())

    def _run(self, argv: list[str], what: str, timeout: float = 30,
             env: dict | None = None) -> subprocess.CompletedProcess:
        try:
            cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                env=env, stdin=subprocess.DEVNULL)
        except FileNotFoundError as e:
            raise MailStackError(f"{what}: {e} (run hack/install-system-deps.sh)") from e
        except subprocess.TimeoutExpired as e:
            raise self._fail(f"{what}: timed out after {timeout}s: {argv}") from e
        if cp.returncode != 0:
            raise self._fail(f"{what} failed (exit {cp.returncode}): {' '.join(argv)}",
                             f"stdout: {cp.stdout}\nstderr: {cp.stderr}")
        return cp

    # ------------------------------------------------------------------ configuration
    def _configure(self) -> None:
        os.chmod(self.base, 0o755)  # daemons' unprivileged users must traverse it
        for d in (self.tls_dir, self.log_dir, self.pf_conf, self.pf_queue, self.pf_data,
                  self.dv_dir, self.dv_run, self.mail_root, self.pg_db):
            d.mkdir(parents=True, exist_ok=True)
        self._make_postfix_dirs()
        self._make_tls()
        self._write_dovecot()
        self._write_postfix()
        self._configured = True

    def _make_postfix_dirs(self) -> None:
        # What "postfix-script check-fatal" (post-install create-missing) would create; done
        # here so that every start can use the quick-start path (skips ~2 s of checks).
        pf, root = pwd.getpwnam("postfix"), 0
        postfix_uid, postfix_gid = pf.pw_uid, pf.pw_gid
        postdrop = grp.getgrnam("postdrop").gr_gid
        os.chown(self.pf_data, postfix_uid, postfix_gid)
        os.chmod(self.pf_data, 0o700)
        os.chown(self.pf_queue, root, root)
        os.chmod(self.pf_queue, 0o755)
        for name in ("active", "bounce", "corrupt", "defer", "deferred", "flush", "hold",
                     "incoming", "private", "saved", "trace"):
            d = self.pf_queue / name
            d.mkdir(exist_ok=True)
            os.chown(d, postfix_uid, root)
            os.chmod(d, 0o700)
        for name, mode in (("maildrop", 0o730), ("public", 0o710)):
            d = self.pf_queue / name
            d.mkdir(exist_ok=True)
            os.chown(d, postfix_uid, postdrop)
            os.chmod(d, mode)
        (self.pf_queue / "pid").mkdir(exist_ok=True)
        os.chmod(self.pf_queue / "pid", 0o755)

    def _make_tls(self) -> None:
        d = self.tls_dir
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        self._run(["openssl", "req", "-x509", "-new", *ec, "-keyout", str(d / "ca.key"),
                   "-out", str(self.ca_file), "-days", "3", "-subj",
                   "/O=mail-selfcheck tests/CN=mail-selfcheck test CA",
                   "-addext", "basicConstraints=critical,CA:TRUE",
                   "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                   "-addext", "subjectKeyIdentifier=hash"], "openssl CA")
        (d / "server.ext").write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
        self._run(["openssl", "req", "-new", *ec, "-keyout", str(self.key_file),
                   "-out", str(d / "server.csr"), "-subj", "/CN=localhost"], "openssl key")
        self._run(["openssl", "x509", "-req", "-in", str(d / "server.csr"),
                   "-CA", str(self.ca_file), "-CAkey", str(d / "ca.key"), "-CAcreateserial",
                   "-days", "3", "-extfile", str(d / "server.ext"), "-out",
                   str(self.cert_file)], "openssl sign")
        os.chmod(self.key_file, 0o600)
        os.chmod(self.ca_file, 0o644)
        os.chmod(self.cert_file, 0o644)

    def maildir(self, user: str) -> pathlib.Path:
        """Maildir root of ``user`` (short name, e.g. ``"receiver"``)."""
        return self.mail_root / user / "Maildir"

    def _home(self, user: str) -> pathlib.Path:
        return self.mail_root / user

    def _write_passwd(self) -> None:
        uid, gid = self._mail_pw.pw_uid, self._mail_pw.pw_gid
        lines = [f"{u.address}:{{PLAIN}}{u.password}:{uid}:{gid}::{self._home(n)}::{USER_SETTINGS.get(n, '')}"
                 for n, u in self.users.items() if n not in TEMPFAIL_USERS]
        tmp = self.passwd_file.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.chown(tmp, 0, grp.getgrnam("dovecot").gr_gid)  # dovecot's auth worker reads it
        os.chmod(tmp, 0o640)
        # Dovecot reloads a passwd-file when its mtime or size changes: make the mtime
        # strictly increase even for several rewrites within one second.
        self._pw_stamp = max(int(time.time()), self._pw_stamp + 1)
        os.utime(tmp, (self._pw_stamp, self._pw_stamp))
        os.replace(tmp, self.passwd_file)
        if self.dovecot_running():
            # Dovecot stats the passwd-file at most once per (whole) second of its clock:
            # wait for the next second so that the very next login sees the new file.
            time.sleep(max(0.0, math.floor(time.time()) + 1.02 - time.time()))

    def _write_dovecot(self) -> None:
        uid, gid = self._mail_pw.pw_uid, self._mail_pw.pw_gid
        for n in self.users:
            home = self._home(n)
            home.mkdir(parents=True, exist_ok=True)
            os.chown(home, uid, gid)
        junk_sieve = self._home("junked") / ".dovecot.sieve"
        junk_sieve.write_text(textwrap.dedent("""\
            require ["fileinto"];
            if exists "X-Selfcheck-Token" {
              fileinto "Junk";
              stop;
            }
            """))
        os.chown(junk_sieve, uid, gid)
        # gmail: every delivery is also filed into "[Gmail]/All Mail" (INBOX is a label on
        # Gmail; tests/harness/imapproxy.py's Gmail personality does the rest).
        gmail_sieve = self._home("gmail") / ".dovecot.sieve"
        gmail_sieve.write_text(textwrap.dedent("""\
            require ["fileinto", "copy", "mailbox"];
            fileinto :copy :create "[Gmail]/All Mail";
            """))
        os.chown(gmail_sieve, uid, gid)
        self._write_passwd()
        # A passdb that fails *temporarily* (checkpassword exit 111, "internal failure") for
        # TEMPFAIL_USERS and says "no" (exit 1, next passdb) for everyone else: Dovecot then
        # answers IMAP LOGIN "NO [UNAVAILABLE] Temporary authentication failure" and Postfix
        # SMTP AUTH "454 4.7.0 Temporary authentication failure" (a broken SASL backend).
        tempfail = self.dv_dir / "tempfail-checkpassword"
        names = " ".join(self.users[n].address for n in TEMPFAIL_USERS)
        tempfail.write_text("#!/bin/bash\n"
                            "IFS= read -r -d '' user <&3\n"
                            f"for u in {names}; do [ \"$user\" = \"$u\" ] && exit 111; done\n"
                            "exit 1\n")
        os.chmod(tempfail, 0o755)
        (self.dv_dir / "state").mkdir(exist_ok=True)
        conf = f"""\
            # Generated by tests/harness/mailstack.py: a self-contained Dovecot for tests.
            protocols = imap lmtp
            listen = {HOST}
            base_dir = {self.dv_run}
            state_dir = {self.dv_dir}/state
            instance_name = mailstack-{self.imap_port}
            log_path = {self.dovecot_log}
            info_log_path = {self.dovecot_log}
            debug_log_path = {self.dovecot_log}
            log_timestamp = "%Y-%m-%d %H:%M:%S.%{{usecs}} "
            default_login_user = dovenull
            default_internal_user = dovecot
            first_valid_uid = {uid}
            mail_location = maildir:~/Maildir
            mail_max_userip_connections = 200
            mail_plugins = $mail_plugins notify mail_log
            auth_mechanisms = plain login
            auth_failure_delay = 0
            auth_cache_size = 0
            # Plaintext auth only over TLS... and on loopback, which Dovecot counts as
            # "secured" (remote IP == local IP): so the lab "plain" modes work on 127.0.0.1
            # (IMAP LOGIN without STARTTLS, SMTP AUTH on submission_notls_port).
            disable_plaintext_auth = yes
            ssl = yes
            ssl_cert = <{self.cert_file}
            ssl_key = <{self.key_file}
            ssl_min_protocol = TLSv1.2
            lmtp_save_to_detail_mailbox = no
            recipient_delimiter =
            postmaster_address = postmaster@{DOMAIN}
            passdb {{
              driver = checkpassword
              args = {self.dv_dir}/tempfail-checkpassword
              result_failure = continue
              result_internalfail = continue
            }}
            passdb {{
              driver = passwd-file
              args = scheme=PLAIN username_format=%Lu {self.passwd_file}
            }}
            userdb {{
              driver = passwd-file
              args = username_format=%Lu {self.passwd_file}
            }}
            namespace inbox {{
              inbox = yes
              separator = /
              mailbox Junk {{
                special_use = \\Junk
                auto = subscribe
              }}
              mailbox Trash {{
                special_use = \\Trash
                auto = subscribe
              }}
              mailbox Sent {{
                special_use = \\Sent
                auto = subscribe
              }}
            }}
            service imap-login {{
              inet_listener imap {{
                address = {HOST}
                port = {self.imap_port}
              }}
              inet_listener imaps {{
                address = {HOST}
                port = {self.imaps_port}
                ssl = yes
              }}
            }}
            service lmtp {{
              unix_listener lmtp {{
                mode = 0666
              }}
            }}
            # No anvil "auth penalty" (2..15 s extra delay per failed login from one IP):
            # tests make many deliberate failures from 127.0.0.1. mode 0 = no listener.
            service anvil {{
              unix_listener anvil-auth-penalty {{
                mode = 0
              }}
            }}
            service auth {{
              unix_listener auth-client {{
                mode = 0666
              }}
              unix_listener auth-postfix {{
                mode = 0666
              }}
            }}
            protocol lmtp {{
              mail_plugins = $mail_plugins sieve
            }}
            plugin {{
              sieve = file:~/sieve;active=~/.dovecot.sieve
              mail_log_events = save copy expunge
              mail_log_fields = uid box msgid size
            }}
            """
        self.dv_conf.write_text(textwrap.dedent(conf))

    def _write_postfix(self) -> None:
        c = self.pf_conf
        (c / "vmailbox").write_text("".join(f"{u.address} ok\n" for u in self.users.values()))
        (c / "recipient_access").write_text(
            f"{self.users['held'].address} HOLD held by the mailstack test harness\n"
            f"{self.users['greylisted'].address} greylist\n"
            f"{self.users['tampered'].address} FILTER tamper:[{HOST}]:{self.tamper_port}\n")
        (c / "tamper_body_checks").write_text(
            f"/{_TAMPER_MARK}/ REPLACE {TAMPERED_HTML_LINE}\n")
        main = f"""\
            # Generated by tests/harness/mailstack.py: a self-contained Postfix for tests.
            compatibility_level = 3.6
            config_directory = {c}
            queue_directory = {self.pf_queue}
            data_directory = {self.pf_data}
            meta_directory = /etc/postfix
            command_directory = /usr/sbin
            daemon_directory = {_POSTFIX_DAEMON_DIR}
            mail_owner = postfix
            setgid_group = postdrop
            maillog_file = {self.postfix_log}
            maillog_file_prefixes = {self.log_dir}
            myhostname = mailstack.{DOMAIN}
            mydomain = {DOMAIN}
            myorigin = $myhostname
            mydestination =
            local_transport = error:local delivery is disabled
            alias_maps =
            alias_database =
            inet_interfaces = {HOST}
            inet_protocols = ipv4
            mynetworks = 127.0.0.0/8
            smtp_bind_address = {HOST}
            lmtp_bind_address =
            relayhost =
            biff = no
            append_dot_mydomain = no
            virtual_mailbox_domains = {DOMAIN}
            virtual_mailbox_maps = texthash:{c}/vmailbox
            virtual_transport = lmtp:unix:{self.dv_run}/lmtp
            smtpd_banner = $myhostname ESMTP mailstack
            smtpd_tls_cert_file = {self.cert_file}
            smtpd_tls_key_file = {self.key_file}
            smtpd_tls_security_level = may
            smtpd_tls_loglevel = 0
            smtp_tls_security_level = none
            lmtp_tls_security_level = none
            smtpd_sasl_type = dovecot
            smtpd_sasl_path = {self.dv_run}/auth-postfix
            smtpd_sasl_auth_enable = no
            smtpd_sasl_security_options = noanonymous
            smtpd_tls_auth_only = yes
            smtpd_restriction_classes = greylist
            greylist = check_policy_service inet:{HOST}:{self.postgrey_port}
            smtpd_relay_restrictions = permit_sasl_authenticated, reject_unauth_destination
            smtpd_recipient_restrictions = check_recipient_access texthash:{c}/recipient_access
            smtpd_error_sleep_time = 0
            smtpd_soft_error_limit = 100
            smtpd_hard_error_limit = 200
            smtpd_client_connection_count_limit = 0
            smtpd_client_connection_rate_limit = 0
            smtpd_peername_lookup = no
            smtp_dns_support_level = disabled
            disable_dns_lookups = yes
            in_flow_delay = 0
            queue_run_delay = 1s
            minimal_backoff_time = 1s
            maximal_backoff_time = 2s
            bounce_queue_lifetime = 1h
            maximal_queue_lifetime = 1h
            lmtp_connection_cache_on_demand = no
            delay_warning_time = 0
            message_size_limit = 10240000
            mailbox_size_limit = 0
            postlog_service_name = postlog
            """
        (c / "main.cf").write_text(textwrap.dedent(main))
        sub_common = "-o smtpd_sasl_auth_enable=yes -o smtpd_client_restrictions=permit_sasl_authenticated,reject"
        sub_rcpt = (f"-o smtpd_recipient_restrictions=check_recipient_access,"
                    f"texthash:{c}/recipient_access,permit_sasl_authenticated,reject")
        # master.cf: no chroot anywhere ("n" in the chroot column).
        master = f"""\
            # service type  private unpriv  chroot  wakeup  maxproc command + args
            {HOST}:{self.smtp_port} inet n - n - - smtpd
            {HOST}:{self.submission_port} inet n - n - - smtpd
              -o syslog_name=postfix/submission -o smtpd_tls_security_level=encrypt
              -o smtpd_tls_auth_only=yes {sub_common} {sub_rcpt}
            {HOST}:{self.submissions_port} inet n - n - - smtpd
              -o syslog_name=postfix/submissions -o smtpd_tls_wrappermode=yes
              -o smtpd_tls_security_level=encrypt {sub_common} {sub_rcpt}
            {HOST}:{self.submission_notls_port} inet n - n - - smtpd
              -o syslog_name=postfix/submission-notls -o smtpd_tls_security_level=none
              -o smtpd_tls_auth_only=no {sub_common} {sub_rcpt}
            {HOST}:{self.tamper_port} inet n - n - - smtpd
              -o syslog_name=postfix/tamper -o content_filter= -o cleanup_service_name=tampercleanup
              -o smtpd_tls_security_level=none -o smtpd_sasl_auth_enable=no
              -o smtpd_client_restrictions=permit_mynetworks,reject
              -o smtpd_recipient_restrictions=permit_mynetworks,reject
              -o smtpd_relay_restrictions=permit_mynetworks,reject
              -o receive_override_options=no_address_mappings
            tampercleanup unix n - n - 0 cleanup
              -o syslog_name=postfix/tampercleanup -o body_checks=regexp:{c}/tamper_body_checks
            tamper unix - - n - - smtp
              -o syslog_name=postfix/tamper-smtp -o smtp_tls_security_level=none
            pickup    unix  n       -       n       60      1       pickup
            cleanup   unix  n       -       n       -       0       cleanup
            qmgr      unix  n       -       n       300     1       qmgr
            tlsmgr    unix  -       -       n       1000?   1       tlsmgr
            rewrite   unix  -       -       n       -       -       trivial-rewrite
            bounce    unix  -       -       n       -       0       bounce
            defer     unix  -       -       n       -       0       bounce
            trace     unix  -       -       n       -       0       bounce
            verify    unix  -       -       n       -       1       verify
            flush     unix  n       -       n       1000?   0       flush
            proxymap  unix  -       -       n       -       -       proxymap
            proxywrite unix -       -       n       -       1       proxymap
            smtp      unix  -       -       n       -       -       smtp
            relay     unix  -       -       n       -       -       smtp
            showq     unix  n       -       n       -       -       showq
            error     unix  -       -       n       -       -       error
            retry     unix  -       -       n       -       -       error
            discard   unix  -       -       n       -       -       discard
            lmtp      unix  -       -       n       -       -       lmtp
            anvil     unix  -       -       n       -       1       anvil
            scache    unix  -       -       n       -       1       scache
            postlog   unix-dgram n  -       n       -       1       postlogd
            """
        # master.cf continuation lines must start with whitespace: dedent keeps the
        # two-space indent of "-o" lines relative to the service lines.
        (c / "master.cf").write_text(textwrap.dedent(master))
        # The postfix command sleeps ~1.5 s when its configuration files are younger than a
        # second or so (a guard against clock/mtime races): backdate them.
        past = time.time() - 10
        for f in c.iterdir():
            os.utime(f, (past, past))

    # ------------------------------------------------------------------ postgrey
    def start_postgrey(self) -> None:
        """Start postgrey (``--delay=1``, db in the temp dir) on ``postgrey_port``."""
        if self._postgrey and self._postgrey.poll() is None:
            return
        empty = self.pg_db / "empty-whitelist"
        empty.write_text("")
        log = open(self.postgrey_log, "ab")
        argv = ["postgrey", f"--inet={HOST}:{self.postgrey_port}", f"--dbdir={self.pg_db}",
                "--delay=1", "--max-age=1", "--retry-window=1", "--auto-whitelist-clients=0",
                "--lookup-by-host", "--user=root", "--group=root",
                f"--whitelist-clients={empty}", f"--whitelist-recipients={empty}",
                "--greylist-text=Greylisted by mailstack, retry in %s seconds"]
        try:
            self._postgrey = subprocess.Popen(argv, stdout=log, stderr=log,
                                              stdin=subprocess.DEVNULL)
        except FileNotFoundError as e:
            raise MailStackError(f"postgrey not installed: {e} (run hack/install-system-deps.sh)")
        finally:
            log.close()
        if not _wait_port(self.postgrey_port, 15):
            rc = self._postgrey.poll()
            raise self._fail(f"postgrey did not listen on {HOST}:{self.postgrey_port} "
                             f"(exit code {rc})")
        self._pg_log_mark = self.postgrey_log.stat().st_size

    def stop_postgrey(self) -> None:
        """Stop postgrey (SIGTERM by PID, then SIGKILL). Never raises."""
        if self._postgrey is not None:
            if self._postgrey.poll() is None:
                self._postgrey.terminate()
                try:
                    self._postgrey.wait(5)
                except subprocess.TimeoutExpired:
                    self._postgrey.kill()
                    self._postgrey.wait(5)
            self._postgrey = None

    def greylist_used(self) -> bool:
        """True if postgrey answered a query since it was (re)started."""
        try:
            return self.postgrey_log.stat().st_size > self._pg_log_mark
        except OSError:
            return False

    def reset_greylist(self) -> None:
        """Restart postgrey on an empty database: the next attempt is greylisted again."""
        self.stop_postgrey()
        for p in self.pg_db.iterdir():
            if p.name != "empty-whitelist":
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        self.start_postgrey()

    # ------------------------------------------------------------------ dovecot
    def dovecot_running(self) -> bool:
        """True if the Dovecot master process we started is alive."""
        return self._dovecot is not None and self._dovecot.poll() is None

    def start_dovecot(self) -> None:
        """Start the Dovecot master in the foreground (our child, ``-F``) and wait until
        IMAP, IMAPS, the LMTP socket and the auth socket accept connections.
        Raises ``MailStackError`` with the Dovecot log tail if it does not come up."""
        if self.dovecot_running():
            return
        log = open(self.log_dir / "dovecot.stderr", "ab")
        try:
            self._dovecot = subprocess.Popen(["dovecot", "-F", "-c", str(self.dv_conf)],
                                             stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        except FileNotFoundError as e:
            raise MailStackError(f"dovecot not installed: {e} (run hack/install-system-deps.sh)")
        finally:
            log.close()
        deadline = time.monotonic() + 20
        socks = [self.dv_run / "lmtp", self.dv_run / "auth-postfix"]
        while time.monotonic() < deadline:
            if self._dovecot.poll() is not None:
                break
            # Ready = sockets exist and imap-login sends its greeting (it only does once it
            # has a connection to the auth process); a bare TCP connect is not enough and
            # leaves imap-login blocked on auth, which makes a later shutdown take 5 s.
            if all(p.exists() for p in socks) and _imap_greeting(self.imap_port) \
                    and _wait_port(self.imaps_port, 0.05):
                self.create_mailbox("gmail", *GMAIL_FOLDERS)
                return
            time.sleep(0.02)
        rc = self._dovecot.poll()
        stderr = _tail(self.log_dir / "dovecot.stderr", 30)
        self.stop_dovecot()
        raise self._fail(f"Dovecot did not come up (exit code {rc})", f"stderr:\n{stderr}")

    def stop_dovecot(self) -> None:
        """Stop Dovecot: SIGTERM to its master PID (kills all its children), wait for the
        listening ports to close. Never raises."""
        if self._dovecot is None:
            return
        if self._dovecot.poll() is None:
            self._dovecot.terminate()
            try:
                self._dovecot.wait(10)
            except subprocess.TimeoutExpired:
                self._dovecot.kill()
                self._dovecot.wait(5)
        self._dovecot = None
        _port_closed(self.imap_port, 3)

    # ------------------------------------------------------------------ postfix
    def _pf_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["MAIL_CONFIG"] = str(self.pf_conf)
        return env

    def _postfix_master_pid(self) -> int | None:
        try:
            pid = int((self.pf_queue / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _pid_alive(pid) else None

    def postfix_running(self) -> bool:
        """True if the Postfix master of this stack is alive."""
        return self._postfix_master_pid() is not None

    def start_postfix(self) -> None:
        """``postfix -c DIR start`` and wait until all smtpd ports accept connections.
        Raises ``MailStackError`` with the Postfix log tail otherwise."""
        if self.postfix_running():
            return
        # The postfix command reports fatal errors on stderr only when it is a terminal
        # (else to syslog, absent here): give it a pty so that errors reach the exception.
        (self.pf_queue / "quick-start").touch()  # directories made by _make_postfix_dirs
        master_fd, slave_fd = os.openpty()
        try:
            cp = subprocess.run(["postfix", "-c", str(self.pf_conf), "start"],
                                stdin=subprocess.DEVNULL, stdout=slave_fd, stderr=slave_fd,
                                env=self._pf_env(), timeout=60)
            os.close(slave_fd)
            slave_fd = -1
            out = b""
            # Read only what is already there: the detached master may keep the pty open.
            while select.select([master_fd], [], [], 0)[0]:
                try:
                    chunk = os.read(master_fd, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
        except FileNotFoundError as e:
            raise MailStackError(f"postfix not installed: {e} (run hack/install-system-deps.sh)")
        except subprocess.TimeoutExpired as e:
            raise self._fail("postfix start timed out after 60 s") from e
        finally:
            if slave_fd >= 0:
                os.close(slave_fd)
            os.close(master_fd)
        if cp.returncode != 0:
            raise self._fail(f"postfix start failed (exit {cp.returncode})",
                             out.decode(errors="replace"))
        for port in (self.smtp_port, self.submission_port, self.submissions_port,
                     self.submission_notls_port, self.tamper_port):
            if not _wait_port(port, 15):
                raise self._fail(f"Postfix does not listen on {HOST}:{port}")

    def stop_postfix(self) -> None:
        """Stop Postfix: SIGTERM to the master PID (``postfix stop`` equivalent), wait for it
        to exit and the ports to close; SIGKILL after 10 s. Never raises."""
        pid = self._postfix_master_pid()
        if pid is None:
            return
        _kill_wait(pid, 10)
        _port_closed(self.submission_port, 3)

    def mail_queue(self) -> list[dict]:
        """Postfix queue as parsed ``postqueue -j`` records: dicts with ``queue_name``
        (active|deferred|hold|incoming|maildrop), ``queue_id``, ``arrival_time`` (epoch s),
        ``sender``, ``recipients`` (list of ``{"address", "delay_reason"?}``) ..."""
        cp = self._run(["postqueue", "-c", str(self.pf_conf), "-j"], "postqueue -j",
                       env=self._pf_env())
        return [json.loads(line) for line in cp.stdout.splitlines() if line.strip()]

    def flush_queue(self) -> None:
        """Delete every message in every Postfix queue (``postsuper -d ALL``)."""
        self._run(["postsuper", "-c", str(self.pf_conf), "-d", "ALL"], "postsuper -d ALL",
                  env=self._pf_env())

    # ------------------------------------------------------------------ users and mail
    def _short(self, user: str) -> str:
        if user in self.users:
            return user
        for n, u in self.users.items():
            if u.address == user.lower():
                return n
        raise KeyError(f"unknown mailstack user {user!r}; known: {sorted(self.users)}")

    def set_password(self, user: str, password: str) -> None:
        """Set ``user``'s (short name or address) password for IMAP and SMTP AUTH;
        effective for the next login (returns after <= 1 s: Dovecot re-reads the
        passwd-file at most once per second)."""
        n = self._short(user)
        self.users[n] = dataclasses.replace(self.users[n], password=password)
        self._write_passwd()

    def reset_passwords(self) -> None:
        """Restore the initial passwords (rewrites the passwd-file only if one changed)."""
        if any(self.users[n].password != pw for n, pw in self._initial_passwords.items()):
            for n, pw in self._initial_passwords.items():
                self.users[n] = dataclasses.replace(self.users[n], password=pw)
            self._write_passwd()

    def _folder_dir(self, user: str, folder: str) -> pathlib.Path:
        md = self.maildir(self._short(user))
        if folder.upper() == "INBOX":
            return md
        return md / ("." + folder.replace("/", "."))

    def messages(self, user: str, folder: str = "INBOX") -> list[pathlib.Path]:
        """Maildir message files (``cur`` + ``new``) of ``user`` in ``folder``, sorted by
        mtime. Empty list if the folder does not exist yet."""
        d = self._folder_dir(user, folder)
        files = [p for sub in ("new", "cur") if (d / sub).is_dir()
                 for p in (d / sub).iterdir() if p.is_file()]
        return sorted(files, key=lambda p: p.stat().st_mtime_ns)

    def wait_messages(self, user: str, folder: str = "INBOX", count: int = 1,
                      timeout: float = 10.0) -> list[pathlib.Path]:
        """Wait until ``user``/``folder`` holds at least ``count`` messages; return them.
        Raises ``MailStackError`` (with queue and log tails) on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            msgs = self.messages(user, folder)
            if len(msgs) >= count or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        if len(msgs) < count:
            raise self._fail(f"{user}/{folder}: {len(msgs)} message(s) after {timeout}s, "
                             f"wanted {count}", f"queue: {self.mail_queue()}")
        return msgs

    def clear_mailboxes(self) -> None:
        """Delete every message of every user and folder. With Dovecot running this is
        ``doveadm expunge -A mailbox '*' all`` (indexes stay consistent, ~30 ms); with it
        stopped, the users' Maildirs are removed (recreated on the next delivery/login)."""
        if self.dovecot_running():
            self._run(["doveadm", "-c", str(self.dv_conf), "expunge", "-A", "mailbox", "*",
                       "all"], "doveadm expunge")
            return
        for n in self.users:
            shutil.rmtree(self.maildir(n), ignore_errors=True)

    def doveadm(self, *args: str, what: str = "doveadm") -> str:
        """Run ``doveadm -c <our config> args...``; returns stdout. Raises ``MailStackError``."""
        return self._run(["doveadm", "-c", str(self.dv_conf), *args], what).stdout

    def create_mailbox(self, user: str, *names: str) -> None:
        """Create mailboxes of ``user`` (short name or address) that do not exist yet."""
        address = self.users[self._short(user)].address
        existing = set(self.doveadm("mailbox", "list", "-u", address).splitlines())
        missing = [n for n in names if n not in existing]
        if missing:
            self.doveadm("mailbox", "create", "-u", address, *missing, what="doveadm mailbox create")

    def message_ids(self, user: str, folder: str, uidset: str, uid: bool = True) -> list[str]:
        """Message-IDs (with ``<>``) of the messages ``uidset`` (UIDs, or sequence numbers when
        ``uid`` is false) in ``user``'s ``folder``."""
        address = self.users[self._short(user)].address
        key = "uid" if uid else "seq"
        out = self.doveadm("-f", "tab", "fetch", "-u", address, "hdr.message-id", "mailbox", folder, key, uidset)
        return [line.split(":", 1)[-1].strip() for line in out.splitlines()[1:] if line.strip()]

    def expunge_by_message_id(self, user: str, folder: str, message_id: str) -> None:
        """Expunge every message of ``user``'s ``folder`` whose Message-ID is ``message_id``."""
        address = self.users[self._short(user)].address
        self.doveadm("expunge", "-u", address, "mailbox", folder, "header", "Message-ID", message_id)

    _SAVED_RE = re.compile(
        r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\.(\d{6}) lmtp\(([^)]*)\).*?"
        r"msgid=<?([^>:\s]+)>?: saved mail to (.+)$")

    def delivery_records(self) -> list[dict]:
        """Dovecot LMTP deliveries from its log: dicts ``{"message_id"`` (no ``<>``),
        ``"time"`` (epoch seconds, float, local-time log converted), ``"user"``,
        ``"folder"}``, in log order."""
        out = []
        try:
            text = self.dovecot_log.read_text(errors="replace")
        except OSError:
            return out
        for line in text.splitlines():
            m = self._SAVED_RE.match(line)
            if not m:
                continue
            ts = _dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp()
            out.append({"message_id": m.group(4), "time": ts + int(m.group(2)) / 1e6,
                        "user": m.group(3), "folder": m.group(5).strip()})
        return out

    def delivery_times(self) -> dict[str, float]:
        """Message-ID (without ``<>``) -> epoch seconds when Dovecot stored it (last one)."""
        return {r["message_id"]: r["time"] for r in self.delivery_records()}

    def delivery_time(self, message_id: str, timeout: float = 5.0) -> float:
        """Epoch seconds at which Dovecot stored ``message_id`` (with or without ``<>``);
        waits up to ``timeout`` s for the log line. Raises ``MailStackError`` if absent."""
        mid = message_id.strip().strip("<>")
        deadline = time.monotonic() + timeout
        while True:
            t = self.delivery_times().get(mid)
            if t is not None:
                return t
            if time.monotonic() > deadline:
                raise self._fail(f"no Dovecot delivery logged for Message-ID <{mid}>")
            time.sleep(0.02)

    # ------------------------------------------------------------------ probe env
    def probe_env(self, from_user: str = "sender", to_user: str = "receiver",
                  smtp_security: str = "starttls", imap_security: str = "tls",
                  **overrides) -> dict[str, str]:
        """Environment variables for the probe against this stack (all values ``str``).

        ``from_user``/``to_user``: short names or addresses. ``smtp_security``:
        ``starttls`` (submission_port) | ``tls`` (submissions_port) | ``plain``
        (submission_notls_port); ``imap_security``: ``tls`` (imaps_port) | ``starttls`` |
        ``plain`` (imap_port). ``overrides``: ``smtp_port=...`` / ``TIMEOUT=...`` (suffix
        after ``MESSAGES_SELFCHECK_``, any case) or full variable names; ``None`` deletes.
        Raises ``ValueError`` on an unknown security mode, ``KeyError`` on an unknown user.
        """
        smtp_ports = {"starttls": self.submission_port, "tls": self.submissions_port,
                      "plain": self.submission_notls_port}
        imap_ports = {"tls": self.imaps_port, "starttls": self.imap_port,
                      "plain": self.imap_port}
        if smtp_security not in smtp_ports:
            raise ValueError(f"smtp_security must be one of {sorted(smtp_ports)}")
        if imap_security not in imap_ports:
            raise ValueError(f"imap_security must be one of {sorted(imap_ports)}")
        f, t = self.users[self._short(from_user)], self.users[self._short(to_user)]
        return env_for(f, t, self.secret, self.ca_file, (smtp_security, smtp_ports[smtp_security]),
                       (imap_security, imap_ports[imap_security]), overrides)

    def describe(self) -> dict:
        """JSON-able summary: ports, users/passwords, CA file, log paths, base dir."""
        return {
            "host": HOST, "base_dir": str(self.base), "ca_file": str(self.ca_file),
            "ports": {k: getattr(self, k) for k in (
                "smtp_port", "submission_port", "submissions_port", "submission_notls_port",
                "imap_port", "imaps_port", "tamper_port", "postgrey_port")},
            "users": {n: dataclasses.asdict(u) for n, u in self.users.items()},
            "logs": {"postfix": str(self.postfix_log), "dovecot": str(self.dovecot_log),
                     "postgrey": str(self.postgrey_log)},
        }


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.harness.mailstack",
                                 description="Run the test mail stack in the foreground.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start Postfix+Dovecot, print the probe env, wait for ^C")
    up.add_argument("--from-user", default="sender")
    up.add_argument("--to-user", default="receiver")
    up.add_argument("--smtp-security", default="starttls", choices=["starttls", "tls", "plain"])
    up.add_argument("--imap-security", default="tls", choices=["tls", "starttls", "plain"])
    up.add_argument("--dir", help="base directory (default: a new temporary one)")
    up.add_argument("--keep", action="store_true", help="keep the directory after exit")
    up.add_argument("--json", action="store_true", help="print a JSON summary too")
    args = ap.parse_args(argv)

    stop = {"now": False}

    def _sig(*_):
        stop["now"] = True

    signal.signal(signal.SIGTERM, _sig)
    signal.signal(signal.SIGINT, _sig)
    stack = MailStack(base_dir=args.dir, keep=args.keep)
    try:
        stack.start()
        print(f"# mail stack up in {stack.startup_seconds:.2f}s under {stack.base}", flush=True)
        for k, v in stack.probe_env(args.from_user, args.to_user, args.smtp_security,
                                    args.imap_security).items():
            print(f"export {k}={json.dumps(v)}")
        if args.json:
            print(json.dumps(stack.describe()))
        print(f"# other ports on {stack.host}: submission+implicit TLS (--smtp-security tls) "
              f"{stack.submissions_port}, submission without STARTTLS {stack.submission_notls_port}, "
              f"IMAP+STARTTLS/plain {stack.imap_port}, IMAPS {stack.imaps_port}")
        print(f"# users (password in the passwd file under {stack.base}): "
              + ", ".join(f"{u.address}" for u in stack.users.values()))
        print("# runs in the foreground: use these exports in a second shell; Ctrl-C / SIGTERM to stop",
              flush=True)
        while not stop["now"]:
            time.sleep(0.2)
    except MailStackError as e:
        print(f"mailstack: {e}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
