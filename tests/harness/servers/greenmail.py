"""Real GreenMail 2.1 (Maven Central ``com.icegreen:greenmail-standalone``) on loopback.

GreenMail is a Java test mail server with its own SMTP, SMTPS, IMAP and IMAPS (no Postfix in
front). It runs from ``~/.cache/mail-selfcheck/servers/greenmail/greenmail-standalone-<v>.jar``
(``hack/install-servers.sh greenmail``, run automatically; SHA-256 pinned) with the ``java``
on PATH (Debian's OpenJDK 17), configured only through ``-Dgreenmail.*`` system properties;
its state is in memory, its TLS keystore (PKCS#12 of the stack's CA-signed ``localhost``
certificate) and logs in the stack's temp dir.

Quick use::

    from tests.harness.servers.greenmail import GreenMailStack

    with GreenMailStack() as stack:         # ~1.5 s (JVM start)
        env = stack.probe_env()             # sender -> receiver, SMTPS + IMAPS
        stack.view.messages(*stack.login("receiver"))   # -> [Message, ...]

What GreenMail offers (and what it does not): ``smtp_port`` plain SMTP with AUTH PLAIN/LOGIN
(no STARTTLS), ``submissions_port`` SMTP over implicit TLS, ``imap_port`` plain IMAP (**no
STARTTLS**), ``imaps_port`` IMAP over implicit TLS. AUTH is checked against the configured
users; mail to any address is accepted and delivered to that address' mailbox (GreenMail
creates unknown users). IMAP capabilities: ``IMAP4rev1 LITERAL+ SORT UIDPLUS IDLE QUOTA MOVE``
(no SPECIAL-USE); folders other than INBOX only when created by a client. GreenMail sends
untagged ``* n EXISTS`` before the ``+`` continuation of IDLE (issue 9, item 7).

``probe_env()`` follows ``MailStack.probe_env`` with GreenMail's ports: SMTP ``tls`` ->
``submissions_port``, ``starttls``/``plain`` -> ``smtp_port`` (so ``starttls`` meets a server
without STARTTLS); IMAP ``tls`` -> ``imaps_port``, ``starttls``/``plain`` -> ``imap_port``.
Defaults: ``smtp_security="tls"``, ``imap_security="tls"``.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import pathlib
import shutil
import subprocess
import tempfile
import time

from tests.harness.mailstack import DOMAIN, HOST, MailStack, User, _imap_greeting, _tail, _wait_port, env_for

from .common import ImapView, ServerStackError, ensure_installed, stop_process

GREENMAIL_VERSION = "2.1.13"
USER_NAMES = ("sender", "receiver")


class GreenMailStack:
    """GreenMail standalone under a temp dir (see module doc). ``GreenMailStack(base_dir=None,
    keep=False)``; ``start()``/``stop()`` or a context manager. Attributes as ``MailStack``:
    ``host``, ``users`` (short name -> ``User``), ``secret``, ``ca_file``, ``smtp_port``,
    ``submissions_port``, ``imap_port``, ``imaps_port``, ``api_port`` (GreenMail's REST API)."""

    name = "greenmail"
    default_smtp_security = "tls"

    def __init__(self, base_dir=None, keep: bool = False):
        self.host, self.domain = HOST, DOMAIN
        self._own_dir = base_dir is None
        self.base = pathlib.Path(base_dir or tempfile.mkdtemp(prefix="greenmail-"))
        self.keep = keep
        self.users = {n: User(f"{n}@{DOMAIN}", f"{n}-pw-{os.urandom(4).hex()}") for n in USER_NAMES}
        self.secret = "selfcheck-" + os.urandom(4).hex()
        (self.smtp_port, self.submissions_port, self.imap_port, self.imaps_port,
         self.api_port) = MailStack._distinct_ports(5)
        self.imap_ssl_port = self.imaps_port
        self.jar = ensure_installed("greenmail") / f"greenmail-standalone-{GREENMAIL_VERSION}.jar"
        self.version = GREENMAIL_VERSION
        self.tls_dir = self.base / "tls"
        self.ca_file = self.tls_dir / "ca.pem"
        self.cert_file = self.tls_dir / "server.pem"
        self.key_file = self.tls_dir / "server.key"
        self.keystore = self.tls_dir / "greenmail.p12"
        self.keystore_password = os.urandom(8).hex()
        self.log_dir = self.base / "log"
        self.greenmail_log = self.log_dir / "greenmail.log"
        self._proc: subprocess.Popen | None = None
        self._configured = False
        self._atexit = False
        self.started = False
        self.startup_seconds: float | None = None
        self.view = ImapView(HOST, self.imap_port)

    def __enter__(self) -> "GreenMailStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def login(self, user: str) -> tuple[str, str]:
        """``(address, password)`` of a short user name, for ``self.view``."""
        u = self.users[user]
        return u.address, u.password

    # -- configuration and lifecycle
    def _configure(self) -> None:
        self.tls_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        MailStack._make_tls(self)  # same CA + localhost/127.0.0.1 certificate as MailStack
        self._run(["openssl", "pkcs12", "-export", "-in", str(self.cert_file), "-inkey",
                   str(self.key_file), "-name", "greenmail", "-out", str(self.keystore),
                   "-passout", f"pass:{self.keystore_password}"], "openssl pkcs12")
        self._configured = True

    def _run(self, argv, what, timeout: float = 30, env=None):
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                            stdin=subprocess.DEVNULL)
        if cp.returncode != 0:
            raise ServerStackError(f"{what} failed (exit {cp.returncode}): {cp.stderr}")
        return cp

    def _fail(self, what: str, detail: str = "") -> ServerStackError:
        return ServerStackError(f"{what}\n{detail}\n{self.logs()}".strip())

    def argv(self) -> list[str]:
        """The ``java -D... -jar`` command line (passwords included: keep it out of logs)."""
        users = ",".join(f"{u.address.split('@')[0]}:{u.password}@{DOMAIN}" for u in self.users.values())
        props = {
            "greenmail.hostname": HOST,
            "greenmail.smtp.port": self.smtp_port, "greenmail.smtps.port": self.submissions_port,
            "greenmail.imap.port": self.imap_port, "greenmail.imaps.port": self.imaps_port,
            "greenmail.users": users, "greenmail.users.login": "email",
            "greenmail.tls.keystore.file": self.keystore,
            "greenmail.tls.keystore.password": self.keystore_password,
            "greenmail.api.hostname": HOST, "greenmail.api.port": self.api_port,
            "greenmail.startup.timeout": 10000,
        }
        java = shutil.which("java") or "java"
        return [java, "-Xss512k", "-XX:TieredStopAtLevel=1", "-Dgreenmail.verbose",
                *(f"-D{k}={v}" for k, v in props.items()), "-jar", str(self.jar)]

    def start(self) -> "GreenMailStack":
        """Start GreenMail (our child) and wait until SMTP, SMTPS, IMAP (greeting) and IMAPS
        accept connections. Raises ``ServerStackError`` with the log tail otherwise."""
        if self.running():
            return self
        t0 = time.monotonic()
        if not self._configured:
            self._configure()
        with open(self.greenmail_log, "ab") as log:
            try:
                self._proc = subprocess.Popen(self.argv(), stdout=log, stderr=log,
                                              stdin=subprocess.DEVNULL)
            except FileNotFoundError as e:
                raise ServerStackError(f"java not found ({e}): GreenMail needs Java >= 11 "
                                       "(apt-get install default-jre-headless)") from e
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if _imap_greeting(self.imap_port, 1) and all(
                    _wait_port(p, 0.05) for p in (self.smtp_port, self.submissions_port, self.imaps_port)):
                self.started = True
                self.startup_seconds = time.monotonic() - t0
                if not self._atexit:
                    atexit.register(self.stop)
                    self._atexit = True
                return self
            time.sleep(0.05)
        rc = self._proc.poll()
        self.stop(_remove=False)
        raise self._fail(f"GreenMail did not come up (exit code {rc})")

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    backend_running = running

    def stop(self, _remove: bool = True) -> None:
        """Stop GreenMail (SIGTERM by PID, SIGKILL after 10 s); remove the temp dir unless
        ``keep`` or given by the caller. Never raises."""
        stop_process(self._proc)
        self._proc = None
        self.started = False
        if _remove and self._own_dir and not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)

    def logs(self, lines: int = 60) -> str:
        return f"----- {self.greenmail_log} (last {lines} lines) -----\n{_tail(self.greenmail_log, lines)}"

    # -- mail
    def clear_mailboxes(self) -> None:
        """Delete every message of every user (IMAP STORE \\Deleted + EXPUNGE per folder)."""
        for n in self.users:
            self.view.clear(*self.login(n))

    def reset_passwords(self) -> None:
        """No-op: GreenMail's passwords are fixed at start (tests pass wrong ones in the env)."""

    # -- probe env
    def probe_env(self, from_user: str = "sender", to_user: str = "receiver",
                  smtp_security: str = "tls", imap_security: str = "tls",
                  **overrides) -> dict[str, str]:
        """The probe's environment (``MESSAGES_SELFCHECK_*``, all ``str``), as
        ``MailStack.probe_env`` but with GreenMail's ports (see module doc)."""
        smtp_ports = {"tls": self.submissions_port, "starttls": self.smtp_port, "plain": self.smtp_port}
        imap_ports = {"tls": self.imaps_port, "starttls": self.imap_port, "plain": self.imap_port}
        if smtp_security not in smtp_ports or imap_security not in imap_ports:
            raise ValueError(f"unknown security mode {smtp_security!r}/{imap_security!r}")
        return env_for(self.users[from_user], self.users[to_user], self.secret, self.ca_file,
                       (smtp_security, smtp_ports[smtp_security]), (imap_security, imap_ports[imap_security]),
                       overrides)

    def describe(self) -> dict:
        """JSON-able summary: server, version, ports, users, CA file, log path, base dir."""
        return {"server": "greenmail", "version": self.version, "host": HOST,
                "base_dir": str(self.base), "ca_file": str(self.ca_file),
                "ports": {k: getattr(self, k) for k in ("smtp_port", "submissions_port",
                                                        "imap_port", "imaps_port", "api_port")},
                "users": {n: dataclasses.asdict(u) for n, u in self.users.items()},
                "logs": {"greenmail": str(self.greenmail_log)}}


__all__ = ["GREENMAIL_VERSION", "GreenMailStack", "ServerStackError"]
