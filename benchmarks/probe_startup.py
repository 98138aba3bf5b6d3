"""Start-up cost of the probe process (issue 13): two code versions side by side, one stack.

Each run is a real ``mail-selfcheck run`` (a fresh process, as in a Job) against Postfix +
Dovecot from ``tests/harness/mailstack`` (STARTTLS submission, IMAPS, no webhook unless
``--webhook``), with the versions interleaved run by run. Certificates are verified against the
system CAs as in production (``SSL_CERT_FILE``: the system bundle plus the stack's CA), or with
``--stack-ca`` against the stack's CA file alone (``MESSAGES_SELFCHECK_TLS_CA_FILE``). Per version:

* ``imports ms``: the sum of ``python -X importtime`` self times of every module the run
  imports beyond the interpreter's own start-up (``python -c pass``), measured in a separate
  ``-X importtime`` run so the other figures are not slowed by it;
* ``first connect ms``: process spawn to the probe's first ``socket.connect`` (an audit hook,
  PEP 578): interpreter start-up, imports, settings, up to the first network byte;
* ``CPU s``: user + system CPU of the whole run (``os.wait4`` rusage of the child);
* ``peak RSS MiB``: the child's ``ru_maxrss``.

Versions: ``--before REV`` and ``--after REV`` are git revisions (``git archive REV operator``
into a temporary directory, put first on ``PYTHONPATH``); ``--after`` defaults to this working
tree. Without ``--before`` only one version is measured.

    .venv/bin/python benchmarks/probe_startup.py --before 9d1efb1 [--runs 10] [--webhook] [--stack-ca]

Prints medians (and the minimum) per version and the ratio after / before, then the packages
that cost the most import time in the last version. Not a test.
"""

from __future__ import annotations

import argparse
import http.server
import os
import re
import ssl
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.harness.mailstack import MailStack  # noqa: E402

#: Runs the probe exactly as the console script does, after an audit hook (PEP 578) that
#: prints the monotonic time of the first ``socket.connect`` to stderr.
RUNNER = r"""
import sys, time
_seen = []
def _hook(event, args):
    if event == "socket.connect" and not _seen:
        _seen.append(1)
        sys.stderr.write(f"@@first_connect {time.monotonic()!r}\n")
sys.addaudithook(_hook)
from mail_selfcheck.cli import main
sys.exit(main(["run"]))
"""
METRICS = ("imports ms", "first connect ms", "CPU s", "peak RSS MiB")


def extract(rev: str, into: Path) -> Path:
    """``git archive REV operator`` unpacked under ``into``; returns its ``operator`` dir."""
    data = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "operator"], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into / "operator"


