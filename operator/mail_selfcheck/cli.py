"""Command line: ``mail-selfcheck run | operator | crd``. Parsing only; logic lives elsewhere.

Exit codes of ``run``: 0 when the check succeeded (or was skipped), 1 when it failed, 2 on
invalid configuration; ``--format nagios``: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
"""

from __future__ import annotations

import argparse
import sys

RUN_EPILOG = """\
configuration: environment variables (flags above override them)
  MESSAGES_SELFCHECK_FROM, _TO, _SECRET, _INTERVAL, _TIMEOUT, _WEBHOOK_URL
      (the original selfcheck's six names, accepted as they are; empty FROM or TO
      skips the run)
  MESSAGES_SELFCHECK_WEBHOOK_KIND (generic | healthchecks | uptime-kuma | gatus |
      betterstack | cronitor), _WEBHOOK_FAILURE_URL (generic), _WEBHOOK_TOKEN (gatus)
  MESSAGES_SELFCHECK_SMTP_HOST, _SMTP_PORT, _SMTP_SECURITY, _SMTP_USERNAME, _SMTP_PASSWORD,
      _SMTP_EHLO_NAME (default: FROM's domain)
  MESSAGES_SELFCHECK_IMAP_HOST, _IMAP_PORT, _IMAP_SECURITY, _IMAP_USERNAME, _IMAP_PASSWORD,
      _IMAP_FOLDER, _IMAP_DETECTION, _IMAP_POLL_INTERVAL,
      _IMAP_JUNK_FOLDERS (comma-separated extra junk folder names)
  MESSAGES_SELFCHECK_TLS_CA_FILE, _TLS_CA_PEM, _TLS_INSECURE_SKIP_VERIFY
  (all durations in seconds; see README.md, "Running the probe by hand")

exit status:
  0  the check succeeded (also: the run was skipped because FROM or TO is empty)
  1  the check failed (the verdict is in the log line, --json and --result-file)
  2  invalid configuration: nothing was attempted, no result is written
  with --format nagios (monitoring-plugins guidelines): 0 OK, 1 WARNING (reception time
  above --warning), 2 CRITICAL (failed check, or above --critical), 3 UNKNOWN (invalid
  configuration, skipped run, a failure of the probe itself); one line on stdout:
    MAIL OK - delivered in 2.340s | send_time=0.150s;;;0 reception_time=2.340s;5;30;0
  --loop exits 0 when stopped.
"""


class _RunParser(argparse.ArgumentParser):
    """``run``'s parser: a usage error in plugin mode exits 3 (UNKNOWN), not argparse's 2."""

    def error(self, message: str):  # noqa: D102 - argparse API
        if _nagios_requested(sys.argv[1:] if _ARGV is None else _ARGV):
            self.print_usage(sys.stderr)
            sys.stdout.write(f"MAIL UNKNOWN - usage error: {message}\n")
            self.exit(3, f"{self.prog}: error: {message}\n")
        super().error(message)


_ARGV: list[str] | None = None


def _nagios_requested(argv: list[str]) -> bool:
    return "--format=nagios" in argv or any(a == "--format" and b == "nagios" for a, b in zip(argv, argv[1:]))


def _seconds(text: str) -> float:
    """A threshold in seconds: a number >= 0 (the plugins' plain ``N`` = alert above N)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds must be >= 0")
    return value


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="mail-selfcheck", description="End-to-end mail delivery selfcheck.")
    parser.add_argument("--version", action="version", version=f"mail-selfcheck {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_RunParser)

    run = sub.add_parser(
        "run",
        help="run the selfcheck once (or --loop) against the configured mail stack",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--verbose", "-v", action="store_true", help="log every step (DEBUG)")
    out = run.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the result object as one JSON line on stdout")
    out.add_argument("--format", choices=["json", "nagios"], dest="output_format",
                     help="stdout: json (= --json) or nagios (one monitoring-plugins line with perfdata; "
                          "exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN; quiet log unless --verbose)")
    run.add_argument("--warning", "-w", type=_seconds, metavar="SECONDS",
                     help="with --format nagios: WARNING when the reception time is above SECONDS")
    run.add_argument("--critical", "-c", type=_seconds, metavar="SECONDS",
                     help="with --format nagios: CRITICAL when the reception time is above SECONDS")
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
    global _ARGV
    _ARGV = argv
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
            output_format=args.output_format,
            warning=args.warning,
            critical=args.critical,
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
