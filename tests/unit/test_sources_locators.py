"""Locators: parsing, canonical round trip, no secrets, and file paths held to the ingest roots."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.ingest.sources.base import SourceError
from services.ingest.sources.csv import CsvSource
from services.ingest.sources.hf import HfSource
from services.ingest.sources.jsonl import JsonlSource
from services.ingest.sources.locators import FileLocator, HfLocator, PgLocator, open_source, parse_locator
from services.ingest.sources.pg import PgSource


@pytest.mark.parametrize("text, expected", [
    ("jsonl:data/train.jsonl", FileLocator("jsonl", "data/train.jsonl")),
    ("csv:/abs/path with space.csv", FileLocator("csv", "/abs/path with space.csv")),
    ("hf:PolyAI/banking77:train", HfLocator("hf", "PolyAI/banking77", "train")),
    ("hf:banking77:test:v1.0", HfLocator("hf", "banking77", "test", "v1.0")),
    ("hf:owner/name:train:refs/pr/1", HfLocator("hf", "owner/name", "train", "refs/pr/1")),
    ("hf:./local/saved_ds:validation", HfLocator("hf", "./local/saved_ds", "validation")),
    ("hf:/abs/dir/ds:train", HfLocator("hf", "/abs/dir/ds", "train")),
    ("pg:TRAIN_DSN?query=SELECT text, label FROM t WHERE x LIKE '%a'",
     PgLocator("pg", "TRAIN_DSN", "SELECT text, label FROM t WHERE x LIKE '%a'")),
    ("pg:TRAIN_DSN?query=SELECT%20text%2C%20label%20FROM%20t", PgLocator("pg", "TRAIN_DSN", "SELECT text, label FROM t")),
    ("pg:DB?query=SELECT+1", PgLocator("pg", "DB", "SELECT 1")),
])
def test_parse_and_round_trip(text, expected):
    loc = parse_locator(text)
    assert loc == expected
    assert parse_locator(str(loc)) == loc


@pytest.mark.parametrize("text, needle", [
    ("jsonl", "expected SCHEME"),
    ("jsonl:", "nothing after the scheme"),
    ("JSONL:x", "lower-case"),
    ("hf:PolyAI/banking77", "ID:SPLIT"),
    ("hf:a/b/c:train", "neither a hub id"),
    ("hf:ds:train[:10%]", "ID:SPLIT"),
    ("hf:ds:tr ain", "split"),
    ("pg:DB", "?query=SQL"),
    ("pg:DB?query=", "empty"),
    ("pg:DB?sql=select 1", "?query=SQL"),
])
def test_invalid_locators_name_the_problem_and_show_an_example(text, needle):
    with pytest.raises(SourceError) as err:
        parse_locator(text)
    assert err.value.reason_code == "ingest.locator_invalid"
    assert needle in str(err.value) and "e.g." in str(err.value)


def test_unknown_scheme_is_unsupported():
    with pytest.raises(SourceError) as err:
        parse_locator("s3:bucket/key.jsonl")
    assert err.value.reason_code == "ingest.locator_unsupported"
    assert "'s3'" in str(err.value) and "jsonl" in str(err.value)


@pytest.mark.parametrize("text", [
    "pg:postgresql://alice:S3cretPassw0rd@db.internal:5432/prod?query=select 1",
    "postgresql://alice:S3cretPassw0rd@db.internal:5432/prod",
    "pg:host=db password=S3cretPassw0rd?query=select 1",
])
def test_a_dsn_pasted_into_a_locator_is_refused_without_echoing_the_password(text):
    with pytest.raises(SourceError) as err:
        parse_locator(text)
    assert err.value.reason_code in ("ingest.locator_invalid", "ingest.locator_unsupported")
    assert "S3cretPassw0rd" not in str(err.value)


def test_pg_locator_holds_the_env_name_never_the_dsn(monkeypatch):
    monkeypatch.setenv("TRAIN_DSN", "postgresql://alice:S3cretPassw0rd@db/prod")
    loc = parse_locator("pg:TRAIN_DSN?query=select 1")
    for shown in (str(loc), repr(loc), loc.location):
        assert "S3cretPassw0rd" not in shown and "alice" not in shown
    src = open_source(loc, roots=[])
    assert isinstance(src, PgSource) and src.dsn_env == "TRAIN_DSN" and "S3cret" not in repr(src)


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.jsonl").write_text('{"a": 1}\n')
    (root / "b.csv").write_text("x,y\n1,2\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jsonl").write_text('{"s": 1}\n')
    return root, outside


def test_open_source_builds_the_connector_for_files_inside_the_roots(tree):
    root, _ = tree
    assert isinstance(open_source(f"jsonl:{root}/sub/a.jsonl", roots=[root]), JsonlSource)
    assert isinstance(open_source(parse_locator(f"csv:{root}/b.csv"), roots=[root], max_row_bytes=10), CsvSource)
    src = open_source(f"jsonl:{root}/sub/../sub/a.jsonl", roots=[root / "sub"], max_row_bytes=123)
    assert src.max_row_bytes == 123 and src.path == (root / "sub" / "a.jsonl").resolve()


def test_relative_paths_resolve_against_the_working_directory(tree, monkeypatch):
    root, _ = tree
    monkeypatch.chdir(root)
    assert list(open_source("jsonl:sub/a.jsonl", roots=[root]).load())[0].fields == {"a": 1}


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink", "symlinked_dir"])
def test_locators_outside_the_roots_are_refused(tree, how):
    root, outside = tree
    if how == "absolute":
        text = f"jsonl:{outside}/secret.jsonl"
    elif how == "dotdot":
        text = f"jsonl:{root}/sub/../../outside/secret.jsonl"
    elif how == "symlink":
        (root / "link.jsonl").symlink_to(outside / "secret.jsonl")
        text = f"jsonl:{root}/link.jsonl"
    else:
        (root / "linkdir").symlink_to(outside)
        text = f"jsonl:{root}/linkdir/secret.jsonl"
    with pytest.raises(SourceError) as err:
        open_source(text, roots=[root])
    assert err.value.reason_code == "ingest.locator_outside_roots"
    message = str(err.value)
    assert "secret.jsonl" in message and str(root.resolve()) in message and "outside the allowed ingest roots" in message


def test_no_roots_means_no_files(tree):
    root, _ = tree
    with pytest.raises(SourceError) as err:
        open_source(f"jsonl:{root}/sub/a.jsonl", roots=[])
    assert err.value.reason_code == "ingest.locator_outside_roots"


def test_missing_file_and_directory_are_not_found(tree):
    root, _ = tree
    with pytest.raises(SourceError) as err:
        open_source(f"jsonl:{root}/nope.jsonl", roots=[root])
    assert err.value.reason_code == "ingest.source_not_found" and "nope.jsonl" in str(err.value)
    with pytest.raises(SourceError) as err:
        open_source(f"csv:{root}/sub", roots=[root])
    assert err.value.reason_code == "ingest.source_not_found" and "not a file" in str(err.value)
    with pytest.raises(SourceError) as err:  # the connector itself, when the file goes away after open_source
        list(JsonlSource(root / "gone.jsonl").load())
    assert err.value.reason_code == "ingest.source_not_found"


def test_hf_local_directories_are_held_to_the_roots_too(tree):
    root, outside = tree
    (root / "ds").mkdir()
    assert isinstance(open_source(f"hf:{root}/ds:train", roots=[root]), HfSource)
    with pytest.raises(SourceError) as err:
        open_source(f"hf:{outside}:train", roots=[root])
    assert err.value.reason_code == "ingest.locator_outside_roots"
    hub = open_source("hf:PolyAI/banking77:train:main", roots=[])
    assert isinstance(hub, HfSource) and (hub.dataset, hub.split, hub.revision) == ("PolyAI/banking77", "train", "main")


def test_locator_errors_are_source_errors_and_value_errors():
    with pytest.raises(ValueError):
        parse_locator("nope")
    assert issubclass(type(_raises(lambda: parse_locator("x:y"))), SourceError)


def _raises(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        return exc
    raise AssertionError("did not raise")


def test_str_of_a_file_locator_is_the_text(tmp_path):
    p = os.path.join(str(tmp_path), "x.jsonl")
    assert str(parse_locator(f"jsonl:{p}")) == f"jsonl:{p}" and Path(parse_locator(f"jsonl:{p}").path) == Path(p)


# --- what a local HF directory would make the datasets library read --------------------------------


def _refused(text: str, root: Path) -> str:
    with pytest.raises(SourceError) as err:
        open_source(text, roots=[root])
    assert err.value.reason_code == "ingest.locator_outside_roots"
    return str(err.value)


def test_a_link_to_a_file_outside_the_roots_in_an_hf_directory_refuses_it(tree):
    root, outside = tree
    (root / "ds" / "data").mkdir(parents=True)
    (root / "ds" / "data" / "train.jsonl").symlink_to(outside / "secret.jsonl")
    message = _refused(f"hf:{root}/ds:train", root)
    assert "data/train.jsonl in " in message and "outside the allowed ingest roots" in message
    assert str(root.resolve()) in message and '{"s": 1}' not in message
    # the same directory is fine under roots that hold the target too
    assert isinstance(open_source(f"hf:{root}/ds:train", roots=[root, outside]), HfSource)


def test_a_linked_subdirectory_outside_the_roots_refuses_the_directory(tree):
    root, outside = tree
    (root / "ds" / "deep" / "er").mkdir(parents=True)
    (root / "ds" / "deep" / "er" / "train.jsonl").write_text('{"text": "a", "label": "b"}\n')
    (root / "ds" / "deep" / "er" / "more").symlink_to(outside, target_is_directory=True)
    message = _refused(f"hf:{root}/ds:train", root)
    assert "deep/er/more in " in message


def test_links_inside_the_roots_are_followed_and_loops_end(tree):
    root, _ = tree
    (root / "real").mkdir()
    (root / "real" / "train.jsonl").write_text("".join(f'{{"text": "t{i}", "label": "l{i % 2}"}}\n' for i in range(3)))
    (root / "ds").mkdir()
    (root / "ds" / "data").symlink_to(root / "real", target_is_directory=True)
    (root / "real" / "loop").symlink_to(root / "ds", target_is_directory=True)  # ds/data/loop -> ds
    assert isinstance(open_source(f"hf:{root}/ds:train", roots=[root]), HfSource)
    (root / "real" / "escape.jsonl").symlink_to(root.parent / "outside" / "secret.jsonl")  # reached only through the link
    assert "data/escape.jsonl in " in _refused(f"hf:{root}/ds:train", root)


def test_a_dangling_link_to_outside_the_roots_is_refused_too(tree):
    root, outside = tree
    (root / "ds").mkdir()
    (root / "ds" / "gone.jsonl").symlink_to(outside / "not-there.jsonl")
    assert "gone.jsonl in " in _refused(f"hf:{root}/ds:train", root)


def test_data_files_a_dataset_card_names_outside_the_roots_are_refused(tree):
    pytest.importorskip("datasets")
    root, _ = tree
    ds = root / "ds"
    ds.mkdir()
    (ds / "own.jsonl").write_text('{"text": "a", "label": "b"}\n')
    (ds / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                  "    path: ../../outside/secret.jsonl\n---\n")
    assert "../../outside/secret.jsonl in " in _refused(f"hf:{ds}:train", root)
    (ds / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                  "    path: own.jsonl\n---\n")
    assert [r.fields for r in open_source(f"hf:{ds}:train", roots=[root]).load()] == [{"text": "a", "label": "b"}]


def test_a_saved_dataset_naming_files_outside_the_roots_is_refused(tree):
    datasets = pytest.importorskip("datasets")
    import json

    root, outside = tree
    d = datasets.Dataset.from_dict({"text": ["a", "b"], "label": ["x", "y"]})
    d.save_to_disk(str(outside / "saved"))
    datasets.DatasetDict({"train": d}).save_to_disk(str(root / "good"))
    assert len(list(open_source(f"hf:{root}/good:train", roots=[root]).load())) == 2
    (root / "dd").mkdir()
    (root / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["../../outside/saved"]}))
    assert "../../outside/saved in " in _refused(f"hf:{root}/dd:train", root)
    (root / "single").mkdir()
    for name in ("dataset_info.json", "state.json"):
        (root / "single" / name).write_text((outside / "saved" / name).read_text())
    state = json.loads((root / "single" / "state.json").read_text())
    arrow = state["_data_files"][0]["filename"]
    state["_data_files"] = [{"filename": f"../../outside/saved/{arrow}"}]
    (root / "single" / "state.json").write_text(json.dumps(state))
    assert f"../../outside/saved/{arrow} in " in _refused(f"hf:{root}/single:train", root)


def test_a_file_outside_the_roots_says_how_to_set_them(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    (outside / "data.jsonl").write_text('{"text": "a", "label": "b"}\n')
    with pytest.raises(SourceError) as err:
        open_source(f"jsonl:{outside / 'data.jsonl'}", roots=[root])
    message = str(err.value)
    assert "TUNELINE_INGEST_ROOTS" in message and "tuneline up" in message and "tuneline down" in message
