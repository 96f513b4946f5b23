"""The timeline projection: per run, its events in order and each stage's status.

Reads run_events (never the bus), folds a batch in pure Python, writes the rows and its checkpoint
in one transaction (D8). Folding is order-preserving and split-independent — applying events in
batches of any size gives the same rows — so a rebuild from position 0 equals the live projection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from services.audit import exactjson
from services.audit.projections import checkpoints
from services.audit.projections.checkpoints import ProjectionError

NAME = "timeline"

STAGE_OF_PREFIX = {
    "run": "run",
    "ingest": "ingest",
    "prep": "prep",
    "training": "trainer",
    "preflight": "trainer",
    "eval": "evaluator",
    "judge": "evaluator",
    "export": "export",
    "registry": "registry",
    "bus": "bus",
}
STAGES = ("ingest", "prep", "trainer", "evaluator", "export", "registry")

_SUCCEEDED = {
    "ingest.committed", "prep.prepared", "training.completed", "eval.completed", "export.completed",
    "registry.version_registered", "ingest.introspected", "ingest.dry_run_completed",
    "registry.hosted_version_registered",
}
# Events that end a run when they come from the last stage its plan goes through (`plan.until`;
# plans before v2 had no `until` and went through the registry). Introspection and dry-run
# commands are runs of one step.
_ENDS_A_RUN_ALWAYS = {"registry.version_registered", "ingest.introspected", "ingest.dry_run_completed",
                      "registry.hosted_version_registered"}
_STARTS_A_RUN = {"run.start", "ingest.commit", "ingest.introspect", "ingest.dry_run"}
_RUNNING = {"preflight.passed", "training.started", "training.progress", "training.checkpointed", "training.resumed",
            "training.restarted", "training.trial_completed", "training.tuning_completed"}
# Events that fail their stage and the run without a `.failed` name.
_FAILS = {"preflight.blocked"}


def stage_of(event_type: str) -> str:
    prefix = event_type.split(".", 1)[0]
    return STAGE_OF_PREFIX.get(prefix, prefix)


def consumer_stage(consumer: str | None) -> str | None:
    """The stage whose durable consumer this is (`trainer-prep-prepared` -> trainer: a stage's durable
    names start with the stage, which ConsumerSpec checks), or None (the recorder, anything else)."""
    stage = (consumer or "").split("-", 1)[0]
    return stage if stage in STAGES else None


def fails(event_type: str) -> bool:
    """Whether the event fails its stage and its run."""
    return event_type.endswith(".failed") or event_type in _FAILS


def stage_status(event_type: str) -> str | None:
    """The status an event puts its stage in, or None when it does not change it."""
    if fails(event_type):
        return "failed"
    if event_type == "training.paused":
        return "paused"
    if event_type in _SUCCEEDED:
        return "succeeded"
    if event_type in _RUNNING:
        return "running"
    return None


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _gib(n: int, decimals: int) -> str:
    """Bytes as GiB. The contract bounds these integers only below: one too large for a float (valid, if
    absurd) raised OverflowError here, and the projection stopped on it for every run."""
    try:
        return f"{n / 2**30:.{decimals}f}"
    except OverflowError:
        return str(n // 2**30)


# The optional parts of a progress line, in order: (payload field, how it reads).
_PROGRESS_PARTS = (
    ("loss", lambda v: f"loss {_fmt(v)}"),
    ("eval_loss", lambda v: f"eval loss {_fmt(v)}"),
    ("learning_rate", lambda v: f"lr {v:.2e}"),
    ("examples_per_s", lambda v: f"{v:.1f} ex/s"),
    ("tokens", lambda v: f"{v} tokens"),
    ("eta_s", lambda v: f"eta {v:.0f}s"),
)


def _progress(p: dict) -> str:
    """A progress line from whatever the backend reported (hosted jobs report fewer fields)."""
    parts = [f"step {p['step']}" + (f"/{p['max_steps']}" if p.get("max_steps") else "")]
    parts += [fmt(p[name]) for name, fmt in _PROGRESS_PARTS if p.get(name) is not None]
    return " ".join(parts)


def _started(p: dict) -> str:
    if p.get("hosted_job_id"):
        cost = p.get("cost_estimate")
        return (f"hosted fine-tune of {p['base_model']} on {p.get('backend', 'openai')}: job {p['hosted_job_id']} on "
                f"{p['train_rows']} rows" + (f", estimated ${cost['usd']:.2f}" if cost else ""))
    what = f"{p['recipe']}: " if p.get("recipe") else ""
    resumed = f", resuming from step {p['resumed_from_step']}" if p.get("resumed_from_step") else ""
    return (f"{what}LoRA fine-tune of {model_name(p['base_model'])} for {p['max_steps']} steps on "
            f"{p['train_rows']} rows{resumed}")


def _completed(p: dict) -> str:
    if p.get("hosted_job_id"):
        return (f"hosted job {p['hosted_job_id']} succeeded: {p.get('fine_tuned_model')}, "
                f"{p.get('trained_tokens')} trained tokens in {p['wall_s']:.0f}s")
    line = f"trained {p['steps']} steps in {p['wall_s']:.1f}s, final loss {_fmt(p['final_loss'])}"
    if p.get("best_step") is not None:
        line += f"; best {p.get('metric_name')} {_fmt(p.get('best_metric'))} at step {p['best_step']} (exported)"
    if p.get("stopped_early"):
        line += "; stopped early"
    if p.get("resumed_from_step"):
        line += f"; resumed from step {p['resumed_from_step']}"
    return line


def _settings(settings: dict) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(settings.items()))


def _trial(p: dict) -> str:
    head = f"trial {p['trial']}/{p['trials']}"
    if p["status"] == "completed":
        at = f" at step {p['best_step']}" if p.get("best_step") is not None else ""
        result = f"validation {p.get('metric_name')} {_fmt(p.get('metric'))}{at}" + (" (best so far)" if p.get("is_best") else "")
    else:
        result = {"diverged": "diverged", "cut_off": "cut off by the budget"}.get(p["status"], p["status"])
    return f"{head}: {result}, {p['wall_s']:.1f}s; {_settings(p['settings'])}"


def _tuning(p: dict) -> str:
    stop = "; the budget fit no more trials" if p.get("stopped_by_budget") else ""
    if p.get("best_trial") is None:
        return (f"tuning: no trial scored in {p['trials_run']} of {p['trials_planned']}; the recipe's own settings "
                f"are trained{stop}")
    base = (f" (recipe's own: {_fmt(p['baseline_metric'])})" if p.get("baseline_metric") is not None
            and p["best_trial"] != 1 else "")
    return (f"tuning: trial {p['best_trial']} of {p['trials_run']} run won, validation {p.get('metric_name')} "
            f"{_fmt(p.get('best_metric'))}{base}; the trials took {p['wall_s']:.0f}s (budget {p['budget_minutes']:g} min){stop}; "
            f"training the final model with {_settings(p['best_settings'])}")


def model_name(base_model: str) -> str:
    """A readable name for a model path: the bundled MiniLM lives in `<package>/model`."""
    parts = [x for x in base_model.rstrip("/").split("/") if x]
    if len(parts) >= 2 and parts[-1] == "model":
        return parts[-2]
    return parts[-1] if parts else base_model


def summarize(event_type: str, payload: dict, reason_code: str | None) -> str:
    """One human line per event, for the timeline."""
    p = payload
    match event_type:
        case "run.start" | "ingest.commit":
            plan = p["plan"]
            until = plan.get("until", "registry")
            return (f"{'run' if event_type == 'run.start' else 'ingest commit'} requested: {plan['locator']} -> target "
                    f"{plan['target']}" + ("" if until == "registry" else f" (until {until})"))
        case "ingest.introspect":
            return f"introspection requested: {p['locator']}"
        case "ingest.dry_run":
            return f"dry run requested: {p['locator']}"
        case "ingest.introspected":
            hyps = p["hypotheses"]
            best = f"best {hyps[0]['shape']} at {hyps[0]['confidence']:.2f}" if hyps else "no proposal"
            return f"introspected {p['sample_rows']} sample rows: {best}" + ("" if p["auto_pick"] else " (below 0.80: not picked)")
        case "ingest.dry_run_completed":
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(p["rejected_by_reason"].items()))
            return (f"dry run: read {p['rows_read']} rows: {p['rows_accepted']} would be accepted, "
                    f"{p['rows_rejected']} rejected" + (f" ({reasons})" if reasons else ""))
        case "prep.cleaned":
            reasons = ", ".join(f"{k.split('.', 1)[-1]}: {v}" for k, v in sorted(p["dropped_by_reason"].items()))
            pii = sum(p["pii_by_kind"].values())
            return (f"cleaned {p['rows_in']} rows: kept {p['rows_kept']}" + (f", dropped {reasons}" if reasons else "")
                    + (f"; {pii} PII values scrubbed in {p['rows_with_pii']} rows" if pii else ""))
        case "ingest.committed":
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(p["rejected_by_reason"].items()))
            return (f"read {p['rows_read']} rows: {p['rows_accepted']} accepted, {p['rows_rejected']} rejected"
                    + (f" ({reasons})" if reasons else ""))
        case "prep.prepared":
            dropped = p.get("duplicates_dropped", 0)
            warnings = [w["reason_code"] for w in p.get("warnings", [])]
            test = p.get("test_set") or {}
            split = (f"{p['train_rows']} train / {p['eval_rows']} validation / {p.get('test_rows', 0)} test"
                     + (f" (test set {test['sha256'][:12]}, {test['origin']})" if test else "")
                     if p.get("test") else f"{p['train_rows']} train / {p['eval_rows']} eval")
            return (f"split {split} over {len(p['label_space'])} labels"
                    + (f" after dropping {dropped} duplicate rows" if dropped else "")
                    + f", dataset {p['dataset_version']}" + (f"; warnings: {', '.join(warnings)}" if warnings else ""))
        case "preflight.passed":
            tp = p["train_plan"]
            warn = [w["reason_code"] for w in p.get("warnings", [])]
            mem = p.get("memory") or {}
            fit = (f", needs ~{_gib(mem['total'], 2)} GiB of {_gib(mem['available'], 1)} available"
                   if mem.get("available") else "")
            return (f"preflight passed ({p.get('mode', 'strict')}): {tp['recipe']} on {tp['device']}, {tp['steps']} "
                    f"steps{fit}" + (f"; warnings: {', '.join(warn)}" if warn else ""))
        case "preflight.blocked":
            return "preflight blocked: " + "; ".join(f"[{b['reason_code']}] {b['message']}" for b in p["blockers"])[:500]
        case "training.started":
            return _started(p)
        case "training.progress":
            return _progress(p)
        case "training.checkpointed":
            metric = f" {p['metric_name']} {_fmt(p['metric'])}" if p.get("metric_name") else ""
            return f"checkpoint at step {p['step']}{metric}" + (" (best so far)" if p.get("is_best") else "")
        case "training.trial_completed":
            return _trial(p)
        case "training.tuning_completed":
            return _tuning(p)
        case "training.restarted":
            at = (f"from its checkpoint at step {p['resumed_from_step']}" if p.get("resumed_from_step")
                  else "from step 0 (no checkpoint)")
            return f"training restarted on delivery {p['delivery']} of its trigger, {at}"
        case "projection.replayed":
            diff = sum(p["differences"].values())
            return (f"projection {p['projection']} v{p['version']} rebuilt by {p['requested_by']} up to position "
                    f"{p['to_position']}: {'identical' if not diff else f'{diff} rows differ'}, {p['outcome']}")
        case "store.replayed":
            diff = sum(p["differences"].values())
            return (f"store rebuilt from the stream into {p['into']} by {p['requested_by']}: positions "
                    f"{p['compared_from']}..{p['compared_to']} compared, "
                    + ("the bus and the store agree" if p["outcome"] == "identical" else
                       f"{diff} differences" if p["outcome"] == "differs" else "failed"))
        case "consumer.replayed":
            start = f"sequence {p['from_sequence']}" if p.get("from_sequence") else f"time {p.get('from_time')}"
            if p["mode"] == "in_place":
                return f"{p['durable']} rewound to {start} by {p['requested_by']}: {p['inputs']} messages again"
            diff = sum(p["differences"].values())
            return (f"{p['durable']} replayed in a sandbox from {start} by {p['requested_by']}: {p['inputs']} inputs, "
                    + (f"{diff} outputs differ from history" if diff else "outputs as recorded"
                       if p["outcome"] != "failed" else "failed"))
        case "run.replayed":
            return (f"re-run of {p['origin_run_id']} from {p['from_stage']} by {p['requested_by']}: its "
                    f"{p['trigger_type']} re-issued with the same inputs")
        case "training.paused" | "training.resumed":
            at = f" at step {p['step']}" if p.get("step") is not None else ""
            return f"{event_type.split('.')[1]} by {p['requested_by']}{at}"
        case "training.cancel" | "training.pause" | "training.resume":
            return f"{event_type.split('.')[1]} requested by {p['requested_by']}" + (
                f": {p['reason']}" if p.get("reason") else "")
        case "training.completed":
            return _completed(p)
        case "eval.completed":
            c, b = p["candidate"], p["base"]
            against = f"{p['baseline_kind']} baseline" if p.get("baseline_kind", "base_model") != "base_model" else "base"
            warn = [w["reason_code"] for w in p.get("warnings", [])]
            return (f"candidate accuracy {_fmt(c['accuracy'])} macro-F1 {_fmt(c['macro_f1'])} vs {against} "
                    f"accuracy {_fmt(b['accuracy'])} macro-F1 {_fmt(b['macro_f1'])} (n={c['n']})"
                    + (f"; warnings: {', '.join(warn)}" if warn else ""))
        case "judge.validated":
            return (f"judge {p['judge']['judge_id']} {'validated' if p['passed'] else 'NOT validated'}: agreement "
                    f"{_fmt(p['accuracy'])}, kappa {_fmt(p['cohen_kappa'])} on {p['n_gold']} gold / {p['n_wrong']} wrong")
        case "eval.gate_decided":
            ev = p.get("evidence") or {}
            why = "" if p["passed"] else ": " + ", ".join(f["reason_code"] for f in p["failed"])
            return (f"gate {'passed' if p['passed'] else 'failed'}{why} (judge mean {_fmt(ev.get('candidate_mean'))} vs "
                    f"{p['baseline']} {_fmt(ev.get('baseline_mean'))}, delta {_fmt(ev.get('delta'))}, "
                    f"p={_fmt(ev.get('p_value'))}, n={ev.get('n')})")
        case "prep.test_set_frozen":
            t = p["test_set"]
            return f"test set of {t['target']} frozen ({t['origin']}): {t['rows']} rows, {t['sha256'][:12]}"
        case "export.completed":
            return f"exported {len(p['files'])} files as {p['format']} ({p['export']['sha256'][:12]})"
        case "registry.version_registered":
            return f"registered {p['target']} v{p['version']} as {p['status']}"
        case "registry.hosted_version_registered":
            return (f"registered {p['target']} v{p['version']} as {p['status']}: {p['fine_tuned_model']} "
                    f"(hosted job {p['hosted_job_id']})")
        case "training.provider_event":
            return f"archived {len(p['events'])} {p['provider']} events of {p['hosted_job_id']}"
        case "training.provider_job":
            return f"{p['provider']} job {p['hosted_job_id']} {p['status']}"
        case "training.provider_archived":
            kept = sum(1 for f in p["files"] if f.get("artifact"))
            return (f"{'imported' if p.get('imported') else 'archived'} {p['provider']} job {p['hosted_job_id']} "
                    f"({p['status']}): {p['events_archived']} events, {len(p['checkpoints'])} checkpoints, "
                    f"{kept} of {len(p['files'])} files kept")
        case "registry.validated":
            return f"{p['target']} v{p['version']} validated by its gate"
        case "registry.rejected":
            why = ", ".join(f["reason_code"] for f in p.get("failed") or []) or p.get("reason") or ""
            return f"{p['target']} v{p['version']} rejected" + (f": {why}" if why else "")
        case "registry.promoted":
            demoted = f" (v{p['demoted']} archived)" if p.get("demoted") else ""
            how = " automatically" if p.get("auto") else f" by {p.get('actor')}" if p.get("actor") else ""
            return (f"{p['target']} v{p['version']} promoted to production{demoted}{how}"
                    + (" with --override" if p.get("override") else "") + (f": {p['reason']}" if p.get("reason") else ""))
        case "registry.rolled_back" | "registry.restored":
            verb = "rolled back to" if event_type == "registry.rolled_back" else "restored"
            demoted = f" (v{p['demoted']} archived)" if p.get("demoted") else ""
            return f"{p['target']} {verb} v{p['version']}{demoted}" + (f": {p['reason']}" if p.get("reason") else "")
        case "registry.rollout_set":
            return f"{p['target']} v{p['version']} rollout {p['previous_percent']}% -> {p['percent']}%"
        case "gate.replayed":
            return (f"gate replay asked by {p['requested_by']} (policy {p['policy_sha256'][:12]}"
                    + (f", target {p['target']}" if p.get("target") else "") + f"): {len(p['flipped'])} of "
                    f"{p['replayed']} decisions flip, {p.get('unreplayable', 0)} not replayable")
        case "registry.command_refused":
            return f"[{reason_code}] {p['command']} on {p['target']} refused"
        case "bus.message_dead_lettered":
            return f"[{reason_code}] {p['consumer']} dead-lettered stream seq {p['stream_sequence']}: {p['error'][:200]}"
    if event_type.endswith(".failed"):
        return f"[{reason_code}] {p.get('message', '')[:300]}"
    return event_type


@dataclass
class RunFold:
    correlation_id: str
    started_at: datetime
    updated_at: datetime
    last_position: int
    status: str | None = None
    target: str | None = None
    locator: str | None = None
    reason_code: str | None = None
    failure: str | None = None


@dataclass
class StageFold:
    status: str
    started_at: datetime
    ended_at: datetime | None
    last_type: str
    last_position: int
    reason_code: str | None
    detail: str


@dataclass
class TimelineBatch:
    entries: list[tuple] = field(default_factory=list)
    runs: dict[str, RunFold] = field(default_factory=dict)
    stages: dict[tuple[str, str], StageFold] = field(default_factory=dict)
    last_position: int = 0


def fold(rows: list) -> TimelineBatch:
    """Fold run_events rows (in position order) into the rows this batch writes."""
    b = TimelineBatch()
    for r in rows:
        pos, etype, run_id, at = r["global_position"], r["type"], r["run_id"], r["occurred_at"]
        try:
            payload = r["payload"] if isinstance(r["payload"], dict) else exactjson.loads(r["payload"])
            stage = stage_of(etype)
            summary = summarize(etype, payload, r["reason_code"])
            b.entries.append((pos, run_id, r["event_id"], etype, stage, r["severity"], r["reason_code"], at, summary))
            run = b.runs.get(run_id)
            if run is None:
                run = b.runs[run_id] = RunFold(r["correlation_id"], at, at, pos)
            run.updated_at, run.last_position = at, pos
            if etype in _STARTS_A_RUN:
                plan = payload.get("plan") or {}
                # the first start names the run's target and source, as the upsert keeps them across
                # batches (coalesce): folding must not depend on where a batch ends
                run.target = run.target or plan.get("target")
                run.locator = run.locator or plan.get("locator") or payload.get("locator")
                run.status = run.status or "running"
            status = stage_status(etype) if stage in STAGES else None
            row_stage = stage  # the stage row the event updates
            if etype == "bus.message_dead_lettered" and (gave_up := consumer_stage(payload.get("consumer"))):
                # a stage's own consumer gave up on its trigger: that stage failed (it may never have started)
                row_stage, status = gave_up, "failed"
            if etype == "bus.message_dead_lettered" or fails(etype):
                if run.status != "failed":  # the first failure names the run's failure
                    run.status, run.reason_code, run.failure = "failed", r["reason_code"], summary
            elif run.status != "failed" and (etype in _ENDS_A_RUN_ALWAYS or (
                    etype in _SUCCEEDED and (payload.get("plan") or {}).get("until", "registry") == stage)):
                run.status = "succeeded"
            elif status is not None and run.status not in ("failed", "succeeded"):
                run.status = "running"
            if status is not None:
                prev = b.stages.get((run_id, row_stage))
                b.stages[(run_id, row_stage)] = StageFold(
                    status=status,
                    started_at=prev.started_at if prev else at,
                    ended_at=at if status in ("succeeded", "failed") else None,
                    last_type=etype,
                    last_position=pos,
                    reason_code=r["reason_code"] if status == "failed" else None,
                    detail=summary,
                )
        except Exception as exc:  # noqa: BLE001 - any bug here must stop the projection at this position
            raise ProjectionError(pos, f"{etype}: {exc!r}") from exc
        b.last_position = pos
    return b


_UPSERT_RUN = """
INSERT INTO timeline_runs AS t (run_id, correlation_id, target, locator, status, started_at, updated_at,
                                last_position, reason_code, failure)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[],
                     $7::timestamptz[], $8::bigint[], $9::text[], $10::text[])
