"""The probe, run as users run it (``mail-selfcheck run --json`` with ``MESSAGES_SELFCHECK_*``),
against several real IMAP servers on loopback (tests/harness/servers):

* ``dovecot``: Postfix 3.7 + Dovecot 2.3 (the session's ``mail_stack``),
* ``cyrus``: Postfix 3.7 -> LMTP -> Cyrus IMAP 3.6 (Debian 12 packages, unpacked),
* ``courier``: Postfix 3.7 -> Maildir -> Courier-IMAP 5.0 (Debian 12 packages, unpacked),
* ``greenmail``: GreenMail 2.1.13 standalone (its own SMTP; no STARTTLS anywhere).

Scenarios: success in every TLS mode and detection strategy (message delivered, found,
verified and deleted: no probe message left in any folder), other mail untouched (a foreign
message, another probe's message, another probe whose secret ends with ours), our own old
leftover swept, another client's ``\\Deleted`` message untouched, wrong IMAP/SMTP password,
an authentication backend that is down (Courier), wrong TLS mode per port, delivery to junk,
late delivery and no delivery (Postfix HOLD, released or not).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).with_name("mail-selfcheck"))
ALL = ["dovecot", "cyrus", "courier", "greenmail"]
WITH_POSTFIX = ["dovecot", "cyrus", "courier"]  # Postfix in front: HOLD / release possible


def _servers(names=ALL, xfails: dict | None = None) -> list:
    """Indirect params for ``matrix_server``; ``xfails``: name -> mark."""
    xfails = xfails or {}
    return [pytest.param(n, id=n, marks=[xfails[n]] if n in xfails else []) for n in names]


def _cli(env: dict[str, str], *args: str, timeout: float = 120) -> tuple[dict, subprocess.CompletedProcess]:
    """Run ``mail-selfcheck run --json`` with exactly ``env``'s MESSAGES_SELFCHECK_* values;
    return (parsed result, process). Fails the test if no JSON result is printed or the exit
    status does not match the verdict (0 success, 1 failure)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("MESSAGES_SELFCHECK_")}
    full.update(env)
    proc = subprocess.run([CLI, "run", "--json", *args], env=full, capture_output=True, text=True,
                          timeout=timeout)
    try:
        result = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"no JSON result on stdout (exit {proc.returncode}): {proc.stdout!r}\n{proc.stderr}")
    # Exit status (issue 12 item 5): 0 for a successful check, 1 for a failed one.
    assert proc.returncode == (0 if result["success"] else 1), f"exit {proc.returncode}: {proc.stderr}"
    print(f"probe result: {proc.stdout.strip()}")
    return result, proc


def _probe_messages(server, secret: str, user: str = "receiver") -> list:
    """Messages carrying a token of ``secret`` (``<secret>/...``) in any folder of ``user``."""
    address, password = server.login(user)
    out = []
    for folder in server.view.folders(address, password):
        out += [m for m in server.view.messages(address, password, folder)
                if m.token and m.token.startswith(secret + "/")]
    return out


def _token_message(token: str, subject: str = "selfcheck") -> bytes:
    return (f"From: sender@example.test\r\nTo: receiver@example.test\r\nSubject: {subject}\r\n"
            f"Message-ID: <{secrets.token_hex(8)}@example.test>\r\nX-Selfcheck-Token: {token}\r\n"
            f"\r\nSelfcheck token: {token}\r\n").encode()


TWO_HOURS_AGO = datetime.now(timezone.utc) - timedelta(hours=2)


# -- success ---------------------------------------------------------------------------------


@pytest.mark.parametrize("matrix_server", _servers(), indirect=True)
def test_success_found_verified_and_deleted(matrix_server, record_property) -> None:
    env = matrix_server.env()
    result, proc = _cli(env, "--verbose")
    record_property("probe_result", json.dumps(result))
    assert result["success"] is True and result["error"] is None, result
    assert result["folder"] == "INBOX" and result["cleanup_warning"] is None, result
    assert 0 < result["send_time"] < 20 and 0 <= result["reception_time"] < 20
    assert "selfcheck_completed success=true" in proc.stderr
    assert _probe_messages(matrix_server, env["MESSAGES_SELFCHECK_SECRET"]) == []
    assert matrix_server.messages("receiver") == []  # expunged, not just flagged


