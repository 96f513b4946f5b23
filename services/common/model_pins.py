"""Pinning a base model by the sha256 of its weights files: the registry pins a version's base with it and
export records it in the manifest, so an adapter is never served, smoke-checked or re-exported on another
base. One algorithm for both, so the two pins compare."""

from __future__ import annotations

import hashlib
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def weights_sha256(model_dir: Path) -> str | None:
    """One sha256 over a local model's weight files (name and content, in name order); None when the
    path holds none (a hub id not on this machine)."""
    root = Path(model_dir)
    if not root.is_dir():
        return None
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
