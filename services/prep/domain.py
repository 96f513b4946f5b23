"""Prep: clean the committed rows, split them three ways (D14), and write the dataset version:
train.jsonl, validation (the PrepPrepared `eval` split the trainer evaluates on mid-training),
test.jsonl (the rows the evaluator alone scores, each with its content `row_id`), the OpenAI chat
JSONL of train and validation, every dropped row, and manifest.json, the single source of truth
downstream.

Where the test set comes from:
- none frozen for the target yet (its first run), or the plan asks for a new one: the seeded split
  (stratified by label for classification, by row otherwise) holds out `eval_fraction` of the
  cleaned rows as test, then `validation_fraction` of the rest as validation;
- a frozen test set (the target's, passed in): no test rows are split off; every cleaned row that
  equals or nearly equals a test row is dropped (`cleaning.eval_overlap`), the rest is split into
  train and validation;
- an explicit eval set (`eval_locator`): it is the test set, cleaned with the same PII placeholders,
  and overlapping source rows are dropped the same way.

Accounting, asserted: rows_in (+ eval rows in) = train + validation + test (when made here) + dropped
(every dropped row named with its reason in dropped.jsonl). Near-duplicates are removed before the
split, so no text or near-copy of it is on two sides.

With the plan's `min_per_class`, labels with fewer rows than that after cleaning and the overlap check
are dropped before the split (`cleaning.rare_label`, named in a `prep.rare_labels_dropped` warning);
a label the test set holds (frozen or explicit) is kept: that test set is never changed.

Classification shapes are cleaned by :func:`services.prep.clean.clean`; the others (chat, prompt/
completion, JSON extraction, preference pairs) by :func:`services.prep.structured.clean_structured`:
every string of a row normalised and scrubbed, the same dedup, quality, outlier, near-dup and
synthetic-cap steps on a text key of the row. Chat and prompt/completion rows get the OpenAI chat
JSONL and a cost estimate; for the other two the manifest's ``openai_chat`` says why there is none.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from functools import partial

import orjson

from contracts.common import CLASSIFICATION_SHAPES, ArtifactRef, RunPlan
from contracts.errors import ReasonCodedError
from contracts.events import CostEstimate, Notice, TestSetRef
from services.common.artifacts import ArtifactStore
from services.common.jsonl import gc_paused, write_jsonl, write_lines
from services.prep.clean import (PARALLEL_MIN_CHARS, CleaningBlocked, CleaningPolicy, check_eval_overlap, clean,
                                 drop_rare_labels)
from services.prep.formats import (NO_OPENAI_CHAT, OPENAI_CHAT_SHAPES, TRAINING_PRICE_PER_1M, estimate_cost,
                                   estimate_text_tokens, openai_chat_lines, openai_chat_tokens, openai_messages_lines,
                                   openai_messages_tokens, system_prompt)
from services.common.parallel import Forked, workers
from services.prep.pii import Scrubber
from services.prep.structured import check_eval_overlap_structured, clean_structured, row_strings

MIN_ROWS = 10
MIN_ROWS_PER_CLASS = 2  # one to train on, one to test
WARN_ROWS_PER_CLASS = 50
WARN_ROWS_TOTAL = 500


class InsufficientData(ValueError):
    reason_code = "prep.insufficient_data"


class UnusableTestSet(ValueError):
    """The frozen test set's rows are not rows of this run's shape (the target changed shape)."""

    reason_code = "prep.test_set_unreadable"


class PrepBlocked(ReasonCodedError, ValueError):
    """Cleaning refused the dataset (`cleaning.pii_block`, `cleaning.outlier_threshold_exceeded`)."""


def stratified_split(rows: list[dict], eval_fraction: float, seed: int | str) -> tuple[list[dict], list[dict]]:
    """A seeded split per label that holds out round(total * fraction) rows overall (at least one),
    shared among the labels by largest remainder: each label first gets the whole part of its quota
    (its rows * fraction), then the rows still owed go one each to the labels with the largest
    fractional part (ties in a seeded order). A label never gives up its last train row, so every eval
    label is in train; a label whose quota is under one row may get no eval row at all (many tiny
    classes would otherwise inflate the eval share far past the fraction; the data-sufficiency
    warnings name such labels). Within a label, a seeded shuffle picks the eval rows. Both sides keep
    source row order."""
    if len(rows) < MIN_ROWS:
        raise InsufficientData(f"{len(rows)} rows after cleaning; at least {MIN_ROWS} are needed")
    by_label: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_label[r["label"]].append(r)
    if len(by_label) < 2:
        raise InsufficientData(f"only one label ({next(iter(by_label))!r}): a classifier needs at least two")
    small = sorted(label for label, rs in by_label.items() if len(rs) < MIN_ROWS_PER_CLASS)
    if small:
        raise InsufficientData(
            f"{len(small)} label{'s have' if len(small) > 1 else ' has'} fewer than {MIN_ROWS_PER_CLASS} rows after "
            f"cleaning: {_some(small, {label: len(by_label[label]) for label in small})}; pass --min-per-class "
            f"{MIN_ROWS_PER_CLASS} to drop such labels (their rows are counted as cleaning.rare_label)")
    return _stratified_holdout(rows, eval_fraction, seed, at_least_one=True)


def _some(labels: list[str], rows: dict[str, int] | None = None, shown: int = 10) -> str:
    """Up to `shown` labels (with their row counts, if given), and how many there are in all when more."""
    head = ", ".join(f"{label} ({rows[label]})" if rows else str(label) for label in labels[:shown])
    return head + (f", ... ({len(labels)} in all)" if len(labels) > shown else "")


def _stratified_holdout(rows: list[dict], fraction: float, seed: int | str, *, at_least_one: bool
                        ) -> tuple[list[dict], list[dict]]:
    """stratified_split's allocation without its checks: (kept, held out)."""
    by_label: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_label[r["label"]].append(r)
    labels = sorted(by_label)
    spare = {label: len(by_label[label]) - 1 for label in labels}  # one row of each label stays in train
    wanted = round(len(rows) * fraction)
    total = min(sum(spare.values()), max(1, wanted) if at_least_one else wanted)
    quota = {label: len(by_label[label]) * fraction for label in labels}
    n_eval = {label: min(spare[label], int(quota[label])) for label in labels}
    owed = total - sum(n_eval.values())
    tie = {label: hashlib.blake2b(f"{seed}:{label}".encode(), digest_size=8).digest() for label in labels}
    while owed > 0:  # more than one pass only when spare rows cap some labels (a fraction near 1)
        order = sorted((label for label in labels if n_eval[label] < spare[label]),
                       key=lambda label: (n_eval[label] - quota[label], tie[label]))
        for label in order[:owed]:
            n_eval[label] += 1
        owed -= min(owed, len(order))
    train, eval_ = [], []
    for label in labels:
        rs = list(by_label[label])
        random.Random(f"{seed}:{label}").shuffle(rs)
        eval_ += rs[:n_eval[label]]
        train += rs[n_eval[label]:]
    train.sort(key=lambda r: r["row_number"])
    eval_.sort(key=lambda r: r["row_number"])
    return train, eval_


