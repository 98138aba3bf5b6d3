"""Scheduling: due slots from persisted state, Forbid, suspend, run-now, Job names."""

from __future__ import annotations

import datetime as dt
import re

from mail_selfcheck.controller.schedule import MAX_JOB_NAME, decide, due_slot, format_time, job_name, parse_time

T0 = dt.datetime(2025, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def test_first_run_is_due_at_creation():
    assert due_slot(at(0.5), 60, None, T0) == T0
    d = decide(at(0.5), interval=60, last_schedule=None, created=T0, suspend=False, active=False, run_now=False)
    assert d.launch and d.slot == T0


def test_first_slot_is_stable_across_restarts():
    """Before the first record, a restarted operator computes the same slot (same Job name)."""
    assert due_slot(at(3), 60, None, T0) == due_slot(at(7), 60, None, T0) == T0


def test_next_slot_from_persisted_last_schedule():
    d = decide(at(30), interval=60, last_schedule=T0, created=T0, suspend=False, active=False, run_now=False)
    assert not d.launch and d.wake_at == at(60)
    d = decide(at(60), interval=60, last_schedule=T0, created=T0, suspend=False, active=False, run_now=False)
    assert d.launch and d.slot == at(60)


def test_missed_slots_run_once_for_the_latest():
    assert due_slot(at(250), 60, T0, T0) == at(240)


def test_forbid_while_active():
    d = decide(at(600), interval=60, last_schedule=T0, created=T0, suspend=False, active=True, run_now=True)
    assert not d.launch


def test_suspend_stops_scheduling_but_run_now_still_runs():
    d = decide(at(600), interval=60, last_schedule=T0, created=T0, suspend=True, active=False, run_now=False)
    assert not d.launch and d.wake_at is None
    d = decide(at(600.7), interval=60, last_schedule=T0, created=T0, suspend=True, active=False, run_now=True)
    assert d.launch and d.slot == at(600)


UID = "0b8f1c2e-1111-4a2b-9c3d-000000000001"
OTHER_UID = "0b8f1c2e-1111-4a2b-9c3d-000000000002"


def test_job_names_are_deterministic_and_valid():
    name = job_name("demo", UID, T0)
    assert name == job_name("demo", UID, T0) and name.startswith("demo-") and name.endswith(f"-{int(T0.timestamp())}")
    long = "a" * 200
    name = job_name(long, UID, T0)
    assert len(name) <= MAX_JOB_NAME and name == job_name(long, UID, T0)
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name)
    assert job_name("x.y", UID, T0).startswith("x-y-")


def test_job_names_differ_between_resources():
    """``dot.name`` and ``dot-name`` (and two long names sharing a prefix) never share a Job name."""
    assert job_name("dot.name", UID, T0) != job_name("dot-name", OTHER_UID, T0)
    assert job_name("a" * 200, UID, T0) != job_name("a" * 199, OTHER_UID, T0)
    # a resource deleted and re-created under its name (new UID) gets new Job names too
    assert job_name("demo", UID, T0) != job_name("demo", OTHER_UID, T0)


def test_time_format_round_trip():
    assert format_time(T0) == "2025-01-01T12:00:00Z"
    assert parse_time("2025-01-01T12:00:00Z") == T0 and parse_time(None) is None


def test_skipped_slots():
    from mail_selfcheck.controller.schedule import skipped_slots

    assert skipped_slots(T0, at(60), 60) == 0
    assert skipped_slots(T0, due_slot(at(250), 60, T0, T0), 60) == 3  # 60, 120, 180 missed; 240 runs
