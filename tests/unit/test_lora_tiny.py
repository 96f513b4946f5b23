"""LoRA training and prediction on a tiny randomly initialised BERT, so the whole path runs in seconds."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from services.evaluator.adapters.classifier import predict_labels  # noqa: E402
from services.trainer.adapters.lora import (  # noqa: E402
    ClassificationRecipe,
    TrainingDiverged,
    TrainingProgress,
    train_sequence_classifier,
)

WORDS = [
    "good", "great", "fine", "lovely", "bad", "awful", "poor", "terrible",
    "the", "movie", "film", "plot", "acting", "was", "really", "very", "a", "show",
]
POSITIVE = ["good", "great", "fine", "lovely"]
NEGATIVE = ["bad", "awful", "poor", "terrible"]
LABEL_SPACE = ["neg", "pos"]


def make_rows() -> tuple[list[str], list[str]]:
    texts, labels = [], []
    fillers = ["the movie was", "the film was really", "a show", "the plot was very", "acting"]
    for i, filler in enumerate(fillers):
        for j, word in enumerate(POSITIVE):
            texts.append(f"{filler} {word}" if (i + j) % 2 else f"{word} {filler}")
            labels.append("pos")
        for j, word in enumerate(NEGATIVE):
            texts.append(f"{filler} {word}" if (i + j) % 2 else f"{word} {filler}")
            labels.append("neg")
    return texts, labels


def make_tokenizer(tokenizer_cls, vocab_path):
    import inspect

    # transformers 5 renamed the argument (vocab_file -> vocab) and silently ignores the old one
    params = inspect.signature(tokenizer_cls.__init__).parameters
    key = "vocab_file" if "vocab_file" in params else "vocab"
    tokenizer = tokenizer_cls(**{key: str(vocab_path)})
    assert tokenizer.convert_tokens_to_ids("good") != tokenizer.unk_token_id
    return tokenizer


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny-bert")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = make_tokenizer(BertTokenizerFast, vocab)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(str(root))
    tokenizer.save_pretrained(str(root))
    return str(root)


def tiny_recipe(base: str, **overrides) -> ClassificationRecipe:
    # whole-dataset batches: minibatches of a random 32-wide BERT are too noisy to converge in 40 steps
    params = dict(base_model=base, max_steps=40, batch_size=40, learning_rate=1e-2, max_length=16, seed=2)
    params.update(overrides)
    return ClassificationRecipe(**params)


@pytest.fixture(scope="module")
def trained(tiny_bert, tmp_path_factory):
    texts, labels = make_rows()
    seen: list[TrainingProgress] = []
    out = tmp_path_factory.mktemp("adapter")
    result = train_sequence_classifier(texts, labels, LABEL_SPACE, tiny_recipe(tiny_bert), out, seen.append, 10)
    return result, seen


def adapter_tensors(adapter_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def test_adapter_files_are_written(trained):
    result, _ = trained
    for name in ("adapter_model.safetensors", "adapter_config.json", "labels.json"):
        assert (result.adapter_dir / name).is_file(), name
    assert result.steps == 40
    assert 0 < result.trainable_params < result.total_params
    assert math.isfinite(result.final_loss)


def test_lora_weights_moved_from_initialisation(trained):
    result, _ = trained
    tensors = adapter_tensors(result.adapter_dir)
    lora_b = [name for name in tensors if "lora_B" in name]
    assert lora_b, list(tensors)
    # lora_B starts at zero, so any non-zero value proves the adapter was trained
    assert any(tensors[name].abs().sum() > 0 for name in lora_b)
    assert any("classifier" in name for name in tensors), "the head must ship with the adapter"


def test_progress_reports_increasing_steps(trained):
    _, seen = trained
    assert [p.step for p in seen] == [10, 20, 30, 40]
    assert all(p.max_steps == 40 and math.isfinite(p.loss) for p in seen)
    assert seen[-1].eta_s == 0


def test_same_seed_gives_identical_adapter(trained, tiny_bert, tmp_path):
    first, _ = trained
    texts, labels = make_rows()
    second = train_sequence_classifier(texts, labels, LABEL_SPACE, tiny_recipe(tiny_bert), tmp_path / "again")
    a, b = adapter_tensors(first.adapter_dir), adapter_tensors(second.adapter_dir)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_adapter_learns_the_training_rows(trained, tiny_bert):
    result, _ = trained
    texts, labels = make_rows()
    predicted = predict_labels(tiny_bert, result.adapter_dir, texts, LABEL_SPACE, max_length=16)
    correct = sum(p == t for p, t in zip(predicted, labels))
    assert correct / len(labels) >= 0.9


def test_base_model_baseline_is_deterministic(tiny_bert):
    texts, _ = make_rows()
    first = predict_labels(tiny_bert, None, texts, LABEL_SPACE, max_length=16)
    second = predict_labels(tiny_bert, None, texts, LABEL_SPACE, max_length=16)
    assert first == second
    assert set(first) <= set(LABEL_SPACE)


def test_absurd_learning_rate_diverges(tiny_bert, tmp_path):
    texts, labels = make_rows()
    recipe = tiny_recipe(tiny_bert, learning_rate=1e6, warmup_ratio=0.0)
    with pytest.raises(TrainingDiverged):
        train_sequence_classifier(texts, labels, LABEL_SPACE, recipe, tmp_path / "diverged")
    assert not (tmp_path / "diverged" / "adapter_model.safetensors").exists()


def test_label_outside_space_is_rejected(tiny_bert, tmp_path):
    with pytest.raises(ValueError, match="not in label_space"):
        train_sequence_classifier(["good"], ["meh"], LABEL_SPACE, tiny_recipe(tiny_bert), tmp_path)
