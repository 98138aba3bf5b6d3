"""``sent_at`` is the 250 reply to DATA, read inside the transaction: QUIT's round trip is in
neither ``send_time`` nor the reception time counted from ``sent_at``."""

from __future__ import annotations

import time

from mail_selfcheck.models.settings import ProbeSettings
from mail_selfcheck.probe import smtp
from mail_selfcheck.probe.message import build_message, make_token
from tests.harness.smtpstub import SmtpStub

QUIT_DELAY = 0.3  # seconds the stub takes to answer QUIT


def test_sent_at_is_the_data_reply_not_the_end_of_quit() -> None:
    server = SmtpStub(quit_delay=QUIT_DELAY)
    settings = ProbeSettings(from_address="probe@example.test", to_address="b@example.test", secret="s",
                             smtp_security="plain", smtp_auth="none", imap_password="q", smtp_host="127.0.0.1",
                             smtp_port=server.port)
    token, nonce = make_token("s")
    started = time.monotonic()
    sent = smtp.send(settings, build_message(settings.from_address, settings.to_address, token, nonce),
                     started + 10)
    returned = time.monotonic()
    assert server.lines[-1].upper() == "QUIT" and server.quit_at is not None
    assert sent.reply.startswith("250 2.0.0")
    assert started < sent.sent_at <= server.quit_at  # before QUIT was even sent
    assert returned - sent.sent_at >= QUIT_DELAY  # send() returned after QUIT, sent_at stayed at the 250
    assert sent.send_time < QUIT_DELAY and abs((time.time() - sent.sent_at_epoch) - (returned - sent.sent_at)) < 0.05