def startup_modules() -> set[str]:
    """Modules the bare interpreter imports at start-up (site, encodings, ...)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True, check=True)
    return {name for name, _ in _import_lines(proc.stderr)}


def _import_lines(stderr: str) -> list[tuple[str, int]]:
    """(module, self time in microseconds) per ``-X importtime`` line."""
    out = []
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \| (\s*)(\S+)", line)
        if m:
            out.append((m.group(3), int(m.group(1))))
    return out


class _Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server API
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):  # quiet
        pass


def run_probe(env: dict[str, str], pythonpath: Path, importtime: bool, skip: set[str],
              packages: dict[str, float] | None = None) -> dict[str, float]:
    """One ``mail-selfcheck run`` process; its figures (see the module docstring)."""
    env = {**env, "PYTHONPATH": str(pythonpath)}
    argv = [sys.executable, *(["-X", "importtime"] if importtime else []), "-c", RUNNER]
    started = time.monotonic()
    proc = subprocess.Popen(argv, env=env, cwd=pythonpath.parent if pythonpath.parent != ROOT else tempfile.gettempdir(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr_lines: list[str] = []
    reader = threading.Thread(target=lambda: stderr_lines.extend(proc.stderr), daemon=True)
    reader.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    stderr = "".join(stderr_lines)
    if proc.returncode != 0 or "selfcheck_completed success=true" not in stderr:
        raise SystemExit(f"probe run failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    if importtime:
        lines = [(name, us) for name, us in _import_lines(stderr) if name not in skip]
        if packages is not None:  # self time per top-level package, ms (the last run's)
            packages.clear()
            for name, us in lines:
                packages[name.split(".")[0]] = packages.get(name.split(".")[0], 0.0) + us / 1000.0
        return {"imports ms": sum(us for _, us in lines) / 1000.0}
    connect = float(re.search(r"@@first_connect (\S+)", stderr).group(1))
    return {
        "first connect ms": (connect - started) * 1000.0,
        "CPU s": usage.ru_utime + usage.ru_stime,
        "peak RSS MiB": usage.ru_maxrss / 1024.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", metavar="REV", help="git revision measured as 'before'")
    parser.add_argument("--after", metavar="REV", help="git revision measured as 'after' (default: this working tree)")
    parser.add_argument("--runs", type=int, default=10, help="runs per version and figure (default 10)")
    parser.add_argument("--webhook", action="store_true", help="with a generic webhook (a loopback HTTP receiver)")
    parser.add_argument("--stack-ca", action="store_true",
                        help="verify against the stack's CA file only (default: the system CAs plus the stack's CA)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="probe-startup-") as tmp:
        versions: dict[str, Path] = {}
        if args.before:
            versions[f"before ({args.before})"] = extract(args.before, Path(tmp) / "before")
        versions[f"after ({args.after})" if args.after else "after (working tree)"] = (
            extract(args.after, Path(tmp) / "after") if args.after else ROOT / "operator")
        for path in versions.values():  # as the image's pip install does: no run compiles source
            subprocess.run([sys.executable, "-m", "compileall", "-q", str(path)], check=True)
        skip = startup_modules()
        bare = []
        for _ in range(args.runs):
            t0 = time.monotonic()
            subprocess.run([sys.executable, "-c", "pass"], check=True)
            bare.append((time.monotonic() - t0) * 1000.0)
        server = None
        with MailStack() as stack:
            env = {k: v for k, v in os.environ.items() if not k.startswith("MESSAGES_SELFCHECK_")}
            env.update(stack.probe_env())
            if not args.stack_ca:  # production: the system bundle (plus the stack's CA, so its certificate verifies)
                bundle = Path(tmp) / "system-plus-stack.pem"
                system = Path(ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt")
                bundle.write_text(system.read_text() + Path(stack.ca_file).read_text())
                env["SSL_CERT_FILE"] = str(bundle)
                del env["MESSAGES_SELFCHECK_TLS_CA_FILE"]
            if args.webhook:
                server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
                threading.Thread(target=server.serve_forever, daemon=True).start()
                env["MESSAGES_SELFCHECK_WEBHOOK_URL"] = f"http://127.0.0.1:{server.server_address[1]}/ping/tok"
            figures = {label: {m: [] for m in METRICS} for label in versions}
            packages: dict[str, float] = {}
            for label, path in versions.items():  # warm-up: the page cache, the stack's caches
                run_probe(env, path, False, skip)
            for _ in range(args.runs):
                for importtime in (False, True):
                    for label, path in versions.items():
                        for key, value in run_probe(env, path, importtime, skip, packages).items():
                            figures[label][key].append(value)
            if server is not None:
                server.shutdown()

    print(f"\nprobe start-up, {args.runs} runs per version and figure, Postfix + Dovecot on loopback, "
          f"{'the stack CA file' if args.stack_ca else 'system CAs'}{', generic webhook' if args.webhook else ''}; "
          f"bare `python -c pass`: {statistics.median(bare):.1f} ms")
    labels = list(versions)
    width = max(len(label) for label in labels) + 2
    print(f"{'figure':<18}" + "".join(f"{label + ' median (min)':>{width + 14}}" for label in labels)
          + ("   after/before" if len(labels) == 2 else ""))
    for metric in METRICS:
        row = f"{metric:<18}"
        medians = []
        for label in labels:
            values = figures[label][metric]
            medians.append(statistics.median(values))
            fmt = ".3f" if metric == "CPU s" else ".1f"
            row += f"{format(medians[-1], fmt) + ' (' + format(min(values), fmt) + ')':>{width + 14}}"
        if len(labels) == 2:
            row += f"{medians[1] / medians[0]:15.2f}"
        print(row)

    top = sorted(packages.items(), key=lambda item: -item[1])[:10]
    print(f"\nimport time by package, {labels[-1]}, last run (ms, -X importtime self times): "
          + ", ".join(f"{name} {ms:.1f}" for name, ms in top))


if __name__ == "__main__":
    main()
