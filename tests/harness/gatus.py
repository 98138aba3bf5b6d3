"""A real Gatus (https://github.com/TwiN/gatus), built from the Go module proxy, as a heartbeat receiver.

Gatus' *external endpoints* take results pushed by other programs
(``POST /api/v1/endpoints/{key}/external?success=&error=&duration=`` with
``Authorization: Bearer <token>``, README "External Endpoints"); ``mail-selfcheck``'s
``WEBHOOK_KIND=gatus`` speaks that API, and the tests read back what Gatus stored through its
own ``GET /api/v1/endpoints/{key}/statuses``.

* :func:`build` compiles ``github.com/TwiN/gatus/v5@VERSION`` once into
  ``$MAIL_SELFCHECK_CACHE/gatus-VERSION/gatus`` (default cache ``~/.cache/mail-selfcheck``)
  and returns that path; later calls return the cached binary at once (idempotent; a lock
  file serialises parallel builds). ``go install MODULE@VERSION`` cannot be used here: it
  asks the proxy for the module's version list (``@v/list``) to look for deprecations,
  which the proxy this workplace reaches refuses (403), while single versions download
  fine; so the build is a two-line wrapper module that ``require``s Gatus and ``go build``s
  its main package (same sources, same result). First build: about 2 minutes on 2 CPUs.
* :class:`GatusServer` runs it on a free loopback port with one external endpoint
  (in-memory storage, no alerting, nothing leaves loopback), ``python -m tests.harness.gatus
  build`` builds ahead of time.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.harness.controlplane import cache_root

GATUS_MODULE = "github.com/TwiN/gatus/v5"
GATUS_VERSION = "v5.36.0"
BUILD_TIMEOUT = 900  # seconds for a cold build (downloads included)


class GatusError(RuntimeError):
    """Gatus could not be built or started; the message carries the log tail."""


def _go() -> str:
    found = os.environ.get("GO") or shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if not found:
        raise GatusError("no `go` toolchain found (set $GO or put go on PATH)")
    return found


def binary_path(version: str = GATUS_VERSION) -> Path:
    """Where :func:`build` puts Gatus ``version``."""
    return cache_root() / f"gatus-{version}" / "gatus"


def build(version: str = GATUS_VERSION) -> Path:
    """Build Gatus ``version`` from the module proxy unless it is cached; return the binary.

    Raises:
        GatusError: the toolchain is missing or the build failed (with the log tail).
    """
    dest = binary_path(version)
    if os.access(dest, os.X_OK):
        return dest
    work = dest.parent / "src"
    work.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.access(dest, os.X_OK):  # another process built it while we waited
            return dest
        go_version = "1.26"
        (work / "go.mod").write_text(f"module mail-selfcheck/gatus-build\n\ngo {go_version}\n\n"
                                     f"require {GATUS_MODULE} {version}\n")
        (work / "tools.go").write_text(f'//go:build tools\n\npackage tools\n\nimport _ "{GATUS_MODULE}"\n')
        env = {**os.environ, "CGO_ENABLED": "0", "GOWORK": "off", "GOFLAGS": "-mod=mod -buildvcs=false"}
        env.setdefault("GOTOOLCHAIN", "local")
        log = dest.parent / "build.log"
        t0 = time.monotonic()
        with open(log, "w") as fh:
            for args in (["mod", "tidy"], ["build", "-trimpath", "-o", str(dest) + ".tmp", GATUS_MODULE]):
                fh.write(f"$ go {' '.join(args)}\n")
                fh.flush()
                try:
                    proc = subprocess.run([_go(), *args], cwd=work, env=env, stdout=fh, stderr=fh,
                                          timeout=BUILD_TIMEOUT, stdin=subprocess.DEVNULL)
                except subprocess.TimeoutExpired:
                    raise GatusError(f"`go {' '.join(args)}` took over {BUILD_TIMEOUT}s; log {log}") from None
                if proc.returncode != 0:
                    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
                    raise GatusError(f"`go {' '.join(args)}` failed (exit {proc.returncode}); log {log}:\n{tail}")
        os.replace(str(dest) + ".tmp", dest)
        (dest.parent / "BUILDINFO.json").write_text(json.dumps(
            {"module": GATUS_MODULE, "version": version, "seconds": round(time.monotonic() - t0, 1)}))
    return dest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GatusServer:
    """One Gatus on ``127.0.0.1:<port>`` with external endpoint ``group``/``name`` and ``token``.

    ``push_url`` is what ``MESSAGES_SELFCHECK_WEBHOOK_URL`` takes; :meth:`results` is what
    Gatus stored for the endpoint (newest last): dicts with ``success``, ``errors``,
    ``duration`` (nanoseconds), ``timestamp``. Use as a context manager.
    """

    def __init__(self, base: Path, token: str, group: str = "mail", name: str = "selfcheck") -> None:
        self.base, self.token, self.group, self.name = base, token, group, name
        self.port = _free_port()
        self.key = f"{group}_{name}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.push_url = f"{self.url}/api/v1/endpoints/{self.key}/external"
        self.log_path = base / "gatus.log"
        self._proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "GatusServer":
        binary = build()
        self.base.mkdir(parents=True, exist_ok=True)
        config = self.base / "config.yaml"
        # Gatus refuses a configuration without a (polled) endpoint: one that asks Gatus'
        # own /health on loopback once an hour.
        config.write_text(
            f"web:\n  address: 127.0.0.1\n  port: {self.port}\n"
            "storage:\n  type: memory\n"
            f"endpoints:\n  - name: self\n    url: {self.url}/health\n    interval: 1h\n"
            "    conditions: ['[STATUS] == 200']\n"
            f"external-endpoints:\n  - name: {self.name}\n    group: {self.group}\n    token: {json.dumps(self.token)}\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"))}
        env.update(GATUS_CONFIG_PATH=str(config), GATUS_LOG_LEVEL="INFO")
        self._log = open(self.log_path, "w")
        self._proc = subprocess.Popen([str(binary)], cwd=self.base, env=env, stdout=self._log, stderr=self._log,
                                      stdin=subprocess.DEVNULL)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._proc.poll() is not None:
                raise GatusError(f"gatus exited with {self._proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise GatusError(f"gatus did not answer /health within {timeout:g}s:\n{self.log_tail()}")

    def results(self) -> list[dict]:
        """The results Gatus stored for the external endpoint, oldest first."""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/endpoints/{self.key}/statuses", timeout=5) as resp:
                results = json.load(resp).get("results") or []
        except urllib.error.HTTPError as exc:
            if exc.code == 404:  # Gatus knows an external endpoint's status from its first result on
                return []
            raise
        for result in results:
            result.setdefault("errors", [])  # omitted when empty
        return results

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> "GatusServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":  # pragma: no cover - manual helper
    if sys.argv[1:] == ["build"]:
        t0 = time.monotonic()
        print(build(), f"({time.monotonic() - t0:.1f}s)")
    else:
        sys.exit("usage: python -m tests.harness.gatus build")
