"""What OAuth2 adds to a probe run: ``token_time`` and the whole run, against passwords, interleaved.

Runs ``mail-selfcheck run --json`` N times each way against the mail stack with Dovecot's
oauth2 passdb (:mod:`tests.harness.oauth2_mailstack`, the local Authlib authorization server on
loopback), alternating oauth2 (app-only, both sides) and password runs, and prints medians.

    .venv/bin/python benchmarks/oauth2_overhead.py [--runs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.harness.oauth2_mailstack import OAuth2MailStack  # noqa: E402

CLI = str(Path(sys.executable).parent / "mail-selfcheck")


def run(env: dict[str, str]) -> dict:
    out = subprocess.run([CLI, "run", "--json"], env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    result = json.loads(out.stdout.splitlines()[-1])
    if not result["success"]:
        raise SystemExit(f"a run failed: {result}")
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    token, oauth, password = [], [], []
    with OAuth2MailStack() as stack:
        passwords = dict(SMTP_AUTH="password", IMAP_AUTH="password", SMTP_PASSWORD=stack.users["sender"].password,
                         IMAP_PASSWORD=stack.users["receiver"].password)
        for _ in range(args.runs):
            r = run(stack.probe_env())
            token.append(r["token_time"])
            oauth.append(r["duration"])
            password.append(run(stack.probe_env(**passwords))["duration"])
    print(f"runs: {args.runs} each, interleaved")
    print(f"token_time (both sides): median {statistics.median(token):.3f} s, max {max(token):.3f} s")
    print(f"run duration: oauth2 median {statistics.median(oauth):.3f} s, password median {statistics.median(password):.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
