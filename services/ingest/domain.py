"""Ingest use cases, independent of the bus: introspect a source, dry-run a mapping, commit rows.

Every record a source yields is counted exactly once, as accepted or as rejected with a reason
code; rejected rows are kept (row number, source offset, raw text, reason, detail) in an artifact.
Rows stream from the source into artifact files, so memory stays flat whatever the source's size.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import orjson

from contracts.common import FieldMapping, RunPlan
from contracts.events import ShapeHypothesis
from contracts.errors import ReasonCodedError
from contracts.common import ArtifactRef
from services.common.artifacts import ArtifactStore
from services.ingest.introspect import AUTO_PICK, SAMPLE_SIZE, WIDER_SAMPLE_SIZE, choose, introspect, spread_sample
from services.ingest.mapping import (
    MappingCounts,
    MappingError,
    RejectedRow,
    RowMapper,
    check_fields_present,
    map_lines,
    map_records,
)
from services.ingest.sources.base import Source, SourceDescription, SourceError
from services.ingest.sources.locators import open_source
from services.common.parallel import Forked, workers


_BATCH_BYTES = 64 << 10  # accepted rows are written in pieces of about this size


class IngestError(ReasonCodedError, ValueError):
    """The source or the mapping as a whole is unusable; `reason_code` is registered."""


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


def scrubbed_sample(rows: list[dict]) -> list[dict]:
    """A dry run's sample of accepted rows as it may travel in an event, which the audit log keeps
    for good: every string with its PII and secrets replaced by placeholders (prep's scrubber; the
    committed rows themselves are scrubbed by prep, the sample is shown before that), and storable."""
    from services.prep.pii import Scrubber

    return storable(Scrubber().scrub_strings_in(rows))


def storable(value):
    """A JSON-like value from the source (a sample, column names) with its strings and keys made
    storable (:func:`~services.common.delivery.storable_text`: no NUL, no lone surrogate), as prep's
    normalisation leaves NULs out of texts: it goes into an event, and PostgreSQL cannot store a NUL;
    the recorder would dead-letter the event (a dry run would get no answer, a committed run would
    show as failed in its timeline while prep went on)."""
    from services.common.delivery import storable_text
    from services.prep.pii import string_leaves, with_string_leaves

    leaves = (storable_text(s) for s in string_leaves(value, keys_and_integers=True))
    return with_string_leaves(value, leaves, keys_and_integers=True)


def introspect_source(source: Source, sample_size: int = SAMPLE_SIZE) -> Introspection:
    try:
        records = (r for r in source.load() if r.fields is not None)
        wider = [r.fields for r in spread_sample(records, max(sample_size, WIDER_SAMPLE_SIZE))]
        sample = spread_sample(wider, sample_size)
    except SourceError as exc:
        raise IngestError(exc.reason_code, str(exc)) from exc
    if not sample:
        raise IngestError("ingest.empty_source", "no parseable row in the source to introspect")
    # a field whose name holds a NUL is never proposed: a mapping travels in events (see storable)
    sample = [{k: v for k, v in row.items() if "\x00" not in k} for row in sample]
    fields = list(dict.fromkeys(k for row in sample for k in row))
    return Introspection(fields, sample, introspect(sample, wider))


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
                          f"give a mapping (--map text=FIELD --map label=FIELD, or --text-field/--label-field on "
                          f"`tuneline run`) or --force to accept the proposal")
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

    @property
    def warning(self) -> str | None:
        """A registered warning code about the source as read (ingest.mixed_encoding), or None."""
        return self.description.details.get("decoding", {}).get("warning")


def _mapper(source: Source, mapping: FieldMapping, default_provenance: str) -> tuple[RowMapper, SourceDescription]:
    try:
        mapper = RowMapper(mapping, default_provenance=default_provenance)
        description = source.describe()
        check_fields_present(mapping, description.columns)
    except (MappingError, SourceError) as exc:
        raise IngestError(exc.reason_code, str(exc)) from exc
    return mapper, description


# A JSONL file this large is mapped by two processes, each taking one half of its lines (about
# 0.1 s saved per 25 MB; the second half's output is copied into the artifacts afterwards).
PARALLEL_MIN_BYTES = 8 << 20


def _write_rows(rows: Iterator, rejected_w, dataset_w, sample: list[dict], sample_size: int) -> None:
    """Accepted rows into ``dataset_w`` a batch of lines at a time, rejected rows into ``rejected_w``."""
    dumps, nl = orjson.dumps, orjson.OPT_APPEND_NEWLINE
    # orjson's output of a small row keeps a 4 KB allocation: lines are copied into one buffer at once
    buf = bytearray()
    try:
        for out in rows:
            if type(out) is RejectedRow:
                rejected_w.write(dumps(out.as_json(), option=nl))
                continue
            if len(sample) < sample_size:
                sample.append(out)
            buf += dumps(out, option=nl)
            if len(buf) >= _BATCH_BYTES:
                dataset_w.write(bytes(buf))
                buf.clear()
    except SourceError as exc:
        raise IngestError(exc.reason_code, str(exc)) from exc
    if buf:
        dataset_w.write(bytes(buf))


class _FileSink:
    """The writer interface over a plain file (a worker's part of an artifact)."""

    def __init__(self, path: str) -> None:
        self._f = open(path, "wb", buffering=1 << 20)

    def write(self, data: bytes) -> None:
        self._f.write(data)

    def close(self) -> None:
        self._f.close()


def _map_part(source, mapper: RowMapper, point: int, dataset_path: str | None, rejected_path: str,
              sample_size: int) -> dict:
    """In a forked worker: map the lines from ``point`` on into two plain files (no dataset file for
    a dry run); return the counts and the sample."""
    counts = MappingCounts()
    sample: list[dict] = []
    lines = source.load_range(point, None, source.lines_before(point))
    dataset_w, rejected_w = _FileSink(dataset_path) if dataset_path else _Null(), _FileSink(rejected_path)
    try:
        _write_rows(map_lines(lines, source.raw_text, mapper, counts), rejected_w, dataset_w, sample, sample_size)
    finally:
        if dataset_path:
            dataset_w.close()
        rejected_w.close()
    return {"read": counts.rows_read, "accepted": counts.rows_accepted,
            "rejected": list(counts.rejected_by_reason.items()), "sample": sample}


def _copy_file(path: str, w) -> None:
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(256 << 10):
            w.write(chunk)


def run_ingest(source: Source, mapping: FieldMapping, store: ArtifactStore, *, commit: bool,
               sample_size: int = 0, default_provenance: str = "human") -> IngestOutcome:
    """Stream the source through the mapping into artifacts: accepted rows (when committing) and
    every rejected row. Raises IngestError when the source fails as a whole.

    A large JSONL file is mapped by this process (first half) and a forked worker (second half,
    into two plain files appended afterwards); the artifacts, counts and sample are those of one
    pass in order, and a failed worker's half is mapped here instead."""
    mapper, description = _mapper(source, mapping, default_provenance)
    counts = MappingCounts()
    sample: list[dict] = []
    point = source.split_point(PARALLEL_MIN_BYTES) if hasattr(source, "split_point") and workers() >= 2 else None
    part = None
    try:
        if point is not None:
            part = _Part(store, source, mapper, point, sample_size, commit)
        with store.writer() as rejected_w, (store.writer() if commit else _Null()) as dataset_w:
            if part is not None:
                part.write_all(counts, rejected_w, dataset_w, sample, sample_size)
            else:
                if hasattr(source, "load_lines"):  # JSONL: raw text decoded for rejected rows only
                    rows = map_lines(source.load_lines(), source.raw_text, mapper, counts)
                else:
                    rows = map_records(source.load(), mapper, counts)
                _write_rows(rows, rejected_w, dataset_w, sample, sample_size)
            counts.check()
            if counts.rows_read == 0:
                raise IngestError("ingest.empty_source", "the source holds no rows")
            rejected = rejected_w.commit()
            dataset = dataset_w.commit() if commit else None
    finally:
        if part is not None:
            part.close()
    report = source.decoding_report() if hasattr(source, "decoding_report") else {}
    if report:  # how the rows were decoded is known only now, after reading them all
        description = replace(description, details={**description.details, "decoding": report})
    return IngestOutcome(counts, rejected, description, dataset, sample)


class _Part:
    """The second half of a JSONL file (from ``point``), mapped by a forked worker into two plain
    files; :meth:`write_all` maps the first half here and then appends the worker's."""

    def __init__(self, store: ArtifactStore, source, mapper: RowMapper, point: int, sample_size: int,
                 commit: bool) -> None:
        self.source, self.mapper, self.point = source, mapper, point
        tmp = store.root / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        self.paths: list[str] = []
        for _ in range(2):
            fd, path = tempfile.mkstemp(dir=tmp, prefix=".part-")
            os.close(fd)
            self.paths.append(path)
        self.commit = commit
        self.child = Forked(_map_part, source, mapper, point, self.paths[0] if commit else None, self.paths[1],
                            sample_size)

    def write_all(self, counts: MappingCounts, rejected_w, dataset_w, sample: list[dict], sample_size: int) -> None:
        source, mapper, point = self.source, self.mapper, self.point
        _write_rows(map_lines(source.load_range(0, point), source.raw_text, mapper, counts),
                    rejected_w, dataset_w, sample, sample_size)
        res = self.child.result()
        if res is None:  # the worker failed: map its half here
            lines = source.load_range(point, None, source.lines_before(point))
            _write_rows(map_lines(lines, source.raw_text, mapper, counts), rejected_w, dataset_w, sample, sample_size)
        else:
            counts.rows_read += res["read"]
            counts.rows_accepted += res["accepted"]
            for code, n in res["rejected"]:
                counts.rejected_by_reason[code] += n
            sample.extend(res["sample"][:max(0, sample_size - len(sample))])
            _copy_file(self.paths[1], rejected_w)
            if self.commit:
                _copy_file(self.paths[0], dataset_w)
        if counts.rows_read == 0:
            err = source.empty_error()
            raise IngestError(err.reason_code, str(err))

    def close(self) -> None:
        self.child.close()
        for path in self.paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


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