_MODES = [(s, smtp, imap) for s in WITH_POSTFIX
          for smtp, imap in (("starttls", "tls"), ("tls", "starttls"), ("plain", "plain"))]
_MODES += [("greenmail", "tls", "tls"), ("greenmail", "plain", "plain")]


@pytest.mark.parametrize("matrix_server,smtp_security,imap_security",
                         [pytest.param(s, a, b, id=f"{s}-smtp_{a}-imap_{b}") for s, a, b in _MODES],
                         indirect=["matrix_server"])
def test_success_in_each_tls_mode(matrix_server, smtp_security, imap_security) -> None:
    env = matrix_server.env(smtp_security=smtp_security, imap_security=imap_security)
    result, _ = _cli(env)
    assert result["success"] is True, result
    assert _probe_messages(matrix_server, env["MESSAGES_SELFCHECK_SECRET"]) == []


#: GreenMail sends ``* n EXISTS`` before the IDLE continuation (issue 9 item 7, fixed).
_DETECTION = [pytest.param(s, d, id=f"{s}-{d}") for s in ALL for d in ("idle", "poll")]


@pytest.mark.parametrize("matrix_server,detection", _DETECTION, indirect=["matrix_server"])
def test_success_with_each_detection(matrix_server, detection) -> None:
    env = matrix_server.env(imap_detection=detection, timeout="15")
    result, _ = _cli(env)
    assert result["success"] is True, result
    assert result["reception_time"] < 10, result
    assert _probe_messages(matrix_server, env["MESSAGES_SELFCHECK_SECRET"]) == []


# -- other mail is never touched; own leftovers are ------------------------------------------------


@pytest.mark.parametrize("matrix_server", _servers(), indirect=True)
def test_foreign_mail_survives(matrix_server) -> None:
    """Another client's message (recent and old), and another probe's old message."""
    matrix_server.append(b"Subject: keep me (new)\r\n\r\nnot a probe message\r\n")
    matrix_server.append(b"Subject: keep me (old)\r\n\r\nnot a probe message\r\n", msg_time=TWO_HOURS_AGO)
    other = "another-probe/" + secrets.token_hex(16)
    matrix_server.append(_token_message(other, "other probe"), msg_time=TWO_HOURS_AGO)
    result, _ = _cli(matrix_server.env())
    assert result["success"] is True, result
    left = matrix_server.messages("receiver")
    assert sorted(m.subject for m in left) == ["keep me (new)", "keep me (old)", "other probe"]
    assert not any("\\Deleted" in m.flags for m in left), [m.flags for m in left]


@pytest.mark.parametrize("matrix_server", _servers(), indirect=True)
def test_lookalike_token_of_another_probe_survives(matrix_server) -> None:
    """IMAP HEADER search is a substring match: ``other-<secret>/...`` matches a search for
    ``<secret>/`` on every server; the exact token check must spare it (issue 9 item 1)."""
    env = matrix_server.env()
    lookalike = f"other-{env['MESSAGES_SELFCHECK_SECRET']}/{secrets.token_hex(16)}"
    matrix_server.append(_token_message(lookalike, "lookalike"), msg_time=TWO_HOURS_AGO)
    result, _ = _cli(env)
    assert result["success"] is True, result
    left = matrix_server.messages("receiver")
    assert [m.subject for m in left] == ["lookalike"] and "\\Deleted" not in left[0].flags


@pytest.mark.parametrize("matrix_server", _servers(), indirect=True)
def test_another_clients_deleted_message_survives(matrix_server) -> None:
    """A message another client flagged ``\\Deleted`` (not yet expunged) stays: the probe
    expunges by UID only (all four servers have UIDPLUS)."""
    matrix_server.append(b"Subject: flagged by another client\r\n\r\nkeep\r\n", flags=("\\Deleted",))
    result, _ = _cli(matrix_server.env())
    assert result["success"] is True and result["cleanup_warning"] is None, result
    left = matrix_server.messages("receiver")
    assert [m.subject for m in left] == ["flagged by another client"], left
    assert "\\Deleted" in left[0].flags


@pytest.mark.parametrize("matrix_server", _servers(), indirect=True)
def test_own_old_leftover_is_swept(matrix_server) -> None:
    env = matrix_server.env()
    mine = f"{env['MESSAGES_SELFCHECK_SECRET']}/{secrets.token_hex(16)}"
    matrix_server.append(_token_message(mine, "leftover"), msg_time=TWO_HOURS_AGO)
    result, _ = _cli(env)
    assert result["success"] is True, result
    assert matrix_server.messages("receiver") == []


