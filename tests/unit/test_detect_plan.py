"""Arrival-detection planning (``probe.imap.detect``): pure functions, no server.

The plan decides *when* to look; these tests check its shape (how many checks a 5 s wait
costs, where the dense window lies), not the wall clock.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mail_selfcheck.models.settings import ProbeSettings
from mail_selfcheck.probe.imap import detect
from mail_selfcheck.probe.imap.detect import DENSE_POLL, FAST_POLL, Plan, before_window, next_check, plan


def _checks(p: Plan, until: float, rtt: float = 0.0003) -> list[float]:
    """Elapsed times (seconds) of the checks the plan makes until ``until``."""
    t, out = 0.0, []
    while t < until:
        out.append(t)
        t += next_check(p, t) + rtt
    return out


def test_no_history_polls_fast_at_first_then_paces_by_the_time_waited() -> None:
    p = plan([])
    assert p.window is None
    checks = _checks(p, 0.1)
    assert all(b - a <= FAST_POLL + 0.001 for a, b in zip(checks, checks[1:]))  # 10 ms delivery: seen within ~10 ms
    assert next_check(p, 2.0) == pytest.approx(0.2)  # 10 % of the time waited
    assert next_check(p, 60.0) == detect.SLOW_POLL_MAX  # never slower than 1 s while IDLE is unproven
    assert len(_checks(p, 5.0)) < 60  # was ~200 NOOPs for a 5 s delivery


def test_history_waits_once_then_polls_densely_around_the_expected_arrival() -> None:
    p = plan([4.9, 5.0, 5.1])
    start, end = p.window
    assert start == 4.9 and 5.1 < end < 5.3 and 4.7 < p.lead_in < 4.9
    assert p.fast_until == detect.FAST_START_PLANNED
    assert before_window(p, 1.0) and not before_window(p, 0.01) and not before_window(p, 5.0)
    checks = _checks(p, 5.0)
    assert len(checks) <= 13  # fast start + one wait + the lead-in + the window up to the arrival
    inside = [c for c in checks if c >= start]
    assert p.dense <= 0.04
    assert all(b - a <= p.dense + 0.001 for a, b in zip(inside, inside[1:]))
    assert next_check(p, end + 1.0) > DENSE_POLL  # late: back to paced polling


def test_fast_history_keeps_the_fast_gap() -> None:
    p = plan([0.008, 0.012, 0.01])
    assert p.lead_in == 0.0 and p.fast_until == 0.0
    assert next_check(p, 0.0) == FAST_POLL and next_check(p, 0.02) == FAST_POLL


def test_the_lead_in_is_as_long_as_the_history_is_unsure() -> None:
    """One earlier reception time says nothing about the spread: polling starts 10 % of it
    before, with gaps shrinking towards it; an earlier delivery than seen is timed within a
    fraction of how much earlier it came (not at the window's start, nor by an IDLE)."""
    one, ten = plan([5.0]), plan([5.0] * 10)
    assert one.lead_in == pytest.approx(4.5) and ten.lead_in == pytest.approx(5.0 - 0.1)
    checks = _checks(one, 5.0)
    lead_in = [c for c in checks if c >= one.lead_in]
    gaps = [b - a for a, b in zip(lead_in, lead_in[1:])]
    assert gaps == sorted(gaps, reverse=True) and gaps[0] < 0.11 and gaps[-1] <= one.dense + 0.01
    assert not before_window(one, 4.6) and before_window(one, 4.4)  # no IDLE inside the lead-in
    for early in (0.1, 0.3, 0.5):  # seen within the dense gap + 10 % of how early it came
        at = one.window[0] - early
        assert min(c for c in checks if c >= at) - at <= one.dense + detect.LEAD_IN_GROWTH * early + 0.001
    assert len(checks) <= 16


def test_an_outlier_does_not_stretch_the_window() -> None:
    assert plan([5.0, 5.1, 4.9, 60.0, 0.01]).window == plan([5.0, 5.1, 4.9]).window
    # a first check's time (no-history pacing: up to ~0.4 s late) among steady ones
    assert plan([5.35, 5.1, 5.12, 5.05, 5.13]).window == pytest.approx(plan([5.1, 5.12, 5.05, 5.13]).window, abs=0.001)
    assert plan([4.8, 4.9, 5.0, 5.1, 5.2]).window[0] == 4.8  # a real spread is kept


def test_a_wide_spread_is_polled_less_densely_to_bound_the_commands() -> None:
    p = plan([4.8, 5.0, 5.2])
    assert p.dense > DENSE_POLL
    assert (p.window[1] - p.window[0]) / p.dense <= detect.MAX_WINDOW_POLLS + 0.01
    assert plan([3.0, 4.0, 5.0, 6.0]).dense == 0.1  # never sparser than 0.1 s in the window


class _Box:
    exists = 3


def test_exists_growth_is_timed_at_the_announcement_and_expunges_are_counted() -> None:
    w = detect._Watch.__new__(detect._Watch)
    w.grown_at = None
    box = _Box()
    assert w.absorb(box, [(1, b"EXPUNGE")], at=10.0) is False and box.exists == 2
    assert w.absorb(box, [(3, b"EXISTS"), (1, b"RECENT")], at=11.0) is True  # 2 -> 3 after an expunge
    assert w.grown_at == 11.0
    assert w.absorb(box, [(4, b"EXISTS")], at=12.0) is True and w.grown_at == 11.0  # first announcement kept
    assert w.absorb(box, [(b"OK", b"Still here")], at=13.0) is False


def test_expected_arrival_setting(monkeypatch) -> None:
    for key in ("MESSAGES_SELFCHECK_FROM", "MESSAGES_SELFCHECK_TO"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MESSAGES_SELFCHECK_IMAP_EXPECTED_ARRIVAL", "4.9, 5.1,,5")
    assert ProbeSettings().imap_expected_arrivals == [4.9, 5.1, 5.0]
    monkeypatch.setenv("MESSAGES_SELFCHECK_IMAP_EXPECTED_ARRIVAL", "5")
    assert ProbeSettings().imap_expected_arrivals == [5.0]
    monkeypatch.delenv("MESSAGES_SELFCHECK_IMAP_EXPECTED_ARRIVAL")
    assert ProbeSettings().imap_expected_arrivals == []
    for bad in ("soon", "-1"):
        monkeypatch.setenv("MESSAGES_SELFCHECK_IMAP_EXPECTED_ARRIVAL", bad)
        with pytest.raises(ValidationError):
            ProbeSettings()