def random_split(rows: list[dict], eval_fraction: float, seed: int | str) -> tuple[list[dict], list[dict]]:
    """Shapes without a label (chat, prompt/completion, ...): a seeded split by row."""
    if len(rows) < MIN_ROWS:
        raise InsufficientData(f"{len(rows)} rows after dedup; at least {MIN_ROWS} are needed")
    return _random_holdout(rows, eval_fraction, seed, at_least_one=True)


def _random_holdout(rows: list[dict], fraction: float, seed: int | str, *, at_least_one: bool
                    ) -> tuple[list[dict], list[dict]]:
    order = sorted(rows, key=lambda r: hashlib.blake2b(f"{seed}:{r['row_number']}".encode(), digest_size=8).digest())
    wanted = round(len(rows) * fraction)
    n_eval = max(0, min(len(rows) - 1, max(1, wanted) if at_least_one else wanted))
    ev = {r["row_number"] for r in order[:n_eval]}
    return [r for r in rows if r["row_number"] not in ev], [r for r in rows if r["row_number"] in ev]


def validation_split(rows: list[dict], validation_fraction: float, seed: int, classification: bool
                     ) -> tuple[list[dict], list[dict]]:
    """The non-test rows as (train, validation): `validation_fraction` of them held out the way the test
    split is (by label, never a label's last train row; by row otherwise), with a seed of its own.
    Validation is empty at fraction 0, or when no label has a row to spare."""
    if not rows:
        return [], []
    holdout = _stratified_holdout if classification else _random_holdout
    return holdout(rows, validation_fraction, f"{seed}:validation", at_least_one=validation_fraction > 0)


