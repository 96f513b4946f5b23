"""The fault suite's verdicts (bench/faults.py): a figure that misses its goal makes the table, and so
`make faults`, fail; the registry check catches a promotion applied on a stale state."""

from __future__ import annotations

import json

from bench.faults import POISON_KINDS, stale_acts, table


def _figures(**over) -> dict:
    fig = {
        "runs": {"started": 20, "terminal": 20, "succeeded": 19, "failed": 1, "not_started": 0, "not_terminal": []},
        "events": {"stream": 900, "run_events": 890, "skipped": 10, "lost": 0, "id_mismatches": []},
        "duplicates": {"total": 0, "promotions": 1},
        "training": {"trainer_kills": [{}], "restarts_visible": 1, "steps_repeated": 1, "ok": True},
        "projections": {"timeline": {"identical": True}, "history": {"identical": True}},
        "chain": {"ok": True, "checked": 890},
        "poison": {k: {"ok": True} for k in POISON_KINDS},
        "unexpected_deaths": [],
        "recovery": {"trainer": {"kill_to_next_event_s": 9.0, "restart_to_next_event_s": 3.0, "up_wall_s": 5.0,
                                 "judged": True, "ok": True}},
    }
    for key, value in over.items():
        fig[key] = {**fig[key], **value} if isinstance(value, dict) else value
    return fig


def _missed(fig: dict) -> list[str]:
    rows, ok = table(fig)
    missed = [name for name, _v, _g, good in rows if not good]
    assert ok == (not missed)
    return missed


def test_a_clean_suite_meets_every_goal():
    assert _missed(_figures()) == []


def test_each_figure_that_misses_its_goal_fails_the_suite():
    assert _missed(_figures(runs={"terminal": 19, "not_terminal": ["run-x"]})) == ["runs terminal"]
    assert _missed(_figures(runs={"started": 12, "terminal": 12})) == ["runs terminal"]  # fewer than 20 runs
    assert _missed(_figures(events={"lost": 1})) == ["events lost"]
    assert _missed(_figures(events={"id_mismatches": [7]})) == ["events lost"]
    assert _missed(_figures(duplicates={"total": 1})) == ["duplicated effects"]
    assert _missed(_figures(training={"ok": False})) == ["trainer restarts visible"]
    assert _missed(_figures(projections={"history": {"identical": False}})) == ["projections = rebuild"]
    assert _missed(_figures(chain={"ok": False})) == ["chain verified"]
    assert _missed(_figures(poison={"non_json": {"ok": False}})) == ["poison handled"]
    never_sent = _figures()
    del never_sent["poison"]["payload_2mb"]
    assert _missed(never_sent) == ["poison handled"]
    assert _missed(_figures(unexpected_deaths=[{"services": ["export"]}])) == ["services died unasked"]
    slow = {"trainer": {"kill_to_next_event_s": 40.0, "restart_to_next_event_s": 31.0, "up_wall_s": 5.0,
                        "judged": True, "ok": False}}
    assert _missed(_figures(recovery=slow)) == ["recovery trainer"]


def test_promotions_must_each_demote_the_production_they_replace():
    acts = [(10, "registry.promoted", {"version": 1, "demoted": None}),
            (20, "registry.promoted", json.dumps({"version": 2, "demoted": 1})),
            (30, "registry.rolled_back", {"version": 1, "demoted": 2}),
            (40, "registry.restored", {"version": 2, "demoted": 1})]
    assert stale_acts(acts) == []
    # two promotions decided on the same state: both demote v1, the second on a stale state
    raced = [(10, "registry.promoted", {"version": 1, "demoted": None}),
             (20, "registry.promoted", {"version": 2, "demoted": 1}),
             (21, "registry.promoted", {"version": 3, "demoted": 1})]
    assert stale_acts(raced) == [{"position": 21, "version": 3, "demoted": 1, "production_before": 2}]
