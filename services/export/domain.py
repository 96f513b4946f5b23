"""Packaging a trained LoRA adapter into a self-describing, checksummed export folder."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

EXPORT_FORMAT = "peft-lora-safetensors"
MANIFEST_FILE = "export_manifest.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
LABELS_FILE = "labels.json"
REQUIRED_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG)
# labels.json is shipped when present: without it a consumer cannot map head indices to labels
OPTIONAL_FILES = (LABELS_FILE,)


class ExportError(ValueError):
    """The adapter cannot be exported, or an export is unusable."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_adapter_export(adapter_dir: Path, out_dir: Path, *, run_id: str, base_model: str, metrics: dict) -> dict:
    """Copy the adapter files into out_dir and write export_manifest.json; returns the manifest."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    for name in REQUIRED_FILES:
        if not (adapter_dir / name).is_file():
            raise ExportError(f"adapter is missing {name} in {adapter_dir}")
    if adapter_dir.resolve() == out_dir.resolve():
        raise ExportError("export folder must differ from the adapter folder")

    out_dir.mkdir(parents=True, exist_ok=True)
    names = [*REQUIRED_FILES, *(n for n in OPTIONAL_FILES if (adapter_dir / n).is_file())]
    files = []
    for name in sorted(names):
        target = out_dir / name
        shutil.copyfile(adapter_dir / name, target)
        files.append({"path": name, "sha256": sha256_of(target), "size": target.stat().st_size})

    manifest = {
        "format": EXPORT_FORMAT,
        "run_id": run_id,
        "base_model": base_model,
        "metrics": metrics,
        "files": files,
    }
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def verify_export(out_dir: Path) -> list[str]:
    """Problems found in an export folder (missing or altered files); empty when intact."""
    out_dir = Path(out_dir)
    manifest_path = out_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        return [f"missing {MANIFEST_FILE}"]
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        return [f"{MANIFEST_FILE} is not valid JSON: {exc}"]

    problems: list[str] = []
    if manifest.get("format") != EXPORT_FORMAT:
        problems.append(f"unexpected format {manifest.get('format')!r}")
    listed = {entry.get("path") for entry in manifest.get("files", [])}
    problems.extend(f"manifest does not list {name}" for name in REQUIRED_FILES if name not in listed)
    for entry in manifest.get("files", []):
        name = entry.get("path", "")
        path = out_dir / name
        # a manifest path escaping the folder would let verification read arbitrary files
        if Path(name).is_absolute() or ".." in Path(name).parts:
            problems.append(f"unsafe path in manifest: {name}")
            continue
        if not path.is_file():
            problems.append(f"missing file: {name}")
            continue
        if path.stat().st_size != entry.get("size"):
            problems.append(f"size mismatch: {name}")
        if sha256_of(path) != entry.get("sha256"):
            problems.append(f"sha256 mismatch: {name}")
    return problems


def smoke_load(out_dir: Path) -> int:
    """Load the exported weights to prove they deserialise; returns the tensor count."""
    from safetensors.torch import load_file

    weights = Path(out_dir) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ExportError(f"export is missing {ADAPTER_WEIGHTS} in {out_dir}")
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ExportError(f"{ADAPTER_WEIGHTS} does not load: {exc}") from exc
    if not tensors:
        raise ExportError(f"{ADAPTER_WEIGHTS} holds no tensors")
    return len(tensors)