# -- wrong credentials ------------------------------------------------------------------------------

#: What each server answers to a wrong IMAP LOGIN (the probe must pass it on).
IMAP_AUTH_REPLY = {
    "dovecot": "[AUTHENTICATIONFAILED] Authentication failed.",
    "cyrus": "Login failed: authentication failure",
    "courier": "Login failed.",
    "greenmail": "LOGIN failed. Invalid login/password",
}


@pytest.mark.parametrize("matrix_server", _servers(), indirect=True)
def test_wrong_imap_password(matrix_server) -> None:
    env = matrix_server.env(imap_password="wrong-imap-pw")
    result, proc = _cli(env)
    assert result["success"] is False and result["error_class"] == "mailbox_unavailable", result
    assert result["error"].startswith(
        f"mailbox unavailable: receiver@example.test cannot log in at IMAP server 127.0.0.1:{env['MESSAGES_SELFCHECK_IMAP_PORT']}"), result
    assert IMAP_AUTH_REPLY[matrix_server.name] in result["error"], result
    assert result["send_time"] is None  # nothing was sent
    assert "wrong-imap-pw" not in proc.stdout + proc.stderr


#: What each server answers to a wrong SMTP AUTH (Postfix: 535 5.7.8 for any SASL backend).
SMTP_AUTH_REPLY = {"dovecot": "535 5.7.8", "cyrus": "535 5.7.8", "courier": "535 5.7.8",
                   "greenmail": "535 5.7.8"}


def _smtp_log(server) -> Path:
    stack = server.stack
    return stack.greenmail_log if server.name == "greenmail" else stack.postfix_log


def _failed_smtp_auths(server, mark: int) -> int:
    """Failed SMTP AUTH attempts logged by the server after byte offset ``mark`` of its log
    (Postfix: one ``SASL <mech> authentication failed`` warning each, written by the time
    its ``disconnect from`` line is; GreenMail: one ``535`` reply each)."""
    log = _smtp_log(server)
    deadline = time.monotonic() + 5
    while True:
        with open(log, "rb") as f:
            f.seek(mark)
            text = f.read().decode(errors="replace")
        if server.name == "greenmail" or "disconnect from" in text or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if server.name == "greenmail":
        return text.count("S: 535 ")
    return sum(1 for line in text.splitlines() if "authentication failed" in line and "SASL" in line)


@pytest.mark.parametrize("matrix_server", _servers(), indirect=True)
def test_wrong_smtp_password(matrix_server) -> None:
    """The server's own reply is reported, after exactly one AUTH (issue 9 item 10: no second
    mechanism, no second failed login counting towards a lockout)."""
    env = matrix_server.env(smtp_password="wrong-smtp-pw")
    mark = _smtp_log(matrix_server).stat().st_size
    result, proc = _cli(env)
    assert result["success"] is False and result["error_class"] == "mailbox_unavailable", result
    assert "sender@example.test cannot authenticate at SMTP server" in result["error"], result
    assert SMTP_AUTH_REPLY[matrix_server.name] in result["error"], result
    assert "wrong-smtp-pw" not in proc.stdout + proc.stderr
    assert _failed_smtp_auths(matrix_server, mark) == 1


# -- wrong TLS mode per port --------------------------------------------------------------------------


def _imap_tls_port(server) -> int:
    return server.stack.imaps_port


def _imap_plain_port(server) -> int:
    return server.stack.imap_port


@pytest.mark.parametrize("matrix_server", _servers(), indirect=True)
def test_imap_implicit_tls_against_the_plain_port(matrix_server) -> None:
    env = matrix_server.env(imap_security="tls", imap_port=_imap_plain_port(matrix_server))
    result, _ = _cli(env)
    assert result["success"] is False and result["error_class"] == "imap_tls", result
    assert "WRONG_VERSION_NUMBER" in result["error"] and "wrong port or security mode" in result["error"]
    assert result["duration"] < 5, result


