"""Loopback HTTP receivers that check each heartbeat service's documented request shape.

For the services without a receiver that installs from the registries (healthchecks.io,
Uptime Kuma, Better Stack, Cronitor; plus the generic webhook), :class:`ShapeServer` answers
like the service does and records every request. A request that does not match the
documented shape is answered ``400`` and recorded in ``violations``, so a test asserts both
what was sent and that nothing off-spec was:

* healthchecks (https://healthchecks.io/docs/http_api/): ``HEAD|GET|POST /ping/<uuid>``,
  ``.../start``, ``.../fail`` (optional ``?rid=<uuid>``); ``200 OK``; unknown UUID ``404``.
* uptime-kuma (Push monitor): ``GET /api/push/<token>?status=up|down&msg=<text>&ping=<number
  or empty>``; ``200 {"ok": true}``; unknown token ``404 {"ok": false, "msg": ...}``.
* betterstack (https://betterstack.com/docs/uptime/cron-and-heartbeat-monitor/):
  ``GET|POST /api/v1/heartbeat/<token>`` and ``.../fail``; ``200``.
* cronitor (https://cronitor.io/docs/telemetry-api): ``GET|POST /p/<api key>/<monitor>?state=
  run|complete|fail[&message=<= 2000 chars][&series=..]``; ``200``.
* generic: ``POST /hook/<token>`` (success, JSON ``{"send_time","reception_time"}``) and
  ``POST /fail/<token>`` (JSON ``{"error","error_class","send_time","reception_time"}``).

``behaviour`` makes the receiver misbehave for failure tests: ``"ok"``, ``"error"`` (500),
``"hang"`` (answers after 15 s), ``"refuse"`` (the service's "unknown token" answer).
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


@dataclass
class Received:
    """One request as the receiver saw it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    signal: str | None = None  # start | success | failure, as the service would read it

    def q(self, key: str) -> str | None:
        values = self.query.get(key)
        return values[0] if values else None


