"""The gate's decision behind an evaluation, read back from the bus for export.completed (the registry
validates or rejects a version on it, D13). eval.completed says whether the gate passed; the criteria that
failed and the evidence's event id are in eval.gate_decided, which the evaluator published just before."""

from __future__ import annotations

import uuid

from nats.js.errors import NotFoundError

from contracts import subjects
from contracts.events import GateDecided, GateVerdict
from contracts.registry import ContractError, decode
from services.common.ids import derived_event_id

# How far back from eval.completed the gate decision is looked for first (it is published right before,
# unless a redelivery published eval.completed much later); then the whole subject.
NEAR = 10_000


def gate_event_id(training_completed_id: uuid.UUID) -> uuid.UUID:
    """The id the evaluator gives its eval.gate_decided (D3: derived from its trigger, training.completed;
    the step is services/evaluator/app.py's "gate", as StageContext.envelope_for spells derived ids)."""
    return derived_event_id(training_completed_id, "evaluator/eval.gate_decidedgate")


async def find_gate_verdict(js, training_completed_id: uuid.UUID | None, eval_seq: int) -> GateVerdict | None:
    """The gate decision of the evaluation at stream sequence `eval_seq`, or None (a v3 evaluation, no gate)."""
    if training_completed_id is None:
        return None
    wanted = gate_event_id(training_completed_id)
    for start in (max(1, eval_seq - NEAR), 1):
        seq = start
        while seq <= eval_seq:
            try:
                msg = await js.get_msg(subjects.STREAM, seq, subject=subjects.subject_for("eval.gate_decided", kind="event"),
                                       next=True, direct=True)
            except NotFoundError:
                break
            if msg.seq > eval_seq:
                break
            try:
                env, gate = decode(msg.data)
            except ContractError:
                env = gate = None
            if env is not None and env.event_id == wanted and isinstance(gate, GateDecided):
                e = gate.evidence
                return GateVerdict(event_id=str(env.event_id), passed=gate.passed, failed=gate.failed,
                                   baseline=gate.baseline, baseline_kind=gate.baseline_kind,
                                   test_set_sha256=gate.test_set_sha256, judge_id=gate.judge_id,
                                   n=e.get("n"), delta=e.get("delta"), p_value=e.get("p_value"))
            seq = msg.seq + 1
        if start == 1:
            break
    return None
