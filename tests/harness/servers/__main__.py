"""``python -m tests.harness.servers {cyrus,courier,greenmail} up``: one matrix server in the
foreground, printing ``export MESSAGES_SELFCHECK_...`` lines for the probe (as
``python -m tests.harness.mailstack up`` does for Dovecot). Ctrl-C / SIGTERM stops it."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

from tests.harness.mailstack import MailStackError

from .fixtures import _make


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.harness.servers",
                                 description="Run one server of the matrix in the foreground.")
    ap.add_argument("server", choices=["cyrus", "courier", "greenmail"])
    ap.add_argument("cmd", choices=["up"])
    ap.add_argument("--smtp-security", choices=["starttls", "tls", "plain"])
    ap.add_argument("--imap-security", default="tls", choices=["tls", "starttls", "plain"])
    ap.add_argument("--json", action="store_true", help="print a JSON summary too")
    args = ap.parse_args(argv)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))
    stack = _make(args.server)
    try:
        stack.start()
        print(f"# {args.server} {stack.version} up in {stack.startup_seconds:.2f}s under {stack.base}",
              flush=True)
        smtp = args.smtp_security or getattr(stack, "default_smtp_security", "starttls")
        for k, v in stack.probe_env(smtp_security=smtp, imap_security=args.imap_security).items():
            print(f"export {k}={json.dumps(v)}")
        if args.json:
            print(json.dumps(stack.describe()))
        print("# runs in the foreground: use these exports in a second shell; Ctrl-C / SIGTERM to stop",
              flush=True)
        while not stop["now"]:
            time.sleep(0.2)
    except MailStackError as e:
        print(f"servers: {e}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