def three_way_split(rows: list[dict], test_fraction: float, validation_fraction: float, seed: int,
                    classification: bool) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation, test): the seeded split holds out `test_fraction` of the rows as test, then
    :func:`validation_split` splits the rest. Every test and validation label keeps a train row."""
    rest, test = (stratified_split if classification else random_split)(rows, test_fraction, seed)
    train, validation = validation_split(rest, validation_fraction, seed, classification)
    return train, validation, test


ROW_BOOKKEEPING = ("row_number", "provenance", "quality", "text_sha256", "row_id")


def row_id(row: dict) -> str:
    """A row's stable content id: the first 16 hex digits of the sha256 of its content as canonical
    JSON (every field but the bookkeeping ones), the same in every run and file that holds the row."""
    content = {k: v for k, v in row.items() if k not in ROW_BOOKKEEPING}
    return hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def sufficiency_warnings(rows: list[dict], classification: bool) -> list[Notice]:
    out = []
    if len(rows) < WARN_ROWS_TOTAL:
        out.append(Notice(reason_code="prep.few_rows_total",
                          message=f"{len(rows)} rows in all (train + validation + test); fewer than {WARN_ROWS_TOTAL} "
                                  "rarely fine-tune well"))
    if classification:
        counts = Counter(r["label"] for r in rows)
        small = sorted((n, label) for label, n in counts.items() if n < WARN_ROWS_PER_CLASS)
        if small:
            shown = ", ".join(f"{label} ({n})" for n, label in small[:10])
            out.append(Notice(reason_code="prep.few_rows_for_class",
                              message=f"{len(small)} of {len(counts)} classes have fewer than {WARN_ROWS_PER_CLASS} rows: "
                                      f"{shown}{' ...' if len(small) > 10 else ''}"))
    return out


@dataclass(frozen=True)
class FrozenTestSet:
    """The target's test set in force (D14): its record and its rows, each with its row_id."""

    ref: TestSetRef
    rows: list[dict]


@dataclass
class Prepared:
    """What prep made. `eval` is the validation split (PrepPrepared's name for it); `test` the test
    set, newly made here (`test_set` None: the caller records it, origin `test_origin`) or the frozen
    one reused (`test_set` is its record)."""

    manifest: dict
    manifest_ref: ArtifactRef
    train: ArtifactRef
    eval: ArtifactRef
    dropped: ArtifactRef
    openai_train: ArtifactRef | None
    openai_eval: ArtifactRef | None
    label_space: list[str]
    train_rows: int
    eval_rows: int
    rows_in: int
    dropped_by_reason: dict[str, int]
    cleaning: dict
    warnings: list[Notice] = field(default_factory=list)
    cost: CostEstimate | None = None
    test: ArtifactRef | None = None
    test_rows: int = 0
    test_origin: str = "first_run"
    test_set: TestSetRef | None = None

    @property
    def rows_kept(self) -> int:
        """Cleaned rows of this run's input kept: train, validation, and the test set when made here."""
        return self.train_rows + self.eval_rows + (self.test_rows if self.test_set is None else 0)


