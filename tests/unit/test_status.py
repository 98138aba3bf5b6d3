"""Status patches, the Ready condition and transition Events (pure functions)."""

from __future__ import annotations

import datetime as dt

from mail_selfcheck.controller.jobs import Outcome
from mail_selfcheck.controller.status import harvest_patch, launched_patch, pending_condition, ready_condition

T0 = dt.datetime(2025, 1, 1, 12, 0, tzinfo=dt.timezone.utc)
OK = Outcome(success=True, send_time=0.2, reception_time=1.1)
BAD = Outcome(success=False, error="IMAP login failed", error_class="mailbox_unavailable")


def harvest(status, outcome, job="j1", now=T0):
    patch, event = harvest_patch(status, outcome=outcome, job_name=job, schedule_time="2025-01-01T11:59:00Z",
                                 generation=3, now=now)
    merged = {**status, **patch["status"]}
    return {k: v for k, v in merged.items() if v is not None}, patch, event


def test_launched_patch_records_active_and_slot():
    patch = launched_patch({"metadata": {"name": "j1", "uid": "u"}}, T0)
    assert patch == {"status": {"active": {"name": "j1", "uid": "u", "scheduleTime": "2025-01-01T12:00:00Z"},
                                "lastScheduleTime": "2025-01-01T12:00:00Z"}}


def test_success_then_failures_then_recovery():
    status, patch, event = harvest({}, OK)
    assert patch["status"]["active"] is None and status["lastHarvestedJob"] == "j1"
    assert status["success"] is True and status["sendTime"] == 0.2 and status["consecutiveFailures"] == 0
    assert status["lastSuccessTime"] == "2025-01-01T12:00:00Z"
    ready = status["conditions"][0]
    assert (ready["type"], ready["status"], ready["observedGeneration"]) == ("Ready", "True", 3)
    assert event.type == "Normal"

    status, patch, event = harvest(status, BAD, "j2", T0 + dt.timedelta(minutes=1))
    assert status["success"] is False and status["error"] == "IMAP login failed"
    assert patch["status"]["sendTime"] is None  # merge patch removes the stale value
    assert status["consecutiveFailures"] == 1 and status["conditions"][0]["status"] == "False"
    assert (event.type, event.reason) == ("Warning", "CheckFailing")
    first_failure = status["conditions"][0]["lastTransitionTime"]

    status, _, event = harvest(status, BAD, "j3", T0 + dt.timedelta(minutes=2))
    assert status["consecutiveFailures"] == 2 and event is None  # no Event per run
    assert status["conditions"][0]["lastTransitionTime"] == first_failure

    status, _, event = harvest(status, OK, "j4", T0 + dt.timedelta(minutes=3))
    assert status["consecutiveFailures"] == 0 and (event.type, event.reason) == ("Normal", "CheckRecovered")
    assert [h["job"] for h in status["history"]] == ["j4", "j3", "j2", "j1"]


def test_history_is_bounded():
    status = {}
    for i in range(25):
        status, _, _ = harvest(status, OK, f"j{i}")
    assert len(status["history"]) == 10 and status["history"][0]["job"] == "j24"


def test_history_records_the_folder_for_the_next_checks_plan():
    """The controller plans a probe's detection from history entries of the watched folder."""
    status, _, _ = harvest({}, Outcome(success=True, send_time=0.2, reception_time=4.2, folder="INBOX"))
    assert status["history"][0]["folder"] == "INBOX" and status["history"][0]["receptionTime"] == 4.2
    status, _, _ = harvest({}, OK)
    assert "folder" not in status["history"][0]


def test_status_carries_the_imap_load_of_the_last_check():
    status, _, _ = harvest({}, Outcome(success=True, send_time=0.2, reception_time=1.0, imap_commands=21,
                                       imap_session_seconds=1.3))
    assert (status["imapCommands"], status["imapSessionSeconds"]) == (21, 1.3)
    status, patch, _ = harvest(status, BAD)  # a check that opened no IMAP session: no stale load
    assert patch["status"]["imapCommands"] is None and "imapCommands" not in status


def test_pending_condition_only_before_any():
    assert pending_condition({}, generation=1, now=T0)["status"]["conditions"][0]["status"] == "Unknown"
    assert pending_condition({"conditions": [{"type": "Ready"}]}, generation=1, now=T0) is None


def test_ready_condition_keeps_other_types():
    conds = ready_condition([{"type": "Other", "status": "True"}], ok=True, reason="R", message="m", generation=1, now=T0)
    assert [c["type"] for c in conds] == ["Other", "Ready"]


def test_suspend_and_resume_set_ready_unknown_once():
    from mail_selfcheck.controller.status import SUSPENDED, suspended_patch

    now = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    ok = {"conditions": [{"type": "Ready", "status": "True", "reason": "CheckSucceeded", "lastTransitionTime": "x"}]}
    patch = suspended_patch(ok, suspended=True, generation=3, now=now)
    (cond,) = patch["status"]["conditions"]
    assert (cond["status"], cond["reason"], cond["observedGeneration"]) == ("Unknown", SUSPENDED, 3)
    assert suspended_patch(patch["status"], suspended=True, generation=3, now=now) is None, "only on a change"
    resumed = suspended_patch(patch["status"], suspended=False, generation=4, now=now)
    assert resumed["status"]["conditions"][0]["reason"] == "Pending"
    assert suspended_patch(ok, suspended=False, generation=1, now=now) is None


def test_tls_timings_and_heartbeat_reach_status_and_events():
    from mail_selfcheck.controller.status import heartbeat_transition

    now = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    outcome = Outcome(success=True, send_time=0.1, reception_time=0.2, timings={"imap_connect": 0.02},
                      tls={"smtp": {"version": "TLSv1.3", "cipher": "X", "not_after": 1767225600.0, "hostname_matched": True}},
                      webhook={"kind": "healthchecks", "signal": "success", "sent": False, "error": "HTTP 500"})
    patch, _ = harvest_patch({}, outcome=outcome, job_name="j", schedule_time=None, generation=1, now=now)
    st = patch["status"]
    assert st["tls"]["smtp"] == {"version": "TLSv1.3", "cipher": "X", "hostnameMatched": True, "notAfter": "2026-01-01T00:00:00Z"}
    assert st["timings"] == {"imap_connect": 0.02}
    assert st["webhook"] == {"kind": "healthchecks", "signal": "success", "sent": False, "error": "HTTP 500"}
    event = heartbeat_transition({}, outcome)
    assert event.type == "Warning" and event.reason == "HeartbeatFailing" and "HTTP 500" in event.message
    assert heartbeat_transition({"webhook": {"sent": False}}, outcome) is None, "one Event when it starts failing"
    assert heartbeat_transition({}, Outcome(success=True, webhook={"sent": True})) is None
