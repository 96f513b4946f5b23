"""Evaluator service: `training.completed` -> the candidate and its baseline scored row by row on the
target's frozen test set (D14-D16) -> `judge.validated`, `eval.gate_decided`, then `eval.completed`
(or `eval.failed`).

The baseline (D15) is the target's production version when it has one, else the plan's prompt
baseline, else a classical TF-IDF + logistic regression trained here on the run's train split.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

from contracts import subjects
from contracts.events import (ClassificationMetrics, EvalCompleted, EvalFailed, GateDecided, JudgeRef, JudgeValidated,
                             Notice)
from services.common.app import Service
from services.common.artifacts import ArtifactIntegrityError
from services.common.delivery import ConsumerSpec, StageContext, StageError
from services.common.jsonl import loads_jsonl, write_jsonl
from services.common.logging import get_logger
from services.common.models import resolve_base_model
from services.evaluator import domain
from services.evaluator.adapters.classifier import LABELS_FILE, predict, trained_metadata
from services.evaluator.scoring import Scored, gold_of
from services.evaluator.settings import EvaluatorSettings

log = get_logger(__name__)

TRAINED = ConsumerSpec(service="evaluator", durable="evaluator-training-completed",
                       subject=subjects.subject_for("training.completed", kind="event"),
                       accepts=("training.completed",), failure_type=EvalFailed, stage="evaluator")

CANDIDATE = "candidate"


def trained_max_length(adapter_dir: Path, fallback: int | None) -> int:
    """Score with the sequence length the adapter was trained with (labels.json), else the plan's."""
    try:
        return int(json.loads((adapter_dir / LABELS_FILE).read_text())["max_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return fallback or 128


def _summary(report) -> ClassificationMetrics:
    m = report.metrics
    if "accuracy" in m:
        return ClassificationMetrics(accuracy=m["accuracy"], macro_f1=m["macro_f1"], n=report.n)
    if "micro_f1" in m:  # tags: exact-set accuracy and the tag macro-F1
        return ClassificationMetrics(accuracy=m["exact_set_accuracy"], macro_f1=m["macro_f1"], n=report.n)
    lead = m.get("fields", {}).get("label", {})
    return ClassificationMetrics(accuracy=lead.get("accuracy", report.judge_mean), macro_f1=lead.get("macro_f1", 0.0),
                                 n=report.n)


def _read_rows(ctx: StageContext, ref) -> list[dict]:
    try:
        return loads_jsonl(ctx.artifacts.read_bytes(ref)) if ref is not None else []
    except ArtifactIntegrityError as exc:
        raise StageError("eval.artifact_unreadable", str(exc)) from exc


def score_local_candidate(base_model: str, adapter_dir: Path, rows: list[dict], label_space: list[str], kind: str,
                          plan, name: str = CANDIDATE) -> Scored:
    """An adapter's answers on the test rows (a local encoder classifier: the candidate, or production's
    export)."""
    import time

    meta = trained_metadata(adapter_dir)
    space = list(meta.get("label_space") or label_space)
    t0 = time.perf_counter()
    outputs, latency = predict(base_model, adapter_dir, [r["text"] for r in rows], space,
                               trained_max_length(adapter_dir, plan.max_length), 64, plan.seed, None,
                               multi_label=kind == "multi_label", threshold=float(meta.get("threshold") or 0.5))
    return Scored(model=name, outputs=_as_kind(outputs, kind), latency_ms=latency, compute_s=time.perf_counter() - t0)


def _as_kind(outputs: list, kind: str) -> list:
    """Answers in the form the rows are scored in, when the model was trained by another recipe than the
    candidate (e.g. production a single-label model, the candidate a triage model): a label answers a
    triage row's lead field; a triage answer's lead label (or tags) answers a single-label (multi-label) row."""
    if kind == "triage":
        return [o if o is None or isinstance(o, dict) else {"label": o} for o in outputs]
    if kind in ("single_label", "multi_label"):
        field = "label" if kind == "single_label" else "tags"
        return [o.get(field) if isinstance(o, dict) else o for o in outputs]
    return outputs


def _check_labels(kind: str, rows: list[dict], space: list[str]) -> None:
    """A test label outside the candidate's label space cannot be answered: a mismatch, not a score."""
    if kind == "single_label":
        unknown = sorted({r["label"] for r in rows} - set(space))
        if unknown:
            raise StageError("eval.label_space_mismatch",
                             f"the test set holds labels the candidate cannot answer: {', '.join(unknown[:10])}")


def _hosted_client(p):
    """The chat client of a hosted fine-tune (OpenAI, or an OpenAI-compatible host)."""
    from services.evaluator.adapters.chat import ChatClient

    hosted = p.plan.hosted
    base_url = hosted.base_url if hosted else None
    return ChatClient("openai_compatible" if base_url else "openai", p.fine_tuned_model, base_url=base_url,
                      api_key_env=hosted.api_key_env if hosted else "OPENAI_API_KEY")


async def score_candidate(ctx: StageContext, p, kind: str, rows: list[dict], tmp: Path) -> tuple[Scored, list[str]]:
    """(the candidate's answers on the test rows, the label space it answers in)."""
    from services.evaluator.adapters.chat import ScoringError

    if p.adapter is None:  # a hosted fine-tune, asked through its provider's chat API
        if not p.fine_tuned_model:
            raise StageError("eval.capability_unsupported", f"{p.backend} training produced no model to score")
        from services.evaluator.adapters.chat import score_with_chat

        space = list(p.label_space)
        _check_labels(kind, rows, space)
        try:
            async with ctx.keep_alive():
                scored = await asyncio.to_thread(
                    lambda: score_with_chat(_hosted_client(p), rows, label_space=space, system_prompt=None,
                                            few_shot_rows=[], kind=kind, model_name=CANDIDATE))
        except ScoringError as exc:
            raise StageError(exc.reason_code, f"candidate {p.fine_tuned_model}: {exc.message}") from exc
        return scored, space
    try:
        adapter_dir = ctx.artifacts.materialize_dir(p.adapter, tmp / "adapter")
    except ArtifactIntegrityError as exc:
        raise StageError("eval.artifact_unreadable", str(exc)) from exc
    meta = trained_metadata(adapter_dir)
    space = list(meta.get("label_space") or p.label_space)
    _check_labels(kind, rows, space)
    base_model = resolve_base_model(p.base_model)
    try:
        async with ctx.keep_alive():
            if p.task == "chat_sft":
                from services.evaluator.adapters.chat_sft import generate_chat

                scored = await asyncio.to_thread(generate_chat, base_model, adapter_dir, rows, kind=kind, label_space=space,
                                                 model_name=CANDIDATE)
            else:
                scored = await asyncio.to_thread(score_local_candidate, base_model, adapter_dir, rows, space, kind, p.plan)
    except ScoringError as exc:
        raise StageError(exc.reason_code, exc.message) from exc
    except (ValueError, RuntimeError, OSError) as exc:
        raise StageError("eval.runtime_error", f"{type(exc).__name__}: {exc}") from exc
    return scored, space


SCORES_BUCKET = "eval_scores"  # (target, version, test-set sha256) -> production's answers on that test set


async def _scores_bucket(js):
    from nats.js.api import KeyValueConfig, StorageType
    from nats.js.errors import BucketNotFoundError

    from services.common.bus import stream_replicas

    try:
        return await js.key_value(SCORES_BUCKET)
    except BucketNotFoundError:
        return await js.create_key_value(KeyValueConfig(
            bucket=SCORES_BUCKET, history=1, storage=StorageType.FILE, replicas=stream_replicas(),
            description="production's per-row answers by (target, version, test set): not rescored on every run"))


def _scored_json(scored: Scored) -> bytes:
    return json.dumps({"model": scored.model, "outputs": scored.outputs, "latency_ms": scored.latency_ms,
                       "tokens": scored.tokens, "compute_s": scored.compute_s, "usd": scored.usd}).encode()


async def score_production(ctx: StageContext, p, kind: str, test: list[dict], space: list[str], test_sha: str,
                           tmp: Path) -> tuple[Scored, dict, list[Notice]] | None:
    """What serves the target now (the `serving` bucket, D17) scored on the same test rows, or None when
    nothing does. Its answers are cached by (version, test-set sha256): production is scored once per
    test set, not on every run."""
    from contracts.common import ArtifactRef
    from nats.js.errors import KeyNotFoundError

    from services.common import serving

    entry = await serving.read(ctx.js, p.plan.target)
    if entry is None:
        return None
    name = f"production:v{entry['version']}"
    info = {"version": entry["version"], "source_run_id": entry.get("source_run_id"), "cached": False}
    kv = await _scores_bucket(ctx.js)
    key = f"{p.plan.target}.v{entry['version']}.{test_sha}"
    try:
        cached = json.loads((await kv.get(key)).value)
        data = json.loads(ctx.artifacts.read_bytes(ArtifactRef.model_validate(cached)))
        if len(data["outputs"]) == len(test):
            return Scored(**data), info | {"cached": True}, []
    except (KeyNotFoundError, ArtifactIntegrityError, ValueError, KeyError, TypeError):
        pass  # not cached (or the cached answers are gone): score now
    notices: list[Notice] = []
    if entry.get("hosted_model"):
        from services.evaluator.adapters.chat import ChatClient, ScoringError, score_with_chat

        hosted = p.plan.hosted
        try:
            client = ChatClient("openai_compatible" if hosted and hosted.base_url else "openai", entry["hosted_model"],
                                base_url=hosted.base_url if hosted else None,
                                api_key_env=hosted.api_key_env if hosted else "OPENAI_API_KEY")
            async with ctx.keep_alive():
                scored = await asyncio.to_thread(lambda: score_with_chat(
                    client, test, label_space=space, system_prompt=None, few_shot_rows=[], kind=kind, model_name=name))
        except ScoringError as exc:
            raise StageError("eval.production_unavailable" if exc.reason_code == "eval.model_not_found" else exc.reason_code,
                             f"production {name} ({entry['hosted_model']}): {exc.message}") from exc
    else:
        try:
            ref = ArtifactRef(uri=entry["model_uri"], sha256=entry["model_sha256"], size=int(entry.get("model_size") or 0))
            export_dir = ctx.artifacts.materialize_dir(ref, tmp / "production")
        except (ArtifactIntegrityError, KeyError, TypeError, ValueError, OSError) as exc:
            raise StageError("eval.production_unavailable",
                             f"production {name}: its export cannot be read ({exc}); promote or restore a version "
                             f"whose artifact exists") from exc
        prod_space = list(trained_metadata(export_dir).get("label_space") or space)
        if prod_space != list(space):
            notices.append(Notice(reason_code="eval.label_space_mismatch",
                                  message=f"{name} answers in {len(prod_space)} labels, the candidate in {len(space)}: "
                                          f"rows of a label one of them lacks count as that model's errors"))
        base_model = resolve_base_model((entry.get("base_model") or {}).get("model") or p.base_model)
        try:
            async with ctx.keep_alive():
                scored = await asyncio.to_thread(score_local_candidate, base_model, export_dir, test, prod_space, kind,
                                                 p.plan, name)
        except (ValueError, RuntimeError, OSError) as exc:
            raise StageError("eval.production_unavailable", f"production {name} does not load: {exc}") from exc
    ref = await asyncio.to_thread(ctx.artifacts.put_bytes, _scored_json(scored))
    await kv.put(key, ref.model_dump_json().encode())
    return scored, info, notices


async def score_baseline(ctx: StageContext, plan, kind: str, train: list[dict], validation: list[dict],
                         test: list[dict], space: list[str]) -> tuple[Scored, str, dict]:
    """(the baseline's answers, its kind, what was chosen) when nothing serves the target yet: the plan's
    prompt baseline when it has one, else the classical baseline where the rows are text classification."""
    from services.evaluator.adapters.chat import ChatClient, ScoringError, pick_few_shot, score_with_chat

    pb = plan.evaluation.prompt_baseline
    if pb is not None:
        try:
            async with ctx.keep_alive():
                scored = await asyncio.to_thread(lambda: score_with_chat(
                    ChatClient.from_settings(pb), test, label_space=space, system_prompt=pb.system_prompt,
                    few_shot_rows=pick_few_shot(train, pb.few_shot, kind=kind), kind=kind, model_name=f"prompt:{pb.model}"))
        except ScoringError as exc:
            raise StageError(exc.reason_code, f"prompt baseline {pb.model}: {exc.message}") from exc
        return scored, "prompt", {"provider": pb.provider, "model": pb.model, "few_shot": pb.few_shot}
    if kind == "triage" and all("text" in r for r in test):  # one classical model per field
        from services.evaluator.adapters.classical import score_classical_triage

        try:
            async with ctx.keep_alive():
                scored, info = await asyncio.to_thread(score_classical_triage, train, validation, test, seed=plan.seed)
        except ValueError as exc:
            raise StageError("eval.baseline_failed", f"classical baseline: {exc}") from exc
        return scored, "classical", info
    if kind not in ("single_label", "multi_label") or not all("text" in r for r in test):
        raise StageError("eval.baseline_failed", f"a {kind} candidate has no classical baseline and the target has no "
                                                 f"production version: configure evaluation.prompt_baseline")
    from services.evaluator.adapters.classical import score_classical

    try:
        async with ctx.keep_alive():
            scored, info = await asyncio.to_thread(score_classical, train, validation, test, space,
                                                   multi_label=kind == "multi_label", seed=plan.seed)
    except ValueError as exc:
        raise StageError("eval.baseline_failed", f"classical baseline: {exc}") from exc
    return scored, "classical", info


# the LLM judge's validation is asked over at most this many test rows (gold and wrong answers each)
JUDGE_VALIDATION_ROWS = 200


async def llm_judgement(ctx: StageContext, settings, kind: str, rows: list[dict], space: list[str],
                        models: list[Scored]) -> tuple[dict, JudgeRef, dict]:
    """(model name -> per-row scores, the judge, its validation) from the plan's LLM judge."""
    from services.evaluator.adapters.chat import ChatClient, ScoringError
    from services.evaluator.adapters.llm_judge import LLMJudge

    js = settings.judge
    if not js.model:
        raise StageError("eval.judge_unavailable", "evaluation.judge.kind is llm but no judge model is named")

    def run():
        judge = LLMJudge(ChatClient.from_settings(js))
        sample = rows[:JUDGE_VALIDATION_ROWS]
        gold = judge.score_rows(sample, [gold_of(r, kind) for r in sample], kind=kind)
        wrong = judge.score_rows(sample, domain.wrong_outputs(sample, kind, space), kind=kind)
        validation = domain.judge_agreement(gold, wrong, js.min_agreement)
        scores = {m.model: judge.score_rows(rows, m.outputs, kind=kind) for m in models}
        ref = JudgeRef(judge_id=judge.judge_id, kind="llm", model=judge.model, prompt_sha256=judge.prompt_sha256)
        return scores, ref, validation

    try:
        async with ctx.keep_alive():
            return await asyncio.to_thread(run)
    except ScoringError as exc:
        raise StageError(exc.reason_code, exc.message) from exc


async def on_trained(ctx: StageContext) -> None:
    p = ctx.payload
    plan = p.plan
    settings = plan.evaluation
    shape = plan.mapping.shape if plan.mapping else "single_label_classification"
    try:
        kind = domain.kind_of(p.task, shape)
    except ValueError as exc:
        raise StageError("eval.capability_unsupported", str(exc)) from exc
    if kind == "text" and settings.judge.kind != "llm":
        raise StageError("eval.capability_unsupported", "free-text answers need the LLM judge (evaluation.judge.kind "
                                                        "llm): the rubric can only check exact answers")
    test_ref = p.test or p.eval  # a v3 run had no test split: it is scored on its eval split
    if test_ref is None:
        raise StageError("eval.no_test_set", "the run carries no test split")
    test_rows = _read_rows(ctx, test_ref)
    if not test_rows:
        raise StageError("eval.no_test_set", "the test split is empty")
    train_rows = _read_rows(ctx, p.train)
    validation_rows = _read_rows(ctx, p.eval) if p.test is not None else []

    test_sha = p.test_set.sha256 if p.test_set is not None else test_ref.sha256
    notices: list[Notice] = []
    with tempfile.TemporaryDirectory(prefix="tuneline-eval-") as tmp:
        candidate, space = await score_candidate(ctx, p, kind, test_rows, Path(tmp))
        production = await score_production(ctx, p, kind, test_rows, space, test_sha, Path(tmp))
    if production is not None:
        baseline, baseline_info, notices = production
        baseline_kind = "production"
    else:
        baseline, baseline_kind, baseline_info = await score_baseline(ctx, plan, kind, train_rows, validation_rows,
                                                                      test_rows, space)
    judge_scores = judge = validation = None
    if settings.judge.kind == "llm":
        judge_scores, judge, validation = await llm_judgement(ctx, settings, kind, test_rows, space, [candidate, baseline])
    try:
        a = domain.assess(test_rows, candidate, baseline, kind=kind, label_space=space, settings=settings,
                          judge_scores=judge_scores, judge=judge, validation=validation,
                          severity_field=domain.severity_field(test_rows, kind))
    except ValueError as exc:
        raise StageError("eval.runtime_error", f"judging: {exc}") from exc
    records = await asyncio.to_thread(write_jsonl, ctx.artifacts, a.judged.records)
    await ctx.emit(JudgeValidated(judge=a.judge, test_set_sha256=test_sha, **a.validation), step="judge")
    base_report = a.baseline_report.model_copy(update={"metrics": {**a.baseline_report.metrics, "baseline": baseline_info}})
    await ctx.emit(GateDecided(
        target=plan.target, passed=a.passed, failed=a.failed, candidate=candidate.model, baseline=baseline.model,
        baseline_kind=baseline_kind, records=records, test_set_sha256=test_sha, judge_id=a.judge.judge_id,
        evidence=a.evidence,
    ), step="gate")
    log.info("gate_decided", passed=a.passed, failed=[f.reason_code for f in a.failed], baseline=baseline.model)
    await ctx.emit(EvalCompleted(
        plan=plan, base_model=p.base_model, adapter=p.adapter, eval=test_ref,
        candidate=_summary(a.candidate_report), base=_summary(base_report), label_space=space,
        baseline_kind=baseline_kind, candidate_report=a.candidate_report, baseline_report=base_report,
        records=records, test_set_sha256=test_sha, judge=a.judge, gate_passed=a.passed, warnings=notices + a.warnings,
    ))


def build(settings: EvaluatorSettings | None = None) -> Service:
    svc = Service("evaluator", settings or EvaluatorSettings())
    svc.consume(TRAINED, on_trained)
    return svc


def main() -> None:
    build().run()
