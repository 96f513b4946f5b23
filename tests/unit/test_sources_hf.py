"""HfSource on tiny local datasets (nothing downloads): save_to_disk directories, a directory of data
files, JSON-able values, ClassLabel names in describe(), unavailable datasets and splits."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from services.ingest.sources.base import SourceError
from services.ingest.sources.hf import HfSource, jsonable

datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    features = datasets.Features({
        "text": datasets.Value("string"),
        "label": datasets.ClassLabel(names=["negative", "positive"]),
        "when": datasets.Value("timestamp[s]"),
        "tags": datasets.Sequence(datasets.Value("string")),
    })
    ds = datasets.Dataset.from_dict({
        "text": ["good", "bad", "fine"], "label": [1, 0, 1],
        "when": [dt.datetime(2024, 1, 2, 3, 4, 5)] * 3, "tags": [["a"], [], ["b", "c"]],
    }, features=features)
    ds.save_to_disk(str(root / "single"), num_proc=None)
    datasets.DatasetDict({"train": ds, "test": ds.select([2])}).save_to_disk(str(root / "dict"))
    files = root / "files"
    files.mkdir()
    (files / "train.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": f"l{i % 2}"}) + "\n" for i in range(5)))
    (files / "test.jsonl").write_text(json.dumps({"text": "x", "label": "l0"}) + "\n")
    return root


def test_saved_dataset_streams_json_able_rows(saved):
    recs = list(HfSource(str(saved / "single"), "train").load())
    assert [r.fields for r in recs] == [
        {"text": "good", "label": "positive", "when": "2024-01-02T03:04:05", "tags": ["a"]},  # names, not indices
        {"text": "bad", "label": "negative", "when": "2024-01-02T03:04:05", "tags": []},
        {"text": "fine", "label": "positive", "when": "2024-01-02T03:04:05", "tags": ["b", "c"]}]
    assert [(r.row_number, r.offset) for r in recs] == [(1, 0), (2, 1), (3, 2)]
    assert json.loads(recs[0].raw) == recs[0].fields and all(r.error is None for r in recs)


def test_describe_reports_features_label_names_and_rows(saved):
    d = HfSource(str(saved / "dict"), "train").describe()
    assert d.scheme == "hf" and d.format == "hf" and d.columns == ["text", "label", "when", "tags"]
    assert d.row_estimate == 3 and d.details["label_names"] == {"label": ["negative", "positive"]}
    assert d.details["features"]["label"] == "class_label" and d.details["mode"] == "load_from_disk"


def test_dataset_dict_split_is_picked_and_a_missing_split_is_unavailable(saved):
    assert [r.fields["text"] for r in HfSource(str(saved / "dict"), "test").load()] == ["fine"]
    with pytest.raises(SourceError) as err:
        list(HfSource(str(saved / "dict"), "validation").load())
    assert err.value.reason_code == "ingest.dataset_unavailable"
    assert "validation" in str(err.value) and "train, test" in str(err.value)


def test_directory_of_data_files_streams(saved):
    src = HfSource(str(saved / "files"), "train")
    assert [r.fields for r in src.load()] == [{"text": f"t{i}", "label": f"l{i % 2}"} for i in range(5)]
    d = src.describe()
    assert d.columns == ["text", "label"] and d.details["mode"] == "streaming"
    with pytest.raises(SourceError) as err:
        list(HfSource(str(saved / "files"), "validation").load())
    assert err.value.reason_code == "ingest.dataset_unavailable" and "validation" in str(err.value)


def test_hub_dataset_not_in_the_offline_cache_is_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(SourceError) as err:
        list(HfSource("tuneline-test-owner/no-such-dataset", "train").load())
    assert err.value.reason_code == "ingest.dataset_unavailable"
    assert "tuneline-test-owner/no-such-dataset" in str(err.value)


def test_missing_local_directory_is_unavailable(tmp_path):
    with pytest.raises(SourceError) as err:
        HfSource(str(tmp_path / "nope"), "train").describe()
    assert err.value.reason_code == "ingest.dataset_unavailable" and "does not exist" in str(err.value)


def test_empty_split_is_an_empty_source(tmp_path):
    (tmp_path / "empty").mkdir()  # (datasets cannot load back an empty save_to_disk directory)
    (tmp_path / "empty" / "train.csv").write_text("text,label\n")
    with pytest.raises(SourceError) as err:
        list(HfSource(str(tmp_path / "empty"), "train").load())
    assert err.value.reason_code == "ingest.empty_source"


def test_jsonable_values():
    import decimal
    import uuid

    import numpy as np

    value = {"d": dt.date(2024, 1, 2), "t": dt.time(1, 2), "td": dt.timedelta(seconds=90), "dec": decimal.Decimal("1.10"),
             "b": b"\x00\xff", "u": uuid.UUID(int=1), "np": np.int64(3), "arr": np.array([1.5, 2.0]), 1: (True, None)}
    assert jsonable(value) == {"d": "2024-01-02", "t": "01:02:00", "td": 90.0, "dec": "1.10", "b": "AP8=",
                               "u": "00000000-0000-0000-0000-000000000001", "np": 3, "arr": [1.5, 2.0], "1": [True, None]}
    json.dumps(jsonable(value))


def test_an_unlabelled_row_of_a_class_label_column_is_rejected_not_a_class(tmp_path):
    """-1 is the datasets library's "no label" (unlabelled test splits): the row has no label."""
    from contracts.common import FieldMapping
    from services.common.artifacts import ArtifactStore
    from services.ingest.domain import run_ingest

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    ds = datasets.Dataset.from_dict({"text": ["good", "who knows", "bad"], "label": [1, -1, 0]}, features=features)
    ds.save_to_disk(str(tmp_path / "ds"))
    src = HfSource(str(tmp_path / "ds"), "train", roots=[tmp_path])
    assert [r.fields["label"] for r in src.load()] == ["positive", None, "negative"]
    out = run_ingest(HfSource(str(tmp_path / "ds"), "train", roots=[tmp_path]),
                     FieldMapping(text=["text"], label="label"), ArtifactStore(tmp_path / "art"), commit=False,
                     sample_size=5)
    assert (out.counts.rows_read, out.counts.rows_accepted, out.counts.rows_rejected) == (3, 2, 1)
    assert sorted(r["label"] for r in out.sample_accepted) == ["negative", "positive"]
    assert out.rejected_by_reason == {"ingest.missing_field": 1}


def test_a_sequence_of_class_labels_gives_names(tmp_path):
    features = datasets.Features({"text": datasets.Value("string"),
                                  "topics": datasets.Sequence(datasets.ClassLabel(names=["billing", "login", "shipping"]))})
    ds = datasets.Dataset.from_dict({"text": ["a", "b"], "topics": [[0, 2], []]}, features=features)
    ds.save_to_disk(str(tmp_path / "ds"))
    assert [r.fields["topics"] for r in HfSource(str(tmp_path / "ds"), "train").load()] == [["billing", "shipping"], []]
