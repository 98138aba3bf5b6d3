"""Detection overhead of the probe's arrival-detection strategies, on the real local stack.

For each strategy, N probe runs against the local Postfix + Dovecot (tests/harness/mailstack):
overhead = (moment the probe saw the message) - (moment Dovecot stored it: the Maildir
file's mtime, from ``MailStack.delivery_time``). Side by side: the probe's strategies
(adaptive = default, idle) and plain polling every 100 ms and every 1 s.
Also prints the probe's import time and one run's peak RSS.

    .venv/bin/python benchmarks/detection_overhead.py [--runs 20]

Prints a table of median / p95 overhead in milliseconds and the ratio to 100 ms polling.
Not a test: figures go into the issue notes.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mail_selfcheck.models.settings import ProbeSettings  # noqa: E402
from mail_selfcheck.probe.report import configure_logging  # noqa: E402
from mail_selfcheck.probe.run import run_probe  # noqa: E402
from tests.harness.mailstack import MailStack  # noqa: E402

STRATEGIES = [
    ("adaptive (default)", {"MESSAGES_SELFCHECK_IMAP_DETECTION": "adaptive"}),
    ("idle", {"MESSAGES_SELFCHECK_IMAP_DETECTION": "idle"}),
    ("poll 100 ms", {"MESSAGES_SELFCHECK_IMAP_DETECTION": "poll", "MESSAGES_SELFCHECK_IMAP_POLL_INTERVAL": "0.1"}),
    ("poll 1 s", {"MESSAGES_SELFCHECK_IMAP_DETECTION": "poll", "MESSAGES_SELFCHECK_IMAP_POLL_INTERVAL": "1"}),
]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(stack: MailStack, extra: dict[str, str], runs: int) -> list[float]:
    env = {**stack.probe_env(), **extra}
    for key in [k for k in os.environ if k.startswith("MESSAGES_SELFCHECK_")]:
        del os.environ[key]
    os.environ.update(env)
    settings = ProbeSettings()
    overheads = []
    for _ in range(runs):
        result = run_probe(settings)
        if not result.success:
            raise SystemExit(f"run failed: {result.error}")
        stored = stack.delivery_time(result.message_id)
        seen = result.sent_at + result.reception_time
        overheads.append((seen - stored) * 1000.0)
    return overheads


def import_time_ms() -> float:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import mail_selfcheck.probe.main"],
                          capture_output=True, text=True, check=True)
    last = [line for line in proc.stderr.splitlines() if line.rstrip().endswith("mail_selfcheck.probe.main")][-1]
    return int(re.split(r"\s*\|\s*", last.split(":", 1)[1])[1]) / 1000.0


def peak_rss_mb(stack: MailStack) -> float:
    env = {**os.environ, **stack.probe_env()}
    code = (
        "import resource, sys; from mail_selfcheck.cli import main; main(['run']);"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return int(proc.stdout.split()[-1]) / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    configure_logging(verbose=False)
    with MailStack() as stack:
        rows = []
        for name, extra in STRATEGIES:
            values = measure(stack, extra, args.runs)
            rows.append((name, statistics.median(values), _pct(values, 0.95)))
        base = rows[2][1]
        print(f"detection overhead over {args.runs} runs (ms after Dovecot stored the message)")
        print(f"{'strategy':<20} {'median':>8} {'p95':>8} {'median / poll-100ms':>20}")
        for name, median, p95 in rows:
            print(f"{name:<20} {median:8.1f} {p95:8.1f} {median / base:20.2f}")
        print(f"import time of mail_selfcheck.probe.main: {import_time_ms():.1f} ms (python -X importtime, cumulative)")
        print(f"peak RSS of one run: {peak_rss_mb(stack):.1f} MiB")


if __name__ == "__main__":
    main()
