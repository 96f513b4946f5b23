"""The CLI's error paths that need no stack: bad `tuneline run` input, an unreachable nats-server,
`status` exit codes, `events` for an unknown run. One line each, never a traceback, never an input value."""

from __future__ import annotations

import json

import pytest

from services.cli import main, stack
from tests.unit.cli_support import run_cli

pytestmark = pytest.mark.usefixtures("cli_data_dir")


def test_a_bad_target_names_the_allowed_characters_and_suggests_a_slug_exit_2(capsys):
    code, out, err = run_cli(["run", "--locator", "jsonl:x.jsonl", "--target", "Support Tickets (Zürich)"], capsys)
    assert code == 2
    assert err.strip().splitlines() == [
        "tuneline run: --target 'Support Tickets (Zürich)': a target name may hold only ASCII letters, digits, "
        "'-' and '_' (it is part of a bus subject); try --target support-tickets-zurich"]
    assert "A-Za-z0-9" not in err and "Traceback" not in err


def test_every_bad_option_gets_its_line(capsys):
    code, _, err = run_cli(["run", "--locator", "jsonl:x.jsonl", "--target", "ok", "--eval-fraction", "5",
                            "--max-steps", "0"], capsys)
    assert code == 2
    assert err.strip().splitlines() == ["tuneline run: --eval-fraction: Input should be less than 1",
                                        "tuneline run: --max-steps: Input should be greater than or equal to 1"]


def test_an_unreachable_nats_server_is_one_line_not_a_traceback(cli_data_dir, capsys):
    url = f"nats://127.0.0.1:{stack.free_port()}"  # nothing listens there
    stack.write_state(cli_data_dir, {"nats": {"url": url, "managed": True},
                                 "postgres": {"url": "postgresql://u:pw@/tuneline?host=/nonexistent"}})
    for argv in (["status"], ["status", "--json"], ["run", "--locator", "jsonl:x", "--target", "t", "--no-wait"]):
        code, out, err = run_cli(argv, capsys)
        assert code == 1, argv
        assert err.strip() == f"nats-server at {url} is not reachable (NoServersError): run `tuneline up`"


def _status(alive=True, stopped=False, history_stopped=False) -> dict:
    timeline = {"position": 3, **({"error_position": 4, "error": "boom"} if stopped else {})}
    return {"services": {n: {"pid": 1, "alive": alive or n != "export", "pending": 0, "ack_pending": 0}
                         for n in stack.SERVICES},
            "stream": {"name": "RUN_EVENTS", "messages": 0, "last_seq": 0, "dlq_messages": 0},
            "recorder": {"recorded_position": 0, "lag": 0, "gaps": [], "active": {"pid": 1, "host": "h"},
                         "standbys": []},
            "projection": timeline,
            "projections": {"timeline": timeline,
                            "history": {"position": 3, **({"error_position": 5, "error": "bad"} if history_stopped
                                                          else {})}}}


@pytest.mark.parametrize("json_mode", [False, True])
@pytest.mark.parametrize(("kwargs", "expected"), [({}, 0), ({"alive": False}, 1), ({"stopped": True}, 1),
                                                  ({"history_stopped": True}, 1)])
def test_status_exit_code_is_the_same_in_text_and_json(monkeypatch, capsys, json_mode, kwargs, expected):
    async def fake():
        return _status(**kwargs)

    monkeypatch.setattr(main, "_status", fake)
    code, out, _ = run_cli(["status"] + (["--json"] if json_mode else []), capsys)
    assert code == expected
    if json_mode:
        json.loads(out)
    else:  # both projections' positions, and who records
        assert "timeline projection: position 3" in out and "history projection: position 3" in out
        assert "recorder: active pid 1 on h; standby none" in out


def test_events_for_an_unknown_run_says_so(monkeypatch, capsys):
    async def none(run_id):
        return []

    monkeypatch.setattr(main, "_events", none)
    code, _, err = run_cli(["events", "--run", "run-nope"], capsys)
    assert code == 1 and err.strip() == "no events recorded for run run-nope"
