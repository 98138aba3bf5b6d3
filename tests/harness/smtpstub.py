"""A minimal loopback SMTP server for unit tests of the probe's SMTP client (RFC 5321 replies only).

``SmtpStub()`` listens on a free port of 127.0.0.1 (``port``), serves one connection: greets
``220``, answers ``250`` to every command, ``354`` to ``DATA`` and ``250`` after the message's
final ``.``, and ``221`` to ``QUIT`` after ``quit_delay`` seconds. ``lines`` records every
command line (message content not included); ``quit_at`` is the ``time.monotonic()`` moment
QUIT arrived.
"""

from __future__ import annotations

import socket
import threading
import time


class SmtpStub:
    def __init__(self, quit_delay: float = 0.0) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.quit_delay = quit_delay
        self.lines: list[str] = []
        self.quit_at: float | None = None
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn, conn.makefile("rb") as rfile:
            conn.sendall(b"220 test ESMTP\r\n")
            in_data = False
            for raw in rfile:
                if in_data:
                    if raw in (b".\r\n", b".\n"):
                        in_data = False
                        conn.sendall(b"250 2.0.0 queued\r\n")
                    continue
                line = raw.decode().strip()
                self.lines.append(line)
                if line.upper().startswith("QUIT"):
                    self.quit_at = time.monotonic()
                    time.sleep(self.quit_delay)
                    conn.sendall(b"221 bye\r\n")
                    return
                if line.upper() == "DATA":
                    in_data = True
                    conn.sendall(b"354 go ahead\r\n")
                    continue
                conn.sendall(b"250 ok\r\n")