def policy_for(plan: RunPlan, base: CleaningPolicy) -> CleaningPolicy:
    c = plan.cleaning
    overrides = {k: v for k, v in {
        "pii_scrub": c.pii_scrub, "pii_block_threshold": c.pii_block_threshold, "near_dup": c.near_dup,
        "quality_threshold": c.quality_threshold, "outlier_block_threshold": c.outlier_block_threshold,
        "synthetic_cap": c.synthetic_cap, "min_per_class": c.min_per_class}.items() if v is not None}
    if c.length_outliers is not None:
        on = base.outlier_sides if base.outlier_sides != "none" else "both"
        overrides["outlier_sides"] = on if c.length_outliers else "none"
    return replace(base, seed=plan.seed, **overrides)


def rare_label_notice(min_per_class: int, gone: dict[str, int], spared: dict[str, int]) -> Notice | None:
    """The warning for `min_per_class`: the labels dropped and those kept under the minimum because the
    test set in force holds them, each with its rows."""
    if not gone and not spared:
        return None
    parts = []
    if gone:
        rows = sum(gone.values())
        parts.append(f"{len(gone)} label{'s' if len(gone) > 1 else ''} with fewer than {min_per_class} rows after "
                     f"cleaning dropped ({rows} row{'s' if rows > 1 else ''}, cleaning.rare_label): "
                     f"{_some(sorted(gone), gone)}")
    if spared:
        parts.append(f"{len(spared)} label{'s' if len(spared) > 1 else ''} under {min_per_class} rows kept: the test "
                     f"set holds {'them' if len(spared) > 1 else 'it'}, and a frozen or given test set is never "
                     f"changed: {_some(sorted(spared), spared)}")
    return Notice(reason_code="prep.rare_labels_dropped", message=f"--min-per-class {min_per_class}: " + "; ".join(parts))


def prepare(rows: list[dict], plan: RunPlan, store: ArtifactStore, *, eval_rows: list[dict] | None = None,
            frozen_test: FrozenTestSet | None = None, base_policy: CleaningPolicy | None = None,
            source_sha256: str = "", hosted_model: str = "gpt-4o-mini-2024-07-18", hosted_epochs: int = 3) -> Prepared:
    """Clean, split three ways (or reuse the frozen test set, or take the explicit eval set as the test
    set), write every artifact and the manifest. `eval_rows` wins over `frozen_test`."""
    with gc_paused():
        return _prepare(rows, plan, store, eval_rows, None if eval_rows is not None else frozen_test, base_policy,
                        source_sha256, hosted_model, hosted_epochs)


def _check_frozen_rows(frozen: FrozenTestSet, shape: str, classification: bool) -> None:
    """The frozen rows must be rows of this run's shape (a target whose data changed shape cannot reuse them)."""
    problem = "it has no rows" if not frozen.rows else None
    for r in frozen.rows:
        try:
            if "row_id" not in r or "row_number" not in r or (classification and "label" not in r):
                raise KeyError("row_id, row_number or label")
            if not classification:
                row_strings(r, shape)
        except (KeyError, TypeError) as exc:
            problem = f"its rows are not {shape} rows (missing {exc})"
            break
    if problem:
        raise UnusableTestSet(
            f"the test set frozen for target {frozen.ref.target} by run {frozen.ref.frozen_by_run_id} cannot be used: "
            f"{problem}; run with --new-test-set to freeze a new one")


