"""Adapter export: manifest, checksums, tamper detection and missing-file errors."""

from __future__ import annotations

import json

import pytest

from services.export.domain import ExportError, build_adapter_export, smoke_load, verify_export


@pytest.fixture
def adapter_dir(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file(
        {"base_model.model.x.lora_A.weight": torch.ones(2, 4), "base_model.model.x.lora_B.weight": torch.zeros(4, 2)},
        str(adapter / "adapter_model.safetensors"),
    )
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    (adapter / "labels.json").write_text(json.dumps({"label_space": ["neg", "pos"], "base_model": "m", "max_length": 16}))
    return adapter


def export(adapter_dir, out_dir):
    return build_adapter_export(adapter_dir, out_dir, run_id="run-1", base_model="m", metrics={"macro_f1": 0.9})


def test_export_writes_manifest_and_verifies(adapter_dir, tmp_path):
    out = tmp_path / "export"
    manifest = export(adapter_dir, out)
    assert manifest["format"] == "peft-lora-safetensors"
    assert manifest["run_id"] == "run-1" and manifest["metrics"] == {"macro_f1": 0.9}
    paths = [f["path"] for f in manifest["files"]]
    assert paths == sorted(paths) == ["adapter_config.json", "adapter_model.safetensors", "labels.json"]
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in manifest["files"])
    assert json.loads((out / "export_manifest.json").read_text()) == manifest
    assert verify_export(out) == []
    assert smoke_load(out) == 2


def test_corrupted_byte_is_named(adapter_dir, tmp_path):
    out = tmp_path / "export"
    export(adapter_dir, out)
    weights = out / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    problems = verify_export(out)
    assert problems and all("adapter_model.safetensors" in p for p in problems)


def test_deleted_file_is_reported(adapter_dir, tmp_path):
    out = tmp_path / "export"
    export(adapter_dir, out)
    (out / "labels.json").unlink()
    assert verify_export(out) == ["missing file: labels.json"]


def test_missing_adapter_weights_raise(adapter_dir, tmp_path):
    (adapter_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(ExportError, match="adapter_model.safetensors"):
        export(adapter_dir, tmp_path / "export")


def test_missing_adapter_config_raises(adapter_dir, tmp_path):
    (adapter_dir / "adapter_config.json").unlink()
    with pytest.raises(ExportError, match="adapter_config.json"):
        export(adapter_dir, tmp_path / "export")


def test_verify_without_manifest(tmp_path):
    assert verify_export(tmp_path) == ["missing export_manifest.json"]
