"""Step 7: the ``selfcheck_completed`` log line, the heartbeat services and plugin output.

Log line (:mod:`.eventlog`), exactly one per run::

    selfcheck_completed success=true send_time=0.150 reception_time=2.340        (INFO)
    selfcheck_completed success=false error="Message not received within 60 seconds"   (ERROR)

``console`` renders ``key=value`` pairs (logfmt-style values); ``json`` renders one JSON
object per line for log pipelines.

Heartbeats (:class:`Heartbeat`, issue 12): one API per ``MESSAGES_SELFCHECK_WEBHOOK_KIND``, each
following its service's documentation (see :func:`build_signal`); the outcome goes into
``ProbeResult.webhook``. Plugin mode (:func:`nagios_line`): one line in the monitoring-plugins
format, https://www.monitoring-plugins.org/doc/guidelines.html.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..models.result import ProbeResult, WebhookOutcome
from . import eventlog

if TYPE_CHECKING:  # requests (~40 ms to import) is loaded only when a heartbeat is sent
    import requests

WEBHOOK_TIMEOUT = 10.0  # seconds per attempt (success / failure signals)
WEBHOOK_RETRIES = 2  # extra attempts on connection errors and 429/5xx replies
START_TIMEOUT = 5.0  # seconds per attempt of the start signal (it delays the check itself)
START_RETRIES = 1
#: Longest error text put into a query string (Uptime Kuma msg, Gatus error, Cronitor message:
#: Cronitor documents at most 2000 characters); bodies (healthchecks, Better Stack) take more.
QUERY_TEXT_MAX = 1000
BODY_TEXT_MAX = 10_000
USER_AGENT = "mail-selfcheck"

log = eventlog.get_logger()


def configure_logging(verbose: bool = False, log_format: str = "console", quiet: bool = False) -> None:
    """The probe's log: INFO (DEBUG with ``verbose``) to stderr.

    Args:
        log_format: ``console`` (human, ``key=value``) or ``json`` (one object per line).
        quiet: log nothing (plugin mode: Icinga 2 appends stderr to the plugin output);
            ``verbose`` wins over it.
    """
    eventlog.configure(verbose, log_format, quiet)


def log_result(result: ProbeResult) -> None:
    """Emit the one ``selfcheck_completed`` line for ``result`` (INFO on success, else ERROR)."""
    if result.success:
        log.info(
            "selfcheck_completed",
            success=True,
            send_time=result.send_time,
            reception_time=result.reception_time,
        )
    else:
        log.error("selfcheck_completed", success=False, error=result.error, error_class=result.error_class)



# ----------------------------------------------------------------------------- heartbeats

Signal = str  # "start" | "success" | "failure"


@dataclass(frozen=True)
class SignalRequest:
    """One HTTP request to a heartbeat service. ``url`` holds the service's token: never log it."""

    method: str  # "GET" | "POST"
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None


def _with_path(url: str, suffix: str, query: dict[str, str] | None = None) -> str:
    """``url`` with ``/suffix`` appended to its path (when given) and ``query`` merged into its
    query string (our keys replace the pasted URL's own, e.g. Uptime Kuma's ``?status=up&msg=OK``)."""
    parts = urlsplit(url)
    path = f"{parts.path.rstrip('/')}/{suffix}" if suffix else parts.path
    pairs = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not query or k not in query]
    pairs += list((query or {}).items())
    return urlunsplit((parts.scheme, parts.netloc, path, urlencode(pairs), parts.fragment))


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _seconds(value: float | None) -> str:
    return "null" if value is None else f"{value:.3f}"


def _timings_text(result: ProbeResult) -> str:
    return f"send_time={_seconds(result.send_time)}s reception_time={_seconds(result.reception_time)}s"


def _error_text(result: ProbeResult) -> str:
    text = result.error or "selfcheck failed"
    return f"{text} (error_class={result.error_class})" if result.error_class else text


def build_signal(
    kind: str,
    signal: Signal,
    result: ProbeResult | None,
    *,
    url: str | None,
    failure_url: str | None = None,
    token: str | None = None,
    run_id: str | None = None,
) -> SignalRequest | None:
    """The request that tells heartbeat service ``kind`` about ``signal`` (pure; no I/O).

    Args:
        kind: ``generic`` | ``healthchecks`` | ``uptime-kuma`` | ``gatus`` | ``betterstack`` |
            ``cronitor`` (``MESSAGES_SELFCHECK_WEBHOOK_KIND``).
        signal: ``start`` (before step 1), ``success`` or ``failure`` (after the verdict).
        result: the verdict; ``None`` for ``start``. Times are seconds; the "delivery time"
            a service records is ``reception_time`` (final 250 reply to the message seen).
        url: ``MESSAGES_SELFCHECK_WEBHOOK_URL`` (the service's ping URL, with its token).
        failure_url: generic only: ``MESSAGES_SELFCHECK_WEBHOOK_FAILURE_URL``.
        token: gatus only: the external endpoint's bearer token.
        run_id: pairs start and finish (healthchecks ``rid``, Cronitor ``series``).

    Returns:
        ``None`` when the kind has no such signal (generic and Better Stack and Uptime Kuma and
        Gatus have no start; generic sends a failure only with ``failure_url``). Per kind:

        * ``generic``: success ``POST url`` JSON ``{"send_time", "reception_time"}`` (exactly the
          seed's body); failure ``POST failure_url`` JSON ``{"error", "error_class",
          "send_time", "reception_time"}``.
        * ``healthchecks`` (https://healthchecks.io/docs/http_api/): start ``POST url/start``,
          success ``POST url`` (body: the timings), failure ``POST url/fail`` (body: the error
          text; healthchecks.io logs the first 100 kB of a body), each with ``?rid=<run_id>``.
        * ``uptime-kuma`` (Push monitor, ``/api/push/<token>``): ``GET url?status=up&msg=...
          &ping=<reception ms>`` or ``?status=down&msg=<error>``; the pasted URL's own
          ``status``/``msg``/``ping`` are replaced.
        * ``gatus`` (https://github.com/TwiN/gatus#external-endpoints): ``POST
          /api/v1/endpoints/{key}/external?success=true|false&error=...&duration=<Go duration,
          e.g. 2.340s>`` with ``Authorization: Bearer <token>``; ``url`` is that push URL.
        * ``betterstack`` (https://betterstack.com/docs/uptime/cron-and-heartbeat-monitor/):
          success ``POST url`` (body: the timings), failure ``POST url/fail`` (body: the error).
        * ``cronitor`` (https://cronitor.io/docs/telemetry-api): ``GET url?state=run``,
          ``?state=complete&message=<timings>``, ``?state=fail&message=<error>`` (at most 2000
          characters), each with ``series=<run_id>``.

    Raises:
        ValueError: an unknown ``kind`` or ``signal``.
    """
    if signal not in ("start", "success", "failure"):
        raise ValueError(f"unknown heartbeat signal {signal!r}")
    if signal != "start" and result is None:
        raise ValueError("success and failure signals need the result")
    text = "" if result is None else (_timings_text(result) if signal == "success" else _error_text(result))
    plain = {"Content-Type": "text/plain; charset=utf-8"}
    if kind == "generic":
        if signal == "success" and url:
            body = {"send_time": result.send_time, "reception_time": result.reception_time}
            return SignalRequest("POST", url, {"Content-Type": "application/json"}, json.dumps(body).encode())
        if signal == "failure" and failure_url:
            body = {"error": result.error, "error_class": result.error_class,
                    "send_time": result.send_time, "reception_time": result.reception_time}
            return SignalRequest("POST", failure_url, {"Content-Type": "application/json"}, json.dumps(body).encode())
        return None
    if not url:
        return None
    if kind == "healthchecks":
        suffix = {"start": "start", "success": "", "failure": "fail"}[signal]
        query = {"rid": run_id} if run_id else None
        return SignalRequest("POST", _with_path(url, suffix, query), plain, _cut(text, BODY_TEXT_MAX).encode())
    if kind == "betterstack":
        if signal == "start":
            return None  # Better Stack heartbeats document no start signal
        return SignalRequest("POST", _with_path(url, "fail" if signal == "failure" else ""), plain,
                             _cut(text, BODY_TEXT_MAX).encode())
    if kind == "uptime-kuma":
        if signal == "start":
            return None  # a push monitor knows only up and down
        if signal == "success":
            ping = "" if result.reception_time is None else str(round(result.reception_time * 1000))
            query = {"status": "up", "msg": f"OK {_timings_text(result)}", "ping": ping}
        else:
            query = {"status": "down", "msg": _cut(text, QUERY_TEXT_MAX), "ping": ""}
        return SignalRequest("GET", _with_path(url, "", query))
    if kind == "gatus":
        if signal == "start":
            return None  # an external endpoint takes results only
        query = {"success": "true" if signal == "success" else "false"}
        if signal == "failure":
            query["error"] = _cut(text, QUERY_TEXT_MAX)
        seconds = result.reception_time if signal == "success" else result.duration
        if seconds is not None:
            query["duration"] = f"{seconds:.3f}s"
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return SignalRequest("POST", _with_path(url, "", query), headers)
    if kind == "cronitor":
        state = {"start": "run", "success": "complete", "failure": "fail"}[signal]
        query = {"state": state}
        if text:
            query["message"] = _cut(text, QUERY_TEXT_MAX)
        if run_id:
            query["series"] = run_id
        return SignalRequest("GET", _with_path(url, "", query))
    raise ValueError(f"unknown heartbeat kind {kind!r}")


def _session(retries: int, methods: frozenset[str]) -> requests.Session:
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    retry = Retry(
        total=retries,
        connect=retries,
        read=0,
        status=retries,
        backoff_factor=0.5,
        status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=methods,
        raise_on_status=False,
    )
    session = requests.Session()
    session.headers["User-Agent"] = USER_AGENT
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    return session


def send_signal(request: SignalRequest, *, timeout: float = WEBHOOK_TIMEOUT, retries: int = WEBHOOK_RETRIES) -> str | None:
    """Send ``request``; return ``None`` when the service answered 2xx, else why not.

    ``timeout`` seconds per attempt; up to ``retries`` extra attempts on connection errors and
    429/5xx replies (urllib3 ``Retry`` with backoff); a read timeout is not retried, so a
    hanging service costs at most ``timeout``. Never raises. The reason never holds the URL
    (it carries the service's token): ``HTTP 404``, ``connection failed``, ``no answer within
    10 seconds``, or Uptime Kuma's own ``{"ok": false, "msg"}`` refusal.
    """
    import requests

    with _session(retries, frozenset({request.method})) as session:
        try:
            response = session.request(request.method, request.url, headers=request.headers,
                                       data=request.body, timeout=timeout)
        except requests.RequestException as exc:
            return _reason(exc, timeout)
    if not response.ok:
        return f"HTTP {response.status_code}"
    if response.headers.get("Content-Type", "").startswith("application/json"):
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if isinstance(answer, dict) and answer.get("ok") is False:  # Uptime Kuma: 200 {"ok": false}
            return _cut(f"refused: {answer.get('msg') or 'ok=false'}", 200)
    return None


def _reason(exc: requests.RequestException, timeout: float = WEBHOOK_TIMEOUT) -> str:
    """Name the failure without the URL (requests puts host and path in its messages)."""
    import requests
    from urllib3.exceptions import ReadTimeoutError

    # urllib3 wraps a read timeout that used up its retries (read=0) in MaxRetryError, which
    # requests turns into ConnectionError: look at the reason, not the class.
    cause = exc.args[0] if exc.args else None
    if isinstance(exc, requests.Timeout) or isinstance(getattr(cause, "reason", None), ReadTimeoutError):
        return f"no answer within {timeout:g} seconds"
    if isinstance(exc, requests.ConnectionError):
        return "connection failed"
    return type(exc).__name__


class Heartbeat:
    """The heartbeat of one run: :meth:`start` before step 1, :meth:`finish` after the verdict.

    Built from the settings' ``webhook_kind``, ``webhook_url``, ``webhook_failure_url`` and
    ``webhook_token``; :meth:`from_settings` returns ``None`` when nothing is configured. A
    signal that fails is one ``webhook_failed`` WARNING line (kind, signal, reason; never the
    URL) and never changes the verdict.
    """

    def __init__(self, kind: str, url: str | None, failure_url: str | None = None, token: str | None = None,
                 run_id: str | None = None) -> None:
        self.kind = kind
        self._url, self._failure_url, self._token = url, failure_url, token
        self.run_id = run_id or str(uuid.uuid4())  # healthchecks.io wants a UUID (canonical form) as rid
        self._start_error: str | None = None

    @classmethod
    def from_settings(cls, settings) -> "Heartbeat | None":
        """The heartbeat ``settings`` (a ``ProbeSettings``) configure, or ``None``."""
        url = settings.webhook_url.get_secret_value() if settings.webhook_url else None
        failure_url = settings.webhook_failure_url.get_secret_value() if settings.webhook_failure_url else None
        if not url and not failure_url:
            return None
        token = settings.webhook_token.get_secret_value() if settings.webhook_token else None
        return cls(settings.webhook_kind, url, failure_url if settings.webhook_kind == "generic" else None, token)

    def _request(self, signal: Signal, result: ProbeResult | None) -> SignalRequest | None:
        return build_signal(self.kind, signal, result, url=self._url, failure_url=self._failure_url,
                            token=self._token, run_id=self.run_id)

    def start(self) -> bool | None:
        """Send the start signal where the kind has one (``START_TIMEOUT`` seconds per attempt,
        ``START_RETRIES`` retry). Returns True when sent, False when it failed, None when the
        kind has no start signal."""
        request = self._request("start", None)
        if request is None:
            return None
        error = send_signal(request, timeout=START_TIMEOUT, retries=START_RETRIES)
        self._log(error, "start")
        self._start_error = error
        return error is None

    def finish(self, result: ProbeResult) -> WebhookOutcome | None:
        """Send the success or failure signal for ``result``.

        Returns:
            The outcome for ``ProbeResult.webhook``: ``signal`` success|failure, ``sent``
            whether the service took it, ``error`` why not (or, when it was sent, why the start
            signal was not); ``None`` when this kind sends nothing for this verdict (generic
            without ``failure_url`` on a failure).
        """
        signal = "success" if result.success else "failure"
        request = self._request(signal, result)
        if request is None:
            return None
        error = send_signal(request)
        self._log(error, signal)
        if error is None and self._start_error is not None:
            return WebhookOutcome(kind=self.kind, signal=signal, sent=True, error=f"start signal: {self._start_error}")
        return WebhookOutcome(kind=self.kind, signal=signal, sent=error is None, error=error)

    def _log(self, error: str | None, signal: Signal) -> None:
        if error is None:
            log.debug("webhook_sent", kind=self.kind, signal=signal)
        else:
            log.warning("webhook_failed", kind=self.kind, signal=signal, reason=error)


