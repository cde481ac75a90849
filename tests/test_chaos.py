"""Random fault schedules against real daemons, checked against a reference model.

The engine is ``tests/chaos.py`` (see its docstring). The slow test runs as many seeded
schedules as fit in ``CHAOS_BUDGET`` seconds (default 75) of wall time. The base seed is
fixed (``DEFAULT_SEED``: CI must not turn red at random) unless ``CHAOS_SEED`` is set
(``random`` picks one); schedule i has seed base + i. ``make chaos`` runs thousands from a
random base. On failure the message
names the base seed and every failing schedule's seed, and shows the first failing
schedule with its trace; replay one with ``python tests/chaos.py --seed S --schedules 1``.
Select it with ``-m slow``, skip it with ``-m "not slow"``. The quick tests check the
engine itself (the generator and the checker), without any process.
"""

from __future__ import annotations

import os
import secrets

import pytest

import chaos
from chaos import Connect, KillDaemon, Model, Names, Observation, PauseRedis, StopDaemon

BUDGET = float(os.environ.get("CHAOS_BUDGET", "75"))
DEFAULT_SEED = 20_261_125
"""Seconds of wall time for schedules (a schedule starts only if it should end in time)."""


@pytest.mark.slow
@pytest.mark.timeout(BUDGET + 120)
def test_random_fault_schedules_heal() -> None:
    seed_text = os.environ.get("CHAOS_SEED", str(DEFAULT_SEED))
    base_seed = secrets.randbelow(10**9) if seed_text == "random" else int(seed_text)
    print(f"chaos base seed {base_seed} (CHAOS_SEED={base_seed} repeats this run)")
    summary = chaos.run(base_seed=base_seed, schedules=None, budget=BUDGET, verbose=True)
    print(summary.render())
    assert summary.schedules >= 1, "no schedule fitted in the budget"
    assert summary.violation_count == 0, (
        f"{summary.render()}\n\n{summary.reports[0]}\n\n"
        f"(base seed {base_seed}; failing schedule seeds {summary.failing})"
    )


# ---------------------------------------------------------------------------
# The engine itself.


def test_a_schedule_is_a_function_of_its_seed() -> None:
    assert chaos.generate(7) == chaos.generate(7)
    assert chaos.generate(7) != chaos.generate(8)
    assert chaos.generate(7).describe() == chaos.generate(7).describe()


def test_schedules_inject_faults_of_every_kind_and_durations_either_side_of_the_lease() -> None:
    lease = 1.0
    faults = [
        step.action
        for seed in range(200)
        for step in chaos.generate(seed, lease).steps
        if isinstance(step.action, StopDaemon | KillDaemon | PauseRedis)
    ]
    for seed in range(200):
        schedule = chaos.generate(seed, lease)
        assert any(
            isinstance(s.action, StopDaemon | KillDaemon | PauseRedis) for s in schedule.steps
        )
        assert [s.at for s in schedule.steps] == sorted(s.at for s in schedule.steps)
    stops = [f.duration for f in faults if isinstance(f, StopDaemon)]
    pauses = [f.duration for f in faults if isinstance(f, PauseRedis)]
    kills = [f for f in faults if isinstance(f, KillDaemon)]
    for durations in (stops, pauses):
        assert any(d < lease for d in durations) and any(d > lease for d in durations)
    assert any(k.restart_after is None for k in kills)
    assert any(k.restart_after is not None for k in kills)


def test_friend_changes_only_through_a_connected_first_client() -> None:
    for seed in range(200):
        schedule = chaos.generate(seed)
        connected: set[int] = set()
        for step in schedule.steps:
            match step.action:
                case Connect(client):
                    assert client not in connected
                    connected.add(client)
                case chaos.Disconnect(client):
                    assert client in connected
                    connected.discard(client)
                case chaos.ChangeFriends(user, _, _):
                    assert schedule.primary(user) in connected


def _world() -> tuple[chaos.Schedule, Model, Names, Observation]:
    """Two users who declare each other, one client each, both connected; and an
    observation that matches."""
    schedule = chaos.Schedule(
        seed=0,
        lease_ttl=1.0,
        users=(chaos.UserSpec(1, (1,)), chaos.UserSpec(1, (0,))),
        clients=(chaos.ClientSpec(0, 0, (0, 1, 2)), chaos.ClientSpec(1, 0, (0, 1, 2))),
        steps=(),
    )
    model = Model(schedule)
    model.connect_done(0)
    model.connect_done(1)
    names = Names(schedule, "t")
    a, b = names.users
    observation = Observation(
        entries=[{names.clients[0]: "ab12|chaos-d0|x"}, {names.clients[1]: "cd34|chaos-d1|y"}],
        friends=[{b}, {a}],
        fans=[{b}, {a}],
        views=[{b: True}, {a: True}],
        connected=[True, True],
        sessions=["ab12", "cd34"],
        declared=[[b], [a]],
    )
    return schedule, model, names, observation


def test_the_checker_accepts_what_matches_the_model() -> None:
    _, model, names, observation = _world()
    assert chaos.compare(model, observation, names) == []


def test_the_checker_names_each_kind_of_difference() -> None:
    _, model, names, observation = _world()
    b = names.users[1]
    observation.entries[1] = {}  # b offline in Redis although its client is connected
    kinds = [kind for kind, _ in chaos.compare(model, observation, names)]
    # a's view still shows b online: the model agrees, Redis does not.
    assert kinds == ["online"]

    _, model, names, observation = _world()
    observation.views[0] = {b: False}  # a missed b's coming online
    assert [kind for kind, _ in chaos.compare(model, observation, names)] == ["view"]

    _, model, names, observation = _world()
    observation.friends[1] = set()  # b's list lost: a's view follows Redis, not the model
    observation.fans[0] = set()
    observation.views[0] = {b: False}
    kinds = sorted(kind for kind, _ in chaos.compare(model, observation, names))
    assert kinds == ["friend-list", "view-follows-redis"]

    _, model, names, observation = _world()
    observation.fans[0] = set()  # the reverse index disagrees with b's list
    assert [kind for kind, _ in chaos.compare(model, observation, names)] == ["fans-index"]

    _, model, names, observation = _world()
    observation.connected[0] = False
    assert [kind for kind, _ in chaos.compare(model, observation, names)] == ["client-state"]

    _, model, names, observation = _world()
    observation.sessions[0] = "ef56"  # a stale session of a's client won in Redis
    assert [kind for kind, _ in chaos.compare(model, observation, names)] == ["client-entry"]

    _, model, names, observation = _world()
    model.disconnect_done(1)  # b gone: a must show it offline, Redis must not list it
    observation.entries[1] = {}
    observation.views[0] = {b: False}
    assert chaos.compare(model, observation, names) == []
