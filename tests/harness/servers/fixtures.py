"""pytest plugin: the server-matrix stacks as fixtures (registered in ``tests/conftest.py``).

* ``matrix_stacks`` (session scope): a registry that starts each stack the first time a test
  asks for it (``"cyrus"``, ``"courier"``, ``"greenmail"``) and stops them all at the end of
  the session. A stack that cannot start FAILS every test using it, with its logs (never
  skipped). ``"dovecot"`` is the session's existing ``mail_stack`` (tests/harness/mail_fixtures).
* ``matrix_server`` (function scope, **indirectly parametrised** with a server name): a
  ``MatrixServer`` for that server, reset before the test (passwords restored, daemons
  running, Postfix queue emptied, every mailbox of ``sender``/``receiver``/``held``/``junked`` emptied)::

      @pytest.mark.parametrize("matrix_server", ["cyrus", "greenmail"], indirect=True)
      def test_x(matrix_server):
          env = matrix_server.env()                      # probe env, a fresh secret
          matrix_server.messages("receiver")             # -> [Message, ...] over IMAP

  On a test failure the report gets a "<server> logs" section with the log tails.
"""

from __future__ import annotations

import dataclasses
import secrets
import time

import pytest

from tests.harness.mailstack import HOST, MailStack, MailStackError

from .common import ImapView, Message, ServerStackError

SERVER_NAMES = ("dovecot", "cyrus", "courier", "greenmail")
_LOGS_KEY = pytest.StashKey[object]()


@dataclasses.dataclass
class MatrixServer:
    """One server of the matrix, as the tests use it.

    ``name`` (``dovecot|cyrus|courier|greenmail``), ``version`` (package/artifact version
    ``str``), ``stack`` (``MailStack``, ``CyrusStack``, ``CourierStack`` or
    ``GreenMailStack``), ``view`` (``ImapView`` on the plain/STARTTLS IMAP port, plain LOGIN
    on loopback), ``smtp_security`` (the SMTP mode the server supports by default:
    ``starttls`` with Postfix in front, ``tls`` for GreenMail), ``has_postfix`` (Postfix
    queue control: ``held`` recipient, ``postsuper``), ``imap_starttls`` (the plain IMAP port
    offers STARTTLS).
    """

    name: str
    version: str
    stack: object
    view: ImapView
    smtp_security: str
    has_postfix: bool
    imap_starttls: bool

    def env(self, **kw) -> dict[str, str]:
        """Probe environment (``stack.probe_env(**kw)``, all ``str``) with this server's
        default SMTP mode and a fresh ``MESSAGES_SELFCHECK_SECRET`` (``mx-<12 hex>``), so
        one test's leftover sweep never meets another's messages."""
        kw.setdefault("smtp_security", self.smtp_security)
        env = self.stack.probe_env(**kw)
        env["MESSAGES_SELFCHECK_SECRET"] = "mx-" + secrets.token_hex(6)
        return env

    def login(self, user: str) -> tuple[str, str]:
        """``(address, password)`` of a user (``sender``, ``receiver``; with Postfix also
        ``held``, ``junked``)."""
        u = self.stack.users[user]
        return u.address, u.password

    def messages(self, user: str = "receiver", folder: str = "INBOX") -> list[Message]:
        """Every message of ``user``'s ``folder`` over IMAP, ``\\Deleted`` ones included."""
        return self.view.messages(*self.login(user), folder)

    def append(self, raw: bytes, user: str = "receiver", **kw) -> None:
        """IMAP APPEND ``raw`` to ``user``'s INBOX (``flags=``, ``msg_time=``, ``folder=``)."""
        self.view.append(*self.login(user), raw, **kw)

    def logs(self, lines: int = 40) -> str:
        return self.stack.logs(lines)


def _make(name: str):
    if name == "cyrus":
        from .cyrus import CyrusStack
        return CyrusStack()
    if name == "courier":
        from .courier import CourierStack
        return CourierStack()
    if name == "greenmail":
        from .greenmail import GreenMailStack
        return GreenMailStack()
    raise KeyError(f"unknown matrix server {name!r}; known: {SERVER_NAMES}")


class _Registry:
    def __init__(self):
        self.stacks: dict[str, object] = {}
        self.errors: dict[str, str] = {}

    def get(self, name: str):
        if name in self.errors:
            pytest.fail(self.errors[name], pytrace=False)
        if name not in self.stacks:
            t0 = time.monotonic()
            stack = None
            try:
                stack = _make(name)
                stack.start()
            except (MailStackError, ServerStackError, OSError) as e:
                if stack is not None:
                    stack.stop()
                self.errors[name] = f"the real {name} stack did not start:\n{e}"
                pytest.fail(self.errors[name], pytrace=False)
            print(f"\n{name}: started in {time.monotonic() - t0:.2f}s under {stack.base}")
            self.stacks[name] = stack
        return self.stacks[name]

    def stop_all(self) -> None:
        for stack in self.stacks.values():
            stack.stop()
        self.stacks.clear()


@pytest.fixture(scope="session")
def matrix_stacks():
    """Session registry of the Cyrus / Courier / GreenMail stacks (started on first use)."""
    reg = _Registry()
    try:
        yield reg
    finally:
        reg.stop_all()


def _reset(stack) -> None:
    stack.reset_passwords()
    if not stack.backend_running():
        stack.start_backend() if hasattr(stack, "start_backend") else stack.start()
    if hasattr(stack, "postfix_running"):
        if not stack.postfix_running():
            stack.start_postfix()
        stack.flush_queue()
    for user in ("sender", "receiver", "held", "junked"):
        if user in stack.users:
            u = stack.users[user]
            stack.view.clear(u.address, u.password)


@pytest.fixture
def matrix_server(request: pytest.FixtureRequest, matrix_stacks) -> MatrixServer:
    """The server named by the (indirect) parameter, reset for this test (module doc)."""
    name = request.param
    if name == "dovecot":
        stack: MailStack = request.getfixturevalue("mail_stack")  # reset by its fixture
        stack.view = ImapView(HOST, stack.imap_port)
        server = MatrixServer("dovecot", _dovecot_version(), stack, stack.view, "starttls",
                              has_postfix=True, imap_starttls=True)
    else:
        stack = matrix_stacks.get(name)
        try:
            _reset(stack)
        except (MailStackError, ServerStackError, OSError) as e:
            pytest.fail(f"could not reset the {name} stack:\n{e}\n{stack.logs(40)}", pytrace=False)
        server = MatrixServer(name, stack.version, stack, stack.view,
                              getattr(stack, "default_smtp_security", "starttls"),
                              has_postfix=hasattr(stack, "postfix_running"),
                              imap_starttls=name != "greenmail")
    request.node.stash[_LOGS_KEY] = server
    return server


def _dovecot_version() -> str:
    import subprocess
    cp = subprocess.run(["dovecot", "--version"], capture_output=True, text=True)
    return cp.stdout.strip() or "unknown"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    report = outcome.get_result()
    server = item.stash.get(_LOGS_KEY, None)
    if server is not None and report.failed and report.when == "call" and server.name != "dovecot":
        report.sections.append((f"{server.name} logs", server.logs(40)))
