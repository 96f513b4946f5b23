"""The registry's edge with model files: pinning a base model by the sha256 of its weights, and the smoke
check before a promotion (the exported artifact on its pinned base reproduces the evaluator's outputs)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from contracts.events import BaseModelPin, SmokeCheck
from services.common.artifacts import ArtifactIntegrityError, ArtifactStore
from services.common.jsonl import loads_jsonl
from services.common.model_pins import WEIGHT_SUFFIXES, weights_sha256  # noqa: F401 (pinned here before)
from services.common.models import resolve_base_model

CANDIDATE = "candidate"  # the records' model name for the candidate (services/evaluator/app.py)


class SmokeFailed(Exception):
    """The smoke check could not run or did not reproduce; the message says which."""


def pin_base_model(base_model: str) -> BaseModelPin:
    return BaseModelPin(model=base_model, sha256=weights_sha256(Path(resolve_base_model(base_model))))


def smoke_check(store: ArtifactStore, registered: dict, rows: int = 20) -> SmokeCheck:
    """Load the version's export on its pinned base and predict `rows` test rows (the first by row_id that
    the evaluator's records cover); passed when every prediction equals the evaluator's. Raises
    SmokeFailed when it cannot run at all (no evidence to reproduce, an unreadable artifact, another base)."""
    from contracts.common import ArtifactRef
    from services.common.classifier_inference import predict, trained_metadata

    pin = registered.get("base_model_pin") or {}
    if not registered.get("records") or not registered.get("test"):
        raise SmokeFailed("the version carries no per-row records or test rows to reproduce")
    base_path = Path(resolve_base_model(pin.get("model") or registered["base_model"]))
    actual = weights_sha256(base_path)
    if pin.get("sha256") is None or actual != pin["sha256"]:
        raise SmokeFailed(f"base model {pin.get('model')}: weights sha256 {actual} differ from the pin "
                          f"{pin.get('sha256')}: the adapter is not served on another base")
    try:
        records = loads_jsonl(store.read_bytes(ArtifactRef.model_validate(registered["records"])))
        test_rows = loads_jsonl(store.read_bytes(ArtifactRef.model_validate(registered["test"])))
    except ArtifactIntegrityError as exc:
        raise SmokeFailed(f"evidence unreadable: {exc}") from exc
    expected = {r["row_id"]: r["output"] for r in records if r.get("model") == CANDIDATE}
    chosen = sorted((r for r in test_rows if r.get("row_id") in expected), key=lambda r: r["row_id"])[:rows]
    if not chosen:
        raise SmokeFailed("no test row has a candidate record to compare with")
    with tempfile.TemporaryDirectory(prefix="tuneline-smoke-") as tmp:
        try:
            export_dir = store.materialize_dir(ArtifactRef.model_validate(registered["export"]), Path(tmp) / "export")
        except ArtifactIntegrityError as exc:
            raise SmokeFailed(f"export unreadable: {exc}") from exc
        meta = trained_metadata(export_dir)
        space = list(meta.get("label_space") or registered.get("label_space") or [])
        multi = meta.get("task") == "multi_label_classification" or meta.get("multi_label") is True
        try:
            outputs, _ = predict(str(base_path), export_dir, [r["text"] for r in chosen], space,
                                 int(meta.get("max_length") or 128), multi_label=multi,
                                 threshold=float(meta.get("threshold") or 0.5))
        except (ValueError, RuntimeError, OSError) as exc:
            raise SmokeFailed(f"the export does not load on {pin.get('model')}: {type(exc).__name__}: {exc}") from exc
    mismatched = [r["row_id"] for r, out in zip(chosen, outputs) if out != expected[r["row_id"]]]
    return SmokeCheck(rows=len(chosen), matched=len(chosen) - len(mismatched), passed=not mismatched,
                      base_model_sha256=actual, mismatched_row_ids=mismatched[:10])
