"""The content-addressed artifact store on a temporary directory."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from services.common.artifacts import ArtifactIntegrityError, ArtifactStore


@pytest.fixture
def store(tmp_path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "store")


def object_files(store: ArtifactStore) -> list[Path]:
    return sorted(p for p in (store.root / "objects").rglob("*") if p.is_file())


def tmp_leftovers(store: ArtifactStore) -> list[Path]:
    return [p for p in store.root.rglob("*") if p.name.startswith(".tmp-")]


def test_put_bytes_is_content_addressed(store):
    data = b"hello artifacts\n"
    ref = store.put_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    assert (ref.sha256, ref.size) == (sha, len(data))
    path = store.path(ref)
    assert path == store.root / "objects" / sha[:2] / sha
    assert ref.uri == path.as_uri()
    assert store.read_bytes(ref) == data


def test_the_same_bytes_give_the_same_ref_and_are_written_once(store):
    ref1 = store.put_bytes(b"same")
    path = store.path(ref1)
    before = path.stat()
    ref2 = store.put_bytes(b"same")
    assert ref2 == ref1
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert object_files(store) == [path]


def test_different_bytes_give_different_refs(store):
    assert store.put_bytes(b"a").sha256 != store.put_bytes(b"b").sha256
    assert len(object_files(store)) == 2


def test_empty_bytes_are_an_artifact_too(store):
    ref = store.put_bytes(b"")
    assert ref.size == 0
    assert store.read_bytes(ref) == b""


def test_put_file_hashes_like_put_bytes_across_chunk_boundaries(store, tmp_path):
    data = os.urandom((1 << 20) * 2 + 12345)  # larger than the 1 MiB chunk, not a multiple of it
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    ref = store.put_file(src)
    assert ref == store.put_bytes(data)
    assert ref.size == len(data)
    assert store.read_bytes(ref) == data
    assert len(object_files(store)) == 1


def test_put_file_of_existing_content_does_not_rewrite_it(store, tmp_path):
    ref = store.put_bytes(b"content")
    before = store.path(ref).stat().st_mtime_ns
    src = tmp_path / "f.txt"
    src.write_bytes(b"content")
    assert store.put_file(src) == ref
    assert store.path(ref).stat().st_mtime_ns == before


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "adapter_config.json": b'{"r": 8}',
        "adapter_model.safetensors": os.urandom(5000),
        "tokenizer/vocab.txt": "a\nb\nü\n".encode(),
        "tokenizer/special/tokens.json": b"{}",
        "deep/er/and/deeper/empty.bin": b"",
        "copy_of_config.json": b'{"r": 8}',  # same content as another file
    }
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_put_dir_and_materialize_dir_round_trip_a_nested_directory(store, tmp_path):
    files = make_tree(tmp_path / "src")
    ref = store.put_dir(tmp_path / "src")
    out = store.materialize_dir(ref, tmp_path / "out" / "adapter")
    assert out == tmp_path / "out" / "adapter"
    assert read_tree(out) == files


def test_put_dir_is_deterministic_and_content_addressed(store, tmp_path):
    make_tree(tmp_path / "one")
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    assert store.put_dir(tmp_path / "one") == store.put_dir(tmp_path / "two")
    (tmp_path / "two" / "tokenizer" / "vocab.txt").write_bytes(b"changed")
    assert store.put_dir(tmp_path / "one") != store.put_dir(tmp_path / "two")


def test_materialize_refuses_an_artifact_that_is_not_a_directory(store, tmp_path):
    ref = store.put_bytes(b'{"kind": "file"}')
    with pytest.raises(ArtifactIntegrityError):
        store.materialize_dir(ref, tmp_path / "out")


def test_a_corrupted_object_raises_on_read_and_path(store):
    ref = store.put_bytes(b"original content")
    p = store._path_for(ref.sha256)
    p.write_bytes(b"tampered content")
    with pytest.raises(ArtifactIntegrityError, match="corrupt"):
        store.read_bytes(ref)
    with pytest.raises(ArtifactIntegrityError, match="corrupt"):
        store.path(ref)
    assert store.path(ref, verify=False) == p  # the unchecked path is still available on purpose


def test_a_missing_object_raises_even_without_verification(store):
    ref = store.put_bytes(b"soon gone")
    store._path_for(ref.sha256).unlink()
    for call in (lambda: store.read_bytes(ref), lambda: store.path(ref), lambda: store.path(ref, verify=False)):
        with pytest.raises(ArtifactIntegrityError, match="missing"):
            call()


def test_a_corrupted_file_inside_a_directory_fails_materialize(store, tmp_path):
    files = make_tree(tmp_path / "src")
    ref = store.put_dir(tmp_path / "src")
    victim = store._path_for(hashlib.sha256(files["tokenizer/vocab.txt"]).hexdigest())
    victim.write_bytes(b"flipped")
    with pytest.raises(ArtifactIntegrityError):
        store.materialize_dir(ref, tmp_path / "out")


def test_a_store_reopened_on_the_same_root_sees_the_objects(store):
    ref = store.put_bytes(b"persisted")
    assert ArtifactStore(store.root).read_bytes(ref) == b"persisted"


def test_no_temporary_files_are_left_behind(store, tmp_path):
    make_tree(tmp_path / "src")
    store.put_bytes(b"x")
    store.put_bytes(b"x")
    (tmp_path / "f").write_bytes(b"y" * 3000)
    store.put_file(tmp_path / "f")
    store.put_dir(tmp_path / "src")
    assert tmp_leftovers(store) == []


def test_a_write_that_fails_midway_leaves_neither_a_temporary_nor_a_final_file(store):
    final = store._path_for("ab" + "0" * 62)

    def write(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store._atomic_write(final, write)
    assert not final.exists()
    assert tmp_leftovers(store) == []
