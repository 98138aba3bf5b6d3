"""Real Cyrus IMAP 3.6 (Debian 12 ``cyrus-imapd``) behind the mailstack Postfix, on loopback.

Postfix (``tests.harness.mailstack``'s configuration: submission with STARTTLS, implicit-TLS
submissions, plain SMTP, SASL AUTH) delivers over **LMTP on a Unix socket** to Cyrus'
``lmtpd``; Cyrus' ``imapd`` serves IMAP (STARTTLS) and IMAPS. Binaries come unpacked from the
Debian packages in ``~/.cache/mail-selfcheck/servers/cyrus/root`` (``hack/install-servers.sh
cyrus``, run automatically) and run with ``LD_LIBRARY_PATH``; every file they write
(``configdirectory``, spool partition, sockets, pid file, sasldb) is under the stack's temp
dir. Cyrus logs only to syslog: it runs in a private mount namespace whose ``/dev/log`` is a
``SyslogSink`` socket writing ``log/cyrus.log``.

Quick use::

    from tests.harness.servers.cyrus import CyrusStack

    with CyrusStack() as stack:             # ~1 s
        env = stack.probe_env()             # sender -> receiver, STARTTLS submission, IMAPS
        stack.view.messages(*stack.login("receiver"))   # -> [Message, ...]

    python -m tests.harness.servers cyrus up    # foreground; prints the probe env (also courier, greenmail)

Cyrus settings worth knowing (``imapd.conf`` in ``<base>/cyrus/imapd.conf``):
``virtdomains: userid`` (login and mailbox owner ``receiver@example.test``),
``altnamespace`` + ``unixhierarchysep`` (folders ``Quarantine`` (``\\junk``), ``Trash``, ``Sent``
next to INBOX, separator ``/``, autocreated with their special-use attributes, which Cyrus
LISTs in lower case), ``autocreate_post`` (first delivery
creates the INBOX), SASL ``auxprop``/``sasldb`` (the sasldb Postfix also uses),
``allowplaintext: yes`` (LOGIN without TLS on loopback, for the ``plain`` lab mode),
``idled`` running (IDLE notifications are immediate), ``duplicatesuppression: 0``, a default
Sieve script (``autocreate_sieve_script``) that files probe messages for ``junked@`` into
``Quarantine``.
Capabilities include IDLE, UIDPLUS, MOVE, SPECIAL-USE, CONDSTORE/QRESYNC.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import textwrap
import time

from tests.harness.mailstack import DOMAIN, HOST, _imap_greeting, _tail, _wait_port

from .common import (ImapView, PostfixFront, ServerStackError, SyslogSink, ensure_installed,
                     lib_path, mail_ids, namespace_argv, package_versions, private_dev,
                     stop_process)

#: Autocreated folders, name -> special-use (``xlist-<flag>``; Cyrus then LISTs the attribute
#: in lower case, ``\\junk``). The junk folder's name is deliberately none of the well-known
#: ones, so that only its special-use attribute identifies it.
FOLDERS = {"Quarantine": "junk", "Trash": "trash", "Sent": "sent"}
JUNK_FOLDER = "Quarantine"

#: Default Sieve script of every user: probe messages to ``junked@example.test`` go to the
#: junk folder (``Quarantine``).
JUNK_SIEVE = """\
require ["fileinto", "envelope"];
if allof (envelope :localpart :is "to" "junked", exists "X-Selfcheck-Token") {
  fileinto "Quarantine";
  stop;
}
"""


class CyrusStack(PostfixFront):
    """Postfix + Cyrus IMAP under a temp dir (see module doc). ``CyrusStack(base_dir=None,
    keep=False)``; ``start()``/``stop()`` or a context manager. Ports as ``MailStack``
    (``imap_port`` = IMAP + STARTTLS, ``imaps_port`` = IMAPS, submission ports of Postfix),
    plus ``imap_nouidplus_port``: IMAP + STARTTLS of the same server with
    ``suppress_capabilities: UIDPLUS`` (MOVE and SPECIAL-USE still advertised)."""

    name = "cyrus"

    def __init__(self, base_dir=None, keep: bool = False):
        super().__init__(base_dir=base_dir, keep=keep)
        self.root = self.cyrus_root  # copy of the unpacked packages, readable by ``mail``
        self.version = package_versions(self.cyrus_dir)["cyrus-imapd"]
        self.cy_dir = self.base / "cyrus"
        self.cy_conf = self.cy_dir / "imapd.conf"
        self.cy_master_conf = self.cy_dir / "cyrus.conf"
        self.cy_nouidplus_conf = self.cy_dir / "imapd-nouidplus.conf"
        taken = {self.smtp_port, self.submission_port, self.submissions_port,
                 self.submission_notls_port, self.imap_port, self.imaps_port, self.tamper_port,
                 self.postgrey_port}
        #: IMAP (+ STARTTLS) listener of the same Cyrus whose CAPABILITY lacks UIDPLUS (MOVE kept).
        self.imap_nouidplus_port = next(p for p in iter(lambda: self._distinct_ports(1)[0], None)
                                        if p not in taken)
        self.cy_socket_dir = self.cy_dir / "socket"
        self.lmtp_socket = self.cy_socket_dir / "lmtp"
        self.cyrus_log = self.log_dir / "cyrus.log"
        self.cyrus_stderr = self.log_dir / "cyrus.stderr"
        self._syslog = SyslogSink(self.log_dir / "syslog.sock", self.cyrus_log)
        self._master: subprocess.Popen | None = None
        self.virtual_overrides = {"virtual_transport": f"lmtp:unix:{self.lmtp_socket}"}
        self.view = ImapView(HOST, self.imap_port)  # plain on loopback (allowplaintext)

    def login(self, user: str) -> tuple[str, str]:
        """``(address, password)`` of a short user name, for ``self.view``."""
        u = self.users[self._short(user)]
        return u.address, u.password

    def _bin(self, name: str) -> str:
        return str(self.root / "usr/lib/cyrus/bin" / name)

    # -- configuration
    def _write_backend(self) -> None:
        uid, gid = mail_ids()
        # What Debian's postinst (``cyrus makedirs``) creates under configdirectory.
        conf_subdirs = ("db", "log", "msg", "proc", "ptclient", "quota", "sieve", "socket",
                        "sync", "user", "backup", "lock")
        dirs = [self.cy_dir / d for d in ("conf", "spool", "sieve", "socket", "proc", "lock")]
        dirs += [self.cy_dir / "conf" / d for d in conf_subdirs]
        for d in [self.cy_dir, *dirs]:
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, uid, gid)
        (self.cy_dir / "dev").mkdir(exist_ok=True)
        # Cyrus (user mail) must read the key; Postfix (root at start) reads it too.
        os.chown(self.key_file, uid, gid)
        xlist = "\n".join(f"xlist-{flag}: {name}" for name, flag in FOLDERS.items())
        # Server-side Sieve (lmtpd): every autocreated user gets this script; it files probe
        # messages for ``junked@`` into Quarantine, like a spam filter would.
        (self.cy_dir / "default.sieve").write_text(JUNK_SIEVE)
        conf = f"""\
            # Generated by tests/harness/servers/cyrus.py: a self-contained Cyrus for tests.
            configdirectory: {self.cy_dir}/conf
            partition-default: {self.cy_dir}/spool
            defaultpartition: default
            sievedir: {self.cy_dir}/sieve
            proc_path: {self.cy_dir}/proc
            mboxname_lockpath: {self.cy_dir}/lock
            lmtpsocket: {self.lmtp_socket}
            idlesocket: {self.cy_socket_dir}/idle
            notifysocket: {self.cy_socket_dir}/notify
            servername: cyrus.{DOMAIN}
            cyrus_user: mail
            syslog_prefix: cyrus-{self.imap_port}
            virtdomains: userid
            altnamespace: yes
            unixhierarchysep: yes
            lmtp_downcase_rcpt: yes
            autocreate_quota: 0
            autocreate_post: 1
            autocreate_inbox_folders: {' | '.join(FOLDERS)}
            autocreate_subscribe_folders: {' | '.join(FOLDERS)}
            {xlist}
            autocreate_sieve_script: {self.cy_dir}/default.sieve
            sieve_extensions: fileinto envelope
            duplicatesuppression: 0
            allowplaintext: yes
            allowanonymouslogin: no
            sasl_pwcheck_method: auxprop
            sasl_auxprop_plugin: sasldb
            sasl_sasldb_path: {self.sasldb}
            sasl_mech_list: PLAIN LOGIN
            tls_server_cert: {self.cert_file}
            tls_server_key: {self.key_file}
            tls_client_ca_file: {self.ca_file}
            tls_versions: tls1_2 tls1_3
            hashimapspool: false
            umask: 077
            """
        self.cy_conf.write_text(textwrap.dedent(conf))
        # Same server, same mailboxes, for a second IMAP listener that hides UIDPLUS (MOVE
        # stays): the "MOVE without UIDPLUS" shape of issue 9 item 3.
        self.cy_nouidplus_conf.write_text(textwrap.dedent(conf) + "suppress_capabilities: UIDPLUS\n")
        c = f"-C {self.cy_conf}"
        master = f"""\
            START {{
              recover cmd="{self._bin('ctl_cyrusdb')} {c} -r"
            }}
            SERVICES {{
              imap cmd="{self._bin('imapd')} {c}" listen="{HOST}:{self.imap_port}" prefork=1 maxchild=100
              imaps cmd="{self._bin('imapd')} {c} -s" listen="{HOST}:{self.imaps_port}" prefork=1 maxchild=100
              imapnouidplus cmd="{self._bin('imapd')} -C {self.cy_nouidplus_conf}" listen="{HOST}:{self.imap_nouidplus_port}" prefork=0 maxchild=20
              lmtpunix cmd="{self._bin('lmtpd')} {c}" listen="{self.lmtp_socket}" prefork=1 maxchild=20
            }}
            EVENTS {{
              checkpoint cmd="{self._bin('ctl_cyrusdb')} {c} -c" period=30
            }}
            DAEMON {{
              idled cmd="{self._bin('idled')} {c}"
            }}
            """
        self.cy_master_conf.write_text(textwrap.dedent(master))

    def _write_backend_passwords(self) -> None:
        # Cyrus reads the same sasldb (opened per authentication): nothing else to do.
        pass

    # -- process control
    def backend_running(self) -> bool:
        return self._master is not None and self._master.poll() is None

    def start_backend(self) -> None:
        """Start Cyrus' ``master`` (our child, foreground, in a private mount namespace) and
        wait until IMAP sends its greeting, IMAPS and the LMTP socket accept connections."""
        if self.backend_running():
            return
        self._syslog.start()
        dev = self.cy_dir / "dev"
        for p in dev.iterdir() if dev.exists() else ():
            p.unlink() if not p.is_dir() else p.rmdir()
        mounts = private_dev(dev, self._syslog.socket_path)
        argv = namespace_argv(mounts, [self._bin("master"), "-C", str(self.cy_conf), "-M",
                                       str(self.cy_master_conf), "-p",
                                       str(self.cy_dir / "master.pid"), "-D"])
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
               "LD_LIBRARY_PATH": lib_path(self.root),
               "SASL_PATH": str(self.root / "usr/lib/x86_64-linux-gnu/sasl2"),
               "CYRUS_USER": "mail"}
        with open(self.cyrus_stderr, "ab") as err:
            self._master = subprocess.Popen(argv, stdout=err, stderr=err,
                                            stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self._master.poll() is not None:
                break
            if self.lmtp_socket.exists() and _imap_greeting(self.imap_port) \
                    and _imap_greeting(self.imap_nouidplus_port) \
                    and _wait_port(self.imaps_port, 0.05):
                return
            time.sleep(0.05)
        rc = self._master.poll()
        self.stop_backend()
        raise self._fail(f"Cyrus IMAP did not come up (master exit code {rc})")

    def stop_backend(self) -> None:
        """SIGTERM the master (it stops its services), SIGKILL after 10 s. Never raises."""
        stop_process(self._master)
        self._master = None
        self._syslog.stop()

    def backend_logs(self, lines: int = 60) -> str:
        return "\n".join(f"----- {p} (last {lines} lines) -----\n{_tail(p, lines)}"
                         for p in (self.cyrus_log, self.cyrus_stderr))

    def describe(self) -> dict:
        d = super().describe()
        d.update(server="cyrus", version=self.version,
                 logs={"postfix": str(self.postfix_log), "cyrus": str(self.cyrus_log)})
        return d


def installed_dir() -> pathlib.Path:
    """The unpacked Cyrus packages (installs them first if needed)."""
    return ensure_installed("cyrus")


__all__ = ["CyrusStack", "ServerStackError"]
