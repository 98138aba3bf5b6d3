"""Real Courier-IMAP 5.0 (Debian 12 ``courier-imap``) behind the mailstack Postfix, on loopback.

Postfix (``tests.harness.mailstack``'s configuration: submission with STARTTLS, implicit-TLS
submissions, plain SMTP, SASL AUTH) delivers with its own ``virtual(8)`` agent into
**Maildirs** (``<base>/mail/<user>/Maildir/``, owned by ``mail``) that Courier-IMAP reads:
``couriertcpd`` + ``imaplogin`` + ``imapd`` on the IMAP (STARTTLS) port, the same behind
``couriertls -server -tcpd`` on the IMAPS port, and ``authdaemond`` with the ``authuserdb``
module (``userdb.dat``/``userdbshadow.dat`` written with Courier's ``makedatprog``; passwords
as SHA-512 crypt). Binaries come unpacked from the Debian packages
(``hack/install-servers.sh courier``, run automatically), copied into the stack's dir.

Courier's authentication library has compiled-in paths (``/etc/courier/authdaemonrc``,
``/etc/courier/userdb.dat``, modules in ``/usr/lib/courier-authlib``, the socket
``/run/courier/authdaemon/socket``, IDLE's FAM server ``/usr/libexec/gam_server``). So all Courier processes run in one private mount
namespace (held by a ``sleep`` process; each daemon enters it with ``nsenter``) in which
``/etc`` and ``/usr`` are read-only overlays with the stack's files on top and ``/run``
is ``<base>/courier/run``. Nothing is written outside the temp dir; the host's ``/etc``,
``/usr`` and ``/run`` are untouched.

Quick use::

    from tests.harness.servers.courier import CourierStack

    with CourierStack() as stack:           # ~0.5 s
        env = stack.probe_env()             # sender -> receiver, STARTTLS submission, IMAPS
        stack.view.messages(*stack.login("receiver"))   # -> [Message, ...]
        stack.maildir_files("receiver")     # -> [Path, ...] (cur + new of INBOX)

Mail for ``junked@example.test`` is delivered straight into its ``INBOX.Junk``. Folders
``Junk``, ``Trash``, ``Sent`` exist (Maildir++ ``.Junk`` ...), namespace ``INBOX.``
(separator ``.``: folders are ``INBOX.Junk`` ...). Capabilities (Debian defaults):
``IMAP4rev1 UIDPLUS CHILDREN NAMESPACE THREAD=... SORT QUOTA IDLE`` (+ ``STARTTLS``,
``AUTH=PLAIN`` after TLS); no MOVE advertised in the defaults, no SPECIAL-USE. With
Debian's ``IMAP_ENHANCEDIDLE=0`` Courier sends **no** ``* n EXISTS`` during IDLE for a new
Maildir message (measured: none within 15 s; with ``IMAP_ENHANCEDIDLE=1`` and gamin it
does, after ~2 s): a client must re-check on its own.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import textwrap
import time

from tests.harness.mailstack import HOST, _imap_greeting, _kill_wait, _tail, _wait_port

from .common import (Bind, ImapView, Overlay, PostfixFront, ServerStackError, ensure_installed,
                     lib_path, mail_ids, namespace_argv, package_versions, stop_process)

FOLDERS = ("Junk", "Trash", "Sent")

#: Courier-IMAP settings: Debian 12's /etc/courier/imapd and imapd-ssl defaults.
IMAPD_ENV = {
    "IMAP_CAPABILITY": "IMAP4rev1 UIDPLUS CHILDREN NAMESPACE THREAD=ORDEREDSUBJECT "
                       "THREAD=REFERENCES SORT QUOTA IDLE",
    "IMAP_KEYWORDS": "1", "IMAP_ACL": "1", "IMAP_PROXY": "0", "IMAP_IDLE_TIMEOUT": "60",
    "IMAP_MAILBOX_SANITY_CHECK": "1", "IMAP_DISABLETHREADSORT": "0",
    "IMAP_CHECK_ALL_FOLDERS": "0", "IMAP_OBSOLETE_CLIENT": "0", "IMAP_UMASK": "022",
    "IMAP_USELOCKS": "1", "IMAP_ENHANCEDIDLE": "0", "IMAP_TRASHFOLDERNAME": "Trash",
    "IMAP_EMPTYTRASH": "Trash:7", "IMAP_MOVE_EXPUNGE_TO_TRASH": "0",
    "HEADERFROM": "X-IMAP-Sender", "MAILDIRPATH": "Maildir", "IMAP_TLS_REQUIRED": "0",
    "TLS_VERIFYPEER": "NONE", "TLS_CACHEFILE": "", "TLS_PROTOCOL": "TLS1_2:TLS1_3",
}


class CourierStack(PostfixFront):
    """Postfix + Courier-IMAP under a temp dir (see module doc). ``CourierStack(base_dir=None,
    keep=False)``; ``start()``/``stop()`` or a context manager. ``imap_port`` = IMAP with
    STARTTLS, ``imaps_port`` = IMAPS, ``imap_legacy_port`` = IMAP with STARTTLS advertising
    neither UIDPLUS nor MOVE (same mailboxes); Postfix ports as ``MailStack``."""

    name = "courier"

    def __init__(self, base_dir=None, keep: bool = False):
        super().__init__(base_dir=base_dir, keep=keep)
        self.courier_dir = ensure_installed("courier")
        self.version = package_versions(self.courier_dir)["courier-imap"]
        self.root = self.pkg_dir / "courier"
        self.co_dir = self.base / "courier"
        self.etc_layer = self.co_dir / "etc-layer"       # shown as /etc (over the real one)
        self.usr_layer = self.root / "usr"               # shown as /usr (over the real one)
        self.run_dir = self.co_dir / "run"               # is /run in the namespace
        self.pem_file = self.co_dir / "imapd.pem"
        self.courier_log = self.log_dir / "courier.log"
        uid, gid = mail_ids()
        self.virtual_overrides = {
            "virtual_transport": "virtual",
            "virtual_mailbox_base": str(self.mail_root),
            "virtual_mailbox_maps": f"texthash:{self.pf_conf}/vmailbox",
            "virtual_uid_maps": f"static:{uid}", "virtual_gid_maps": f"static:{gid}",
            "virtual_minimum_uid": "1",
        }
        #: A third listener (plain IMAP + STARTTLS) whose capabilities lack UIDPLUS (and MOVE),
        #: like an older Courier configuration: same mailboxes, same logins.
        taken = {self.smtp_port, self.submission_port, self.submissions_port,
                 self.submission_notls_port, self.imap_port, self.imaps_port, self.tamper_port,
                 self.postgrey_port}
        self.imap_legacy_port = next(p for p in iter(lambda: self._distinct_ports(1)[0], None)
                                     if p not in taken)
        self._holder: subprocess.Popen | None = None
        self._procs: dict[str, subprocess.Popen] = {}
        self.view = ImapView(HOST, self.imap_port)  # plain LOGIN on loopback

    def login(self, user: str) -> tuple[str, str]:
        """``(address, password)`` of a short user name, for ``self.view``."""
        u = self.users[self._short(user)]
        return u.address, u.password

    def maildir_files(self, user: str, folder: str = "INBOX") -> list[pathlib.Path]:
        """Message files (``cur`` + ``new``) of ``user``'s ``folder`` (``INBOX`` or a
        top-level name like ``Junk``), sorted by mtime."""
        md = self.maildir(self._short(user))
        d = md if folder.upper() == "INBOX" else md / f".{folder.removeprefix('INBOX.')}"
        files = [p for sub in ("new", "cur") if (d / sub).is_dir()
                 for p in (d / sub).iterdir() if p.is_file()]
        return sorted(files, key=lambda p: p.stat().st_mtime_ns)

    # -- configuration
    def _write_backend(self) -> None:
        uid, gid = mail_ids()
        self.copy_package(self.courier_dir, "courier")
        etc = self.etc_layer / "courier"
        for d in (etc, self.run_dir / "courier" / "authdaemon"):
            d.mkdir(parents=True, exist_ok=True)
        (etc / "authdaemonrc").write_text(textwrap.dedent("""\
            # Generated by tests/harness/servers/courier.py
            authmodulelist="authuserdb"
            authmodulelistorig="authuserdb"
            daemons=3
            authdaemonvar=/run/courier/authdaemon
            DEBUG_LOGIN=0
            DEFAULTOPTIONS=""
            LOGGEROPTS=""
            """))
        # imaplogin runs couriertls for STARTTLS with a compiled-in ``-user=courier``: the
        # namespace's /etc/passwd and /etc/group (host's + ``courier`` = uid/gid of ``mail``).
        for name, line in (("passwd", f"courier:x:{uid}:{gid}:Courier (tests):/nonexistent:/usr/sbin/nologin\n"),
                           ("group", f"courier:x:{gid}:\n")):
            host = pathlib.Path("/etc", name).read_text()
            (self.etc_layer / name).write_text(host if host.endswith("\n") else host + "\n")
            with open(self.etc_layer / name, "a") as f:
                f.write(line)
            os.chmod(self.etc_layer / name, 0o644)
        # Courier's TLS wants key and certificate in one PEM file, readable by ``courier``.
        self.pem_file.write_text(self.key_file.read_text() + self.cert_file.read_text())
        os.chmod(self.pem_file, 0o600)
        os.chown(self.pem_file, uid, gid)
        maildirmake = str(self.root / "usr/bin/maildirmake.courier")
        env = {**os.environ, "LD_LIBRARY_PATH": lib_path(self.root)}
        for n in self.users:
            home = self._home(n)
            home.mkdir(parents=True, exist_ok=True)
            md = self.maildir(n)
            if not md.exists():
                self._run([maildirmake, str(md)], "maildirmake", env=env)
                for f in FOLDERS:
                    self._run([maildirmake, "-f", f, str(md)], "maildirmake -f", env=env)
            for p in [home, *home.rglob("*")]:
                os.chown(p, uid, gid)

    def _write_postfix(self) -> None:
        super()._write_postfix()
        # Postfix virtual(8) map: address -> Maildir (trailing slash = Maildir format).
        # ``junked`` gets everything straight into its Junk folder (INBOX.Junk), as if a
        # filter had sorted it there.
        (self.pf_conf / "vmailbox").write_text("".join(
            f"{u.address} {n}/Maildir/{'.Junk/' if n == 'junked' else ''}\n"
            for n, u in self.users.items()))
        # MailStack's master.cf has no virtual(8) service: add it (Postfix' stock line).
        with open(self.pf_conf / "master.cf", "a") as f:
            f.write("virtual   unix  -       n       n       -       -       virtual\n")
        past = time.time() - 10
        os.utime(self.pf_conf / "master.cf", (past, past))

    def _write_backend_passwords(self) -> None:
        """userdb.dat (uid, gid, home, mail) + userdbshadow.dat (``systempw``, SHA-512 crypt
        from ``openssl passwd -6``) for every user, keyed by the full address."""
        etc = self.etc_layer / "courier"
        if not etc.exists():
            return
        uid, gid = mail_ids()
        plain, shadow = [], []
        for n, u in self.users.items():
            crypt = self._run(["openssl", "passwd", "-6", "-stdin"], "openssl passwd",
                              input_text=u.password).stdout.strip()
            plain.append(f"{u.address}\tuid={uid}|gid={gid}|home={self._home(n)}"
                         f"|mail={self.maildir(n)}|_=\n")
            shadow.append(f"{u.address}\tsystempw={crypt}\n")
        makedat = str(self.root / "usr/lib/courier/courier-authlib/makedatprog")
        env = {**os.environ, "LD_LIBRARY_PATH": lib_path(self.root)}
        for name, lines in (("userdb", plain), ("userdbshadow", shadow)):
            cp = subprocess.run([makedat, "-", str(etc / f"{name}.tmp"), str(etc / f"{name}.dat")],
                                input="".join(lines) + ".\n", text=True, capture_output=True,
                                env=env, timeout=10)
            if cp.returncode != 0:
                raise self._fail(f"makedatprog {name} failed: {cp.stdout} {cp.stderr}")
            os.chmod(etc / f"{name}.dat", 0o600)

    def _run(self, argv, what, timeout: float = 30, env=None, input_text: str | None = None):
        if input_text is None:
            return super()._run(argv, what, timeout=timeout, env=env)
        cp = subprocess.run(argv, input=input_text, capture_output=True, text=True,
                            timeout=timeout, env=env)
        if cp.returncode != 0:
            raise self._fail(f"{what} failed (exit {cp.returncode})", cp.stderr)
        return cp

    # -- process control
    def _mounts(self) -> list[Bind | Overlay]:
        return [Overlay(str(self.etc_layer), "/etc"), Overlay(str(self.usr_layer), "/usr"),
                Bind(str(self.run_dir), "/run")]

    def _start_holder(self) -> None:
        """The process whose mount namespace every Courier daemon joins (``sleep``)."""
        if self._holder is not None and self._holder.poll() is None:
            return
        ready = self.run_dir / ".namespace-ready"
        ready.unlink(missing_ok=True)
        argv = namespace_argv(self._mounts(), ["sh", "-c", "touch /run/.namespace-ready && "
                                                           "exec sleep 2147483647"])
        with open(self.courier_log, "ab") as log:
            self._holder = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not ready.exists():
            if self._holder.poll() is not None or time.monotonic() > deadline:
                rc = self._holder.poll()
                self._holder = None
                raise self._fail(f"Courier mount namespace not set up (exit code {rc})")
            time.sleep(0.01)

    def _spawn(self, name: str, argv: list[str], extra_env: dict[str, str]) -> None:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LD_LIBRARY_PATH": lib_path(self.root),
               **extra_env}
        ns = ["nsenter", f"--mount=/proc/{self._holder.pid}/ns/mnt", "--"]
        with open(self.courier_log, "ab") as log:
            self._procs[name] = subprocess.Popen(ns + argv, stdout=log, stderr=log,
                                                 stdin=subprocess.DEVNULL, env=env)

    def backend_running(self) -> bool:
        """True if authdaemond and the three listeners we started are alive."""
        return set(self._procs) == {"authdaemond", "imap", "imaps", "imap-legacy"} and all(
            p.poll() is None for p in self._procs.values())

    def start_backend(self) -> None:
        """Start the namespace holder, ``authdaemond`` and the three ``couriertcpd`` listeners
        (IMAP, IMAPS, legacy IMAP); wait until the auth socket exists and every port greets. Raises ``ServerStackError``
        with ``log/courier.log`` otherwise."""
        if self.backend_running():
            return
        self.stop_backend()
        self._start_holder()
        r = self.root
        sock = self.run_dir / "courier" / "authdaemon" / "socket"
        self._spawn("authdaemond", [str(r / "usr/lib/courier/courier-authlib/authdaemond")], {})
        imapd = [str(r / "usr/lib/courier/courier/imaplogin"), str(r / "usr/bin/imapd"), "Maildir"]
        tcpd = [str(r / "usr/sbin/couriertcpd"), f"-address={HOST}", "-maxprocs=100",
                "-maxperip=100", "-nodnslookup", "-noidentlookup"]
        tls = {**IMAPD_ENV, "COURIERTLS": str(r / "usr/bin/couriertls"),
               "TLS_CERTFILE": str(self.pem_file), "TLS_TRUSTCERTS": str(self.ca_file),
               "IMAP_CAPABILITY_TLS": IMAPD_ENV["IMAP_CAPABILITY"] + " AUTH=PLAIN",
               "IMAP_SHAREDINDEXFILE": str(self.co_dir / "shared-index"),
               # libgamin's server socket is per user + GAM_CLIENT_ID: one gam_server per
               # stack (all run as ``mail``), not one shared with other stacks.
               "GAM_CLIENT_ID": f"mailstack-{self.imap_port}"}
        self._spawn("imap", [*tcpd, str(self.imap_port), *imapd], {**tls, "IMAP_STARTTLS": "YES"})
        self._spawn("imaps", [*tcpd, str(self.imaps_port), str(r / "usr/bin/couriertls"),
                              "-server", "-tcpd", *imapd],
                    {**tls, "IMAP_STARTTLS": "NO", "IMAP_TLS": "1"})
        legacy = " ".join(c for c in IMAPD_ENV["IMAP_CAPABILITY"].split() if c != "UIDPLUS")
        self._spawn("imap-legacy", [*tcpd, str(self.imap_legacy_port), *imapd],
                    {**tls, "IMAP_STARTTLS": "YES", "IMAP_CAPABILITY": legacy,
                     "IMAP_CAPABILITY_TLS": legacy + " AUTH=PLAIN"})
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if not self.backend_running():
                break
            if sock.exists() and _imap_greeting(self.imap_port) and _wait_port(self.imaps_port, 0.05) \
                    and _imap_greeting(self.imap_legacy_port):
                return
            time.sleep(0.02)
        codes = {n: p.poll() for n, p in self._procs.items()}
        self.stop_backend()
        raise self._fail(f"Courier-IMAP did not come up (exit codes {codes})")

    def stop_authdaemond(self) -> None:
        """Stop only ``authdaemond`` (IMAP LOGIN then answers ``NO Temporary problem, please
        try again later``). ``start_backend()`` (the fixture's reset) restarts everything."""
        stop_process(self._procs.pop("authdaemond", None), 5)

    def _namespace_pids(self) -> list[int]:
        """PIDs of the processes in the holder's mount namespace other than the holder
        (``gam_server``, which libgamin starts detached for IDLE, and anything else left)."""
        if self._holder is None:
            return []
        try:
            ns = os.readlink(f"/proc/{self._holder.pid}/ns/mnt")
        except OSError:
            return []
        pids = []
        for d in pathlib.Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) != self._holder.pid:
                try:
                    if os.readlink(d / "ns" / "mnt") == ns:
                        pids.append(int(d.name))
                except OSError:
                    continue
        return pids

    def stop_backend(self) -> None:
        """Stop the listeners, authdaemond, then whatever else runs in the stack's mount
        namespace (``gam_server``), then the namespace holder (all by PID). Never raises."""
        for name in ("imap-legacy", "imaps", "imap", "authdaemond"):
            stop_process(self._procs.pop(name, None), 5)
        for pid in self._namespace_pids():
            _kill_wait(pid, 2)
        stop_process(self._holder, 2)
        self._holder = None

    def backend_logs(self, lines: int = 60) -> str:
        return f"----- {self.courier_log} (last {lines} lines) -----\n{_tail(self.courier_log, lines)}"

    def describe(self) -> dict:
        d = super().describe()
        d.update(server="courier", version=self.version,
                 logs={"postfix": str(self.postfix_log), "courier": str(self.courier_log)})
        return d


def installed_dir() -> pathlib.Path:
    """The unpacked Courier packages (installs them first if needed)."""
    return ensure_installed("courier")


__all__ = ["CourierStack", "ServerStackError"]
