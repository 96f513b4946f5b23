"""The multi-field triage recipe on a tiny BERT: one encoder, one head per field, trained together;
a missing value is masked out of its head's loss; labels.json carries every head's label space; the
evaluator's inference rebuilds the heads and answers a dict per row."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from services.common.classifier_inference import predict, predict_triage  # noqa: E402
from services.common.encoder_classifier import IGNORE_INDEX, HeadSpec, MultiHeadClassifier, multi_head_loss  # noqa: E402
from services.trainer.local.engine import Callbacks, train  # noqa: E402
from services.trainer.local.tasks import MultiFieldTriage, head_spaces_of, task_for  # noqa: E402
from services.trainer.recipes import RecipeError, resolve_recipe  # noqa: E402
from tests.tiny_models import NEGATIVE, POSITIVE, build_tiny_bert  # noqa: E402

FIELDS = ("label", "severity", "component", "tags")


def triage_rows() -> list[dict]:
    """Every field is learnable from the words: sentiment -> label, subject -> severity and tags,
    intensifier -> component (none without one)."""
    rows = []
    for word, label in [(w, "pos") for w in POSITIVE] + [(w, "neg") for w in NEGATIVE]:
        for subject in ("movie", "film", "plot", "show"):
            for intensifier in ("really", "very", ""):
                rows.append({
                    "row_number": len(rows) + 1, "text": " ".join(f"the {subject} was {intensifier} {word}".split()),
                    "label": label,
                    "heads": {"severity": "Major" if subject in ("movie", "film") else "Minor",
                              "component": {"really": "Alpha", "very": "Beta"}.get(intensifier)},
                    "tags": [subject] if subject in ("plot", "show") else [],
                })
    return rows


def gold(row: dict, field: str):
    return row[field] if field in ("label", "tags") else row["heads"][field]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def triage_recipe(base: str, **kw):
    params = dict(base_model=base, batch_size=96, learning_rate=2e-2, max_length=16, seed=2, epochs=40,
                  eval_every_steps=10, patience=None)
    params.update(kw)
    return resolve_recipe(None, "multi_field_triage", params)  # the shape's default recipe


@pytest.fixture(scope="module")
def trained(tiny_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("triage")
    task = MultiFieldTriage(["neg", "pos"], ["plot", "show"])
    recipe = triage_recipe(tiny_bert)
    ckpts = []
    out = train(task, recipe, triage_rows(), triage_rows(), root / "work", root / "adapter",
                callbacks=Callbacks(on_checkpoint=ckpts.append))
    return task, recipe, out, ckpts


def test_the_default_recipe_for_triage_rows_trains_one_head_per_field(tiny_bert):
    recipe = triage_recipe(tiny_bert)
    assert recipe.name == "triage-lora-minilm" and recipe.task == "multi_field_triage" and recipe.pooling == "mean"
    assert isinstance(task_for(recipe, ["neg", "pos"], ["plot"]), MultiFieldTriage)
    with pytest.raises(RecipeError, match="pooling must be mean"):
        triage_recipe(tiny_bert, pooling="cls")
    with pytest.raises(RecipeError, match="one head per triage field"):
        resolve_recipe("triage-lora-minilm", "single_label_classification")
    with pytest.raises(RecipeError, match="head_weights apply"):
        resolve_recipe("seqcls-lora-minilm", "single_label_classification", {"head_weights": {"label": 2}})


def test_every_head_learns_and_the_loss_goes_down(trained, tiny_bert):
    task, recipe, out, ckpts = trained
    assert out.metric_name == "mean_head_f1"
    assert ckpts[-1].eval_loss < ckpts[0].eval_loss / 2
    assert ckpts[-1].metric > ckpts[0].metric and out.best_metric >= 0.9
    preds, _ = predict_triage(tiny_bert, out.adapter_dir, [r["text"] for r in triage_rows()])
    for field in FIELDS:
        pairs = [(gold(r, field), p[field]) for r, p in zip(triage_rows(), preds) if gold(r, field) is not None]
        assert sum(g == p for g, p in pairs) / len(pairs) >= 0.85, field


def test_the_parameters_of_every_head_changed(trained, tiny_bert):
    from safetensors.torch import load_file

    task, recipe, out, _ = trained
    saved = load_file(str(out.adapter_dir / "adapter_model.safetensors"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)  # as the engine seeds the fresh heads
        fresh = task.build_model(recipe)
    initial = {k: v for k, v in fresh.state_dict().items() if ".heads." in k and "original_module" in k}
    assert len(task.heads) == 4
    for i, head in enumerate(task.heads):
        weight = saved[f"base_model.model.heads.{i}.weight"]
        start = initial[f"base_model.model.heads.{i}.original_module.weight"]
        assert weight.shape == (len(head.labels), 32)
        assert not torch.allclose(weight, start), head.name
    assert any("lora_B" in k and float(v.abs().sum()) > 0 for k, v in saved.items())  # the encoder learned too


def test_labels_json_holds_every_head_s_label_space(trained):
    _, _, out, _ = trained
    meta = json.loads((out.adapter_dir / "labels.json").read_text())
    assert meta["task"] == "multi_field_triage" and meta["label_space"] == ["neg", "pos"]
    assert meta["heads"] == [
        {"name": "label", "labels": ["neg", "pos"], "multi_label": False},
        {"name": "component", "labels": ["Alpha", "Beta"], "multi_label": False},
        {"name": "severity", "labels": ["Major", "Minor"], "multi_label": False},
        {"name": "tags", "labels": ["plot", "show"], "multi_label": True},
    ]
    assert meta["head_weights"] == {"label": 1.0, "component": 1.0, "severity": 1.0, "tags": 1.0}
    assert meta["pooling"] == "mean" and meta["max_length"] == 16 and meta["threshold"] == 0.5


def test_inference_answers_a_dict_per_row_as_the_trainer_predicted(trained, tiny_bert):
    from peft import PeftModel

    task, _, out, _ = trained
    texts = [r["text"] for r in triage_rows()[:10]]
    # the evaluator's and the registry's entry point: predict() recognises a triage adapter
    preds, latency = predict(tiny_bert, out.adapter_dir, texts, ["neg", "pos"], 16)
    assert len(preds) == len(latency) == 10
    for p in preds:
        assert set(p) == set(FIELDS) and isinstance(p["tags"], list) and p["component"] in ("Alpha", "Beta")
    model = PeftModel.from_pretrained(MultiHeadClassifier(tiny_bert, task.heads), str(out.adapter_dir))
    in_memory, _ = task.predict(model, task.encode(triage_rows()[:10]))
    assert preds == in_memory
    with pytest.raises(ValueError, match="label_space"):
        predict(tiny_bert, out.adapter_dir, texts, ["pos", "neg"], 16)


def test_a_missing_value_adds_no_loss_to_its_head():
    heads = [HeadSpec("label", ("a", "b")), HeadSpec("component", ("x", "y", "z")), HeadSpec("tags", ("t",), True)]
    torch.manual_seed(0)
    label_logits = torch.randn(3, 2, requires_grad=True)
    component_logits = torch.randn(3, 3, requires_grad=True)
    tag_logits = torch.randn(3, 1, requires_grad=True)
    labels = torch.tensor([[0, 2], [1, IGNORE_INDEX], [1, 0]])  # row 1 has no component
    tags = torch.tensor([[1.0], [0.0], [0.0]])
    total, per_head = multi_head_loss([label_logits, component_logits, tag_logits], heads, labels, tags, [1, 1, 1])
    total.backward()
    # the component loss is the mean over the two rows that have one: row 1 neither counts nor dilutes it
    expected = torch.nn.functional.cross_entropy(component_logits[[0, 2]], torch.tensor([2, 0]))
    assert torch.allclose(per_head[1], expected)
    assert torch.equal(component_logits.grad[1], torch.zeros(3))
    assert label_logits.grad[1].abs().sum() > 0 and tag_logits.grad[1].abs().sum() > 0  # the row trains the rest
    assert torch.allclose(total, sum(per_head))

    # a batch without a single component: that head adds 0, not NaN
    none = torch.full((3, 2), IGNORE_INDEX)
    none[:, 0] = torch.tensor([0, 1, 1])
    total, per_head = multi_head_loss([label_logits, component_logits, tag_logits], heads, none, tags, [1, 1, 1])
    assert float(per_head[1].detach()) == 0.0 and torch.isfinite(total)


def test_the_loss_is_the_weighted_sum_of_the_heads():
    heads = [HeadSpec("label", ("a", "b")), HeadSpec("severity", ("hi", "lo"))]
    logits = [torch.randn(4, 2), torch.randn(4, 2)]
    labels = torch.tensor([[0, 1], [1, 1], [0, 0], [1, 0]])
    _, per_head = multi_head_loss(logits, heads, labels, None, [1, 1])
    total, _ = multi_head_loss(logits, heads, labels, None, [2.0, 0.5])
    assert torch.allclose(total, 2 * per_head[0] + 0.5 * per_head[1])


def test_head_weights_name_the_run_s_heads(tiny_bert, tmp_path):
    task = MultiFieldTriage(["neg", "pos"], ["plot", "show"])
    task.validate(triage_rows(), [])
    recipe = triage_recipe(tiny_bert, head_weights={"label": 2, "componnent": 1})
    with pytest.raises(ValueError, match="componnent"):
        task.build_model(recipe)
    with pytest.raises(ValueError, match="weight 0"):
        task.build_model(triage_recipe(tiny_bert, head_weights={f: 0 for f in FIELDS}))
    assert task.weights(triage_recipe(tiny_bert, head_weights={"severity": 3})) == [1.0, 1.0, 3.0, 1.0]


def test_head_spaces_come_from_the_rows_first_of_several_and_none_skipped():
    rows = [{"heads": {"component": ["Broker", "Store"], "severity": "Major"}},
            {"heads": {"component": None, "severity": "Minor"}}, {"heads": {"component": "Client", "severity": None}},
            {"heads": {"never": None}}]
    assert head_spaces_of(rows) == {"component": ["Broker", "Client"], "severity": ["Major", "Minor"]}
    with pytest.raises(ValueError, match="may not be named"):
        MultiFieldTriage(["a", "b"], head_spaces={"tags": ["x"]}).validate([], [])


def test_preflight_passes_the_triage_recipe_on_an_encoder(tiny_bert):
    from services.trainer.preflight import DeviceInfo, run_preflight

    report = run_preflight(triage_recipe(tiny_bert), backend="local", shape="multi_field_triage", train_rows=96,
                           eval_rows=96, label_count=2, data_warnings=[],
                           device=DeviceInfo(kind="cpu", name="cpu (test)", available_bytes=64 << 30,
                                             cuda_available=False))
    assert report.passed, report.blockers
    capability = [c.message for c in report.checks if c.name == "capability" and c.status == "ok"]
    assert any("multi_field_triage head (mean pooling)" in m for m in capability)


def test_the_evaluator_scores_the_trained_triage_model_field_by_field(trained, tiny_bert):
    pytest.importorskip("faststream")
    from contracts.common import EvaluationSettings, FieldMapping, RunPlan
    from services.evaluator import domain
    from services.evaluator.adapters.classical import score_classical_triage
    from services.evaluator.app import score_local_candidate

    _, _, out, _ = trained
    rows = [dict(r, row_id=f"r{i}") for i, r in enumerate(triage_rows())]
    plan = RunPlan(locator="jsonl:/x.jsonl", target="reviews",
                   mapping=FieldMapping(shape="multi_field_triage", text=["text"], label="label",
                                        heads={"severity": "severity", "component": "component"}, tags="tags"))
    kind = domain.kind_of("multi_field_triage", plan.mapping.shape)
    candidate = score_local_candidate(tiny_bert, out.adapter_dir, rows, ["neg", "pos"], kind, plan)
    assert all(set(o) == set(FIELDS) for o in candidate.outputs)
    baseline, _ = score_classical_triage(rows, [], rows)
    a = domain.assess(rows, candidate, baseline, kind=kind, label_space=["neg", "pos"], settings=EvaluationSettings(),
                      severity_field=domain.severity_field(rows, kind))
    fields = a.candidate_report.metrics["fields"]
    assert set(fields) == set(FIELDS) and "calibration" in fields["severity"]
    assert fields["component"]["n"] == sum(r["heads"]["component"] is not None for r in rows)
    assert a.candidate_report.judge_mean >= 0.85
    rec = next(r for r in a.judged.records if r["model"] == "candidate" and r["gold"]["component"] is None)
    assert set(rec["correct"]) == {"label", "severity", "tags"}  # no component: judged on the other fields