@dataclass
class ShapeServer:
    """A receiver for ``kind`` on ``127.0.0.1:<port>`` (see the module doc); a context manager."""

    kind: str
    token: str
    behaviour: str = "ok"
    requests: list[Received] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                rec = Received(self.command, parts.path, parse_qs(parts.query, keep_blank_values=True),
                               {k.lower(): v for k, v in self.headers.items()}, body)
                status, reply, ctype = owner._answer(rec)
                owner.requests.append(rec)
                if owner.behaviour == "hang":
                    time.sleep(15)
                data = reply.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_HEAD = do_PUT = _handle

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_port
        self.base = f"http://127.0.0.1:{self.port}"

    # -- the URL a user pastes into MESSAGES_SELFCHECK_WEBHOOK_URL --------------------------
    @property
    def url(self) -> str:
        return {
            "healthchecks": f"{self.base}/ping/{self.token}",
            "uptime-kuma": f"{self.base}/api/push/{self.token}?status=up&msg=OK&ping=",  # as Kuma shows it
            "betterstack": f"{self.base}/api/v1/heartbeat/{self.token}",
            "cronitor": f"{self.base}/p/{self.token}/mail-selfcheck",
            "generic": f"{self.base}/hook/{self.token}",
        }[self.kind]

    @property
    def failure_url(self) -> str:
        return f"{self.base}/fail/{self.token}"

    def signals(self) -> list[str | None]:
        return [r.signal for r in self.requests]

    # -- the documented shapes ----------------------------------------------------------
    def _bad(self, rec: Received, why: str) -> tuple[int, str, str]:
        self.violations.append(f"{rec.method} {rec.path}: {why}")
        return 400, why, "text/plain"

    def _answer(self, rec: Received) -> tuple[int, str, str]:
        fn = getattr(self, "_" + self.kind.replace("-", "_"))
        answer = fn(rec)
        if answer[0] == 400:
            return answer
        if self.behaviour == "error":
            return 500, "internal error", "text/plain"
        return answer

    def _healthchecks(self, rec: Received) -> tuple[int, str, str]:
        m = re.fullmatch(rf"/ping/({_UUID})(/start|/fail)?", rec.path)
        if not m or rec.method not in ("HEAD", "GET", "POST"):
            return self._bad(rec, "not a healthchecks.io ping request")
        if rec.q("rid") is not None and not re.fullmatch(_UUID, rec.q("rid")):
            return self._bad(rec, "rid must be a UUID")
        rec.signal = {None: "success", "/start": "start", "/fail": "failure"}[m.group(2)]
        if self.behaviour == "refuse" or m.group(1) != self.token:
            return 404, "not found", "text/plain"
        return 200, "OK", "text/plain"

    def _uptime_kuma(self, rec: Received) -> tuple[int, str, str]:
        m = re.fullmatch(r"/api/push/([^/]+)", rec.path)
        if not m or rec.method != "GET":
            return self._bad(rec, "not an Uptime Kuma push request (GET /api/push/<token>)")
        status, ping = rec.query.get("status", []), rec.q("ping")
        if status not in (["up"], ["down"]):
            return self._bad(rec, f"status must be up or down once, got {status}")
        if ping not in (None, "") and not re.fullmatch(r"\d+(\.\d+)?", ping):
            return self._bad(rec, f"ping must be a number of milliseconds, got {ping!r}")
        if len(rec.query.get("msg", [])) > 1:
            return self._bad(rec, "msg given more than once")
        rec.signal = "success" if status == ["up"] else "failure"
        if self.behaviour == "refuse" or m.group(1) != self.token:
            return 404, json.dumps({"ok": False, "msg": "Monitor not found or not active."}), "application/json"
        return 200, json.dumps({"ok": True}), "application/json"

    def _betterstack(self, rec: Received) -> tuple[int, str, str]:
        m = re.fullmatch(r"/api/v1/heartbeat/([^/]+?)(/fail)?", rec.path)
        if not m or rec.method not in ("GET", "POST"):
            return self._bad(rec, "not a Better Stack heartbeat request")
        rec.signal = "failure" if m.group(2) else "success"
        if self.behaviour == "refuse" or m.group(1) != self.token:
            return 404, "not found", "text/plain"
        return 200, "", "text/plain"

    def _cronitor(self, rec: Received) -> tuple[int, str, str]:
        m = re.fullmatch(r"/p/([^/]+)/([^/]+)", rec.path)
        if not m or rec.method not in ("GET", "POST"):
            return self._bad(rec, "not a Cronitor telemetry request (/p/<api key>/<monitor>)")
        state = rec.query.get("state", [])
        if state not in (["run"], ["complete"], ["fail"]):
            return self._bad(rec, f"state must be run, complete or fail once, got {state}")
        if len(rec.q("message") or "") > 2000:
            return self._bad(rec, "message longer than 2000 characters")
        rec.signal = {"run": "start", "complete": "success", "fail": "failure"}[state[0]]
        if self.behaviour == "refuse" or m.group(1) != self.token:
            return 403, "invalid api key", "text/plain"
        return 200, "", "text/plain"

    def _generic(self, rec: Received) -> tuple[int, str, str]:
        m = re.fullmatch(r"/(hook|fail)/([^/]+)", rec.path)
        if not m or rec.method != "POST" or not rec.headers.get("content-type", "").startswith("application/json"):
            return self._bad(rec, "not a JSON POST to /hook or /fail")
        try:
            body = json.loads(rec.body)
        except ValueError:
            return self._bad(rec, "body is not JSON")
        want = {"send_time", "reception_time"} if m.group(1) == "hook" else {"error", "error_class", "send_time", "reception_time"}
        if not isinstance(body, dict) or set(body) != want:
            return self._bad(rec, f"body keys {sorted(body) if isinstance(body, dict) else body} != {sorted(want)}")
        rec.signal = "success" if m.group(1) == "hook" else "failure"
        if self.behaviour == "refuse" or m.group(2) != self.token:
            return 404, "", "text/plain"
        return 200, "", "text/plain"

    # -- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> "ShapeServer":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
