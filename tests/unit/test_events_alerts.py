"""GET /api/wild/v2/events/{session}: unseen run outcomes and alerts; alerts and their answers."""

from __future__ import annotations

from experiments import services
from experiments.actors import Actor
from experiments.choices import ActorKind, AlertStatus, RunReason, RunStatus
from experiments.models import AgentCursor, Alert, Run


def _actor(person) -> Actor:
    return Actor(kind=ActorKind.USER, user=person.user)


def _run(person, session="s1", **kw) -> Run:
    return services.run_create(
        actor=_actor(person),
        command="python train.py",
        chat_session_id=session,
        auto_start=True,
        **kw,
    )


def _finish(run: Run) -> None:
    for to in (RunStatus.LAUNCHING, RunStatus.RUNNING):
        assert services.run_transition(run_id=run.id, to=to, actor=Actor.system())
    assert services.run_transition(
        run_id=run.id, to=RunStatus.FINISHED, actor=Actor.system(), fields={"exit_code": 0}
    )


def _fail(run: Run) -> None:
    assert services.run_transition(run_id=run.id, to=RunStatus.LAUNCHING, actor=Actor.system())
    assert services.run_transition(
        run_id=run.id,
        to=RunStatus.FAILED,
        actor=Actor.system(),
        reason=RunReason.CUDA_OOM,
        fields={"exit_code": 1, "error": "CUDA out of memory"},
    )


def _events(person, session="s1"):
    response = person.client.get(f"/api/wild/v2/events/{session}")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["session_id"] == session and body["count"] == len(body["events"])
    return body["events"]


def test_session_events_are_delivered_once(member):
    """GIVEN alice's session s1 with a finished run, a failed run, a stopped run and an alert,
    and session s2 with a finished run WHEN she reads s1's events THEN she gets exactly the
    finish, the failure and the alert; a second read is empty; a later outcome comes alone."""
    done, broken, stopped = _run(member), _run(member), _run(member)
    elsewhere = _run(member, session="s2")
    _finish(done)
    _fail(broken)
    services.run_stop(run=stopped, actor=_actor(member))
    _finish(elsewhere)
    alert = services.alert_raise(message="loss is NaN", run=done, choices=["acknowledge", "stop"])
    services.alert_raise(message="elsewhere", run=elsewhere)

    events = _events(member)
    by_type = {e["type"]: e for e in events}
    assert len(events) == 3 and set(by_type) == {"run_finished", "run_failed", "alert"}
    assert by_type["run_finished"]["run_id"] == done.id
    assert by_type["run_finished"]["exit_code"] == 0
    failed = by_type["run_failed"]
    assert (failed["run_id"], failed["reason"], failed["exit_code"], failed["error"]) == (
        broken.id,
        "cuda_oom",
        1,
        "CUDA out of memory",
    )
    assert by_type["alert"]["alert_id"] == alert.id
    assert by_type["alert"]["choices"] == ["acknowledge", "stop"]
    assert by_type["alert"]["run_id"] == done.id

    assert _events(member) == []

    late = _run(member)
    _fail(late)
    [new] = _events(member)
    assert (new["type"], new["run_id"]) == ("run_failed", late.id)
    assert _events(member) == []


def test_other_sessions_never_appear(member):
    _finish(_run(member, session="s2"))
    _finish(_run(member, session=""))
    assert _events(member, "s1") == []
    assert [e["type"] for e in _events(member, "s2")] == ["run_finished"]


def test_another_member_neither_sees_nor_consumes(member, other):
    """GIVEN alice's finished run in s1 and bob's finished run in his own s1 WHEN bob reads s1
    THEN he sees only his run, and alice still gets hers (and never bob's)."""
    mine = _run(member)
    bobs = _run(other)
    _finish(mine)
    _finish(bobs)
    services.alert_raise(message="alice only", run=mine)

    assert [e["run_id"] for e in _events(other)] == [bobs.id]
    assert _events(other) == []

    alice_sees = _events(member)
    assert {e["run_id"] for e in alice_sees} == {mine.id}
    assert {e["type"] for e in alice_sees} == {"run_finished", "alert"}
    assert AgentCursor.objects.filter(session_id="s1").count() == 2


def test_events_come_in_the_order_they_happened(member):
    first, second = _run(member), _run(member)
    _finish(second)
    _finish(first)
    events = _events(member)
    assert [e["run_id"] for e in events] == [second.id, first.id]
    assert events[0]["at"] <= events[1]["at"]


# --- alerts --------------------------------------------------------------------------------


def _alert(person, **kw) -> Alert:
    run = kw.pop("run", None) or _run(person)
    return services.alert_raise(
        message="GPU 3 is hot", run=run, choices=kw.pop("choices", ["acknowledge", "stop"]), **kw
    )