ON CONFLICT (run_id) DO UPDATE SET
  target = coalesce(t.target, EXCLUDED.target),
  locator = coalesce(t.locator, EXCLUDED.locator),
  status = {status},
  updated_at = EXCLUDED.updated_at,
  last_position = EXCLUDED.last_position,
  reason_code = coalesce(t.reason_code, EXCLUDED.reason_code),
  failure = coalesce(t.failure, EXCLUDED.failure)
"""
# Runs whose status the batch changed: failed is final, and succeeded is not undone by a late
# running event (as in fold()). Runs it did not change keep theirs ('running' if new).
_UPSERT_RUN_STATUS = _UPSERT_RUN.format(
    status="CASE WHEN t.status = 'failed' OR (t.status = 'succeeded' AND EXCLUDED.status = 'running')"
           " THEN t.status ELSE EXCLUDED.status END")
_UPSERT_RUN_KEEP_STATUS = _UPSERT_RUN.format(status="t.status")

_UPSERT_STAGE = """
INSERT INTO timeline_stages AS s (run_id, stage, status, started_at, ended_at, last_type, last_position,
                                  reason_code, detail)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[], $6::text[],
                     $7::bigint[], $8::text[], $9::text[])
ON CONFLICT (run_id, stage) DO UPDATE SET
  status = EXCLUDED.status, ended_at = EXCLUDED.ended_at, last_type = EXCLUDED.last_type,
  last_position = EXCLUDED.last_position, reason_code = EXCLUDED.reason_code, detail = EXCLUDED.detail
