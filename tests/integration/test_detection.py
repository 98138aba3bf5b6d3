"""Arrival detection (issue 13) on the real stacks, the way users run the probe
(``mail-selfcheck run --json``): behaviour, not speed.

* A delivery ~3 s late (Postfix HOLD for ``held@``, released by the test) with the expected
  arrival passed as ``MESSAGES_SELFCHECK_IMAP_EXPECTED_ARRIVAL`` is found with at most 30
  IMAP commands for the whole check (counted by a transparent ``ImapProxy`` in front of
  Dovecot, Cyrus and Courier), and its ``reception_time`` lies after the release and is not
  stretched by the probe's own waits (IDLE cycles, sleeps).
* Without history (a new resource's first check) a late delivery is found by paced polling.
* A server whose IDLE never pushes (the ``SilentIdle`` proxy personality; Courier with
  Debian's ``IMAP_ENHANCEDIDLE=0``) still finds the message promptly after delivery.
* A fast delivery: ``reception_time`` is within the delivery window given by Dovecot's
  ``mail_log`` (``delivery_times()``) and the submission (``sent_at``).

Bounds on ``reception_time`` compare it with the moment the harness released the message:
it must never be earlier (the probe cannot see mail before delivery) and never later by as
much as one of the probe's own waits (0.5 s: Dovecot's IDLE push delay, the old 2 s / 5 s
IDLE cycles), which is what "timed at the announcement" means.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.harness.imapproxy import ImapProxy, Personality, SilentIdle
from tests.harness.stored import truth_function

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).with_name("mail-selfcheck"))
WITH_POSTFIX = ["dovecot", "cyrus", "courier"]
OWN_WAIT = 0.5  # seconds: shorter than any wait of the probe that used to end up in reception_time


def _cli(env: dict[str, str]) -> dict:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MESSAGES_SELFCHECK_")}
    full.update(env)
    proc = subprocess.run([CLI, "run", "--json"], env=full, capture_output=True, text=True, timeout=120)
    try:
        result = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"no JSON result (exit {proc.returncode}): {proc.stdout!r}\n{proc.stderr}")
    print(f"probe result: {proc.stdout.strip()}")
    return result


class Release:
    """Releases the held message ``delay`` seconds after it appeared in Postfix's hold queue
    (``postsuper -H`` + ``postqueue -i``); ``released_at``: epoch seconds of the release."""

    def __init__(self, stack, delay: float):
        self.stack, self.delay = stack, delay
        self.released_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Release":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        stack, limit, queue_id = self.stack, time.monotonic() + 30, None
        while queue_id is None and not self._stop.is_set() and time.monotonic() < limit:
            queue_id = next((q["queue_id"] for q in stack.mail_queue() if q["queue_name"] == "hold"), None)
            time.sleep(0.01)
        if queue_id is None or self._stop.wait(self.delay):
            return
        env = stack._pf_env()
        self.released_at = time.time()
        stack._run(["postsuper", "-c", str(stack.pf_conf), "-H", queue_id], "postsuper -H", env=env)
        stack._run(["postqueue", "-c", str(stack.pf_conf), "-i", queue_id], "postqueue -i", env=env)


def _held_env(server, proxy: ImapProxy, **kw) -> dict[str, str]:
    return server.env(to_user="held", imap_security="plain", imap_port=proxy.port, timeout="20", **kw)


@contextlib.contextmanager
def _stored(server_name: str, stack):
    """``f(message_id)``: epoch seconds at which the server stored the message (Dovecot's log,
    Courier's/Cyrus's message file mtime: tests/harness/stored.py)."""
    f = truth_function(server_name, stack, users=("held",))
    try:
        yield f
    finally:
        if hasattr(f, "watch"):
            f.watch.close()


def _assert_timed_at_announcement(result: dict, release: Release, stored=None) -> None:
    """Not before the release; not an own wait after it, or after the server stored the
    message (``stored``: see :func:`_stored`; under CPU load Postfix may take longer than
    ``OWN_WAIT`` to deliver a released message, which is no fault of the probe's)."""
    assert result["success"] is True, result
    assert release.released_at is not None, "the message was never released"
    released = release.released_at - result["sent_at"]
    assert result["reception_time"] >= released - 0.002, (result["reception_time"], released)
    at = stored(result["message_id"]) - result["sent_at"] if stored is not None else released
    assert result["reception_time"] < max(released, at) + OWN_WAIT, (result["reception_time"], released, at)


@pytest.mark.parametrize("matrix_server", WITH_POSTFIX, indirect=True)
def test_late_delivery_with_expected_arrival_costs_at_most_30_commands(matrix_server) -> None:
    """History says ~3 s: one IDLE until shortly before, NOOPs around it; the whole check
    (login, detection, fetch, cleanup, logout) stays within 30 IMAP commands."""
    with ImapProxy(matrix_server.stack, Personality()) as proxy, _stored(matrix_server.name, matrix_server.stack) as stored:
        env = _held_env(matrix_server, proxy, imap_expected_arrival="2.95,3.0,3.05")
        with Release(matrix_server.stack, 3.0) as release:
            result = _cli(env)
        _assert_timed_at_announcement(result, release, stored)
        assert proxy.command_count() <= 30, (proxy.command_names(), proxy.commands)
        assert result["imap_commands"] == proxy.command_count()  # the run counts its own load
        assert 3.0 < result["imap_session_seconds"] <= result["duration"], result
        assert proxy.command_names().get("IDLE", 0) <= 2, proxy.command_names()


@pytest.mark.parametrize("matrix_server", WITH_POSTFIX, indirect=True)
def test_late_delivery_without_history_is_found_by_paced_polling(matrix_server) -> None:
    """A new resource's first check (no history): the message is still seen soon after the
    release, and far fewer commands than NOOP-every-10-ms (~300 for 3 s) are sent."""
    with ImapProxy(matrix_server.stack, Personality()) as proxy, _stored(matrix_server.name, matrix_server.stack) as stored:
        env = _held_env(matrix_server, proxy)
        with Release(matrix_server.stack, 3.0) as release:
            result = _cli(env)
        _assert_timed_at_announcement(result, release, stored)
        assert proxy.command_names().get("NOOP", 0) <= 80, proxy.command_names()


@pytest.mark.parametrize("expected", [None, "2"], ids=["no-history", "history"])
def test_idle_that_never_pushes_still_finds_the_message_promptly(mail_stack, expected) -> None:
    """IDLE accepted but silent (``SilentIdle``: Courier's default, Cyrus without idled): the
    probe must not wait for its own IDLE/DONE cycle (was: a 5.0 s delivery reported at 7.05 s)."""
    silent = SilentIdle()
    with ImapProxy(mail_stack, silent) as proxy:
        env = mail_stack.probe_env(to_user="held", imap_security="plain", imap_port=proxy.port, timeout="20")
        env["MESSAGES_SELFCHECK_SECRET"] = "dt-" + secrets.token_hex(6)
        if expected:
            env["MESSAGES_SELFCHECK_IMAP_EXPECTED_ARRIVAL"] = expected
        with Release(mail_stack, 2.0) as release:
            result = _cli(env)
        _assert_timed_at_announcement(result, release, mail_stack.delivery_time)


def test_idle_strategy_on_a_silent_idle_still_finds_the_message(mail_stack) -> None:
    """``detection=idle`` where IDLE never pushes: the periodic safety search finds it."""
    with ImapProxy(mail_stack, SilentIdle()) as proxy:
        env = mail_stack.probe_env(to_user="held", imap_security="plain", imap_port=proxy.port, timeout="20",
                                   imap_detection="idle")
        env["MESSAGES_SELFCHECK_SECRET"] = "dt-" + secrets.token_hex(6)
        with Release(mail_stack, 1.0) as release:
            result = _cli(env)
        assert result["success"] is True, result
        assert release.released_at is not None
        assert result["reception_time"] >= release.released_at - result["sent_at"] - 0.002, result
        assert any(c.endswith(b" IDLE") for c in proxy.commands)


@pytest.mark.parametrize("expected", [None, "0.01"], ids=["no-history", "history"])
def test_fast_delivery_reception_time_is_within_the_delivery_window(mail_stack, expected) -> None:
    """``reception_time`` is dated at the response that showed the message: not before Dovecot
    stored it (``delivery_times()``), and not after our own waits."""
    env = mail_stack.probe_env()
    env["MESSAGES_SELFCHECK_SECRET"] = "dt-" + secrets.token_hex(6)
    if expected:
        env["MESSAGES_SELFCHECK_IMAP_EXPECTED_ARRIVAL"] = expected
    result = _cli(env)
    assert result["success"] is True, result
    stored = mail_stack.delivery_time(result["message_id"]) - result["sent_at"]
    # Dovecot writes its mail_log line just after the message became visible; 1 ms rounding
    assert stored - 0.01 <= result["reception_time"] < stored + OWN_WAIT, (result["reception_time"], stored)


def test_expected_arrival_setting_is_validated() -> None:
    """A wrong value is a configuration error naming the variable, never a crash."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESSAGES_SELFCHECK_")}
    env.update({"MESSAGES_SELFCHECK_FROM": "a@example.test", "MESSAGES_SELFCHECK_TO": "b@example.test",
                "MESSAGES_SELFCHECK_SECRET": "s", "MESSAGES_SELFCHECK_IMAP_PASSWORD": "p",
                "MESSAGES_SELFCHECK_SMTP_PASSWORD": "p", "MESSAGES_SELFCHECK_IMAP_EXPECTED_ARRIVAL": "5,soon"})
    proc = subprocess.run([CLI, "run", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "MESSAGES_SELFCHECK_IMAP_EXPECTED_ARRIVAL" in proc.stdout + proc.stderr
    assert "'soon' is not a number of seconds" in proc.stdout + proc.stderr


def test_a_check_asks_nothing_twice(mail_stack) -> None:
    """Dovecot sends its capabilities in the greeting and in the LOGIN reply (RFC 3501 7.1):
    no ``CAPABILITY`` command; the watched folder is SELECTed once (cleanup works in the
    selected INBOX; Junk is swept), and Trash is not looked at on a server that deletes by
    expunging (UIDPLUS)."""
    with ImapProxy(mail_stack, Personality()) as proxy:
        env = mail_stack.probe_env(imap_security="plain", imap_port=proxy.port)
        env["MESSAGES_SELFCHECK_SECRET"] = "dt-" + secrets.token_hex(6)
        result = _cli(env)
    assert result["success"] is True and result["cleanup_warning"] is None, result
    names = proxy.command_names()
    assert "CAPABILITY" not in names, proxy.commands
    assert result["imap_commands"] == proxy.command_count(), proxy.commands
    selects = [c.split(b" ", 1)[1] for c in proxy.commands if b" SELECT " in c]
    assert selects == [b'SELECT "INBOX"', b'SELECT "Junk"'], proxy.commands
    assert mail_stack.messages("receiver") == []
