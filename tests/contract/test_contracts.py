"""Contract tests: schema snapshots, the type registry, the envelope and the reason-code taxonomy."""

from __future__ import annotations

import ast
import re
import json
import uuid
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from contracts import registry, snapshots, subjects
from contracts.envelope import Envelope
from contracts.reason_codes import REASON_CODES, markdown_table
from contracts.registry import ContractError, decode, encode, register, registered_types
from tests.factories import failed_run, successful_run

REPO = Path(__file__).resolve().parents[2]


def test_no_published_contract_was_removed_or_rolled_back():
    assert snapshots.orphans() == []


def test_unregistering_a_type_is_detected(monkeypatch):
    from contracts import registry

    types = dict(registry.registered_types())
    types.pop("training.pause")
    monkeypatch.setattr(snapshots, "registered_types", lambda: types)
    assert "training.pause.v1.json" in snapshots.orphans()


def test_every_contract_matches_its_committed_schema_snapshot():
    missing, changed = snapshots.drift()
    assert not missing, f"no snapshot for {missing}: run `make schemas`"
    assert not changed, f"{changed} changed without a version bump: bump the type's version and add an upcaster"


def test_a_changed_contract_is_detected_as_drift(monkeypatch):
    # Pretend a field was added to a published type without bumping its version.
    mt = registered_types()["ingest.failed"]

    class Widened(mt.model):
        extra_detail: str = ""

    monkeypatch.setattr(mt, "model", Widened)
    _, changed = snapshots.drift()
    assert changed == [f"ingest.failed.v{mt.version}.json"]
    with pytest.raises(SystemExit, match="without a version bump"):
        snapshots.write_missing()


def test_every_registered_type_has_a_unique_wire_name_and_a_kind():
    types = registered_types()
    assert {"run.start", "ingest.committed", "prep.prepared", "training.completed", "eval.completed",
            "export.completed", "registry.version_registered", "bus.message_dead_lettered"} <= set(types)
    assert all(mt.kind in ("event", "command") for mt in types.values())
    assert types["run.start"].kind == "command"
    # each stage that can fail has a registered failure event
    for stage in ("ingest", "prep", "training", "eval", "export", "registry"):
        assert f"{stage}.failed" in types


def test_envelope_round_trips_every_factory_event():
    for env in successful_run("run-rt") + failed_run("run-rt2"):
        decoded, payload = decode(encode(env))
        assert decoded == env
        assert isinstance(payload, BaseModel)


def test_envelope_is_frozen_and_forbids_unknown_fields():
    env = successful_run("run-f")[0]
    with pytest.raises(ValidationError):
        env.run_id = "other"
    raw = json.loads(encode(env))
    raw["surprise"] = 1
    with pytest.raises(ContractError) as err:
        decode(json.dumps(raw).encode())
    assert err.value.reason_code == "bus.malformed_message"


def test_envelope_refuses_an_unregistered_reason_code():
    env = failed_run("run-r")[1]
    with pytest.raises(ValidationError, match="not registered"):
        Envelope.model_validate({**env.model_dump(), "reason_code": "ingest.something_new"})


def test_newer_schema_version_than_known_is_refused_with_a_reason():
    raw = json.loads(encode(successful_run("run-v")[0]))
    raw["schema_version"] = 99
    with pytest.raises(ContractError) as err:
        decode(json.dumps(raw).encode())
    assert err.value.reason_code == "bus.unsupported_schema_version"


def test_old_schema_versions_are_upcast_on_read(monkeypatch):
    monkeypatch.setattr(registry, "_TYPES", dict(registry._TYPES))
    monkeypatch.setattr(registry, "_BY_MODEL", dict(registry._BY_MODEL))

    @register("test.widget_sized", kind="event", version=2,
              upcasters={1: lambda p: {"name": p["name"], "size_mm": p["size_cm"] * 10}})
    class WidgetSized(BaseModel):
        name: str
        size_mm: int

    v1 = Envelope(type="test.widget_sized", schema_version=1, run_id="r", correlation_id="r", producer="t",
                  payload={"name": "w", "size_cm": 3})
    _, payload = decode(encode(v1))
    assert payload == WidgetSized(name="w", size_mm=30)
    with pytest.raises(ValueError, match="needs upcasters"):
        register("test.unupcastable", kind="event", version=2)(type("M", (BaseModel,), {}))


def _reason_codes_used_in_code() -> set[tuple[str, str]]:
    """Every string literal passed as a reason code anywhere in services/ and contracts/."""
    used = set()
    for path in [*REPO.glob("services/**/*.py"), *REPO.glob("contracts/**/*.py")]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            if name in ("StageError", "ContractError", "LocatorError") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    used.add((arg.value, str(path.relative_to(REPO))))
            for kw in node.keywords:
                if kw.arg == "reason_code" and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str):
                    used.add((kw.value.value, str(path.relative_to(REPO))))
    return used


