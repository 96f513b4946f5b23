"""What export.completed carries on from before the evaluation, read back from the bus by event id: the
gate's decision (the registry validates or rejects a version on it, D13) and the lineage (the dataset
version and manifest the registry records). eval.completed says whether the gate passed; the criteria that
failed and the evidence's event id are in eval.gate_decided, which the evaluator published just before; the
manifest is in training.completed, the evaluation's trigger (its causation id), and the dataset version
in that manifest."""

from __future__ import annotations

import json
import uuid

from nats.js.errors import NotFoundError

from contracts import subjects
from contracts.common import ArtifactRef
from contracts.events import GateDecided, GateVerdict, TrainingCompleted
from contracts.registry import ContractError, decode
from services.common.artifacts import ArtifactIntegrityError
from services.common.ids import derived_event_id

# How far back from eval.completed the gate decision is looked for first (it is published right before,
# unless a redelivery published eval.completed much later); then the whole subject.
NEAR = 10_000


def gate_event_id(training_completed_id: uuid.UUID) -> uuid.UUID:
    """The id the evaluator gives its eval.gate_decided (D3: derived from its trigger, training.completed;
    the step is services/evaluator/app.py's "gate", as StageContext.envelope_for spells derived ids)."""
    return derived_event_id(training_completed_id, "evaluator/eval.gate_decidedgate")


async def find_event(js, type_name: str, event_id: uuid.UUID, before_seq: int):
    """(envelope, payload) of the event `event_id` of type `type_name` at or before stream sequence
    `before_seq`, or None: the NEAR window before it first, then the whole subject."""
    for start in (max(1, before_seq - NEAR), 1):
        async for env, payload in _events_of(js, type_name, start, before_seq):
            if env is not None and env.event_id == event_id:
                return env, payload
        if start == 1:
            break
    return None


async def find_gate_verdict(js, training_completed_id: uuid.UUID | None, eval_seq: int) -> GateVerdict | None:
    """The gate decision of the evaluation at stream sequence `eval_seq`, or None (a v3 evaluation, no gate)."""
    if training_completed_id is None:
        return None
    found = await find_event(js, "eval.gate_decided", gate_event_id(training_completed_id), eval_seq)
    if found is None or not isinstance(found[1], GateDecided):
        return None
    env, gate = found
    e = gate.evidence
    return GateVerdict(event_id=str(env.event_id), passed=gate.passed, failed=gate.failed,
                       baseline=gate.baseline, baseline_kind=gate.baseline_kind,
                       test_set_sha256=gate.test_set_sha256, judge_id=gate.judge_id,
                       n=e.get("n"), delta=e.get("delta"), p_value=e.get("p_value"))


async def find_lineage(js, artifacts, training_completed_id: uuid.UUID | None,
                       eval_seq: int) -> tuple[str | None, ArtifactRef | None]:
    """(dataset version, manifest) of the run evaluated at `eval_seq`: the manifest that training.completed
    (the evaluation's trigger) names, and the dataset version written in it (prep's, read back through its
    sha256). (None, None) when the trigger is not on the bus; the version None when the manifest is
    unreadable: the lineage is recorded as far as it is known, never guessed."""
    if training_completed_id is None:
        return None, None
    found = await find_event(js, "training.completed", training_completed_id, eval_seq)
    if found is None or not isinstance(found[1], TrainingCompleted):
        return None, None
    manifest = found[1].manifest
    try:
        doc = json.loads(artifacts.read_bytes(manifest))
    except (ArtifactIntegrityError, OSError, ValueError):
        return None, manifest
    version = doc.get("dataset_version") if isinstance(doc, dict) else None
    return (version if isinstance(version, str) else None), manifest


async def find_run_event(js, type_name: str, run_id: str, before_seq: int):
    """(envelope, payload) of the latest event of `type_name` in run `run_id` at or before stream sequence
    `before_seq`, or None; what does not decode is skipped."""
    found = None
    async for env, payload in _events_of(js, type_name, 1, before_seq):
        if env is not None and env.run_id == run_id:
            found = (env, payload)
    return found


async def _events_of(js, type_name: str, start: int, before_seq: int):
    """Each (envelope, payload) of type `type_name` on the stream from sequence `start` to `before_seq`, read
    one at a time by subject; (None, None) for what does not decode."""
    subject = subjects.subject_for(type_name, kind="event")
    seq = start
    while seq <= before_seq:
        try:
            msg = await js.get_msg(subjects.STREAM, seq, subject=subject, next=True, direct=True)
        except NotFoundError:
            return
        if msg.seq > before_seq:
            return
        try:
            env, payload = decode(msg.data)
        except ContractError:
            env = payload = None
        if env is not None and env.type != type_name:
            env = payload = None
        yield env, payload
        seq = msg.seq + 1
