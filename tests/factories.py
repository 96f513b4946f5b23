"""Builders of valid envelopes for tests: a plausible run's events, in pipeline order."""

from __future__ import annotations

import hashlib
import uuid

from contracts.common import ArtifactRef, RunPlan
from contracts.commands import StartRun
from contracts.envelope import Envelope, Severity
from contracts.events import (
    ClassificationMetrics,
    EvalCompleted,
    ExportCompleted,
    IngestCommitted,
    IngestFailed,
    PrepPrepared,
    TrainingCompleted,
    TrainingProgressed,
    TrainingStarted,
    VersionRegistered,
)
from contracts.registry import message_type_of


def ref(name: str) -> ArtifactRef:
    sha = hashlib.sha256(name.encode()).hexdigest()
    return ArtifactRef(uri=f"file:///artifacts/{sha}", sha256=sha, size=len(name))


def plan(target: str = "support-intents", locator: str = "jsonl:/data/sample.jsonl") -> RunPlan:
    return RunPlan(locator=locator, target=target)


def envelope(payload, *, run_id: str, causation: Envelope | None = None, severity=Severity.INFO,
             reason_code=None, producer="test", event_id=None) -> Envelope:
    mt = message_type_of(payload)
    return Envelope(
        event_id=event_id or uuid.uuid4(), type=mt.name, schema_version=mt.version, run_id=run_id,
        correlation_id=run_id, causation_id=causation.event_id if causation else None, producer=producer,
        severity=severity, reason_code=reason_code, payload=payload.model_dump(mode="json"),
    )


def successful_run(run_id: str, progress_steps: int = 3) -> list[Envelope]:
    p = plan()
    m = ClassificationMetrics(accuracy=0.9, macro_f1=0.88, n=40)
    b = ClassificationMetrics(accuracy=0.3, macro_f1=0.2, n=40)
    out = [envelope(StartRun(plan=p), run_id=run_id, producer="cli")]
    out.append(envelope(IngestCommitted(plan=p, dataset=ref("d"), rejected=ref("r"), rows_read=210, rows_accepted=200,
                                        rows_rejected=10, rejected_by_reason={"ingest.empty_text": 10}),
                        run_id=run_id, causation=out[-1], producer="ingest"))
    out.append(envelope(PrepPrepared(plan=p, manifest=ref("m"), train=ref("t"), eval=ref("e"), label_space=["a", "b"],
                                     train_rows=160, eval_rows=40, dataset_version="abc"), run_id=run_id,
                        causation=out[-1], producer="prep"))
    out.append(envelope(TrainingStarted(plan=p, base_model="/m/all-MiniLM-L6-v2", max_steps=30, train_rows=160),
                        run_id=run_id, causation=out[-1], producer="trainer"))
    for s in range(1, progress_steps + 1):
        out.append(envelope(TrainingProgressed(step=s * 10, max_steps=30, epoch=s / 2, loss=1.0 / s, learning_rate=1e-3,
                                               examples_per_s=50.0, eta_s=3.0), run_id=run_id, causation=out[3],
                            producer="trainer"))
    out.append(envelope(TrainingCompleted(plan=p, base_model="/m", adapter=ref("a"), manifest=ref("m"), eval=ref("e"),
                                          label_space=["a", "b"], steps=30, final_loss=0.2, examples_per_s=50.0,
                                          wall_s=9.5), run_id=run_id, causation=out[-1], producer="trainer"))
    out.append(envelope(EvalCompleted(plan=p, base_model="/m", adapter=ref("a"), eval=ref("e"), candidate=m, base=b,
                                      label_space=["a", "b"]), run_id=run_id, causation=out[-1], producer="evaluator"))
    out.append(envelope(ExportCompleted(plan=p, base_model="/m", export=ref("x"), format="peft-lora-safetensors",
                                        files={"adapter_model.safetensors": "0" * 64}, candidate=m, base=b),
                        run_id=run_id, causation=out[-1], producer="export"))
    out.append(envelope(VersionRegistered(target=p.target, version=1, export=ref("x"), base_model="/m", candidate=m,
                                          base=b, source_run_id=run_id), run_id=run_id, causation=out[-1],
                        producer="registry"))
    return out


def failed_run(run_id: str) -> list[Envelope]:
    p = plan(locator="jsonl:/missing.jsonl")
    start = envelope(StartRun(plan=p), run_id=run_id, producer="cli")
    fail = envelope(IngestFailed(stage="ingest", message="/missing.jsonl does not exist", trigger_type="run.start", plan=p),
                    run_id=run_id, causation=start, severity=Severity.ERROR, reason_code="ingest.source_not_found",
                    producer="ingest")
    return [start, fail]


class HeartbeatOnlyMsg:
    """A trigger message for calling a handler directly: handlers only send it in_progress()."""

    async def in_progress(self) -> None:
        pass