def test_alert_list_shows_choices(member):
    alert = _alert(member)
    body = member.client.get("/api/alerts").json()
    assert body["count"] == 1
    [row] = body["results"]
    assert (row["id"], row["run_id"], row["choices"], row["status"]) == (
        alert.id,
        alert.run_id,
        ["acknowledge", "stop"],
        "open",
    )
    filtered = member.client.get("/api/alerts?status=resolved").json()
    assert filtered["count"] == 0


def test_respond_with_a_valid_choice_resolves(member):
    alert = _alert(member)
    response = member.client.post(
        f"/api/alerts/{alert.id}/respond", {"choice": "acknowledge"}, format="json"
    )
    assert response.status_code == 200
    assert response.json()["status"] == "resolved" and response.json()["response"] == "acknowledge"
    alert.refresh_from_db()
    assert alert.status == AlertStatus.RESOLVED and alert.response == "acknowledge"
    assert alert.responded_by == member.user and alert.responded_at is not None
    alert.run.refresh_from_db()
    assert alert.run.status == RunStatus.QUEUED  # acknowledging does not touch the run


def test_respond_with_an_invalid_choice_is_400_naming_the_valid_ones(member):
    alert = _alert(member)
    response = member.client.post(
        f"/api/alerts/{alert.id}/respond", {"choice": "reboot"}, format="json"
    )
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert "reboot" in detail and "acknowledge" in detail and "stop" in detail
    alert.refresh_from_db()
    assert alert.status == AlertStatus.OPEN and alert.response == ""


def test_respond_twice_is_409(member):
    alert = _alert(member)
    url = f"/api/alerts/{alert.id}/respond"
    assert member.client.post(url, {"choice": "acknowledge"}, format="json").status_code == 200
    response = member.client.post(url, {"choice": "stop"}, format="json")
    assert response.status_code == 409 and "already answered" in response.json()["detail"]
    alert.refresh_from_db()
    assert alert.response == "acknowledge"
    alert.run.refresh_from_db()
    assert alert.run.status == RunStatus.QUEUED  # the late "stop" did nothing


def test_respond_stop_stops_the_run(member):
    alert = _alert(member)
    response = member.client.post(
        f"/api/alerts/{alert.id}/respond", {"choice": "stop"}, format="json"
    )
    assert response.status_code == 200
    run = Run.objects.get(pk=alert.run_id)
    assert (run.status, run.reason) == (RunStatus.STOPPED, RunReason.USER_STOP)
    event = run.events.last()
    assert (event.from_status, event.to_status) == ("queued", "stopped")
    assert event.actor_user == member.user
    alert.refresh_from_db()
    assert alert.status == AlertStatus.RESOLVED and alert.response == "stop"


def test_respond_to_unknown_alert_is_json_404(member):
    response = member.client.post("/api/alerts/999999/respond", {"choice": "x"}, format="json")
    assert response.status_code == 404
    assert response.json() == {"detail": "Alert not found: 999999"}


def test_gpu_confirmation_is_written_once_per_attempt_and_only_for_active_runs(member):
    """GIVEN a running run seen on its leased GPU WHEN polls see it again THEN one event; WHEN it
    is requeued and placed again THEN the new attempt is confirmed anew; an ended run is not."""
    run = _run(member)
    for to in (RunStatus.LAUNCHING, RunStatus.RUNNING):
        assert services.run_transition(run_id=run.id, to=to, actor=Actor.system())
    seen = {run.id: "GPU 1 of node-a (pid 42)"}
    assert services.run_gpus_confirm(seen=seen) == [run.id]
    assert services.run_gpus_confirm(seen=seen) == []
    events = run.events.filter(reason="gpu_confirmed")
    assert [(e.from_status, e.to_status, e.message) for e in events] == [
        ("running", "running", "seen on GPU 1 of node-a (pid 42)")
    ]
    assert services.run_transition(run_id=run.id, to=RunStatus.QUEUED, actor=Actor.system())
    assert services.run_gpus_confirm(seen=seen) == [], "a queued run is on no GPU of its own"
    assert services.run_transition(run_id=run.id, to=RunStatus.LAUNCHING, actor=Actor.system())
    assert services.run_gpus_confirm(seen=seen) == [run.id], "the new attempt is confirmed"
    assert run.events.filter(reason="gpu_confirmed").count() == 2
    ended = _run(member)
    assert services.run_transition(run_id=ended.id, to=RunStatus.LAUNCHING, actor=Actor.system())
    assert services.run_transition(run_id=ended.id, to=RunStatus.STOPPED, actor=Actor.system())
    assert services.run_gpus_confirm(seen={ended.id: "GPU 2 of node-a (pid 7)"}) == []
    assert not ended.events.filter(reason="gpu_confirmed").exists()
