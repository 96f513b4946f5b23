"""Content-addressed artifact store (D6) on the local filesystem (`file://` URIs).

Objects live at `<root>/objects/<sha[:2]>/<sha>`; a directory is stored as its files plus a
directory manifest object, and referenced by the manifest's ref. Writes are atomic (write, fsync,
rename), so a crash never leaves a half-written object under its final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from contracts.common import ArtifactRef

_CHUNK = 1 << 20


class ArtifactIntegrityError(RuntimeError):
    pass


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        (self.root / "objects").mkdir(parents=True, exist_ok=True)

    def _path_for(self, sha256: str) -> Path:
        return self.root / "objects" / sha256[:2] / sha256

    def _ref(self, sha256: str, size: int) -> ArtifactRef:
        return ArtifactRef(uri=self._path_for(sha256).as_uri(), sha256=sha256, size=size)

    def put_bytes(self, data: bytes) -> ArtifactRef:
        sha = hashlib.sha256(data).hexdigest()
        final = self._path_for(sha)
        if not final.exists():
            self._atomic_write(final, lambda f: f.write(data))
        return self._ref(sha, len(data))

    def put_file(self, path: Path) -> ArtifactRef:
        h, size = hashlib.sha256(), 0
        with open(path, "rb") as src:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                size += len(chunk)
        sha = h.hexdigest()
        final = self._path_for(sha)
        if not final.exists():
            def copy(dst):
                with open(path, "rb") as src:
                    shutil.copyfileobj(src, dst, _CHUNK)
            self._atomic_write(final, copy)
        return self._ref(sha, size)

    def writer(self) -> StreamingWriter:
        """Write an artifact of any size in pieces (constant memory); `commit()` returns its ref."""
        return StreamingWriter(self)

    def put_dir(self, path: Path) -> ArtifactRef:
        files = {}
        for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
            ref = self.put_file(f)
            files[f.relative_to(path).as_posix()] = {"sha256": ref.sha256, "size": ref.size}
        manifest = {"kind": "directory", "files": files}
        return self.put_bytes(json.dumps(manifest, sort_keys=True, indent=1).encode())

    def path(self, ref: ArtifactRef, *, verify: bool = True) -> Path:
        """The local path of an artifact, checked against its sha256 unless verify is False."""
        p = self._path_for(ref.sha256)
        if not p.exists():
            raise ArtifactIntegrityError(f"artifact {ref.sha256[:12]} is missing from {self.root}")
        if verify:
            actual = _sha256_file(p)
            if actual != ref.sha256:
                raise ArtifactIntegrityError(
                    f"artifact {ref.sha256[:12]} is corrupt: its content hashes to {actual[:12]}"
                )
        return p

    def read_bytes(self, ref: ArtifactRef) -> bytes:
        return self.path(ref).read_bytes()

    def materialize_dir(self, ref: ArtifactRef, dest: Path) -> Path:
        """Lay a stored directory out under dest (every file verified) and return dest."""
        manifest = json.loads(self.read_bytes(ref))
        if manifest.get("kind") != "directory":
            raise ArtifactIntegrityError(f"artifact {ref.sha256[:12]} is not a directory manifest")
        dest.mkdir(parents=True, exist_ok=True)
        for rel, meta in manifest["files"].items():
            src = self.path(ArtifactRef(uri="file:///x", sha256=meta["sha256"], size=meta["size"]))
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
        return dest

    def _atomic_write(self, final: Path, write) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            dir_fd = os.open(final.parent, os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class StreamingWriter:
    """An artifact written piece by piece: hashed as it is written into a temporary file, fsynced,
    then renamed to its content address. Discarded unless committed."""

    def __init__(self, store: ArtifactStore):
        self.store = store
        tmp_dir = store.root / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=tmp_dir, prefix=".w-")
        self._f = os.fdopen(fd, "wb", buffering=_CHUNK)
        self._h = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self._h.update(data)
        self._f.write(data)
        self.size += len(data)

    def commit(self) -> ArtifactRef:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        sha = self._h.hexdigest()
        final = self.store._path_for(sha)
        if final.exists():
            os.unlink(self._tmp)
        else:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self._tmp, final)
        return self.store._ref(sha, self.size)

    def discard(self) -> None:
        if not self._f.closed:
            self._f.close()
        Path(self._tmp).unlink(missing_ok=True)

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._f.closed:
            self.discard()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