def _prepare(rows: list[dict], plan: RunPlan, store: ArtifactStore, eval_rows: list[dict] | None,
             frozen: FrozenTestSet | None, base_policy: CleaningPolicy | None, source_sha256: str, hosted_model: str,
             hosted_epochs: int) -> Prepared:
    shape = plan.mapping.shape if plan.mapping else "single_label_classification"
    classification = shape in CLASSIFICATION_SHAPES
    policy = policy_for(plan, base_policy or CleaningPolicy())
    rows_in, eval_in = len(rows), len(eval_rows or [])
    dropped: list[dict] = []
    if classification:  # the cleaner, the overlap check and the split for this shape
        clean_rows, overlap_check = clean, check_eval_overlap
    else:
        clean_rows = partial(clean_structured, shape=shape)
        overlap_check = partial(check_eval_overlap_structured, shape=shape)
    if frozen is not None:
        _check_frozen_rows(frozen, shape, classification)
    gone: dict[str, int] = {}
    spared: dict[str, int] = {}

    def without_rare(rs: list[dict], test_rows: list[dict]) -> list[dict]:
        """`rs` less the labels under min_per_class; a label the test set holds is kept (the test set in
        force is never changed, and its label needs a train row)."""
        if not classification or policy.min_per_class is None:
            return rs
        counts = Counter(r["label"] for r in rs)
        held = frozenset(r["label"] for r in test_rows)
        out, out_dropped, labels = drop_rare_labels(rs, policy.min_per_class, keep=held)
        dropped.extend(d | {"side": "source"} for d in out_dropped)
        gone.update((label, counts[label]) for label in labels)
        spared.update((label, n) for label, n in counts.items() if label in held and n < policy.min_per_class)
        return out

    try:
        scrubber = Scrubber()  # one scrubber: train and an explicit eval set share placeholders
        res = clean_rows(rows, policy=policy, scrubber=scrubber)
        kept, cleaning_stats = res.kept, {k: v for k, v in res.stats.items() if k != "policy"}
        cleaning_stats["timings_s"] = res.timings
        dropped += [d | {"side": "source"} for d in res.dropped]
        if eval_rows is not None:
            eres = clean_rows(eval_rows, policy=policy, scrubber=scrubber)
            dropped += [d | {"side": "eval"} for d in eres.dropped]
            rest, overlap = overlap_check(kept, eres.kept, policy=policy)
            dropped += [d | {"side": "source"} for d in overlap]
            test = eres.kept
            cleaning_stats["eval"] = {k: eres.stats[k] for k in ("rows_in", "kept", "dropped_by_reason")}
            rest = without_rare(rest, test)
            train, validation = validation_split(rest, plan.validation_fraction, plan.seed, classification)
        elif frozen is not None:
            rest, overlap = overlap_check(kept, frozen.rows, policy=policy)
            dropped += [d | {"side": "source"} for d in overlap]
            rest = without_rare(rest, frozen.rows)
            if len(rest) < MIN_ROWS:
                raise InsufficientData(f"{len(rest)} rows after cleaning and the overlap check with the target's test "
                                       f"set; at least {MIN_ROWS} are needed")
            test = frozen.rows
            train, validation = validation_split(rest, plan.validation_fraction, plan.seed, classification)
        else:
            kept = without_rare(kept, [])
            train, validation, test = three_way_split(kept, plan.eval_fraction, plan.validation_fraction, plan.seed,
                                                      classification)
    except CleaningBlocked as exc:
        raise PrepBlocked(exc.reason_code, exc.message) from exc
    if not train or not test:
        raise InsufficientData(f"after cleaning and the overlap check: {len(train)} train rows, {len(test)} test rows")
    missing = sorted({r["label"] for r in test} - {r["label"] for r in train}) if classification else []
    if missing:
        raise InsufficientData(f"{len(missing)} test label{'s have' if len(missing) > 1 else ' has'} no train row "
                               f"after the overlap check: {_some(missing)}")
    made_test = frozen is None
    assert rows_in + eval_in == len(train) + len(validation) + (len(test) if made_test else 0) + len(dropped), \
        "prep accounting broken"

    labelled = train + validation + test
    label_space = sorted({r["label"] for r in labelled}) if classification else []
    openai_train = openai_eval = None
    tokens = None
    cost = None
    job = None
    if classification:
        sp = system_prompt(label_space)
        # the OpenAI files are written by a forked child meanwhile when the rows are many (same files)
        if workers() >= 2 and sum(len(r["text"]) for r in train + validation) >= PARALLEL_MIN_CHARS:
            job = Forked(_openai_files, store, train, validation, label_space, sp)
    try:
        train_ref, eval_ref = write_jsonl(store, train), write_jsonl(store, validation)
        if made_test:
            test_ref = write_jsonl(store, ({**r, "row_id": row_id(r)} for r in test))
            origin = "eval_locator" if eval_rows is not None else "new_test_set" if plan.new_test_set else "first_run"
        else:
            test_ref, origin = frozen.ref.artifact, frozen.ref.origin
        dropped_ref = write_jsonl(store, sorted(dropped, key=lambda d: (d["side"], d["row_number"])))
        rare = rare_label_notice(policy.min_per_class, gone, spared) if policy.min_per_class else None
        warnings = ([rare] if rare else []) + sufficiency_warnings(labelled, classification)
        by_reason = dict(sorted(Counter(d["reason_code"] for d in dropped).items()))
        version = hashlib.sha256(f"{train_ref.sha256}:{eval_ref.sha256}:{test_ref.sha256}".encode()).hexdigest()[:16]
        class_histogram = {
            "train": dict(sorted(Counter(r["label"] for r in train).items())),
            "validation": dict(sorted(Counter(r["label"] for r in validation).items())),
            "test": dict(sorted(Counter(r["label"] for r in test).items())),
        } if classification else {}
        heads = _head_spaces(labelled) if shape == "multi_field_triage" else {}
        provenance = dict(sorted(Counter(r.get("provenance", "human") for r in labelled).items()))
        if classification:
            done = job.result() if job is not None else None
            openai_train, openai_eval, tokens = done if done is not None else _openai_files(store, train, validation,
                                                                                           label_space, sp)
        elif shape in OPENAI_CHAT_SHAPES:
            openai_train = write_lines(store, openai_messages_lines(train))
            openai_eval = write_lines(store, openai_messages_lines(validation)) if validation else None
            tokens = openai_messages_tokens(train)
    finally:
        if job is not None:
            job.close()
    if (classification or shape in OPENAI_CHAT_SHAPES) and hosted_model in TRAINING_PRICE_PER_1M:
        c = estimate_cost(tokens, hosted_epochs, hosted_model)
        cost = CostEstimate(model=hosted_model, training_tokens=tokens, epochs=hosted_epochs,
                            usd_per_1m_tokens=c["usd_per_1m_tokens"], usd=c["estimate_usd"], buffer=c["buffer"],
                            prices_as_of=c.get("prices_as_of", "") or "")
    # (a model with no known price, e.g. on an OpenAI-compatible host: no estimate, the tokens still counted)
    if eval_rows is not None:
        method = "explicit_eval"
    elif frozen is not None:
        method = "frozen_test_set"
    else:
        method = "stratified" if classification else "random"
    manifest = {
        "dataset_version": version,
        "task_profile": shape,
        "label_space": label_space,
        "output_schema": {"type": "string", "enum": label_space} if classification else {"shape": shape},
        "scoring_mode": "exact_label" if classification else ("json_match" if shape == "json_extraction" else "judge"),
        "mapping": plan.mapping.model_dump(exclude_defaults=True) if plan.mapping else None,
        "source_sha256": source_sha256,
        "split": {"method": method, "test_fraction": plan.eval_fraction if method in ("stratified", "random") else None,
                  "validation_fraction": plan.validation_fraction, "seed": plan.seed, "eval_locator": plan.eval_locator},
        "test_set": {"origin": origin, "sha256": test_ref.sha256, "rows": len(test), "made_by_this_run": made_test,
                     "frozen_by_run_id": None if made_test else frozen.ref.frozen_by_run_id},
        "counts": {"rows_in": rows_in, "eval_rows_in": eval_in, "train": len(train), "validation": len(validation),
                   "test": len(test), "dropped": len(dropped), "dropped_by_reason": by_reason},
        "class_histogram": class_histogram,
        "heads": heads,
        "provenance": provenance,
        "token_estimate": {"openai_chat_train_tokens": tokens, "method": "chars/4 + message overhead"} if tokens is not None
        else _content_tokens(train, shape) if not classification else None,
        "cost_estimate": cost.model_dump() if cost else None,
        # timings vary from run to run: they go in the prep.cleaned event, not in the manifest, which
        # identical inputs must reproduce byte for byte
        "cleaning": {k: v for k, v in cleaning_stats.items() if k != "timings_s"},
        "warnings": [w.model_dump() for w in warnings],
        "files": {
            "train": {"sha256": train_ref.sha256, "rows": len(train)},
            "validation": {"sha256": eval_ref.sha256, "rows": len(validation)},
            "test": {"sha256": test_ref.sha256, "rows": len(test)},
            "dropped": {"sha256": dropped_ref.sha256, "rows": len(dropped)},
            **({"openai_train": {"sha256": openai_train.sha256}} if openai_train else {}),
            **({"openai_eval": {"sha256": openai_eval.sha256}} if openai_eval else {}),
        },
    }
    if not classification:
        manifest["openai_chat"] = ({"written": True, "messages": "as given" if shape == "chat_messages"
                                    else "prompt as the user turn, completion as the assistant turn"}
                                   if openai_train else {"written": False, "reason": NO_OPENAI_CHAT[shape]})
    manifest_ref = store.put_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    return Prepared(manifest, manifest_ref, train_ref, eval_ref, dropped_ref, openai_train, openai_eval, label_space,
                    len(train), len(validation), rows_in, by_reason, cleaning_stats, warnings, cost,
                    test=test_ref, test_rows=len(test), test_origin=origin, test_set=None if made_test else frozen.ref)


