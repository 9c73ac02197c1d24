"""plan() is pure: every transition is one row of this table."""
import pytest

from reconciler.engine.plan import Action, ActionKind, Observed, Target, plan

A = "st-instance-8001"


def running(fp="fp1", adopted=False):
    return Observed(A, 8001, "running", pid=100, fingerprint=fp, adopted=adopted)


CASES = [
    # (name, desired state or None for undeclared, observed or None for nothing at all, expected kinds)
    ("absent -> running", "running", None, [ActionKind.START]),
    ("stopped record -> running", "running", Observed(A, 8001, "stopped"), [ActionKind.START]),
    ("running -> stopped", "stopped", running(), [ActionKind.STOP]),
    ("stopped -> running", "running", Observed(A, 8001, "stopped"), [ActionKind.START]),
    ("crashed -> running", "running", Observed(A, 8001, "crashed", pid=100, fingerprint="fp1"), [ActionKind.START]),
    ("crashed, stopped wanted", "stopped", Observed(A, 8001, "crashed", pid=100), [ActionKind.FORGET_PID]),
    ("running as wanted", "running", running(), [ActionKind.OK]),
    ("stopped as wanted", "stopped", Observed(A, 8001, "stopped"), [ActionKind.OK]),
    ("absent, stopped wanted", "stopped", None, [ActionKind.OK]),
    ("present -> removed (running)", None, running(), [ActionKind.REMOVE]),
    ("present -> removed (stopped)", None, Observed(A, 8001, "stopped"), [ActionKind.REMOVE]),
    ("present -> removed (crashed)", None, Observed(A, 8001, "crashed", pid=100), [ActionKind.REMOVE]),
    ("adopted", "running", running(adopted=True), [ActionKind.ADOPT]),
    ("adopted but settings changed", "running", running(fp="old", adopted=True), [ActionKind.ADOPT, ActionKind.RESTART]),
    ("settings changed", "running", running(fp="old"), [ActionKind.RESTART]),
    ("port taken", "running", Observed(A, 8001, "port-taken", holder="pid 9"), [ActionKind.FAIL]),
    ("port taken, stopped wanted", "stopped", Observed(A, 8001, "port-taken", holder="pid 9"), [ActionKind.OK]),
]


@pytest.mark.parametrize("name,state,seen,expected", CASES, ids=[c[0] for c in CASES])
def test_transition(name, state, seen, expected):
    targets = [Target(A, 8001, state, fingerprint="fp1")] if state else []
    observed = {A: seen} if seen else {}
    actions = plan(targets, observed)
    assert [a.kind for a in actions] == expected
    assert all(a.id == A and a.port == 8001 for a in actions)


def test_port_taken_reason_names_the_holder():
    [action] = plan([Target(A, 8001, "running", "fp")], {A: Observed(A, 8001, "port-taken", holder="pid 9, nginx")})
    assert action.kind == ActionKind.FAIL and "pid 9, nginx" in action.reason and "8001" in action.reason


def test_unstartable_target_fails_without_touching_others():
    targets = [Target(A, 8001, "running", problem="environment variable X is not set"),
               Target("st-instance-8002", 8002, "running", "fp")]
    actions = plan(targets, {})
    assert actions == [Action(ActionKind.FAIL, A, 8001, "environment variable X is not set"),
                       Action(ActionKind.START, "st-instance-8002", 8002, "started")]


def test_plan_is_pure_and_repeatable():
    targets = [Target(A, 8001, "running", "fp")]
    observed = {A: Observed(A, 8001, "stopped"), "st-instance-9000": Observed("st-instance-9000", 9000, "running")}
    before = (list(targets), dict(observed))
    assert plan(targets, observed) == plan(targets, observed)
    assert (targets, observed) == before
    assert [a.kind for a in plan(targets, observed)] == [ActionKind.START, ActionKind.REMOVE]


def test_only_changes_count_as_changes():
    assert {k for k in ActionKind if Action(k, A, 1).changes} == {ActionKind.START, ActionKind.RESTART, ActionKind.UPGRADE, ActionKind.STOP,
                                                            ActionKind.PARK, ActionKind.REMOVE}


HINT_CASES = [
    ("held while crashed", "running", Observed(A, 8001, "crashed", pid=1, fingerprint="fp1"), {A: "errored"}, {}, [ActionKind.BACK_OFF]),
    ("held while stopped after a failed start", "running", Observed(A, 8001, "stopped"), {A: "errored"}, {}, [ActionKind.BACK_OFF]),
    ("hold does not stop a running instance", "running", running(), {A: "errored"}, {}, [ActionKind.OK]),
    ("hold does not keep a stop from happening", "stopped", running(), {A: "errored"}, {}, [ActionKind.STOP]),
    ("forced restart", "running", running(), {}, {A: "memory"}, [ActionKind.RESTART]),
    ("forced restart of a stopped instance is moot", "stopped", Observed(A, 8001, "stopped"), {}, {A: "memory"}, [ActionKind.OK]),
    ("forced restart after adoption", "running", running(adopted=True), {}, {A: "memory"}, [ActionKind.ADOPT, ActionKind.RESTART]),
]


@pytest.mark.parametrize("name,state,seen,hold,restart,expected", HINT_CASES, ids=[c[0] for c in HINT_CASES])
def test_hints(name, state, seen, hold, restart, expected):
    actions = plan([Target(A, 8001, state, fingerprint="fp1")], {A: seen}, hold=hold, restart=restart)
    assert [a.kind for a in actions] == expected
    if ActionKind.BACK_OFF in expected:
        assert actions[0].reason == "errored"
    if ActionKind.RESTART in expected:
        assert actions[-1].reason == "restarted: memory"


PARKED = Observed(A, 8001, "parked")
PARKING_CASES = [
    # (name, desired state, parks (park_after set), observed, expected kinds)
    ("never started, park_after: parked, not started", "running", True, None, [ActionKind.PARK]),
    ("stopped record, park_after: parked", "running", True, Observed(A, 8001, "stopped"), [ActionKind.PARK]),
    ("parked as wanted: as good as running", "running", True, PARKED, [ActionKind.OK]),
    ("parked, park_after taken away: started", "running", False, PARKED, [ActionKind.START]),
    ("parked, stopped wanted: forgotten", "stopped", True, PARKED, [ActionKind.FORGET_PID]),
    ("crashed with park_after: restarted (backoff applies)", "running", True,
     Observed(A, 8001, "crashed", pid=100, fingerprint="fp1"), [ActionKind.START]),
    ("running with park_after: left alone (cst serve parks it)", "running", True, running(), [ActionKind.OK]),
]


@pytest.mark.parametrize("name,state,parks,seen,expected", PARKING_CASES, ids=[c[0] for c in PARKING_CASES])
def test_parking_transition(name, state, parks, seen, expected):
    actions = plan([Target(A, 8001, state, fingerprint="fp1", parks=parks)], {A: seen} if seen else {})
    assert [a.kind for a in actions] == expected


def test_a_parked_instance_is_not_upgraded_or_restarted_while_parked():
    seen = Observed(A, 8001, "parked", release="sillytavern@1.18.0")
    target = Target(A, 8001, "running", fingerprint="new", release="sillytavern@1.19.0", parks=True)
    assert [a.kind for a in plan([target], {A: seen}, restart={A: "asked"})] == [ActionKind.OK]