def test_every_reason_code_used_in_the_code_is_registered():
    used = _reason_codes_used_in_code()
    assert len(used) > 10  # the scan really finds the call sites
    unregistered = sorted((code, where) for code, where in used if code not in REASON_CODES)
    assert not unregistered, f"unregistered reason codes: {unregistered}"


_NAMESPACES = ("bus", "ingest", "prep", "cleaning", "preflight", "training", "eval", "export", "registry", "audit")


def test_every_string_in_the_code_that_looks_like_a_reason_code_is_registered_or_an_event_type():
    """Whatever carries it (SourceError, a rejected row, a warning, a blocker, a Notice...): any string
    literal shaped like `<stage>.<name>` is a registered reason code or a registered message type. The
    call-site scan above only sees a few constructors; this one cannot miss a new one."""
    from contracts.registry import registered_types

    shaped = re.compile(rf"(?:{'|'.join(_NAMESPACES)})\.[a-z][a-z0-9_]*")
    known = set(REASON_CODES) | set(registered_types())
    found = set()
    for path in [*REPO.glob("services/**/*.py"), *REPO.glob("contracts/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and shaped.fullmatch(node.value):
                found.add((node.value, str(path.relative_to(REPO))))
    assert len(found) > 50
    strays = sorted((value, where) for value, where in found if value not in known)
    assert not strays, f"neither a registered reason code nor a message type: {strays}"


def test_reason_codes_are_namespaced_by_stage():
    for code, rc in REASON_CODES.items():
        prefix = code.split(".", 1)[0]
        assert prefix in ("bus", "ingest", "prep", "cleaning", "preflight", "training", "eval", "gate", "export", "registry",
                          "audit"), code
        assert rc.meaning.endswith("."), code


def test_reason_code_docs_are_generated_from_the_taxonomy():
    assert (REPO / "docs" / "reason-codes.md").read_text() == markdown_table(), "run `make docs`"


def test_subjects_keep_events_commands_and_dead_letters_apart():
    assert subjects.subject_for("run.start", kind="command") == "tuneline.cmd.run.start"
    assert subjects.subject_for("ingest.committed", kind="event") == "tuneline.evt.ingest.committed"
    assert (subjects.subject_for("registry.version_registered", kind="event", target="faq-bot")
            == "tuneline.evt.registry.faq-bot.version_registered")
    assert subjects.dlq_subject("trainer-prep-prepared") == "tuneline.dlq.trainer-prep-prepared"
    with pytest.raises(ValueError):
        subjects.registry_target_filter("a.b")


def test_event_ids_are_uuids_and_distinct_by_default():
    a, b = successful_run("x")[:2]
    assert isinstance(a.event_id, uuid.UUID) and a.event_id != b.event_id


def test_counts_by_reason_must_name_registered_reason_codes():
    """An unregistered key passed the contract, and a `prep.cleaned` holding one stopped the timeline
    projection (its summary splits the code at the dot)."""
    import pydantic

    from contracts.events import PrepCleaned
    from tests.factories import plan, ref

    ok = dict(plan=plan(), rows_in=3, rows_kept=1, dropped_by_reason={"cleaning.exact_duplicate": 2}, dropped=ref("d"),
              pii_by_kind={}, rows_with_pii=0)
    PrepCleaned(**ok)
    for bad in ({"nodot": 2}, {"cleaning.made_up": 2}):
        with pytest.raises(pydantic.ValidationError, match="unregistered reason codes"):
            PrepCleaned(**(ok | {"dropped_by_reason": bad}))


@pytest.mark.parametrize("version", [1, 2])
def test_an_old_plan_that_left_fields_to_their_defaults_upcasts_to_those_defaults(version):
    """v1 defaulted text/label fields to "text"/"label" and v2 the training knobs to 120 steps, batch 16,
    lr 1e-3, 128 tokens; v3's defaults (None) mean something else, so the upcasters must fill them in."""
    import json
    import uuid

    body = {"event_id": str(uuid.uuid4()), "type": "run.start", "schema_version": version, "run_id": "r",
            "correlation_id": "r", "causation_id": None, "occurred_at": "2026-01-01T00:00:00Z", "producer": "cli",
            "severity": "info", "reason_code": None,
            "payload": {"plan": {"locator": "jsonl:a.jsonl", "target": "t"}, "requested_by": "x"}}
    plan = decode(json.dumps(body).encode())[1].plan
    assert (plan.max_steps, plan.batch_size, plan.learning_rate, plan.max_length) == (120, 16, 0.001, 128)
    assert (plan.text_field, plan.label_field) == (("text", "label") if version == 1 else (None, None))
