"""The trainer's adapter as the evaluator reads it: a tiny randomly initialised BERT trained by the
local engine, then scored by the evaluator's predict_labels (the format between the two services)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from services.evaluator.adapters.classifier import predict_labels  # noqa: E402
from services.trainer.local.engine import train  # noqa: E402
from services.trainer.local.tasks import SequenceClassification  # noqa: E402
from services.trainer.recipes import resolve_recipe  # noqa: E402
from tests.tiny_models import LABEL_SPACE, build_tiny_bert, sentiment_rows  # noqa: E402


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def recipe(base: str):
    return resolve_recipe("seqcls-lora-minilm", "single_label_classification",
                          dict(base_model=base, batch_size=40, learning_rate=1e-2, max_length=16, seed=2, epochs=40,
                               eval_every_steps=20, patience=None))


@pytest.fixture(scope="module")
def trained(tiny_bert, tmp_path_factory):
    texts, labels = sentiment_rows()
    rows = [{"text": t, "label": lab} for t, lab in zip(texts, labels)]
    root = tmp_path_factory.mktemp("run")
    return train(SequenceClassification(LABEL_SPACE), recipe(tiny_bert), rows, rows, root / "w", root / "adapter")


def test_adapter_files_and_label_order(trained):
    names = {p.name for p in trained.adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "labels.json"} <= names
    meta = json.loads((trained.adapter_dir / "labels.json").read_text())
    assert meta["label_space"] == LABEL_SPACE and meta["task"] == "sequence_classification" and meta["max_length"] == 16


def test_lora_weights_moved_from_initialisation(trained):
    from safetensors.torch import load_file

    tensors = load_file(str(trained.adapter_dir / "adapter_model.safetensors"))
    lora_b = [v for k, v in tensors.items() if "lora_B" in k]
    assert lora_b and any(float(v.abs().sum()) > 0 for v in lora_b)  # B starts at zero
    assert trained.trainable_params < trained.total_params / 2


def test_evaluator_reads_the_adapter_and_it_learned(trained, tiny_bert):
    texts, labels = sentiment_rows()
    tuned = predict_labels(tiny_bert, trained.adapter_dir, texts, LABEL_SPACE, max_length=16)
    assert sum(t == lab for t, lab in zip(tuned, labels)) / len(labels) >= 0.9


def test_evaluator_refuses_another_label_order(trained, tiny_bert):
    with pytest.raises(ValueError, match="label_space"):
        predict_labels(tiny_bert, trained.adapter_dir, ["good"], list(reversed(LABEL_SPACE)), max_length=16)


def test_base_model_baseline_is_deterministic(tiny_bert):
    texts, _ = sentiment_rows()
    assert predict_labels(tiny_bert, None, texts, LABEL_SPACE, seed=3) == predict_labels(tiny_bert, None, texts,
                                                                                        LABEL_SPACE, seed=3)


def test_label_outside_space_is_rejected(tiny_bert, tmp_path):
    with pytest.raises(ValueError, match="not in label_space"):
        train(SequenceClassification(LABEL_SPACE), recipe(tiny_bert), [{"text": "good", "label": "meh"}], [],
              tmp_path / "w", tmp_path / "a")
