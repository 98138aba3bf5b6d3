"""pytest plugin: the real Postfix + Dovecot stack of ``tests.harness.mailstack`` as fixtures.

Registered in ``tests/conftest.py`` (``pytest_plugins``). Fixtures:

* ``mail_stack_session`` (session scope): one ``MailStack`` for the whole run, started lazily
  the first time a test asks for it (unit-only runs never start it) and stopped at the end
  of the session. If it cannot start, every test using it FAILS with the reason and the log
  tails (never skipped).
* ``mail_stack`` (function scope): the same stack, reset to a clean state *before* the test
  (passwords restored, Postfix + Dovecot + postgrey running, every mailbox emptied, Postfix
  queue deleted, greylisting database emptied if it was used) so tests never leak into each
  other. On a test failure its report gets a "mailstack logs" section with the log tails.
  This is the one tests normally use::

      @pytest.mark.integration
      def test_something(mail_stack):
          env = mail_stack.probe_env(to_user="junked")
          ...
          assert mail_stack.messages("junked", "Junk")

* ``clean_mail_stack``: alias of ``mail_stack`` (same object, same reset).
* ``mail_env`` (function scope): ``mail_stack.probe_env()`` for sender -> receiver
  (STARTTLS submission, IMAPS), a fresh ``dict[str, str]`` per test to modify freely.
"""

from __future__ import annotations

import time

import pytest

from tests.harness.mailstack import MailStack, MailStackError

_STACK_KEY = pytest.StashKey[MailStack]()


def reset_mail_stack(stack: MailStack) -> None:
    """Bring ``stack`` back to its initial state (see module doc). Raises ``MailStackError``."""
    stack.reset_passwords()
    if not stack.dovecot_running():
        stack.start_dovecot()
    if not stack.postfix_running():
        stack.start_postfix()
    stack.flush_queue()
    stack.clear_mailboxes()
    if stack.greylist_used() or stack._postgrey is None or stack._postgrey.poll() is not None:
        stack.reset_greylist()


@pytest.fixture(scope="session")
def mail_stack_session(request: pytest.FixtureRequest):
    """The session's ``MailStack`` (started on first use, stopped at session end)."""
    stack = MailStack()
    request.config.stash[_STACK_KEY] = stack
    t0 = time.monotonic()
    try:
        stack.start()
    except MailStackError as e:
        stack.stop()
        pytest.fail(f"the real mail stack (Postfix + Dovecot + postgrey) did not start:\n{e}",
                    pytrace=False)
    print(f"\nmailstack: started in {time.monotonic() - t0:.2f}s under {stack.base}")
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def mail_stack(mail_stack_session: MailStack, request: pytest.FixtureRequest) -> MailStack:
    """The session stack, reset to a clean state before this test."""
    try:
        reset_mail_stack(mail_stack_session)
    except MailStackError as e:
        pytest.fail(f"could not reset the mail stack:\n{e}", pytrace=False)
    request.node.stash[_STACK_KEY] = mail_stack_session
    return mail_stack_session


@pytest.fixture
def clean_mail_stack(mail_stack: MailStack) -> MailStack:
    """Alias of ``mail_stack``: the session stack reset to a clean state for this test."""
    return mail_stack


@pytest.fixture
def mail_env(mail_stack: MailStack) -> dict[str, str]:
    """Probe environment sender -> receiver (STARTTLS submission, IMAPS) for this stack."""
    return mail_stack.probe_env()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    report = outcome.get_result()
    stack = item.stash.get(_STACK_KEY, None)
    if stack is not None and report.failed and report.when == "call":
        report.sections.append(("mailstack logs", stack.logs(40)))