def _openai_files(store: ArtifactStore, train: list[dict], validation: list[dict], label_space: list[str], sp: str
                  ) -> tuple[ArtifactRef, ArtifactRef | None, int]:
    """The OpenAI chat JSONL of train and validation (None when it is empty), and the training token estimate."""
    return (write_lines(store, openai_chat_lines(train, label_space, system=sp)),
            write_lines(store, openai_chat_lines(validation, label_space, system=sp)) if validation else None,
            openai_chat_tokens(train, label_space, system=sp))


def _content_tokens(train: list[dict], shape: str) -> dict:
    """The training token estimate of a shape with no OpenAI chat file: chars/4 of its strings."""
    if shape == "json_extraction":
        n = sum(estimate_text_tokens(r["text"]) + estimate_text_tokens(orjson.dumps(r["target"]).decode()) for r in train)
    else:
        n = sum(estimate_text_tokens(r["prompt"]) + estimate_text_tokens(r["chosen"]) + estimate_text_tokens(r["rejected"])
                for r in train)
    return {"content_train_tokens": n, "method": "chars/4 of the row's strings (JSON target as JSON); no OpenAI chat file"}


def _head_spaces(rows: list[dict]) -> dict[str, dict[str, int]]:
    """Per triage head, its values and how often they occur (list-valued heads count each value)."""
    values: dict[str, list] = defaultdict(list)
    for r in rows:
        heads = r.get("heads")
        if not heads:
            continue
        for head, v in heads.items():
            if v.__class__ is str:
                values[head].append(v)
            elif v is None:
                values[head].append("(none)")
            elif isinstance(v, list):
                if v:
                    values[head].extend(x if x is not None else "(none)" for x in v)
            else:
                values[head].append(v)
    return {h: dict(Counter(vs).most_common(200)) for h, vs in sorted(values.items())}