@pytest.mark.parametrize("matrix_server", _servers(), indirect=True)
@pytest.mark.parametrize("imap_security", ["starttls", "plain"])
def test_imap_starttls_or_plain_against_the_implicit_tls_port(matrix_server, imap_security) -> None:
    """Issue 9 item 9: an implicit-TLS port sends no greeting in clear text."""
    env = matrix_server.env(imap_security=imap_security, imap_port=_imap_tls_port(matrix_server),
                            timeout="15")
    result, _ = _cli(env)
    assert result["success"] is False and result["error_class"] in ("imap_connect", "imap_tls"), result
    assert "implicit TLS" in result["error"], result
    assert result["duration"] < 10, result  # a few seconds for the greeting, not the whole budget


@pytest.mark.parametrize("matrix_server", _servers(), indirect=True)
def test_smtp_starttls_against_the_implicit_tls_port(matrix_server) -> None:
    """The hint is right, after the 10 s greeting timeout, not at the run's timeout (20 s)."""
    env = matrix_server.env(smtp_security="starttls", smtp_port=matrix_server.stack.submissions_port,
                            timeout="20")
    result, _ = _cli(env)
    assert result["success"] is False and result["error_class"] == "smtp_connect", result
    assert "sent no greeting" in result["error"] and "implicit TLS" in result["error"], result
    assert result["duration"] < 10 + 2, result


def _smtp_starttls_port(server) -> int:
    return server.stack.submission_port if server.has_postfix else server.stack.smtp_port


@pytest.mark.parametrize("matrix_server", _servers(), indirect=True)
def test_smtp_implicit_tls_against_a_plain_port(matrix_server) -> None:
    env = matrix_server.env(smtp_security="tls", smtp_port=_smtp_starttls_port(matrix_server))
    result, _ = _cli(env)
    assert result["success"] is False and result["error_class"] == "smtp_tls", result
    assert "WRONG_VERSION_NUMBER" in result["error"] and "wrong port or security mode" in result["error"]


@pytest.mark.parametrize("matrix_server", _servers(["greenmail"]), indirect=True)
def test_starttls_where_the_server_has_none(matrix_server) -> None:
    """GreenMail offers STARTTLS on neither SMTP nor IMAP: the probe refuses to log in in clear."""
    env = matrix_server.env(imap_security="starttls")
    result, _ = _cli(env)
    assert result["success"] is False and result["error_class"] == "imap_tls", result
    assert "refused STARTTLS" in result["error"] and "clear text" in result["error"], result
    env = matrix_server.env(smtp_security="starttls")
    result, _ = _cli(env)
    assert result["success"] is False and result["error_class"] == "smtp_tls", result
    assert "does not offer STARTTLS" in result["error"], result


# -- late delivery, no delivery (Postfix HOLD) ----------------------------------------------------------


def _release_held_after(server, delay: float, stop: threading.Event) -> threading.Thread:
    """Release every held message (``postsuper -H ALL``) once one is held and ``delay`` s
    have passed since; returns the started thread."""
    stack = server.stack

    def run():
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            if any(q["queue_name"] == "hold" for q in stack.mail_queue()):
                break
            time.sleep(0.05)
        if stop.wait(delay):
            return
        stack._run(["postsuper", "-c", str(stack.pf_conf), "-H", "ALL"], "postsuper -H",
                   env=stack._pf_env())
        stack._run(["postqueue", "-c", str(stack.pf_conf), "-f"], "postqueue -f", env=stack._pf_env())

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("matrix_server", _servers(WITH_POSTFIX), indirect=True)
def test_late_delivery_is_still_found(matrix_server) -> None:
    """Postfix HOLDs the message for ``held``; it is released 4 s later and delivered."""
    env = matrix_server.env(to_user="held", timeout="20")
    stop = threading.Event()
    t = _release_held_after(matrix_server, 4.0, stop)
    try:
        result, _ = _cli(env)
    finally:
        stop.set()
        t.join(10)
    assert result["success"] is True, result
    assert 3.5 <= result["reception_time"] < 12, result
    assert _probe_messages(matrix_server, env["MESSAGES_SELFCHECK_SECRET"], "held") == []


@pytest.mark.parametrize("matrix_server", _servers(WITH_POSTFIX), indirect=True)
def test_no_delivery_is_a_timeout(matrix_server) -> None:
    env = matrix_server.env(to_user="held", timeout="4")
    result, _ = _cli(env)
    assert result["success"] is False and result["error_class"] == "timeout", result
    assert result["error"] == "Message not received within 4 seconds", result
    assert result["send_time"] is not None and result["reception_time"] is None
    assert 4 <= result["duration"] < 4 + 2, result  # the run keeps its own deadline


# -- junk ------------------------------------------------------------------------------------------

