"""Hugging Face datasets, through the `datasets` library.

    a directory written by `save_to_disk`  -> `load_from_disk` (a DatasetDict: the split is picked;
                                              a single Dataset: used whatever the split says)
    a directory of data files, or a hub id -> `load_dataset(id, split=, revision=, streaming=True)`:
                                              offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE=1) it
                                              reads the local cache; with a network it downloads

Rows come back as dicts of JSON-able values: a ClassLabel column (or a sequence of them) gives its
label names, not the indices the dataset stores (a label space of "0", "1", "2" would reach the model,
the manifest and the OpenAI system prompt), and -1, the datasets library's "no label" (unlabelled test
splits), becomes None so that the row is rejected as missing its label rather than trained on as a
class (describe() still lists the names under details["label_names"]); datetime/date/time -> ISO 8601 strings; timedelta ->
seconds (float); Decimal -> string; bytes -> base64 string; numpy scalars/arrays -> Python numbers/
lists; anything else (e.g. decoded images or audio) -> str(value). `row_number` is the 1-based row
index, `offset` the 0-based one; `raw` is the row as JSON.

`local_read_paths` lists what a local directory's metadata makes the library read (a saved dataset's
split directories and arrow files, a dataset card's data_files), for the locator's roots check.

A dataset that cannot be found or read (not cached offline, no such split, unreadable data files)
raises SourceError("ingest.dataset_unavailable"); a split with no rows, ingest.empty_source.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from services.ingest.sources.base import MAX_RAW_KEPT, SourceDescription, SourceError, SourceRecord, new_record

_PLAIN = frozenset((str, int, float, bool, type(None)))


def jsonable(value: Any) -> Any:
    """A JSON-able copy of a value as `datasets` (or a database driver) returns it."""
    t = type(value)
    if t in _PLAIN:
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    for base in (bool, int, float, str):  # subclasses: IntEnum, numpy.float64, numpy.str_, ...
        if isinstance(value, base):
            return base(value)
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return jsonable(value.tolist())
    return str(value)


def _class_label_names(features, datasets) -> dict[str, list[str]]:
    """Column -> label names, for ClassLabel columns and sequences of ClassLabel."""
    out = {}
    for name, feat in features.items():
        if isinstance(feat, datasets.Sequence):
            inner = feat.feature
        elif isinstance(feat, list):
            inner = feat[0] if feat else None
        else:
            inner = feat
        if isinstance(inner, datasets.ClassLabel):
            out[name] = list(inner.names)
    return out


def _named(fields: dict, names: dict[str, list[str]]) -> dict:
    """ClassLabel indices as their names; -1 ("no label") as None (see the module docstring)."""
    for column, labels in names.items():
        value = fields.get(column)
        if isinstance(value, int) and not isinstance(value, bool):
            fields[column] = labels[value] if 0 <= value < len(labels) else None
        elif isinstance(value, list):
            fields[column] = [labels[v] for v in value if isinstance(v, int) and 0 <= v < len(labels)]
    return fields


def jsonable_row(row: dict[str, Any]) -> dict[str, Any]:
    for v in row.values():
        if type(v) not in _PLAIN:
            return {str(k): jsonable(v) for k, v in row.items()}
    return row


def raw_json(fields: dict[str, Any]) -> str:
    try:
        text = orjson.dumps(fields).decode()
    except (TypeError, orjson.JSONEncodeError):
        text = json.dumps(fields, ensure_ascii=False, default=str).encode("utf-8", "replace").decode()
    return text[:MAX_RAW_KEPT]


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def local_read_paths(directory: Path, revision: str | None = None) -> Iterator[str]:
    """The paths, beyond the directory's own entries, that the datasets library would read for a local
    directory, as it would join them (absolute; may hold `..`, or be a URL). A generator, so a caller
    can refuse a path before anything in it is read: a saved dataset's split directory is yielded
    before its state.json and dataset_info.json, and those before the arrow files state.json names.
    A directory of data files yields the data files of the config `load_dataset` would pick (the
    README.md / .huggingface.yaml `configs` may name files anywhere); one the library cannot make
    sense of yields nothing, as loading it fails the same way."""
    if _is_saved_dataset(directory):
        yield from _saved_paths(str(directory), top=True)
        return
    import datasets

    try:
        builder = datasets.load_dataset_builder(str(directory), revision=revision)
    except Exception:  # noqa: BLE001 - load_dataset fails the same way and classifies it then
        return
    data_files = builder.config.data_files or {}
    for files in data_files.values():
        for f in files:
            yield str(f)


def _saved_paths(path: str, top: bool = False) -> Iterator[str]:
    """Mirrors `datasets.load_from_disk`: a Dataset (state.json + dataset_info.json) or a DatasetDict
    (dataset_dict.json naming split directories, each a Dataset)."""
    import posixpath

    state, info, ddict = (posixpath.join(path, n) for n in ("state.json", "dataset_info.json", "dataset_dict.json"))
    if not top:
        yield path
        yield state
        yield info
    if os.path.isfile(state) and os.path.isfile(info):
        for entry in _json_list(state, "_data_files"):
            if isinstance(entry, dict) and isinstance(entry.get("filename"), str):
                yield str(Path(path, entry["filename"]))
    elif top and os.path.isfile(ddict):
        for split in _json_list(ddict, "splits"):
            if isinstance(split, str):
                yield from _saved_paths(posixpath.join(path, split))


def _json_list(path: str, key: str) -> list:
    """The list under `key` of a JSON object file; [] when unreadable (then loading fails on its own)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get(key) or []
    except (OSError, ValueError, AttributeError):
        return []


