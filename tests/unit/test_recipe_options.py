"""The encoder recipe's options measured for the NLBSE default (bench/nlbse.py): full fine-tuning
(method "full"), head + tail truncation and layer-wise learning rates, on a tiny BERT built from a
config; and that the evaluator scores what the trainer trained (same weights, same truncation)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from services.common.truncation import encode_ids  # noqa: E402
from services.evaluator.adapters.classifier import predict_labels  # noqa: E402
from services.trainer.local.engine import layer_depth, param_groups, train  # noqa: E402
from services.trainer.local.tasks import SequenceClassification  # noqa: E402
from services.trainer.recipes import RecipeError, resolve_recipe  # noqa: E402
from tests.tiny_models import LABEL_SPACE, build_tiny_bert, sentiment_rows  # noqa: E402


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def rows():
    texts, labels = sentiment_rows()
    return [{"text": t, "label": lab} for t, lab in zip(texts, labels)]


def recipe(base: str, **kw):
    return resolve_recipe("seqcls-lora-minilm", "single_label_classification",
                          {"base_model": base, "batch_size": 40, "learning_rate": 1e-2, "max_length": 16, "seed": 2,
                           "epochs": 40, "eval_every_steps": 20, "patience": None, "pooling": "mean", **kw})


@pytest.fixture(scope="module")
def full_run(tiny_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    r = recipe(tiny_bert, method="full", learning_rate=3e-3, truncation="head_tail", layer_lr_decay=0.8)
    task = SequenceClassification(LABEL_SPACE)
    return train(task, r, rows(), rows(), root / "w", root / "out"), task, r


def test_full_fine_tuning_trains_every_weight_and_saves_the_whole_model(full_run, tiny_bert):
    outcome, _, _ = full_run
    assert outcome.trainable_params == outcome.total_params  # no frozen base, no adapter
    names = {p.name for p in outcome.adapter_dir.iterdir()}
    assert "model.safetensors" in names and "adapter_config.json" not in names
    meta = json.loads((outcome.adapter_dir / "labels.json").read_text())
    assert meta["method"] == "full" and meta["truncation"] == "head_tail"
    from safetensors.torch import load_file
    from transformers import AutoModel

    saved = load_file(str(outcome.adapter_dir / "model.safetensors"))
    base = AutoModel.from_pretrained(tiny_bert).state_dict()
    moved = [k for k, v in base.items() if f"encoder.{k}" in saved and not torch.equal(v, saved[f"encoder.{k}"])]
    assert any("layer.0." in k for k in moved) and any("embeddings" in k for k in moved)  # the encoder itself moved


def test_the_evaluator_scores_the_fully_tuned_model_as_the_trainer_does(full_run, tiny_bert):
    outcome, task, r = full_run
    texts, labels = sentiment_rows()
    preds = predict_labels(tiny_bert, outcome.adapter_dir, texts, LABEL_SPACE, max_length=16)
    assert sum(p == lab for p, lab in zip(preds, labels)) / len(labels) >= 0.9
    assert outcome.best_metric is not None
    from services.common.metrics import macro_f1

    # the trainer's own evaluation of the exported (best) weights equals the evaluator's
    assert macro_f1(labels, preds, LABEL_SPACE) == pytest.approx(outcome.best_metric)


def test_head_tail_keeps_both_ends_and_the_window(tiny_bert):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    text = "good " + "the " * 30 + "terrible"
    head = encode_ids(tok, [text], 8, "head")[0]
    both = encode_ids(tok, [text], 8, "head_tail")[0]
    good, terrible = tok.convert_tokens_to_ids(["good", "terrible"])
    assert len(head) == len(both) == 8
    assert good in head and terrible not in head
    assert both[1] == good and both[-2] == terrible  # [CLS] head ... tail [SEP]
    assert both[0] == tok.cls_token_id and both[-1] == tok.sep_token_id
    short = "good movie"
    assert encode_ids(tok, [short], 8, "head_tail") == encode_ids(tok, [short], 8, "head")  # nothing to cut
    with pytest.raises(ValueError, match="truncation"):
        encode_ids(tok, [short], 8, "middle")


def test_layer_wise_rates_decay_from_the_head_down():
    r = resolve_recipe("seqcls-lora-minilm", "single_label_classification",
                       {"method": "full", "learning_rate": 1e-4, "layer_lr_decay": 0.5})
    names = ["encoder.embeddings.word_embeddings.weight", "encoder.encoder.layer.0.attention.self.query.weight",
             "encoder.encoder.layer.1.output.dense.weight", "classifier.weight"]
    assert [layer_depth(n) for n in names] == [0, 1, 2, None]
    groups = param_groups([(n, torch.nn.Parameter(torch.zeros(1))) for n in names], r)
    lrs = sorted(g["lr"] for g in groups)
    assert lrs == pytest.approx([0.25e-4, 0.5e-4, 1e-4])  # embeddings, layer 0, (layer 1 + head)
    assert groups[0]["lr"] == pytest.approx(1e-4) and len(groups[0]["params"]) == 2  # head first: progress reports it
    one = param_groups([(n, torch.nn.Parameter(torch.zeros(1))) for n in names],
                       resolve_recipe("seqcls-lora-minilm", "single_label_classification", {}))
    assert len(one) == 1 and "lr" not in one[0]


def test_the_single_label_default_is_the_configuration_the_nlbse_tuning_chose():
    """seqcls-full-minilm is bench/nlbse.py's `full_ht128` tuning config (the LoRA recipe with those overrides),
    field for field: the docstring's table measured this recipe and no other."""
    from bench.nlbse import CONFIGS, RECIPE, TUNE_BASE

    default = resolve_recipe(None, "single_label_classification", {})
    tuned = resolve_recipe(TUNE_BASE, "single_label_classification", {**CONFIGS["full_ht128"], "patience": None})
    assert default.name == RECIPE == "seqcls-full-minilm"
    assert default.model_dump(exclude={"name", "description"}) == tuned.model_dump(exclude={"name", "description"})
    assert (default.method, default.truncation, default.max_length) == ("full", "head_tail", 128)


def test_options_are_validated():
    with pytest.raises(RecipeError, match="method full"):
        resolve_recipe("seqcls-lora-minilm", "single_label_classification", {"method": "full", "pooling": "cls"})
    with pytest.raises(RecipeError, match="method full"):
        resolve_recipe("triage-lora-minilm", "multi_field_triage", {"method": "full"})
    with pytest.raises(RecipeError, match="head_tail"):
        resolve_recipe("chat-sft-lora", "chat_messages", {"truncation": "head_tail"})
    with pytest.raises(RecipeError, match="layer_lr_decay"):
        resolve_recipe("seqcls-lora-minilm", "single_label_classification", {"layer_lr_decay": 0})


def test_preflight_counts_every_weight_of_a_full_fine_tune(full_run, tiny_bert):
    from services.trainer.preflight import inspect_base_model

    outcome, _, r = full_run
    facts = inspect_base_model(tiny_bert, r.task)
    assert facts.trainable_params(r, len(LABEL_SPACE)) == outcome.trainable_params
