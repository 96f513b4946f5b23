"""Evaluator service: `training.completed` -> accuracy and macro-F1 of candidate and base on the
held-out split -> `eval.completed` / `eval.failed`."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from contracts import subjects
from contracts.events import ClassificationMetrics, EvalCompleted, EvalFailed
from services.common.app import Service
from services.common.artifacts import ArtifactIntegrityError
from services.common.delivery import ConsumerSpec, StageContext, StageError
from services.common.jsonl import loads_jsonl
from services.evaluator.adapters.classifier import predict_labels
from services.evaluator.domain import score_classification
from services.evaluator.settings import EvaluatorSettings

TRAINED = ConsumerSpec(service="evaluator", durable="evaluator-training-completed",
                       subject=subjects.subject_for("training.completed", kind="event"),
                       accepts=("training.completed",), failure_type=EvalFailed, stage="evaluator")


def _metrics(y_true, y_pred, label_space) -> ClassificationMetrics:
    s = score_classification(y_true, y_pred, label_space)
    return ClassificationMetrics(accuracy=s.accuracy, macro_f1=s.macro_f1, n=s.n)


async def on_trained(ctx: StageContext) -> None:
    p = ctx.payload
    with tempfile.TemporaryDirectory(prefix="tuneline-eval-") as tmp:
        try:
            rows = loads_jsonl(ctx.artifacts.read_bytes(p.eval))
            adapter_dir = ctx.artifacts.materialize_dir(p.adapter, Path(tmp) / "adapter")
        except ArtifactIntegrityError as exc:
            raise StageError("eval.artifact_unreadable", str(exc)) from exc
        texts, truth = [r["text"] for r in rows], [r["label"] for r in rows]
        try:
            async with ctx.keep_alive():
                cand = await asyncio.to_thread(predict_labels, p.base_model, adapter_dir, texts, p.label_space,
                                               p.plan.max_length, 64, p.plan.seed)
                base = await asyncio.to_thread(predict_labels, p.base_model, None, texts, p.label_space,
                                               p.plan.max_length, 64, p.plan.seed)
        except (ValueError, RuntimeError, OSError) as exc:
            raise StageError("eval.runtime_error", f"{type(exc).__name__}: {exc}") from exc
    await ctx.emit(EvalCompleted(
        plan=p.plan, base_model=p.base_model, adapter=p.adapter, eval=p.eval,
        candidate=_metrics(truth, cand, p.label_space), base=_metrics(truth, base, p.label_space),
        label_space=p.label_space,
    ))


def build(settings: EvaluatorSettings | None = None) -> Service:
    svc = Service("evaluator", settings or EvaluatorSettings())
    svc.consume(TRAINED, on_trained)
    return svc


def main() -> None:
    build().run()