class HfSource:
    format = "hf"

    def __init__(self, dataset: str, split: str, *, revision: str | None = None, batch_size: int = 1000, **_ignored):
        self.dataset = dataset
        self.split = split
        self.revision = revision
        self.batch_size = batch_size

    @property
    def location(self) -> str:
        return f"{self.dataset}:{self.split}" + (f":{self.revision}" if self.revision else "")

    def _local_dir(self) -> Path | None:
        path = Path(self.dataset).expanduser()
        return path if path.is_dir() else None

    def _unavailable(self, why: str) -> SourceError:
        return SourceError("ingest.dataset_unavailable", f"hf dataset {self.location}: {why}")

    def _open(self):
        """The Dataset (saved to disk) or IterableDataset (streaming) for the split."""
        local = self._local_dir()
        if local is not None and _is_saved_dataset(local):
            import datasets

            try:
                ds = datasets.load_from_disk(str(local))
            except Exception as exc:  # noqa: BLE001 - any failure means the directory cannot be read
                raise self._unavailable(f"cannot load the saved dataset in {local}: {type(exc).__name__}: {str(exc)[:300]}") from None
            if isinstance(ds, datasets.DatasetDict):
                if self.split not in ds:
                    raise self._unavailable(f"no split {self.split!r} (splits: {', '.join(ds) or 'none'})")
                ds = ds[self.split]
            return ds
        if local is None and self.dataset.startswith(("/", "./", "../", "~")):
            raise self._unavailable(f"the directory {self.dataset} does not exist")
        return self._stream()

    def _stream(self):
        import datasets

        try:
            return datasets.load_dataset(self.dataset, split=self.split, revision=self.revision, streaming=True)
        except Exception as exc:  # noqa: BLE001 - classified below, never propagated raw
            raise self._classify(exc) from None

    def _classify(self, exc: BaseException) -> SourceError:
        offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                      for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
        name = type(exc).__name__
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else name
        if isinstance(exc, (ConnectionError, TimeoutError)) or "offline" in text.lower() or "connect" in text.lower():
            hint = "offline and not in the local cache" if offline else "the hub cannot be reached and it is not cached"
            return self._unavailable(f"{hint} ({name}: {text})")
        if isinstance(exc, ValueError) and "split" in text.lower():
            return self._unavailable(f"no such split: {text}")
        if name in ("DatasetNotFoundError", "FileNotFoundError", "FileNotFoundDatasetsError", "DataFilesNotFoundError",
                    "EmptyDatasetError", "RepositoryNotFoundError", "LocalEntryNotFoundError"):
            where = " (offline: only the local cache is searched)" if offline else ""
            return self._unavailable(f"not found{where}: {text}")
        return self._unavailable(f"cannot be read: {name}: {text}")

    def load(self) -> Iterator[SourceRecord]:
        import datasets

        ds = self._open()
        record = new_record
        index = 0
        names = _class_label_names(getattr(ds, "features", None) or {}, datasets)
        if isinstance(ds, datasets.Dataset):
            columns = list(ds.column_names)
            for batch in ds.iter(batch_size=self.batch_size):
                for values in zip(*(batch[c] for c in columns)):
                    fields = _named(jsonable_row(dict(zip(columns, values))), names)
                    yield record(index + 1, index, raw_json(fields), fields, None)
                    index += 1
        else:
            it = iter(ds)
            while True:
                try:
                    row = next(it)
                except StopIteration:
                    break
                except Exception as exc:  # noqa: BLE001 - a streaming read failing midway
                    raise self._classify(exc) from None
                fields = _named(jsonable_row(dict(row)), names)
                yield record(index + 1, index, raw_json(fields), fields, None)
                index += 1
        if index == 0:
            raise SourceError("ingest.empty_source", f"hf dataset {self.location}: the split has no rows")

    def describe(self) -> SourceDescription:
        """Features and (when known) the row count; a streaming dataset whose features are not
        declared is peeked at for its first row's keys."""
        import datasets

        ds = self._open()
        features = ds.features
        columns: list[str] = list(features) if features else []
        num_rows: int | None = None
        if isinstance(ds, datasets.Dataset):
            num_rows = ds.num_rows
        else:
            splits = getattr(ds.info, "splits", None) or {}
            info = splits.get(self.split) if hasattr(splits, "get") else None
            num_rows = getattr(info, "num_examples", None) or None
            if not columns:
                try:
                    first = next(iter(ds), None)
                except Exception as exc:  # noqa: BLE001
                    raise self._classify(exc) from None
                columns = list(first) if first else []
        label_names = {}
        feature_types = {}
        if features:
            for name, feat in features.items():
                feature_types[name] = getattr(feat, "dtype", None) or type(feat).__name__
                if isinstance(feat, datasets.ClassLabel):
                    label_names[name] = list(feat.names)
                    feature_types[name] = "class_label"
        return SourceDescription(
            scheme="hf", location=self.location, format="hf", columns=columns, row_estimate=num_rows,
            details={"dataset": self.dataset, "split": self.split, "revision": self.revision,
                     "mode": "load_from_disk" if isinstance(ds, datasets.Dataset) else "streaming",
                     "features": feature_types, "label_names": label_names},
        )
