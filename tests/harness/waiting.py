"""Polling helper shared by the test tiers."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

import pytest

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.5,
               diag: Callable[[], str] | None = None) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns something truthy; return it.

    After ``timeout`` seconds the test fails, naming ``what``, the last value and, if given,
    ``diag()`` (e.g. a log tail).
    """
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    extra = f"\n{diag()}" if diag else ""
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r}){extra}")
