"""Prep service: `ingest.committed` -> clean, split, manifest -> `prep.cleaned` + `prep.prepared` / `prep.failed`.

The target's test set (D14): the last valid `prep.test_set_frozen` on the target's own subject is the
one in force; a run reuses it unless its plan asks for a new one (`new_test_set`) or brings one
(`eval_locator`). A run that makes a test set freezes it with the subject's expected last sequence:
when another run froze one first (two first runs racing), it prepares again against that one, so both
are judged on the same rows (`prep.test_set_conflict`).
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

from nats.js.errors import NotFoundError

from contracts import subjects
from contracts.events import PrepCleaned, PrepFailed, PrepPrepared, TestSetFrozen, TestSetRef
from contracts.registry import ContractError, decode
from services.common.app import Service
from services.common.artifacts import ArtifactIntegrityError
from services.common.bus import ExpectedSequenceMismatch, publish
from services.common.delivery import ConsumerSpec, StageContext, StageError
from services.common.logging import get_logger
from services.common.jsonl import read_jsonl
from services.prep.domain import FrozenTestSet, InsufficientData, PrepBlocked, UnusableTestSet, prepare
from services.prep.settings import PrepSettings

log = get_logger(__name__)

COMMITTED = ConsumerSpec(service="prep", durable="prep-ingest-committed",
                         subject=subjects.subject_for("ingest.committed", kind="event"),
                         accepts=("ingest.committed",), failure_type=PrepFailed, stage="prep")

MAX_FREEZE_ATTEMPTS = 5


def hosted_cost_basis(plan, settings: PrepSettings) -> tuple[str, int]:
    """The model and epochs the hosted cost estimate is for: the run's own hosted settings when it
    trains on a hosted backend (a run on gpt-4o was priced as gpt-4o-mini), else the service's defaults
    (what a hosted fine-tune of this dataset would cost by default)."""
    if plan.backend == "local" or plan.hosted is None:
        return settings.hosted_model, settings.hosted_epochs
    return plan.hosted.model, plan.hosted.n_epochs or settings.hosted_epochs


def frozen_test_set_of(data: bytes, target: str) -> tuple[uuid.UUID | None, TestSetRef] | None:
    """The message as a test set frozen for `target` ((its causation id, the record)), or None. Anyone
    on the bus may publish on the target's subject: what is not a valid `prep.test_set_frozen` of this
    target is not a test set (read as one, it would fail every later run of the target)."""
    try:
        env, payload = decode(data)
    except ContractError:
        return None
    if env.type != subjects.TEST_SET_FROZEN or payload.test_set.target != target:
        return None
    return env.causation_id, payload.test_set


@dataclass(frozen=True)
class TargetTestSets:
    last_seq: int                 # the stream sequence of the target's last message: what a freeze expects
    in_force: TestSetRef | None   # the last valid frozen test set
    ours: TestSetRef | None       # the one this trigger froze (an earlier delivery of it), if any


async def target_test_sets(js, target: str, trigger_id: uuid.UUID) -> TargetTestSets:
    """Read the target's test-set subject: its last sequence, the test set in force, and the one this
    trigger froze. Every message is looked at (freezes are few): a redelivery must find its own freeze
    even when another run froze one after it."""
    target_filter = subjects.test_set_filter(target)
    try:
        last = await js.get_last_msg(subjects.STREAM, target_filter)
    except NotFoundError:
        return TargetTestSets(0, None, None)
    in_force = ours = None
    seq = 1
    while seq <= last.seq:
        try:
            msg = await js.get_msg(subjects.STREAM, seq, subject=target_filter, next=True)
        except NotFoundError:
            break
        if msg.seq > last.seq:
            break
        found = frozen_test_set_of(msg.data, target)
        if found is not None:
            causation, in_force = found
            if causation == trigger_id:
                ours = in_force
        seq = msg.seq + 1
    return TargetTestSets(last.seq, in_force, ours)


def read_frozen(ctx: StageContext, test_set: TestSetRef) -> FrozenTestSet:
    try:
        if test_set.sha256 != test_set.artifact.sha256:
            raise ArtifactIntegrityError(f"the record names sha256 {test_set.sha256[:12]}, its artifact "
                                         f"{test_set.artifact.sha256[:12]}")
        return FrozenTestSet(test_set, read_jsonl(ctx.artifacts, test_set.artifact))
    except (ArtifactIntegrityError, ValueError) as exc:
        raise StageError("prep.test_set_unreadable",
                         f"the test set frozen for target {test_set.target} by run {test_set.frozen_by_run_id} "
                         f"({test_set.sha256[:12]}) is unreadable: {exc}; run with --new-test-set to freeze a new one"
                         ) from exc


async def on_committed(ctx: StageContext) -> None:
    p = ctx.payload
    s: PrepSettings = ctx.settings  # type: ignore[assignment]
    plan = p.plan if p.plan.mapping or not p.mapping else p.plan.model_copy(update={"mapping": p.mapping})
    target, trigger = plan.target, ctx.envelope.event_id
    # a run that asks for a new test set, or brings its own, makes one whatever is in force
    makes_its_own = plan.new_test_set or plan.eval_locator is not None
    model, epochs = hosted_cost_basis(plan, s)

    def read_source():
        return (read_jsonl(ctx.artifacts, p.dataset),
                read_jsonl(ctx.artifacts, p.eval_source.dataset) if p.eval_source else None)

    def work(rows, eval_rows, frozen):
        try:
            return prepare(rows, plan, ctx.artifacts, eval_rows=eval_rows, frozen_test=frozen, base_policy=s.policy(),
                           source_sha256=p.dataset.sha256, hosted_model=model, hosted_epochs=epochs)
        except (InsufficientData, PrepBlocked, UnusableTestSet) as exc:
            raise StageError(exc.reason_code, str(exc)) from exc

    async with ctx.keep_alive():
        try:
            rows, eval_rows = await asyncio.to_thread(read_source)
        except ArtifactIntegrityError as exc:
            raise StageError("prep.artifact_unreadable", str(exc)) from exc
        fresh = None  # this run's own three-way split, made once
        for attempt in range(1, MAX_FREEZE_ATTEMPTS + 1):
            sets = await target_test_sets(ctx.js, target, trigger)
            reuse = None if sets.ours is not None or makes_its_own else sets.in_force
            frozen = await asyncio.to_thread(read_frozen, ctx, reuse) if reuse is not None else None
            if frozen is None and fresh is not None:
                out = fresh
            else:
                out = await asyncio.to_thread(work, rows, eval_rows, frozen)
                fresh = out if frozen is None else fresh
            if out.test_set is not None:  # the target's frozen test set, reused
                test_set = out.test_set
                break
            if sets.ours is not None:
                # an earlier delivery of this trigger froze the test set: preparing as it did made the same
                # one again (recorded already); should it not have, the recorded one stands
                test_set = sets.ours
                if out.test.sha256 != test_set.sha256:
                    log.warning("test_set_remade_differently", recorded=test_set.sha256, made=out.test.sha256)
                    out = await asyncio.to_thread(work, rows, eval_rows, await asyncio.to_thread(read_frozen, ctx, test_set))
                break
            test_set = TestSetRef(target=target, sha256=out.test.sha256, rows=out.test_rows, artifact=out.test,
                                  origin=out.test_origin, frozen_by_run_id=ctx.envelope.run_id)
            if await freeze(ctx, test_set, out.label_space, sets.last_seq, attempt):
                break
        else:
            raise RuntimeError(f"target {target}: {MAX_FREEZE_ATTEMPTS} test-set freeze conflicts in a row")

    c = out.cleaning
    await ctx.emit(PrepCleaned(
        plan=plan, rows_in=out.rows_in + out.manifest["counts"]["eval_rows_in"],
        rows_kept=out.rows_kept, dropped_by_reason=out.dropped_by_reason, dropped=out.dropped,
        pii_by_kind={k: v for k, v in (c.get("pii_by_kind") or {}).items() if v},
        rows_with_pii=c.get("rows_with_pii", 0),
        stats={k: c[k] for k in ("outlier_share", "pii_row_share", "quality_histogram", "timings_s") if k in c},
    ))
    for w in out.warnings:
        log.warning("data_sufficiency", reason_code=w.reason_code, detail=w.message)
    await ctx.emit(PrepPrepared(
        plan=plan, manifest=out.manifest_ref, train=out.train, eval=out.eval, label_space=out.label_space,
        train_rows=out.train_rows, eval_rows=out.eval_rows, dataset_version=out.manifest["dataset_version"],
        duplicates_dropped=sum(v for k, v in out.dropped_by_reason.items()
                               if k in ("cleaning.exact_duplicate", "cleaning.near_duplicate", "cleaning.conflicting_labels")),
        openai_train=out.openai_train, openai_eval=out.openai_eval,
        token_estimate=out.cost.training_tokens if out.cost else None, cost_estimate=out.cost, warnings=out.warnings,
        test=out.test, test_rows=out.test_rows, test_set=test_set,
    ))


REASONS = {"first_run": "the target's first run", "new_test_set": "a new test set was asked for (--new-test-set)",
           "eval_locator": "the run brought its own eval set (--eval-locator)"}


async def freeze(ctx: StageContext, test_set: TestSetRef, label_space: list[str], last_seq: int, attempt: int) -> bool:
    """Publish the target's new test set, expecting the subject's last sequence to be `last_seq`;
    False when another writer appended first. The event id derives from the trigger (D3): a retry
    after a conflict publishes the same event, which the server never stored."""
    env = ctx.envelope_for(TestSetFrozen(test_set=test_set, label_space=label_space,
                                         reason=REASONS.get(test_set.origin, "")))
    try:
        await publish(ctx.js, env, subjects.subject_for(env.type, kind="event", target=test_set.target),
                      expected_last_subject_seq=last_seq,
                      expected_subject_filter=subjects.test_set_filter(test_set.target))
    except ExpectedSequenceMismatch:
        log.warning("test_set_conflict", attempt=attempt, reason_code="prep.test_set_conflict", target=test_set.target)
        return False
    log.info("test_set_frozen", target=test_set.target, sha256=test_set.sha256, rows=test_set.rows,
             origin=test_set.origin, emitted_event_id=str(env.event_id))
    return True


def build(settings: PrepSettings | None = None) -> Service:
    svc = Service("prep", settings or PrepSettings())
    svc.consume(COMMITTED, on_committed)
    return svc


def main() -> None:
    build().run()
