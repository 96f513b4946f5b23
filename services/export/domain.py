"""Packaging a trained LoRA adapter into a self-describing, checksummed export folder: the adapter (its
adapter_config.json naming the base model) and, for classifiers, the merged model under merged/, the
path that loads with stock transformers classes (services/export/adapters/merged.py).

A fully fine-tuned classifier (recipe method "full") has no adapter: its folder holds the whole model's
weights (model.safetensors) and labels.json, the export's format says so (FULL_FORMAT), and merged/ is
the same model in transformers' layout."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

EXPORT_FORMAT = "peft-lora-safetensors"
FULL_FORMAT = "full-safetensors"  # recipe method "full": every weight, no adapter
FULL_WEIGHTS = "model.safetensors"  # = services.common.encoder_classifier.FULL_WEIGHTS (no torch import here)
MANIFEST_FILE = "export_manifest.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
LABELS_FILE = "labels.json"
REQUIRED_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG)
# labels.json is shipped when present: without it a consumer cannot map head indices to labels
OPTIONAL_FILES = (LABELS_FILE,)
MERGED_DIR = "merged"
# the bundled default base (services/common/models.py) under the id standard tooling resolves
HUB_IDS = {"all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2"}


class ExportError(ValueError):
    """The adapter cannot be exported, or an export is unusable."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_full_model(adapter_dir: Path) -> bool:
    """The trainer's output is a fully fine-tuned model (labels.json method "full"), not a LoRA adapter."""
    from services.common.classifier_inference import trained_metadata

    return trained_metadata(Path(adapter_dir)).get("method") == "full"


def required_files(full: bool) -> tuple[str, ...]:
    return (FULL_WEIGHTS, LABELS_FILE) if full else REQUIRED_FILES


def base_model_reference(base_model: str) -> str:
    """What adapter_config.json's base_model_name_or_path says: a hub id or the path trained on."""
    return HUB_IDS.get(base_model, base_model)


def build_adapter_export(adapter_dir: Path, out_dir: Path, *, run_id: str, base_model: str, metrics: dict,
                         merge_from: str | None = None) -> dict:
    """Copy the adapter files into out_dir (adapter_config.json naming `base_model`), with `merge_from`
    (the base model's local path) also the merged model under merged/ for a classification adapter,
    and write export_manifest.json; returns the manifest."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    full = is_full_model(adapter_dir)
    for name in required_files(full):
        if not (adapter_dir / name).is_file():
            raise ExportError(f"{'model' if full else 'adapter'} is missing {name} in {adapter_dir}")
    if adapter_dir.resolve() == out_dir.resolve():
        raise ExportError("export folder must differ from the adapter folder")

    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys([*required_files(full), *(n for n in OPTIONAL_FILES if (adapter_dir / n).is_file())]))
    for name in names:
        shutil.copyfile(adapter_dir / name, out_dir / name)
    if not full:
        try:
            adapter_config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
        except ValueError as exc:
            raise ExportError(f"{ADAPTER_CONFIG} is not valid JSON: {exc}") from exc
        # PEFT records None for a base it cannot name (the mean-pooled module); consumers need the base
        adapter_config["base_model_name_or_path"] = base_model_reference(base_model)
        (out_dir / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True))

    merged = None
    if merge_from is not None:
        from services.export.adapters.merged import MergeError, classifier_metadata, write_merged_model

        if classifier_metadata(adapter_dir) is not None:
            try:
                merged = {"path": MERGED_DIR, **write_merged_model(adapter_dir, merge_from, out_dir / MERGED_DIR)}
            except MergeError as exc:
                raise ExportError(str(exc)) from exc
            names.extend(p.relative_to(out_dir).as_posix() for p in (out_dir / MERGED_DIR).rglob("*") if p.is_file())

    files = []
    for name in sorted(names):
        target = out_dir / name
        files.append({"path": name, "sha256": sha256_of(target), "size": target.stat().st_size})

    manifest = {
        "format": FULL_FORMAT if full else EXPORT_FORMAT,
        "run_id": run_id,
        "base_model": base_model,
        "metrics": metrics,
        "files": files,
        "merged": merged,
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
    if manifest.get("format") not in (EXPORT_FORMAT, FULL_FORMAT):
        problems.append(f"unexpected format {manifest.get('format')!r}")
    listed = {entry.get("path") for entry in manifest.get("files", [])}
    problems.extend(f"manifest does not list {name}" for name in required_files(manifest.get("format") == FULL_FORMAT)
                    if name not in listed)
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

    name = FULL_WEIGHTS if is_full_model(out_dir) else ADAPTER_WEIGHTS
    weights = Path(out_dir) / name
    if not weights.is_file():
        raise ExportError(f"export is missing {name} in {out_dir}")
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ExportError(f"{name} does not load: {exc}") from exc
    if not tensors:
        raise ExportError(f"{name} holds no tensors")
    return len(tensors)


def finish_manifest(out_dir: Path, ref, outcomes: list, *, base_model: str, base_path: str) -> dict:
    """Add the formats written beside the adapter (services/export/formats.py) to export_manifest.json:
    their files (sha256 and size), each format's outcome and parity, the base model's pin (weights and
    tokenizer files' sha256) and the head (task, label space, heads, pooling, threshold, max_length);
    returns the manifest."""
    from services.export.formats import ADAPTER, base_model_pin

    out_dir = Path(out_dir)
    manifest = json.loads((out_dir / MANIFEST_FILE).read_text())
    listed = {f["path"] for f in manifest["files"]}
    files = list(manifest["files"])
    for outcome in outcomes:
        if not outcome.shipped or outcome.path is None:
            continue
        for p in sorted((out_dir / outcome.path).rglob("*")):
            name = p.relative_to(out_dir).as_posix()
            if p.is_file() and name not in listed:
                files.append({"path": name, "sha256": sha256_of(p), "size": p.stat().st_size})
    manifest["files"] = sorted(files, key=lambda f: f["path"])
    manifest["formats"] = [{"format": ADAPTER, "status": "shipped", "path": ".", "reason_code": None,
                            "message": None, "parity": None,
                            "runtime": "torch (full weights, services.common.encoder_classifier)"
                            if manifest.get("format") == FULL_FORMAT else "peft"},
                           *(o.as_json() for o in outcomes)]
    manifest["base"] = base_model_pin(base_model, base_path)
    manifest["head"] = ref.head_json()
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest
