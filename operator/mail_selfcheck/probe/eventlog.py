"""The probe's event log: ``log.info("event", key=value, ...)`` on stdlib :mod:`logging`.

One line per event on stderr, in one of two formats (the lines structlog rendered before, kept
byte for byte; structlog and its asyncio import cost the probe ~50 ms per start)::

    2026-12-01T14:07:56.123456Z INFO selfcheck_completed success=true send_time=0.150 reception_time=2.340
    {"success": true, "send_time": 0.15, "reception_time": 2.34, "event": "selfcheck_completed", "level": "info", "timestamp": "2026-12-01T14:07:56.123456Z"}

``console``: ISO 8601 UTC timestamp, upper-case level, event, then ``key=value`` in the order
logged, values the logfmt way (``true``/``false``, ``null``, floats with 3 decimals, text with
spaces, quotes, ``=`` or backslashes JSON-quoted). ``json``: one object per line, the values
as given. ``exc_info=True`` adds the traceback as ``exception``.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from datetime import datetime, timezone

LOGGER_NAME = "mail_selfcheck.probe"


def _logfmt(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.3f}"
    if value is None:
        return "null"
    if isinstance(value, str) and (not value or any(c in value for c in ' "=\\')):
        return json.dumps(value)
    return str(value)


class _Formatter(logging.Formatter):
    """Renders a record made by :class:`EventLogger` (``record.fields``: the key/values)."""

    def __init__(self, log_format: str) -> None:
        super().__init__()
        self.json = log_format == "json"

    def format(self, record: logging.LogRecord) -> str:
        fields = dict(getattr(record, "fields", {}))
        stamp = datetime.fromtimestamp(record.created, timezone.utc).isoformat().replace("+00:00", "Z")
        level = record.levelname.lower()
        line = {**fields, "event": record.msg, "level": level, "timestamp": stamp} if self.json else fields
        if record.exc_info and record.exc_info[0] is not None:
            line["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        if self.json:
            return json.dumps(line, default=repr)
        return " ".join([stamp, level.upper(), str(record.msg)] + [f"{k}={_logfmt(v)}" for k, v in line.items()])


class _Stderr(logging.Handler):
    """Writes to whatever ``sys.stderr`` is when a line is logged (pytest's capture too)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:  # logging's contract: a broken stream never breaks the caller
            self.handleError(record)


class EventLogger:
    """``debug`` / ``info`` / ``warning`` / ``error`` ``(event, exc_info=False, **fields)``."""

    def __init__(self, name: str = LOGGER_NAME) -> None:
        self._logger = logging.getLogger(name)

    def _log(self, level: int, event: str, exc_info: bool, fields: dict) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, exc_info=exc_info or None, extra={"fields": fields})

    def debug(self, event: str, exc_info: bool = False, **fields) -> None:
        self._log(logging.DEBUG, event, exc_info, fields)

    def info(self, event: str, exc_info: bool = False, **fields) -> None:
        self._log(logging.INFO, event, exc_info, fields)

    def warning(self, event: str, exc_info: bool = False, **fields) -> None:
        self._log(logging.WARNING, event, exc_info, fields)

    def error(self, event: str, exc_info: bool = False, **fields) -> None:
        self._log(logging.ERROR, event, exc_info, fields)


def get_logger(name: str = LOGGER_NAME) -> EventLogger:
    """The event logger ``name`` (the probe's modules share ``mail_selfcheck.probe``)."""
    return EventLogger(name)


def configure(verbose: bool = False, log_format: str = "console", quiet: bool = False) -> None:
    """INFO (DEBUG with ``verbose``) to stderr as ``log_format`` (``console`` | ``json``);
    ``quiet``: nothing (``verbose`` wins over it). May be called again to change it."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = _Stderr()
    handler.setFormatter(_Formatter(log_format))
    logger.addHandler(handler)
    logger.propagate = False  # the probe's lines are its own: never twice through a root handler
    logger.setLevel(logging.DEBUG if verbose else logging.CRITICAL + 1 if quiet else logging.INFO)


configure()  # the default until the command line says otherwise
