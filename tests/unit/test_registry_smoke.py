"""The smoke check before a promotion: an export of a tiny trained adapter, loaded on its pinned base, must
reproduce the evaluator's outputs row by row; altered records, or another base, fail it."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from services.common.artifacts import ArtifactStore  # noqa: E402
from services.common.classifier_inference import predict  # noqa: E402
from services.common.jsonl import write_jsonl  # noqa: E402
from services.export.domain import build_adapter_export  # noqa: E402
from services.registry.smoke import SmokeFailed, pin_base_model, smoke_check  # noqa: E402
from services.trainer.local.engine import train  # noqa: E402
from services.trainer.local.tasks import SequenceClassification  # noqa: E402
from services.trainer.recipes import resolve_recipe  # noqa: E402
from tests.tiny_models import LABEL_SPACE, build_tiny_bert, sentiment_rows  # noqa: E402


@pytest.fixture(scope="module", params=["lora", "full"])
def version(request, tmp_path_factory):
    """A registered version as the registry keeps it: export, pin, the evaluator's records, the test rows; of a
    LoRA adapter, and of a fully fine-tuned model cut head + tail (the single-label default's kind)."""
    root = tmp_path_factory.mktemp(f"smoke-{request.param}")
    full = dict(method="full", learning_rate=1e-3, truncation="head_tail") if request.param == "full" else {}
    base = build_tiny_bert(root / "base")
    texts, labels = sentiment_rows()
    rows = [{"row_id": f"r{i:03d}", "text": t, "label": lab} for i, (t, lab) in enumerate(zip(texts, labels))]
    recipe = resolve_recipe("seqcls-lora-minilm", "single_label_classification",
                            {**dict(base_model=base, batch_size=40, learning_rate=1e-2, max_length=16, seed=2, epochs=3,
                                    eval_every_steps=20, patience=None), **full})
    trained = train(SequenceClassification(LABEL_SPACE), recipe, rows, rows, root / "w", root / "adapter")
    build_adapter_export(trained.adapter_dir, root / "export", run_id="run-1", base_model=base, metrics={})
    assert (root / "export" / ("model.safetensors" if full else "adapter_model.safetensors")).is_file()
    store = ArtifactStore(root / "store")
    outputs, _ = predict(base, trained.adapter_dir, [r["text"] for r in rows], LABEL_SPACE, 16)
    records = [{"row_id": r["row_id"], "model": "candidate", "output": o} for r, o in zip(rows, outputs)]
    return {"store": store, "base": base, "root": root, "registered": {
        "export": store.put_dir(root / "export").model_dump(), "base_model": base,
        "base_model_pin": pin_base_model(base).model_dump(), "label_space": LABEL_SPACE,
        "records": write_jsonl(store, records).model_dump(), "test": write_jsonl(store, rows).model_dump()}}


def test_the_export_on_its_pinned_base_reproduces_the_evaluators_outputs(version):
    result = smoke_check(version["store"], version["registered"], rows=20)
    assert result.passed and result.rows == 20 and result.matched == 20
    assert result.base_model_sha256 == version["registered"]["base_model_pin"]["sha256"]


def test_outputs_that_differ_from_the_records_fail_the_smoke_check_naming_the_rows(version):
    from contracts.common import ArtifactRef
    from services.common.jsonl import loads_jsonl

    store, reg = version["store"], version["registered"]
    honest = {r["row_id"]: r["output"] for r in loads_jsonl(store.read_bytes(ArtifactRef.model_validate(reg["records"])))}
    flipped = [{"row_id": rid, "model": "candidate", "output": "neg" if out == "pos" else "pos"}
               for rid, out in honest.items()]
    result = smoke_check(store, {**reg, "records": write_jsonl(store, flipped).model_dump()}, rows=20)
    assert not result.passed and result.matched == 0 and len(result.mismatched_row_ids) == 10


def test_a_base_whose_weights_differ_from_the_pin_is_refused(version, tmp_path):
    other = tmp_path / "other-base"
    shutil.copytree(version["base"], other)
    weights = next(p for p in other.iterdir() if p.suffix in (".safetensors", ".bin"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    reg = {**version["registered"], "base_model_pin": {"model": str(other), "sha256": version["registered"]["base_model_pin"]["sha256"]}}
    with pytest.raises(SmokeFailed, match="differ from the pin"):
        smoke_check(version["store"], reg)


def test_a_version_without_records_cannot_be_smoke_checked(version):
    with pytest.raises(SmokeFailed, match="no per-row records"):
        smoke_check(version["store"], {**version["registered"], "records": None})
