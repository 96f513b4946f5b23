"""`tuneline artifacts RUN [--out DIR]`: every ArtifactRef in the run's events, named by event type and
field, copied out checked (directories as folders), a new field showing up with no change."""

from __future__ import annotations

import json

import pytest

from services.cli import main
from services.cli.artifacts_cmd import materialise, run_artifacts
from services.common.artifacts import ArtifactStore
from tests.unit.cli_support import run_cli


def _events(store: ArtifactStore, tmp_path):
    rows = store.put_bytes(b'{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    rejected = store.put_bytes(b"")
    manifest = store.put_bytes(json.dumps({"dataset_version": "v1", "rows": 2}).encode())
    test = store.put_bytes(b'{"text": "c", "label": "x"}\n')
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    (adapter_dir / "adapter_config.json").write_text('{"r": 8}')
    (adapter_dir / "labels.json").write_text('["x", "y"]')
    adapter = store.put_dir(adapter_dir)
    ref = lambda r: r.model_dump()  # noqa: E731
    return [
        {"type": "run.start", "payload": {"plan": {"locator": "jsonl:x", "target": "t"}}},
        {"type": "ingest.committed", "payload": {"dataset": ref(rows), "rejected": ref(rejected), "rows_read": 2}},
        # `test` is a field no code here names: it shows up by itself
        {"type": "prep.prepared", "payload": {"manifest": ref(manifest), "train": ref(rows), "test": ref(test),
                                              "openai_train": None, "warnings": [{"reason_code": "x"}]}},
        {"type": "training.completed", "payload": {"adapter": ref(adapter), "manifest": ref(manifest)}},
    ]


def test_artifacts_are_named_by_event_and_field_and_shared_ones_keep_their_first_name(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    found = run_artifacts(_events(store, tmp_path))
    names = [a.name for a in found]
    assert names == ["ingest.committed.dataset", "ingest.committed.rejected", "prep.prepared.manifest",
                     "prep.prepared.test", "training.completed.adapter"]
    dataset = found[0]
    assert dataset.also == ["prep.prepared.train"]
    assert found[2].also == ["training.completed.manifest"]


def test_out_copies_files_with_their_extension_and_directories_as_folders(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    placed = dict((a.name, p) for a, p in materialise(run_artifacts(_events(store, tmp_path)), tmp_path / "out"))
    assert placed["ingest.committed.dataset"].name == "ingest.committed.dataset.jsonl"
    assert placed["prep.prepared.manifest"].name == "prep.prepared.manifest.json"
    assert json.loads(placed["prep.prepared.manifest"].read_text())["rows"] == 2
    assert placed["prep.prepared.test"].read_text() == '{"text": "c", "label": "x"}\n'
    adapter = placed["training.completed.adapter"]
    assert adapter.is_dir() and json.loads((adapter / "labels.json").read_text()) == ["x", "y"]


def test_a_corrupt_artifact_is_refused_not_copied(tmp_path, capsys, monkeypatch, cli_data_dir):
    store = ArtifactStore(tmp_path / "store")
    events = _events(store, tmp_path)
    bad = store.path(run_artifacts(events)[0].ref)
    bad.chmod(0o644)
    bad.write_bytes(b"tampered")

    async def fake_events(run_id):
        return events

    monkeypatch.setattr(main, "_events", fake_events)
    with pytest.raises(SystemExit) as exc:
        main.main(["artifacts", "run-1", "--out", str(tmp_path / "out")])
    assert exc.value.code == 1 and "corrupt" in capsys.readouterr().err


def test_the_command_lists_them_and_the_closing_line_points_at_it(tmp_path, capsys, monkeypatch, cli_data_dir):
    store = ArtifactStore(tmp_path / "store")
    events = _events(store, tmp_path)

    async def fake_events(run_id):
        return events

    monkeypatch.setattr(main, "_events", fake_events)
    code, out, _ = run_cli(["artifacts", "run-1"], capsys)
    assert code == 0
    assert out.splitlines()[0].startswith("ingest.committed.dataset")
    assert "tuneline artifacts run-1 --out DIR" in out
    code, out, _ = run_cli(["artifacts", "run-1", "--out", str(tmp_path / "o")], capsys)
    assert code == 0 and str(tmp_path / "o" / "prep.prepared.test.jsonl") in out
    line = main.artifacts_line("run-1", events)
    assert line.startswith("artifacts: 5 (") and "prep.prepared.test" in line
