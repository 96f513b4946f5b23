"""Ingest use cases, independent of the bus: introspect a source, dry-run a mapping, commit rows.

Every record a source yields is counted exactly once, as accepted or as rejected with a reason
code; rejected rows are kept (row number, source offset, raw text, reason, detail) in an artifact.
Rows stream from the source into artifact files, so memory stays flat whatever the source's size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from contracts.common import FieldMapping, RunPlan
from contracts.events import ShapeHypothesis
from contracts.common import ArtifactRef
from services.common.artifacts import ArtifactStore
from services.ingest.introspect import AUTO_PICK, SAMPLE_SIZE, choose, introspect, spread_sample
from services.ingest.mapping import MappingCounts, MappingError, RejectedRow, RowMapper, check_fields_present, map_records
from services.ingest.sources.base import Source, SourceDescription, SourceError
from services.ingest.sources.locators import open_source


class IngestError(ValueError):
    """The source or the mapping as a whole is unusable; `reason_code` is registered."""

    def __init__(self, reason_code: str, message: str):
        super().__init__(message)
        self.reason_code = reason_code


def open_locator(locator: str, roots: Sequence[Path], **limits) -> Source:
    try:
        return open_source(locator, roots=roots, **limits)
    except SourceError as exc:
        raise IngestError(exc.reason_code, str(exc)) from exc


@dataclass
class Introspection:
    fields: list[str]
    sample: list[dict]
    hypotheses: list[ShapeHypothesis]

    @property
    def auto_pick(self) -> bool:
        return bool(self.hypotheses) and self.hypotheses[0].confidence >= AUTO_PICK


def introspect_source(source: Source, sample_size: int = SAMPLE_SIZE) -> Introspection:
    try:
        records = (r for r in source.load() if r.fields is not None)
        sample = [r.fields for r in spread_sample(records, sample_size)]
    except SourceError as exc:
        raise IngestError(exc.reason_code, str(exc)) from exc
    if not sample:
        raise IngestError("ingest.empty_source", "no parseable row in the source to introspect")
    fields = list(dict.fromkeys(k for row in sample for k in row))
    return Introspection(fields, sample, introspect(sample))


def resolve_mapping(source: Source, *, mapping: FieldMapping | None = None, text_field: str | None = None,
                    label_field: str | None = None, force: bool = False) -> tuple[FieldMapping, float | None, Introspection | None]:
    """The mapping to apply: the one given, the one named by text/label fields, or introspection's
    proposal when it is confident enough (or forced). Returns (mapping, confidence, introspection)."""
    if mapping is None and (text_field or label_field):
        mapping = FieldMapping(text=[text_field or "text"], label=label_field or "label")
    if mapping is not None:
        return mapping, None, None
    found = introspect_source(source)
    best = choose(found.hypotheses, force=force)
    if best is None:
        top = found.hypotheses[0] if found.hypotheses else None
        detail = f"best proposal {top.shape} at {top.confidence:.2f} ({top.rationale})" if top else "no proposal"
        raise IngestError("ingest.mapping_low_confidence",
                          f"no mapping given and introspection is not sure enough to pick one: {detail}; "
                          f"give a mapping (e.g. --text-field/--label-field) or --force to accept the proposal")
    return best.mapping, best.confidence, found


def plan_mapping(source: Source, plan: RunPlan) -> tuple[FieldMapping, float | None]:
    mapping, confidence, _ = resolve_mapping(source, mapping=plan.mapping, text_field=plan.text_field,
                                             label_field=plan.label_field, force=plan.force_mapping)
    return mapping, confidence


@dataclass
class IngestOutcome:
    counts: MappingCounts
    rejected: ArtifactRef
    description: SourceDescription
    dataset: ArtifactRef | None = None  # None for a dry run
    sample_accepted: list[dict] = field(default_factory=list)

    @property
    def rejected_by_reason(self) -> dict[str, int]:
        return dict(sorted(self.counts.rejected_by_reason.items()))


def _mapped(source: Source, mapping: FieldMapping, default_provenance: str
            ) -> tuple[Iterator, MappingCounts, SourceDescription]:
    try:
        mapper = RowMapper(mapping, default_provenance=default_provenance)
        description = source.describe()
        check_fields_present(mapping, description.columns)
    except (MappingError, SourceError) as exc:
        raise IngestError(exc.reason_code, str(exc)) from exc
    counts = MappingCounts()
    return map_records(source.load(), mapper, counts), counts, description


def run_ingest(source: Source, mapping: FieldMapping, store: ArtifactStore, *, commit: bool,
               sample_size: int = 0, default_provenance: str = "human") -> IngestOutcome:
    """Stream the source through the mapping into artifacts: accepted rows (when committing) and
    every rejected row. Raises IngestError when the source fails as a whole."""
    rows, counts, description = _mapped(source, mapping, default_provenance)
    dumps = orjson.dumps
    sample: list[dict] = []
    with store.writer() as rejected_w, (store.writer() if commit else _Null()) as dataset_w:
        try:
            for out in rows:
                if type(out) is RejectedRow:
                    rejected_w.write(dumps(out.as_json()) + b"\n")
                else:
                    if len(sample) < sample_size:
                        sample.append(out)
                    dataset_w.write(dumps(out) + b"\n")
        except SourceError as exc:
            raise IngestError(exc.reason_code, str(exc)) from exc
        counts.check()
        if counts.rows_read == 0:
            raise IngestError("ingest.empty_source", "the source holds no rows")
        rejected = rejected_w.commit()
        dataset = dataset_w.commit() if commit else None
    return IngestOutcome(counts, rejected, description, dataset, sample)


class _Null:
    """A writer that writes nothing (dry runs keep no dataset)."""

    def write(self, data: bytes) -> None:
        pass

    def commit(self) -> None:
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass
