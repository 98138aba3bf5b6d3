"""Command line: ``mail-selfcheck run | operator | crd``. Parsing only; logic lives elsewhere.

Exit codes of ``run``: 0 whenever the probe reached a verdict (success or failure: read the
result), 2 when it could not run at all (invalid configuration).
"""

from __future__ import annotations

import argparse
import sys

RUN_EPILOG = """\
configuration: environment variables (flags above override them)
  MESSAGES_SELFCHECK_FROM, _TO, _SECRET, _INTERVAL, _TIMEOUT, _WEBHOOK_URL
      (the original selfcheck's six names, accepted as they are; empty FROM or TO
      skips the run)
  MESSAGES_SELFCHECK_SMTP_HOST, _SMTP_PORT, _SMTP_SECURITY, _SMTP_USERNAME, _SMTP_PASSWORD
  MESSAGES_SELFCHECK_IMAP_HOST, _IMAP_PORT, _IMAP_SECURITY, _IMAP_USERNAME, _IMAP_PASSWORD,
      _IMAP_FOLDER, _IMAP_DETECTION, _IMAP_POLL_INTERVAL,
      _IMAP_JUNK_FOLDERS (comma-separated extra junk folder names)
  MESSAGES_SELFCHECK_TLS_CA_FILE, _TLS_CA_PEM, _TLS_INSECURE_SKIP_VERIFY
  (all durations in seconds; see README.md, "Running the probe by hand")

exit status: 0 when the probe ran to a verdict, whether the check succeeded or failed
(the verdict is in the log line, --json and --result-file), and when the run is skipped;
2 when the configuration is invalid and nothing was attempted (no result is written).
"""


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="mail-selfcheck", description="End-to-end mail delivery selfcheck.")
    parser.add_argument("--version", action="version", version=f"mail-selfcheck {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="run the selfcheck once (or --loop) against the configured mail stack",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--verbose", "-v", action="store_true", help="log every step (DEBUG)")
    run.add_argument("--json", action="store_true", help="print the result object as one JSON line on stdout")
    run.add_argument("--result-file", metavar="PATH", help="write the result JSON (<= 4 KiB) to PATH, e.g. /dev/termination-log")
    run.add_argument("--log-format", choices=["console", "json"], default="console", help="log renderer (json for production)")
    run.add_argument("--loop", action="store_true", help="repeat every MESSAGES_SELFCHECK_INTERVAL seconds until stopped")
    for name, help_ in [
        ("from", "sender address (MESSAGES_SELFCHECK_FROM)"),
        ("to", "recipient address (MESSAGES_SELFCHECK_TO)"),
        ("smtp-host", "submission server (MESSAGES_SELFCHECK_SMTP_HOST)"),
        ("smtp-port", "submission port (MESSAGES_SELFCHECK_SMTP_PORT)"),
        ("smtp-security", "starttls | tls | plain (MESSAGES_SELFCHECK_SMTP_SECURITY)"),
        ("imap-host", "IMAP server (MESSAGES_SELFCHECK_IMAP_HOST)"),
        ("imap-port", "IMAP port (MESSAGES_SELFCHECK_IMAP_PORT)"),
        ("imap-security", "tls | starttls | plain (MESSAGES_SELFCHECK_IMAP_SECURITY)"),
        ("imap-folder", "folder to watch (MESSAGES_SELFCHECK_IMAP_FOLDER)"),
        ("timeout", "seconds (MESSAGES_SELFCHECK_TIMEOUT)"),
        ("interval", "seconds, for --loop (MESSAGES_SELFCHECK_INTERVAL)"),
    ]:
        run.add_argument(f"--{name}", help=help_)

    op = sub.add_parser("operator", help="run the Kubernetes operator (kopf)")
    scope = op.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[], help="watch this namespace (repeatable)")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace (default)")
    op.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint URL ('' to disable)")
    op.add_argument("--metrics-port", type=int, default=9090, help="Prometheus metrics port (0 to disable)")
    op.add_argument("--verbose", "-v", action="store_true")

    sub.add_parser("crd", help="print the MailSelfcheck CustomResourceDefinition (YAML)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        from .probe.main import main as run_main

        overrides = {
            key: value
            for key, value in {
                "from_address": args.__dict__["from"],
                "to_address": args.to,
                "smtp_host": args.smtp_host,
                "smtp_port": args.smtp_port,
                "smtp_security": args.smtp_security,
                "imap_host": args.imap_host,
                "imap_port": args.imap_port,
                "imap_security": args.imap_security,
                "imap_folder": args.imap_folder,
                "timeout": args.timeout,
                "interval": args.interval,
            }.items()
            if value is not None
        }
        return run_main(
            overrides,
            verbose=args.verbose,
            print_json=args.json,
            result_file=args.result_file,
            log_format=args.log_format,
            loop=args.loop,
        )
    if args.command == "operator":
        from .controller.main import run_operator

        return run_operator(
            namespaces=args.namespace,
            liveness=args.liveness or None,
            metrics_port=args.metrics_port or None,
            verbose=args.verbose,
        )
    if args.command == "crd":
        from .models.spec import crd_yaml

        sys.stdout.write(crd_yaml())
        return 0
    return 2  # pragma: no cover - argparse enforces the choices


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
