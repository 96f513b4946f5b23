"""`tuneline lineage`: a version back to its source, hop by hop, over a run's recorded events (pure)."""

from __future__ import annotations

from contracts.events import PrepCleaned
from services.cli.history_cmds import lineage_chain
from tests.factories import envelope, plan, ref, successful_run


def _events(envs) -> list[dict]:
    return [{"global_position": i + 1, "event_id": str(e.event_id), "type": e.type,
             "causation_id": str(e.causation_id) if e.causation_id else None, "payload": e.payload}
            for i, e in enumerate(envs)]


def _run():
    envs = successful_run("run-1", progress_steps=1)
    committed = next(e for e in envs if e.type == "ingest.committed")
    cleaned = envelope(PrepCleaned(plan=plan(), rows_in=200, rows_kept=190, dropped_by_reason={"cleaning.exact_duplicate": 10},
                                   dropped=ref("dropped"), pii_by_kind={}, rows_with_pii=0),
                       run_id="run-1", causation=committed, producer="prep")
    envs.insert(envs.index(committed) + 1, cleaned)
    events = _events(envs)
    return events[:-1], events[-1]  # the run's events, and its registration


def test_every_hop_from_the_registered_version_to_the_source_is_found_by_sha256():
    events, registration = _run()
    hops = lineage_chain(registration, events, {"abc": "1.0.0"},
                         read_manifest=lambda r: {"source_sha256": ref("d").sha256})
    assert [h.hop for h in hops] == ["registered version", "export", "adapter", "training run", "dataset and manifest",
                                     "accepted rows", "rejected rows", "dropped rows (cleaning)", "source"]
    by = {h.hop: h for h in hops}
    assert by["export"].sha256 == ref("x").sha256 and by["export"].event_type == "export.completed"
    assert by["adapter"].sha256 == ref("a").sha256 and by["adapter"].event_type == "training.completed"
    assert by["dataset and manifest"].sha256 == ref("m").sha256 and "dataset 1.0.0 (abc)" in by["dataset and manifest"].detail
    assert by["accepted rows"].by == "sha256" and by["accepted rows"].sha256 == ref("d").sha256
    assert by["rejected rows"].sha256 == ref("r").sha256 and by["dropped rows (cleaning)"].sha256 == ref("dropped").sha256
    assert "jsonl:/data/sample.jsonl" in by["source"].detail
    assert all(h.by != "unresolved" for h in hops)


def test_without_the_manifest_artifact_the_source_hop_falls_back_to_causation_and_says_so():
    events, registration = _run()
    hops = {h.hop: h for h in lineage_chain(registration, events, {})}
    assert hops["accepted rows"].by == "causation" and hops["accepted rows"].event_type == "ingest.committed"
    assert "dataset ? (abc)" in hops["dataset and manifest"].detail


def test_a_missing_export_breaks_the_chain_there_and_names_the_hop():
    events, registration = _run()
    events = [e for e in events if e["type"] != "export.completed"]
    hops = {h.hop: h for h in lineage_chain(registration, events, {})}
    assert hops["export"].by == "unresolved" and hops["adapter"].by == "unresolved"