"""

_ENTRY_COLUMNS = ("global_position", "run_id", "event_id", "type", "stage", "severity", "reason_code",
                  "occurred_at", "summary")


def _columns(rows: list[tuple]) -> list[list]:
    """Rows to per-column arrays, for one INSERT ... SELECT FROM unnest(...) per batch."""
    return [list(col) for col in zip(*rows)]


_RUN_COLUMNS = ("run_id", "correlation_id", "target", "locator", "status", "started_at", "updated_at",
                "last_position", "reason_code", "failure")
_STAGE_COLUMNS = ("run_id", "stage", "status", "started_at", "ended_at", "last_type", "last_position",
                  "reason_code", "detail")

# Which of a batch's runs and stages the projection already has: those that began in an earlier batch.
_EXISTING = """
SELECT run_id, NULL AS stage FROM timeline_runs WHERE run_id = ANY($1::text[])
UNION ALL
SELECT run_id, stage FROM timeline_stages WHERE run_id = ANY($1::text[])
"""


async def _apply(conn: asyncpg.Connection, b: TimelineBatch, checkpoint: int) -> None:
    """Write a folded batch and the checkpoint after it, in the caller's transaction.

    Runs and stages new to the projection are COPYed, as the upserts' INSERT would write them, for
    about half an upsert's cost; only those that continue from an earlier batch are upserted. What is
    new is read first, and stays true until the commit: the caller holds the checkpoint's row lock
    (catch_up and rebuild both take it), and nothing else writes these tables.
    """
    if b.entries:
        await conn.copy_records_to_table("timeline_entries", records=b.entries, columns=_ENTRY_COLUMNS)
    existing_runs, existing_stages = set(), set()
    if b.runs:
        for run_id, stage in await conn.fetch(_EXISTING, list(b.runs)):
            if stage is None:
                existing_runs.add(run_id)
            else:
                existing_stages.add((run_id, stage))
    new_runs: list[tuple] = []
    continued_runs: dict[bool, list[tuple]] = {True: [], False: []}  # by whether the batch changed its status
    for run_id, f in b.runs.items():
        row = (run_id, f.correlation_id, f.target, f.locator, f.status or "running", f.started_at, f.updated_at,
               f.last_position, f.reason_code, f.failure)
        if run_id in existing_runs:
            continued_runs[f.status is not None].append(row)
        else:
            new_runs.append(row)
    if new_runs:
        await conn.copy_records_to_table("timeline_runs", records=new_runs, columns=_RUN_COLUMNS)
    for changed, sql in ((True, _UPSERT_RUN_STATUS), (False, _UPSERT_RUN_KEEP_STATUS)):
        if continued_runs[changed]:
            await conn.execute(sql, *_columns(continued_runs[changed]))
    new_stages: list[tuple] = []
    continued_stages: list[tuple] = []
    for key, f in b.stages.items():
        row = (*key, f.status, f.started_at, f.ended_at, f.last_type, f.last_position, f.reason_code, f.detail)
        (continued_stages if key in existing_stages else new_stages).append(row)
    if new_stages:
        await conn.copy_records_to_table("timeline_stages", records=new_stages, columns=_STAGE_COLUMNS)
    if continued_stages:
        await conn.execute(_UPSERT_STAGE, *_columns(continued_stages))
    await checkpoints.advance(conn, NAME, checkpoint)


async def catch_up(conn: asyncpg.Connection, batch_size: int = 2000, *, until: int | None = None,
                   on_batch=None) -> int:
    """Apply every event past the checkpoint (up to `until`, if given), one transaction per batch; returns
    events applied. `on_batch(events, checkpoint)` is called after each batch commits.

    Stops on an error, recording the failing position, rather than skipping the event (D8).
    """
    return await checkpoints.catch_up(conn, NAME, _apply_batch, batch_size, until=until, on_batch=on_batch)


async def rebuild(conn: asyncpg.Connection, batch_size: int = 5000, *, until: int | None = None) -> int:
    """Drop the projection's rows and replay run_events from position 0, in one transaction.

    Readers keep seeing the old rows until the commit (MVCC), and the live projector waits on the
    checkpoint row lock, so nobody observes a half-built timeline.

    `until`: replay only up to that position and leave the checkpoint there, so that the result can
    be compared with the live projection at its checkpoint while events keep arriving (`tuneline
    rebuild timeline`); the live projector then goes on from there. An error the live projector
    stopped on beyond `until` stays recorded.
    """
    return await checkpoints.rebuild(conn, NAME, ("timeline_entries", "timeline_stages", "timeline_runs"),
                                     _apply_batch, batch_size, until=until)


async def _apply_batch(conn: asyncpg.Connection, rows: list, checkpoint: int) -> None:
    await _apply(conn, fold(rows), checkpoint)


async def snapshot(conn: asyncpg.Connection) -> dict[str, list[tuple]]:
    """Every row of the projection, ordered: what a rebuild must reproduce."""
    return {
        "timeline_runs": [tuple(r) for r in await conn.fetch("SELECT * FROM timeline_runs ORDER BY run_id")],
        "timeline_stages": [tuple(r) for r in await conn.fetch("SELECT * FROM timeline_stages ORDER BY run_id, stage")],
        "timeline_entries": [tuple(r) for r in await conn.fetch("SELECT * FROM timeline_entries ORDER BY global_position")],
    }


async def run_timeline(conn: asyncpg.Connection, run_id: str) -> dict | None:
    run = await conn.fetchrow("SELECT * FROM timeline_runs WHERE run_id = $1", run_id)
    if run is None:
        return None
    stages = await conn.fetch("SELECT * FROM timeline_stages WHERE run_id = $1 ORDER BY started_at, stage", run_id)
    entries = await conn.fetch("SELECT * FROM timeline_entries WHERE run_id = $1 ORDER BY global_position", run_id)
    return {"run": dict(run), "stages": [dict(s) for s in stages], "entries": [dict(e) for e in entries]}
