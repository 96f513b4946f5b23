"""Evaluator service: `training.completed` -> accuracy and macro-F1 of candidate and base on the
held-out split -> `eval.completed` / `eval.failed`."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

from contracts import subjects
from contracts.events import ClassificationMetrics, EvalCompleted, EvalFailed
from services.common.app import Service
from services.common.artifacts import ArtifactIntegrityError
from services.common.delivery import ConsumerSpec, StageContext, StageError
from services.common.jsonl import loads_jsonl
from services.common.models import resolve_base_model
from services.evaluator.adapters.classifier import LABELS_FILE, predict_labels, trained_pooling
from services.evaluator.domain import score_classification
from services.evaluator.settings import EvaluatorSettings

TRAINED = ConsumerSpec(service="evaluator", durable="evaluator-training-completed",
                       subject=subjects.subject_for("training.completed", kind="event"),
                       accepts=("training.completed",), failure_type=EvalFailed, stage="evaluator")


def _metrics(y_true, y_pred, label_space) -> ClassificationMetrics:
    s = score_classification(y_true, y_pred, label_space)
    return ClassificationMetrics(accuracy=s.accuracy, macro_f1=s.macro_f1, n=s.n)


def trained_max_length(adapter_dir: Path, fallback: int | None) -> int:
    """Score with the sequence length the adapter was trained with (labels.json), else the plan's."""
    try:
        return int(json.loads((adapter_dir / LABELS_FILE).read_text())["max_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return fallback or 128


async def on_trained(ctx: StageContext) -> None:
    p = ctx.payload
    if p.adapter is None:
        raise StageError("eval.capability_unsupported",
                         f"{p.backend} trained {p.fine_tuned_model or 'a hosted model'}: the evaluator scores local "
                         f"adapters only so far; hosted models are evaluated through their provider's API later")
    if p.task not in (None, "sequence_classification"):
        raise StageError("eval.capability_unsupported",
                         f"the evaluator scores single-label classifiers so far; this candidate is {p.task}")
    base_model = resolve_base_model(p.base_model)
    with tempfile.TemporaryDirectory(prefix="tuneline-eval-") as tmp:
        try:
            rows = loads_jsonl(ctx.artifacts.read_bytes(p.eval))
            adapter_dir = ctx.artifacts.materialize_dir(p.adapter, Path(tmp) / "adapter")
        except ArtifactIntegrityError as exc:
            raise StageError("eval.artifact_unreadable", str(exc)) from exc
        texts, truth = [r["text"] for r in rows], [r["label"] for r in rows]
        try:
            async with ctx.keep_alive():
                max_length = trained_max_length(adapter_dir, p.plan.max_length)
                pooling = trained_pooling(adapter_dir)  # the base model is scored with the candidate's head
                cand = await asyncio.to_thread(predict_labels, base_model, adapter_dir, texts, p.label_space,
                                               max_length, 64, p.plan.seed, pooling)
                base = await asyncio.to_thread(predict_labels, base_model, None, texts, p.label_space,
                                               max_length, 64, p.plan.seed, pooling)
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