#: Where each server files the probe message for ``junked``: Dovecot (Sieve in LMTP) ``Junk``
#: (``\\Junk``); Cyrus (default Sieve script in lmtpd) ``Quarantine``, known only by its
#: special-use attribute, which Cyrus LISTs as ``\\junk``; Courier (Postfix delivers into the
#: Maildir ``.Junk``, no special-use) ``INBOX.Junk`` by name. GreenMail has no server-side
#: filtering: not in this test.
JUNK_FOLDER = {"dovecot": "Junk", "cyrus": "Quarantine", "courier": "INBOX.Junk"}


@pytest.mark.parametrize("matrix_server", _servers(WITH_POSTFIX), indirect=True)
def test_delivered_to_junk(matrix_server) -> None:
    env = matrix_server.env(to_user="junked", timeout="15")
    result, _ = _cli(env)
    assert result["success"] is False and result["error_class"] == "junk", result
    assert result["error"].startswith("delivered to junk"), result
    assert result["folder"] == JUNK_FOLDER[matrix_server.name], result
    assert _probe_messages(matrix_server, env["MESSAGES_SELFCHECK_SECRET"], "junked") == []


# -- the server cannot check the password --------------------------------------------------------------


@pytest.mark.parametrize("matrix_server", _servers(["courier"]), indirect=True)
def test_courier_auth_backend_down_is_a_temporary_auth_failure(matrix_server) -> None:
    """authdaemond stopped: Courier's imaplogin cannot check any password."""
    matrix_server.stack.stop_authdaemond()
    try:
        result, _ = _cli(matrix_server.env())
    finally:
        matrix_server.stack.start_backend()
    assert result["success"] is False and result["error_class"] == "auth_temporary", result
    assert "Temporary problem" in result["error"], result


# -- a server without UIDPLUS or MOVE (Courier, capabilities trimmed) -------------------------------


@pytest.mark.parametrize("matrix_server", _servers(["courier"]), indirect=True)
def test_courier_without_uidplus_expunges_only_when_safe(matrix_server) -> None:
    """Issue 9 item 4 on a real server: without UIDPLUS/MOVE the probe may send a plain
    EXPUNGE only while every ``\\\\Deleted`` message is its own; another client's
    ``\\\\Deleted`` message is never expunged, and the probe's own leftover is counted."""
    port = matrix_server.stack.imap_legacy_port
    env = matrix_server.env(imap_security="starttls", imap_port=port)
    result, _ = _cli(env)
    assert result["success"] is True and result["cleanup_warning"] is None, result
    assert result["leftover_count"] == 0 and matrix_server.messages("receiver") == []

    matrix_server.append(b"Subject: flagged by another client\r\n\r\nkeep\r\n", flags=("\\Deleted",))
    env = matrix_server.env(imap_security="starttls", imap_port=port)
    result, _ = _cli(env)
    assert result["success"] is True, result
    left = matrix_server.messages("receiver")
    foreign = [m for m in left if m.subject == "flagged by another client"]
    ours = [m for m in left if m.token and m.token.startswith(env["MESSAGES_SELFCHECK_SECRET"] + "/")]
    assert len(foreign) == 1 and "\\Deleted" in foreign[0].flags
    assert len(ours) == 1 and "\\Deleted" in ours[0].flags and len(left) == 2
    assert result["leftover_count"] == 1, result
    assert "other clients" in result["cleanup_warning"] and "1 probe message(s) left" in result["cleanup_warning"], result


# -- MOVE without UIDPLUS (Cyrus with UIDPLUS suppressed) --------------------------------------------


@pytest.mark.parametrize("matrix_server", _servers(["cyrus"]), indirect=True)
def test_cyrus_move_without_uidplus_leaves_nothing_in_trash(matrix_server) -> None:
    """Issue 9 item 3 on a real server: with MOVE but no UIDPLUS the probe moves its message
    to ``\\\\Trash`` and must remove that copy too; runs must not pile up there."""
    port = matrix_server.stack.imap_nouidplus_port
    for _ in range(2):
        env = matrix_server.env(imap_security="starttls", imap_port=port)
        result, _ = _cli(env)
        assert result["success"] is True, result
        assert result["cleanup_warning"] is None and result["leftover_count"] == 0, result
    assert matrix_server.messages("receiver") == []
    assert matrix_server.messages("receiver", "Trash") == []
