"""Detection overhead and IMAP load of the arrival-detection strategies, on real local stacks.

For each server (Postfix + Dovecot from tests/harness/mailstack; Postfix + Cyrus IMAP and
Postfix + Courier-IMAP from tests/harness/servers), two delivery delays:

* ``~10 ms``: the stack's own delivery (Postfix -> LMTP / virtual(8)), a few milliseconds;
* ``~5 s``: Postfix HOLDs the message for ``held@`` (``check_recipient_access``); a thread
  releases it ``5 s +- 0.1 s`` (uniform jitter, so fixed-period pollers are not flattered)
  after it appeared in the hold queue (``postsuper -H`` + ``postqueue -i``).

Strategies, interleaved run by run (each run is a fresh probe: the in-process history of
``detect`` is cleared, as in a Kubernetes Job):

* ``default``: ``adaptive`` with ``MESSAGES_SELFCHECK_IMAP_EXPECTED_ARRIVAL`` = the reception
  times of this strategy's previous runs in this cell (newest 10), as the controller passes
  a resource's recent history (steady state: each cell starts with one uncounted warm-up
  round of every strategy, so "default" has at least one earlier reception time);
* ``default, no history``: ``adaptive`` without history (a new resource's first check);
* ``poll 100 ms``: ``poll`` with ``IMAP_POLL_INTERVAL=0.1``;
* ``idle only``: ``idle``;
* with ``--before FILE`` (``git show <rev>:operator/mail_selfcheck/probe/imap/detect.py >
  FILE``): that revision's ``adaptive``, loaded in place of the current module for its runs.

Overhead = (moment the probe reports: ``sent_at + reception_time``) - (moment the server
stored the message): Dovecot's ``mail_log`` line (``MailStack.delivery_time``), Cyrus: the
spool file's mtime (lmtpd writes it before its index shows the message; the ``Delivered:``
log line comes after visibility), Courier: the Maildir file's mtime (both caught with inotify
before the probe deletes the message). IMAP commands per check
(the whole session: login, detection, fetch, cleanup) are counted by a transparent
``tests.harness.imapproxy.ImapProxy`` in front of each server (the probe uses IMAP ``plain``
to it; ``TCP_NODELAY`` both ways).

    .venv/bin/python benchmarks/detection_overhead.py [--runs 10] [--fast-runs 15]
        [--servers dovecot,cyrus,courier] [--before /tmp/detect_before.py]
        [--only "default,idle only"] [--slow-only] [--trace]

Prints, per server and delay, median / p95 overhead (ms), median commands per check, and the
ratios to ``poll 100 ms``; then the probe's import time and one run's peak RSS. Not a test.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "operator"))

from mail_selfcheck.models.settings import ProbeSettings  # noqa: E402
from mail_selfcheck.probe.imap import detect, session  # noqa: E402
from mail_selfcheck.probe.report import configure_logging  # noqa: E402
from mail_selfcheck.probe.run import run_probe  # noqa: E402
from tests.harness.imapproxy import ImapProxy, Personality  # noqa: E402
from tests.harness.mailstack import MailStack  # noqa: E402
from tests.harness.stored import truth_function  # noqa: E402

P = "MESSAGES_SELFCHECK_"
STRATEGIES = {
    "default": {P + "IMAP_DETECTION": "adaptive"},
    "default, no history": {P + "IMAP_DETECTION": "adaptive"},
    "poll 100 ms": {P + "IMAP_DETECTION": "poll", P + "IMAP_POLL_INTERVAL": "0.1"},
    "idle only": {P + "IMAP_DETECTION": "idle"},
}
BASE = "poll 100 ms"
SLOW_DELAY, SLOW_JITTER = 5.0, 0.1  # seconds
TRACE = SLOW_ONLY = False  # --trace, --slow-only


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# -- truth: when the server stored the message: tests/harness/stored.py


def make_stack(name: str):
    if name == "dovecot":
        return MailStack()
    if name == "cyrus":
        from tests.harness.servers.cyrus import CyrusStack
        return CyrusStack()
    from tests.harness.servers.courier import CourierStack
    return CourierStack()


# -- the delay -------------------------------------------------------------------------------


def release_later(stack, delay: float, stop: threading.Event) -> threading.Thread:
    """Release the held message ``delay`` seconds after it appeared in the hold queue."""

    def run():
        limit = time.monotonic() + 30
        queue_id = None
        while not stop.is_set() and time.monotonic() < limit and queue_id is None:
            queue_id = next((q["queue_id"] for q in stack.mail_queue() if q["queue_name"] == "hold"), None)
            if queue_id is None:
                time.sleep(0.01)
        if queue_id is None or stop.wait(delay):
            return
        env = stack._pf_env()
        stack._run(["postsuper", "-c", str(stack.pf_conf), "-H", queue_id], "postsuper -H", env=env)
        stack._run(["postqueue", "-c", str(stack.pf_conf), "-i", queue_id], "postqueue -i", env=env)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


# -- one run ---------------------------------------------------------------------------------


def _load_before(path: str):
    spec = importlib.util.spec_from_file_location("mail_selfcheck.probe.imap._detect_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    inner = module.wait_for

    def wait_for(box, nonce, deadline, since=None):  # the same TCP_NODELAY as the current module (fair)
        detect._no_delay(box)
        return inner(box, nonce, deadline)

    module.wait_for = wait_for
    return module


def one_run(stack, proxy, truth, to_user: str, delay: float | None, extra: dict[str, str],
            module=None) -> tuple[float, int, float]:
    env = stack.probe_env(to_user=to_user, imap_security="plain", imap_port=proxy.port, TIMEOUT="20")
    env.update(extra)
    for key in [k for k in os.environ if k.startswith(P)]:
        del os.environ[key]
    os.environ.update(env)
    settings = ProbeSettings()
    detect._recent.clear()  # a fresh probe process, as in a Job
    detect._pushing.clear()
    stop = threading.Event()
    releaser = release_later(stack, delay, stop) if delay is not None else None
    before = proxy.command_count()
    saved = session._detect
    if module is not None:
        session._detect = module
    try:
        result = run_probe(settings)
    finally:
        session._detect = saved
        stop.set()
        if releaser is not None:
            releaser.join(10)
    if not result.success:
        raise SystemExit(f"run failed: {result.error}")
    stored = truth(result.message_id)
    seen = result.sent_at + result.reception_time
    return (seen - stored) * 1000.0, proxy.command_count() - before, result.reception_time


def bench_server(name: str, runs: int, fast_runs: int, strategies: dict, modules: dict) -> list[str]:
    lines = []
    with make_stack(name) as stack, ImapProxy(stack, Personality()) as proxy:
        truth = truth_function(name, stack)
        # warm-up: the first delivery of a fresh stack is slow (cold caches)
        one_run(stack, proxy, truth, "receiver", None, strategies[BASE])
        cells = (("~10 ms", "receiver", None, fast_runs), ("~5 s", "held", SLOW_DELAY, runs))
        for label, user, delay, n in cells[1:] if SLOW_ONLY else cells:
            data = {s: ([], [], []) for s in strategies}
            for i in range(n + 1):  # round 0 is a warm-up: not counted, but it is "default"'s first history
                for strategy, extra in strategies.items():
                    extra = dict(extra)
                    history = data[strategy][2]
                    if strategy == "default" and history:
                        extra[P + "IMAP_EXPECTED_ARRIVAL"] = ",".join(f"{v:.3f}" for v in history[-10:])
                    d = None if delay is None else delay + random.uniform(-SLOW_JITTER, SLOW_JITTER)
                    overhead, commands, reception = one_run(stack, proxy, truth, user, d, extra, modules.get(strategy))
                    if TRACE:
                        print(f"  {name} {label} {strategy:<20} round {i}: reception {reception:.3f} s, overhead "
                              f"{overhead:.1f} ms, {commands} commands, history {extra.get(P + 'IMAP_EXPECTED_ARRIVAL')}",
                              file=sys.stderr, flush=True)
                    history.append(reception)
                    if i == 0:
                        continue
                    data[strategy][0].append(overhead)
                    data[strategy][1].append(commands)
            base_median = statistics.median(data[BASE][0])
            base_cmds = statistics.median(data[BASE][1])
            lines.append(f"\n{name} ({getattr(stack, 'version', '') or 'Dovecot'}), delivery {label}, {n} runs per strategy")
            lines.append(f"{'strategy':<22} {'median ms':>10} {'p95 ms':>8} {'min ms':>8} {'cmds/check':>11} "
                         f"{'median/poll':>12} {'cmds/poll':>10}")
            for strategy in strategies:
                o, c, _ = data[strategy]
                lines.append(f"{strategy:<22} {statistics.median(o):10.1f} {_pct(o, 0.95):8.1f} {min(o):8.1f} "
                             f"{statistics.median(c):11.0f} {statistics.median(o) / base_median:12.2f} "
                             f"{statistics.median(c) / base_cmds:10.2f}")
            print("\n".join(lines[-len(strategies) - 2:]), flush=True)
    return lines


def import_time_ms() -> float:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import mail_selfcheck.probe.main"],
                          capture_output=True, text=True, check=True)
    last = [line for line in proc.stderr.splitlines() if line.rstrip().endswith("mail_selfcheck.probe.main")][-1]
    return int(re.split(r"\s*\|\s*", last.split(":", 1)[1])[1]) / 1000.0


def process_costs() -> tuple[float, float]:
    """(CPU seconds, peak RSS MiB) of one ``mail-selfcheck run`` against a fresh Dovecot stack."""
    with MailStack() as stack:
        env = {**os.environ, **stack.probe_env()}
        code = (
            "import resource, sys; from mail_selfcheck.cli import main\n"
            "try:\n    main(['run'])\nexcept SystemExit:\n    pass\n"
            "u = resource.getrusage(resource.RUSAGE_SELF)\n"
            "print(u.ru_utime + u.ru_stime, u.ru_maxrss)"
        )
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        cpu, rss = proc.stdout.split()[-2:]
        return float(cpu), int(rss) / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10, help="runs per strategy at ~5 s")
    parser.add_argument("--fast-runs", type=int, default=15, help="runs per strategy at ~10 ms")
    parser.add_argument("--servers", default="dovecot,cyrus,courier")
    parser.add_argument("--before", help="an earlier detect.py, measured as 'adaptive (before)'")
    parser.add_argument("--only", help="comma-separated strategies to run (default: all)")
    parser.add_argument("--slow-only", action="store_true", help="only the ~5 s delivery")
    parser.add_argument("--trace", action="store_true", help="one line per run on stderr")
    args = parser.parse_args()
    global TRACE, SLOW_ONLY
    TRACE, SLOW_ONLY = args.trace, args.slow_only
    configure_logging(verbose=False)
    strategies = dict(STRATEGIES)
    modules = {}
    if args.before:
        strategies["adaptive (before)"] = {P + "IMAP_DETECTION": "adaptive"}
        modules["adaptive (before)"] = _load_before(args.before)
    if args.only:
        strategies = {k: v for k, v in strategies.items() if k in args.only.split(",") or k == BASE}
    socket.setdefaulttimeout(None)
    lines = []
    for name in args.servers.split(","):
        lines += bench_server(name.strip(), args.runs, args.fast_runs, strategies, modules)
    print("\n=== summary (overhead = reported arrival - server stored it) ===")
    print("\n".join(lines))
    cpu, rss = process_costs()
    print(f"\nimport time of mail_selfcheck.probe.main: {import_time_ms():.1f} ms (python -X importtime, cumulative)")
    print(f"one `mail-selfcheck run` (Dovecot, ~10 ms delivery): CPU {cpu:.2f} s, peak RSS {rss:.1f} MiB")


if __name__ == "__main__":
    main()