def post_heartbeat(url: str, result: ProbeResult) -> bool:
    """POST ``{"send_time": s, "reception_time": s}`` (seconds) to the generic heartbeat ``url``.

    The seed's heartbeat, kept for callers: :class:`Heartbeat` with kind ``generic``. 10 s
    timeout per attempt, up to 2 retries (connection errors, 429 and 5xx). Never raises: a
    failure is a WARNING without the URL.

    Returns:
        True when the endpoint answered 2xx.
    """
    outcome = Heartbeat("generic", url).finish(result)
    return bool(outcome and outcome.sent)


# ----------------------------------------------------------------------------- plugin mode

NAGIOS_OK, NAGIOS_WARNING, NAGIOS_CRITICAL, NAGIOS_UNKNOWN = 0, 1, 2, 3
_NAGIOS_STATE = {0: "OK", 1: "WARNING", 2: "CRITICAL", 3: "UNKNOWN"}


def _perf(label: str, value: float | None, warn: float | None = None, crit: float | None = None) -> str:
    """``label=value[UOM];[warn];[crit];[min];[max]``; ``U`` when the value is unknown."""
    shown = "U" if value is None else f"{value:.3f}s"
    return f"{label}={shown};{'' if warn is None else f'{warn:g}'};{'' if crit is None else f'{crit:g}'};0"


def _one_line(text: str) -> str:
    """Plugin output is one line and ``|`` starts the perfdata: keep both out of the text."""
    return " ".join(text.split()).replace("|", "/")


def nagios_line(result: ProbeResult, warning: float | None = None, critical: float | None = None) -> tuple[str, int]:
    """One monitoring-plugins line for ``result`` and its exit code.

    Format (https://www.monitoring-plugins.org/doc/guidelines.html, "Plugin Output" and
    "Performance data")::

        MAIL OK - delivered in 2.340s | send_time=0.150s;;;0 reception_time=2.340s;5;30;0

    ``warning`` / ``critical`` are seconds of ``reception_time`` above which the state is
    WARNING / CRITICAL (a plain threshold ``N`` means "alert above N"). A failed check is
    CRITICAL with its error text; a failure of the probe itself (``error_class=internal``) is
    UNKNOWN. Unknown times are ``U`` in the perfdata.

    Returns:
        (line without newline, exit code 0 OK | 1 WARNING | 2 CRITICAL | 3 UNKNOWN).
    """
    perf = f"{_perf('send_time', result.send_time)} {_perf('reception_time', result.reception_time, warning, critical)}"
    if not result.success:
        code = NAGIOS_UNKNOWN if result.error_class == "internal" else NAGIOS_CRITICAL
        detail = _one_line(result.error or "selfcheck failed")
        if result.error_class:
            detail += f" ({result.error_class})"
        return f"MAIL {_NAGIOS_STATE[code]} - {detail} | {perf}", code
    reception = result.reception_time or 0.0
    code, note = NAGIOS_OK, ""
    if critical is not None and reception > critical:
        code, note = NAGIOS_CRITICAL, f" (critical above {critical:g}s)"
    elif warning is not None and reception > warning:
        code, note = NAGIOS_WARNING, f" (warning above {warning:g}s)"
    return f"MAIL {_NAGIOS_STATE[code]} - delivered in {reception:.3f}s{note} | {perf}", code


def nagios_unknown(reason: str) -> str:
    """The UNKNOWN line for a run that could not start (configuration error, skipped run)."""
    return f"MAIL UNKNOWN - {_one_line(reason)}"
