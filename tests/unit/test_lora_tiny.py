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


def recipe(base: str, pooling: str = "mean"):
    return resolve_recipe("seqcls-lora-minilm", "single_label_classification",
                          dict(base_model=base, batch_size=40, learning_rate=1e-2, max_length=16, seed=2, epochs=40,
                               eval_every_steps=20, patience=None, pooling=pooling))


# Both heads (services/common/encoder_classifier.py): each adapter must come back on its own head.
@pytest.fixture(scope="module", params=["cls", "mean"])
def trained(request, tiny_bert, tmp_path_factory):
    texts, labels = sentiment_rows()
    rows = [{"text": t, "label": lab} for t, lab in zip(texts, labels)]
    root = tmp_path_factory.mktemp(f"run-{request.param}")
    return train(SequenceClassification(LABEL_SPACE), recipe(tiny_bert, request.param), rows, rows, root / "w",
                 root / "adapter")


def test_adapter_files_and_label_order(trained, request):
    names = {p.name for p in trained.adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "labels.json"} <= names
    meta = json.loads((trained.adapter_dir / "labels.json").read_text())
    assert meta["label_space"] == LABEL_SPACE and meta["task"] == "sequence_classification" and meta["max_length"] == 16
    assert meta["pooling"] == request.node.callspec.params["trained"]  # the head it was trained with


def test_the_evaluator_rebuilds_the_head_the_adapter_was_trained_with(trained, tiny_bert, request):
    """labels.json's pooling keeps trainer and evaluator in step; asked for the other head, the
    evaluator refuses (PEFT alone would only warn about the adapter keys it cannot place)."""
    texts, _ = sentiment_rows()
    pooling = request.node.callspec.params["trained"]  # the head the fixture trained, not what labels.json says
    own = predict_labels(tiny_bert, trained.adapter_dir, texts, LABEL_SPACE, max_length=16)
    assert own == predict_labels(tiny_bert, trained.adapter_dir, texts, LABEL_SPACE, max_length=16, pooling=pooling)
    other = "cls" if pooling == "mean" else "mean"
    with pytest.raises(ValueError, match=f"trained with {pooling} pooling"):
        predict_labels(tiny_bert, trained.adapter_dir, texts, LABEL_SPACE, max_length=16, pooling=other)


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


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_base_model_baseline_is_deterministic(tiny_bert, pooling):
    texts, _ = sentiment_rows()
    assert (predict_labels(tiny_bert, None, texts, LABEL_SPACE, seed=3, pooling=pooling)
            == predict_labels(tiny_bert, None, texts, LABEL_SPACE, seed=3, pooling=pooling))


def test_mean_pooling_ignores_padding(tiny_bert):
    """The mean runs over real tokens only: a sentence scores the same alone and padded in a batch."""
    from services.common.encoder_classifier import build_encoder_classifier

    torch.manual_seed(0)
    model = build_encoder_classifier(tiny_bert, LABEL_SPACE, pooling="mean").eval()
    ids = torch.tensor([[2, 5, 6, 3, 0, 0, 0], [2, 5, 6, 7, 8, 9, 3]])
    mask = (ids != 0).long()
    mask[1] = 1
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[:1, :4], attention_mask=mask[:1, :4]).logits
        emb = model.embed(ids, mask)
        hidden = model.encoder(input_ids=ids[:1, :4], attention_mask=mask[:1, :4]).last_hidden_state
    assert torch.allclose(batch[0], alone[0], atol=1e-5)
    assert torch.allclose(emb[0], hidden[0].mean(dim=0), atol=1e-5)


def test_pooling_is_validated():
    from services.trainer.recipes import RecipeError

    with pytest.raises(RecipeError, match="pooling"):
        resolve_recipe("seqcls-lora-minilm", "single_label_classification", {"pooling": "max"})
    with pytest.raises(RecipeError, match="pooling"):
        resolve_recipe("chat-sft-lora", "chat_messages", {"pooling": "mean"})


def test_label_outside_space_is_rejected(tiny_bert, tmp_path):
    with pytest.raises(ValueError, match="not in label_space"):
        train(SequenceClassification(LABEL_SPACE), recipe(tiny_bert), [{"text": "good", "label": "meh"}], [],
              tmp_path / "w", tmp_path / "a")
