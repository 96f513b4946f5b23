"""The reason-code taxonomy (ARCHITECTURE D9): every failure or warning names one of these.

`python -m contracts.reason_codes` prints the Markdown table kept in docs/reason-codes.md.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReasonCode:
    code: str
    stage: str
    meaning: str
    retryable: bool = False


_CODES = [
    # The bus: messages that cannot be handled at all.
    ReasonCode("bus.malformed_message", "bus", "The message is not valid JSON or does not match the envelope."),
    ReasonCode("bus.unknown_event_type", "bus", "The envelope names a type that is not registered."),
    ReasonCode("bus.invalid_payload", "bus", "The payload does not match the schema of its registered type."),
    ReasonCode("bus.unsupported_schema_version", "bus", "The schema version is newer than this service knows or has no upcaster."),
    ReasonCode("bus.delivery_exhausted", "bus", "A handler kept failing until max_deliver was reached.", retryable=True),
    ReasonCode("bus.unexpected_subject", "bus", "The envelope's type does not belong on the subject it arrived on."),
    # Ingest.
    ReasonCode("ingest.locator_invalid", "ingest", "The locator does not parse (expected SCHEME:PATH, e.g. jsonl:data.jsonl)."),
    ReasonCode("ingest.locator_unsupported", "ingest", "The locator's scheme is not supported by this ingest service."),
    ReasonCode("ingest.source_not_found", "ingest", "The locator points at a file that does not exist or cannot be read."),
    ReasonCode("ingest.unparseable_row", "ingest", "A row could not be parsed (bad JSON, not an object)."),
    ReasonCode("ingest.missing_field", "ingest", "A row lacks the mapped text or label field."),
    ReasonCode("ingest.empty_text", "ingest", "A row's text is empty after trimming."),
    ReasonCode("ingest.invalid_label", "ingest", "A row's label is not a non-empty string or number."),
    ReasonCode("ingest.no_accepted_rows", "ingest", "No row of the source was accepted."),
    ReasonCode("ingest.locator_outside_roots", "ingest", "A file locator resolves outside the configured ingest roots."),
    ReasonCode("ingest.empty_source", "ingest", "The source holds no rows at all (an empty file, a query with no rows)."),
    ReasonCode("ingest.binary_source", "ingest", "The file is binary (NUL bytes or not text in any encoding), not JSONL or CSV."),
    ReasonCode("ingest.encoding_error", "ingest", "A row's bytes do not decode in the source's (detected or given) encoding."),
    ReasonCode("ingest.mixed_encoding", "ingest", "Warning: a CSV mixes UTF-8 rows with rows in a legacy code page; each row was read in its own (counts and line numbers in the event's source details)."),
    ReasonCode("ingest.row_too_long", "ingest", "A raw row is longer than the row size limit; kept as a rejected row, truncated."),
    ReasonCode("ingest.text_too_long", "ingest", "The mapped text is longer than the text length limit."),
    ReasonCode("ingest.ragged_row", "ingest", "A CSV row has a different number of fields than the header."),
    ReasonCode("ingest.header_missing", "ingest", "The CSV's first row holds personal data or a secret (an email, a phone number, an address, a card, a key) where column names go: the file has no header row."),
    ReasonCode("ingest.invalid_value", "ingest", "A mapped field has the wrong type or shape (e.g. messages that are not a list of {role, content})."),
    ReasonCode("ingest.label_outside_space", "ingest", "The row's label is not in the declared label space."),
    ReasonCode("ingest.dsn_env_missing", "ingest", "The environment variable named by a pg: locator is not set."),
    ReasonCode("ingest.source_connect_failed", "ingest", "The source (a database, a dataset hub) could not be reached.", retryable=True),
    ReasonCode("ingest.query_failed", "ingest", "The source query failed."),
    ReasonCode("ingest.dataset_unavailable", "ingest", "The hf: dataset is not in the local cache or directory and cannot be downloaded."),
    ReasonCode("ingest.mapping_invalid", "ingest", "The field mapping names fields the source does not have, or is incomplete."),
    ReasonCode("ingest.mapping_low_confidence", "ingest", "The proposed mapping's confidence is below 0.80 and --force was not given."),
    # Prep.
    ReasonCode("prep.insufficient_data", "prep", "Too few rows, too few per class or a single class: no honest split exists."),
    ReasonCode("prep.artifact_unreadable", "prep", "The committed dataset artifact is missing or fails its sha256 check."),
    ReasonCode("prep.few_rows_for_class", "prep", "Warning: a class has fewer than 50 rows."),
    ReasonCode("prep.few_rows_total", "prep", "Warning: the dataset has fewer than 500 rows in all."),
    ReasonCode("prep.rare_labels_dropped", "prep", "Warning: labels with fewer rows than the plan's min_per_class (--min-per-class) were dropped; the warning names them and any kept because the test set in force holds them."),
    ReasonCode("prep.eval_source_failed", "prep", "The explicit eval dataset could not be read or mapped."),
    ReasonCode("prep.test_set_unreadable", "prep", "The target's frozen test set artifact is missing or fails its sha256 check (use --new-test-set)."),
    ReasonCode("prep.test_set_conflict", "prep", "Another run froze the target's test set at the same time; retried.", retryable=True),
    # Cleaning (inside prep): failure modes, and why a row was dropped.
    ReasonCode("cleaning.pii_block", "prep", "The share of rows carrying PII is above the configured threshold: the run is blocked."),
    ReasonCode("cleaning.outlier_threshold_exceeded", "prep", "The share of length outliers is above the configured threshold: the run is blocked."),
    ReasonCode("cleaning.exact_duplicate", "prep", "Row dropped: its normalised text repeats an earlier row with the same label."),
    ReasonCode("cleaning.near_duplicate", "prep", "Row dropped: a near-duplicate of an earlier row."),
    ReasonCode("cleaning.conflicting_labels", "prep", "Row dropped: the same (normalised) text appears under different labels."),
    ReasonCode("cleaning.length_outlier", "prep", "Row dropped: its length is an outlier for this dataset."),
    ReasonCode("cleaning.low_quality", "prep", "Row dropped: its quality score is below the threshold."),
    ReasonCode("cleaning.empty_after_cleaning", "prep", "Row dropped: nothing is left of its text (or of a message or field it needs) after normalisation."),
    ReasonCode("cleaning.synthetic_cap", "prep", "Row dropped: synthetic rows above the cap on the synthetic share."),
    ReasonCode("cleaning.eval_overlap", "prep", "Row dropped from train: it equals or nearly equals a row of the explicit eval set."),
    ReasonCode("cleaning.rare_label", "prep", "Row dropped: its label has fewer rows than the plan's min_per_class (--min-per-class) after cleaning."),
    # Training.
    ReasonCode("training.runtime_error", "trainer", "Training raised an error."),
    ReasonCode("training.oom", "trainer", "Training ran out of memory."),
    ReasonCode("training.diverged", "trainer", "The loss became NaN or infinite."),
    ReasonCode("training.timeout", "trainer", "Training (or a hosted job) did not finish within its time limit.", retryable=True),
    ReasonCode("training.cancelled", "trainer", "Training was cancelled by a command or by the hosted provider."),
    ReasonCode("training.capability_unsupported", "trainer", "The backend or base model cannot do what the plan asks (e.g. fine-tuning Claude: only through Amazon Bedrock)."),
    ReasonCode("training.base_model_unavailable", "trainer", "The base model could not be loaded from its path or id."),
    ReasonCode("training.recipe_invalid", "trainer", "The plan names an unknown recipe, an unknown recipe field or an invalid value."),
    ReasonCode("training.tuning_invalid", "trainer", "The plan's tuning names a field the recipe does not tune, or a candidate value the recipe refuses."),
    ReasonCode("training.checkpoint_unreadable", "trainer", "Warning: a checkpoint could not be read back; training restarted from the one before (or from step 0)."),
    ReasonCode("training.provider_file_unavailable", "trainer", "A file a hosted job names (training, validation or result file) is no longer served by the provider (deleted or expired): only its id and what the job says of it are archived."),
    # Preflight (inside the trainer): what blocks a run before any training, or warns.
    ReasonCode("preflight.blocked", "trainer", "Strict preflight found at least one blocker: nothing was trained."),
    ReasonCode("preflight.dependency_missing", "trainer", "A package the recipe needs (torch, transformers, peft, bitsandbytes) is missing or too old."),
    ReasonCode("preflight.cuda_unavailable", "trainer", "The recipe needs a CUDA GPU (e.g. QLoRA) and none is available."),
    ReasonCode("preflight.memory_unknown", "trainer", "Warning: the RAM or VRAM available could not be measured, so the memory fit is unchecked."),
    ReasonCode("preflight.no_eval_split", "trainer", "Warning: the eval split is empty: no mid-training evaluation, best-checkpoint selection or early stopping."),
    ReasonCode("preflight.memory_insufficient", "trainer", "The memory-fit estimate (weights, gradients, optimizer state, activations) exceeds the RAM or VRAM available."),
    ReasonCode("preflight.capability_mismatch", "trainer", "The task does not fit the base model's architecture (e.g. chat SFT on an encoder, or a tokenizer without a chat template)."),
    ReasonCode("preflight.base_model_unavailable", "trainer", "The base model's config could not be read from its path or id."),
    ReasonCode("preflight.credentials_missing", "trainer", "A hosted backend's API-key environment variable is not set."),
    ReasonCode("preflight.hosted_cutoff", "trainer", "Warning: the hosted provider or base model has an announced cutoff (new fine-tuning jobs refused, or the model retired) on the date named; services/trainer/hosted/cutoffs.py lists them with their sources."),
    # Evaluation.
    ReasonCode("eval.runtime_error", "evaluator", "Evaluation raised an error."),
    ReasonCode("eval.artifact_unreadable", "evaluator", "The adapter or eval split is missing or fails its sha256 check."),
    ReasonCode("eval.capability_unsupported", "evaluator", "The evaluator cannot score this kind of candidate (a task it has no scorer for)."),
    ReasonCode("eval.no_test_set", "evaluator", "The candidate's run carries no test split to score on."),
    ReasonCode("eval.class_missing_from_test", "evaluator", "Warning: a label of the label space has no row in the test set, so its per-class scores and bucket say nothing."),
    ReasonCode("eval.label_space_mismatch", "evaluator", "The candidate's label space differs from its baseline's or from the test set's labels."),
    ReasonCode("eval.unparseable_output", "evaluator", "Warning: some outputs named no label of the label space (or no valid JSON); they score 0."),
    ReasonCode("eval.degenerate_model", "evaluator", "Warning: the model predicts (nearly) one class for every row."),
    ReasonCode("eval.judge_unavailable", "evaluator", "The LLM judge could not be reached after retries.", retryable=True),
    ReasonCode("eval.judge_invalid_output", "evaluator", "The LLM judge answered with something other than a JSON score in [0, 1]."),
    ReasonCode("eval.judge_unvalidated", "evaluator", "The judge failed its validation against gold and known-wrong outputs, so it may not gate."),
    ReasonCode("eval.model_not_found", "evaluator", "The hosted model (candidate or prompt baseline) does not exist at the provider (404)."),
    ReasonCode("eval.provider_error", "evaluator", "The hosted provider kept failing (429 / 5xx) after retries.", retryable=True),
    ReasonCode("eval.credentials_missing", "evaluator", "The API-key environment variable of a hosted model or judge is not set."),
    ReasonCode("eval.production_unavailable", "evaluator", "The production version's artifact is missing or unreadable, so the candidate cannot be compared with it."),
    ReasonCode("eval.baseline_failed", "evaluator", "The baseline (classical or prompt) could not be trained or scored."),
    # The gate.
    ReasonCode("gate.delta_below_margin", "evaluator", "The candidate's mean judge score beats the baseline's by less than the policy's margin (min_delta)."),
    ReasonCode("gate.not_significant", "evaluator", "The paired one-sided test of mean delta > min_delta has p >= the policy's alpha."),
    ReasonCode("gate.bucket_regressed", "evaluator", "A bucket's mean score drops by more than the policy's max_bucket_drop; the evidence lists the buckets and their deltas."),
    ReasonCode("gate.too_many_regressions", "evaluator", "The share of rows where the candidate scores below the baseline is at or above the policy's max_regressed_share."),
    ReasonCode("gate.safety_regression", "evaluator", "A row in one of the policy's safety buckets scores lower with the candidate than with the baseline."),
    # Export.
    ReasonCode("export.smoke_failed", "export", "The exported adapter failed its load check."),
    ReasonCode("export.artifact_unreadable", "export", "The adapter to export is missing or fails its sha256 check."),
    ReasonCode("export.format_unknown", "export", "An export format that the model's shape does not have (e.g. GGUF for an encoder classifier); the shape's formats are named."),
    ReasonCode("export.format_unsupported", "export", "The format's converter cannot handle the model's architecture (e.g. GGUF for a non-llama chat model); the converter's message is carried, and the other formats still ship."),
    ReasonCode("export.quantization_failed", "export", "The quantiser refused the model (e.g. the gguf package has no Q4_K quantiser); its message is carried, and the other formats still ship."),
    ReasonCode("export.base_model_changed", "export", "The base model's weights or tokenizer files differ from the sha256s pinned in the run's export manifest: the adapter is not exported onto another base."),
    ReasonCode("export.directory_full", "export", "The export folder ran out of space while a format was written; nothing of that format is left behind."),
    ReasonCode("export.directory_read_only", "export", "The export folder (or the artifact store) is read-only or not writable."),
    ReasonCode("export.directory_unwritable", "export", "Writing the export failed with another OS error (named in the message)."),
    ReasonCode("export.run_unknown", "export", "A re-export names a run with no recorded evaluation (eval.completed with an adapter) to export."),
    # Registry.
    ReasonCode("registry.invalid_target", "registry", "The target name is not a valid subject token ([A-Za-z0-9_-]+)."),
    ReasonCode("registry.concurrent_update", "registry", "Another writer changed the target's log first; retried.", retryable=True),
    ReasonCode("registry.conflict", "registry", "The target's log changed since the command was decided (another command won the race): nothing was appended; the refusal carries the current state.", retryable=True),
    ReasonCode("registry.promote_blocked", "registry", "The version's gate failed, it has no gate decision, or it was rejected: promoting it needs --override with a reason."),
    ReasonCode("registry.smoke_failed", "registry", "Before a promotion, the exported artifact loaded on its pinned base model did not reproduce the evaluator's outputs on the test rows (or did not load, or the base's weights differ from the pin)."),
    ReasonCode("registry.target_not_found", "registry", "The target has no registered version."),
    ReasonCode("registry.version_not_found", "registry", "The target has no such version (a number, vN, or the run id that produced it)."),
    ReasonCode("registry.version_of_other_target", "registry", "The run named was registered as a version of another target."),
    ReasonCode("registry.already_production", "registry", "The version is already in production."),
    ReasonCode("registry.no_previous_production", "registry", "Rollback asked of a target that has no previous production version."),
    ReasonCode("registry.not_archived", "registry", "Restore asked of a version that is not archived (never promoted, or in production now)."),
    ReasonCode("registry.invalid_transition", "registry", "The command does not apply to the version in its status (e.g. rejecting the production version, a rollout with nothing in production)."),
    ReasonCode("registry.invalid_time", "registry", "A point-in-time question (--at) before the target existed, in the future, or not a time."),
    # Audit.
    ReasonCode("audit.event_id_conflict", "audit", "A different event arrived under an event_id already recorded."),
    ReasonCode("audit.projection_failed", "audit", "A projection stopped on an event it could not apply."),
    ReasonCode("audit.unstorable_value", "audit", "The message decodes but holds a value PostgreSQL cannot store (a NUL character, a date before year 1 in UTC); dead-lettered by the recorder."),
    ReasonCode("audit.duplicate_event", "audit", "An event already recorded arrived again at a new stream position (re-published after the dedup window)."),
    # History, lineage and replay (read from run_events).
    ReasonCode("audit.history_target_not_found", "audit", "The History projection holds no fine-tune run of the target (or the target name is not valid)."),
    ReasonCode("audit.lineage_hop_unresolved", "audit", "Warning: a lineage hop names a sha256 that no recorded event produced (the chain breaks there)."),
    ReasonCode("audit.projection_differs", "audit", "Warning: a projection rebuilt from run_events differs from the live version at the same position (kept aside unless --switch)."),
    ReasonCode("audit.projection_replay_failed", "audit", "A blue/green rebuild of a projection stopped on an error; the live version is unchanged."),
    ReasonCode("audit.store_differs", "audit", "A store rebuilt from the stream differs from the live run_events (positions, event ids or hashes): the bus and the store disagree."),
    ReasonCode("audit.store_replay_refused", "audit", "A store rebuild was refused: the target database is the live one, or already holds events, or cannot be reached."),
    ReasonCode("audit.store_replay_failed", "audit", "A store rebuild from the stream stopped on an error; the live store is unchanged."),
    ReasonCode("audit.replay_consumer_unknown", "audit", "No service declares a durable consumer of that name."),
    ReasonCode("audit.replay_position_invalid", "audit", "The replay position is neither a stream sequence nor an ISO 8601 time, or lies outside the stream."),
    ReasonCode("audit.consumer_outputs_differ", "audit", "Warning: a consumer replayed in a sandbox emitted events that differ from what it emitted in history."),
    ReasonCode("audit.consumer_replay_failed", "audit", "A consumer replay stopped on an error (the sandbox did not settle, or the consumer could not be rewound)."),
    ReasonCode("audit.replay_run_not_found", "audit", "The run to re-run has no recorded events."),
    ReasonCode("audit.replay_publish_refused", "audit", "The bus refused to take a replay's re-issued trigger (the NATS user may not publish that stage's events: re-run it as admin); its run.replayed stands alone."),
    ReasonCode("audit.replay_stage_not_reached", "audit", "The run to re-run never reached the stage asked (no trigger of that stage is recorded for it)."),
    ReasonCode("audit.replay_policy_invalid", "audit", "The gate policy file does not parse, is not a mapping, or holds an unknown key or a value out of range."),
    ReasonCode("audit.replay_no_decision", "audit", "The version has no recorded gate decision (a hosted import, a v1 registration), so there is nothing to replay."),
    ReasonCode("audit.replay_records_unreadable", "audit", "Warning: a past decision's per-row records artifact is missing or fails its sha256 check, so it cannot be replayed."),
    ReasonCode("audit.replay_bucket_field_unrecorded", "audit", "Warning: the replayed policy buckets by a field the past decision's records do not carry, so it cannot be replayed."),
]

REASON_CODES: dict[str, ReasonCode] = {c.code: c for c in _CODES}
assert len(REASON_CODES) == len(_CODES), "duplicate reason code"


def is_registered(code: str) -> bool:
    return code in REASON_CODES


def markdown_table() -> str:
    lines = [
        "# Reason codes",
        "",
        "Generated by `python -m contracts.reason_codes` from `contracts/reason_codes.py`; do not edit by hand.",
        "",
        "| code | stage | retryable | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for c in sorted(REASON_CODES.values(), key=lambda c: c.code):
        lines.append(f"| `{c.code}` | {c.stage} | {'yes' if c.retryable else 'no'} | {c.meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
