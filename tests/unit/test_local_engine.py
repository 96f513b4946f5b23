"""The local training loop on tiny models: learning, reproducibility, crash-resume, early stopping,
control (cancel/pause), divergence, multi-label, chat SFT with assistant-only loss."""

from __future__ import annotations

import json
import threading

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from services.trainer.local.engine import (  # noqa: E402
    LATEST,
    Callbacks,
    Control,
    TrainingCancelled,
    TrainingDiverged,
    batch_indices,
    load_latest_checkpoint,
    train,
)
from services.trainer.local.tasks import IGNORE_INDEX, ChatSFT, SequenceClassification, micro_f1  # noqa: E402
from services.trainer.recipes import resolve_recipe  # noqa: E402
from tests.tiny_models import LABEL_SPACE, build_tiny_bert, build_tiny_llama, colour_conversations, sentiment_rows  # noqa: E402


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def rows() -> list[dict]:
    texts, labels = sentiment_rows()
    return [{"row_number": i + 1, "text": t, "label": lab} for i, (t, lab) in enumerate(zip(texts, labels))]


def cls_recipe(base: str, **kw):
    # whole-dataset batches: minibatches of a random 32-wide BERT are too noisy to converge quickly
    params = dict(base_model=base, batch_size=40, learning_rate=1e-2, max_length=16, seed=2, epochs=40,
                  eval_every_steps=10, patience=None)
    params.update(kw)
    return resolve_recipe("seqcls-lora-minilm", "single_label_classification", params)


def adapter_tensors(adapter_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def full_run(tiny_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    seen, ckpts = [], []
    out = train(SequenceClassification(LABEL_SPACE), cls_recipe(tiny_bert), rows(), rows(), root / "work",
                root / "adapter", callbacks=Callbacks(on_progress=seen.append, on_checkpoint=ckpts.append),
                progress_every_s=0.0)
    return out, seen, ckpts


def test_learns_and_reports(full_run):
    out, seen, ckpts = full_run
    assert out.steps == out.max_steps == 40
    assert out.best_metric == 1.0 and out.metric_name == "macro_f1"
    assert [p.step for p in seen] == list(range(1, 41))
    assert seen[-1].loss < seen[0].loss
    assert [c.step for c in ckpts] == [10, 20, 30, 40]
    assert any(c.is_best for c in ckpts)
    assert (out.adapter_dir / "adapter_model.safetensors").exists()


def test_resume_after_crash_repeats_no_step_and_ends_identical(tiny_bert, full_run, tmp_path):
    """Kill the run after step 20's checkpoint (raise from the callback), start again on the same
    work directory: it resumes at step 21 and its adapter equals the unbroken run's, tensor for tensor."""
    out_full, _, _ = full_run

    class Crash(Exception):
        pass

    def crash_at_20(c):
        if c.step == 20:
            raise Crash

    with pytest.raises(Crash):
        train(SequenceClassification(LABEL_SPACE), cls_recipe(tiny_bert), rows(), rows(), tmp_path / "work",
              tmp_path / "a1", callbacks=Callbacks(on_checkpoint=crash_at_20))
    steps_after = []
    out = train(SequenceClassification(LABEL_SPACE), cls_recipe(tiny_bert), rows(), rows(), tmp_path / "work",
                tmp_path / "a2", callbacks=Callbacks(on_progress=lambda p: steps_after.append(p.step)),
                progress_every_s=0.0)
    assert out.resumed_from_step == 20
    assert steps_after[0] == 21 and len(steps_after) == 20
    assert same_tensors(adapter_tensors(out.adapter_dir), adapter_tensors(out_full.adapter_dir))


def test_torn_latest_checkpoint_falls_back_to_the_one_before(tiny_bert, tmp_path):
    work = tmp_path / "work"
    train(SequenceClassification(LABEL_SPACE), cls_recipe(tiny_bert, epochs=20), rows(), rows(), work, tmp_path / "a")
    newest = sorted(work.glob("ckpt-*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[:100])  # torn write (what the atomic rename prevents)
    warnings = []
    state = load_latest_checkpoint(work, lambda code, msg: warnings.append(code))
    assert state is not None and state["step"] == 10
    assert warnings == ["training.checkpoint_unreadable"]
    assert (work / LATEST).exists()


def test_same_seed_same_adapter_and_batches_are_a_function_of_the_step(tiny_bert, tmp_path, full_run):
    out = train(SequenceClassification(LABEL_SPACE), cls_recipe(tiny_bert), rows(), rows(), tmp_path / "w",
                tmp_path / "a")
    assert same_tensors(adapter_tensors(out.adapter_dir), adapter_tensors(full_run[0].adapter_dir))
    assert batch_indices(7, 40, 16, 3) == batch_indices(7, 40, 16, 3)
    epoch = [i for s in (1, 2, 3) for i in batch_indices(s, 40, 16, 3)]
    assert sorted(epoch) == list(range(40))  # one epoch covers every row once


def test_early_stopping_exports_the_best_checkpoint(tiny_bert, tmp_path):
    ckpts = []
    out = train(SequenceClassification(LABEL_SPACE), cls_recipe(tiny_bert, epochs=200, eval_every_steps=5, patience=2),
                rows(), rows(), tmp_path / "w", tmp_path / "a", callbacks=Callbacks(on_checkpoint=ckpts.append))
    assert out.stopped_early and out.steps < 200
    best = [c for c in ckpts if c.is_best][-1]
    assert out.best_step == best.step and out.best_metric == best.metric
    # the last two evaluations did not improve on the best one
    assert [c.is_best for c in ckpts[-2:]] == [False, False]
    exported = adapter_tensors(out.adapter_dir)
    saved_best = torch.load(tmp_path / "w" / "best.pt", weights_only=False)
    assert saved_best["step"] == best.step
    head = [k for k in exported if "classifier" in k and k.endswith("weight")][0]
    live = [v for k, v in saved_best["trainable"].items() if "classifier" in k and k.endswith("weight")][0]
    assert torch.equal(exported[head], live)
    # started again on the same work directory (a redelivery after the last checkpoint, or a tuning winner's
    # checkpoints taken over): it trains no step past the early stop and reports what the first run ended with
    seen = []
    again = train(SequenceClassification(LABEL_SPACE), cls_recipe(tiny_bert, epochs=200, eval_every_steps=5, patience=2),
                  rows(), rows(), tmp_path / "w", tmp_path / "a2", callbacks=Callbacks(on_progress=seen.append),
                  progress_every_s=0.0)
    assert seen == [] and again.resumed_from_step == out.steps == again.steps
    assert again.stopped_early and (again.best_step, again.best_metric) == (out.best_step, out.best_metric)
    assert again.final_loss == out.final_loss
    assert same_tensors(adapter_tensors(again.adapter_dir), exported)


def test_cancel_stops_between_steps(tiny_bert, tmp_path):
    control = Control()

    def cancel_at_5(p):
        if p.step == 5:
            control.cancel("alice")

    with pytest.raises(TrainingCancelled, match="alice at step 5"):
        train(SequenceClassification(LABEL_SPACE), cls_recipe(tiny_bert), rows(), rows(), tmp_path / "w",
              tmp_path / "a", control=control, callbacks=Callbacks(on_progress=cancel_at_5), progress_every_s=0.0)
    assert not (tmp_path / "a").exists()


def test_pause_checkpoints_waits_and_resumes(tiny_bert, tmp_path):
    control = Control()
    events = []

    def on_progress(p):
        if p.step == 3:
            control.pause("bob")

    def on_pause(step):
        events.append(("paused", step))
        assert (tmp_path / "w" / LATEST).exists()  # the pause wrote a checkpoint first
        threading.Timer(0.3, control.resume, args=("bob",)).start()

    out = train(SequenceClassification(LABEL_SPACE), cls_recipe(tiny_bert, epochs=8), rows(), rows(), tmp_path / "w",
                tmp_path / "a", control=control, progress_every_s=0.0,
                callbacks=Callbacks(on_progress=on_progress, on_pause=on_pause,
                                    on_resume=lambda s: events.append(("resumed", s))))
    assert events == [("paused", 3), ("resumed", 3)]
    assert out.steps == 8


def test_absurd_learning_rate_diverges(tiny_bert, tmp_path):
    with pytest.raises(TrainingDiverged):
        train(SequenceClassification(LABEL_SPACE), cls_recipe(tiny_bert, learning_rate=10, warmup_ratio=0.0,
                                                              max_grad_norm=1e6, epochs=60),
              rows(), rows(), tmp_path / "w", tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_divergence_rule():
    from services.trainer.local.engine import _check_divergence, _State

    recipe = cls_recipe("unused")
    st = _State()
    _check_divergence(1.0, st, recipe)  # the first loss is the reference
    for _ in range(10):
        _check_divergence(0.1, st, recipe)
    _check_divergence(9.9, st, recipe)  # under 10x the reference: a bad step, not divergence
    with pytest.raises(TrainingDiverged, match="exploded"):
        _check_divergence(10.5, st, recipe)
    with pytest.raises(TrainingDiverged, match="nan"):
        _check_divergence(float("nan"), _State(), recipe)


def test_multi_label_trains_one_sigmoid_per_label(tiny_bert, tmp_path):
    """The tiny random BERT's pooled output barely varies between inputs, so with BCE it only learns
    the label marginals (CE escapes that; BCE does not within a test's budget). What this test can
    and does check: BCE over the tag space drives the eval loss down, predictions are label lists,
    and the metric is micro-F1 (real learning of tags is checked on all-MiniLM-L6-v2 in the slow suite)."""
    data = []
    for r in rows():
        tags = [r["label"]] + (["plot"] if "plot" in r["text"] else [])
        data.append({**r, "tags": tags})
    recipe = resolve_recipe("multilabel-lora-minilm", "multi_field_triage",
                            dict(base_model=tiny_bert, batch_size=40, learning_rate=1e-2, max_length=16, seed=2,
                                 epochs=30, eval_every_steps=10, patience=None))
    task = SequenceClassification(["neg", "plot", "pos"], multi_label=True)
    ckpts = []
    out = train(task, recipe, data, data, tmp_path / "w", tmp_path / "a", callbacks=Callbacks(on_checkpoint=ckpts.append))
    assert out.metric_name == "micro_f1"
    assert ckpts[-1].eval_loss < ckpts[0].eval_loss < 0.7
    assert json.loads((out.adapter_dir / "labels.json").read_text())["task"] == "multi_label_classification"
    preds, _ = task.predict(train_model_for_predict(task, recipe, out.adapter_dir), task.encode(data[:3]))
    assert all(isinstance(p, list) and set(p) <= {"neg", "plot", "pos"} for p in preds)
    assert micro_f1([["a"], ["b", "c"]], [["a"], ["b"]]) == pytest.approx(0.8)
    assert micro_f1([[]], [[]]) == 1.0


def train_model_for_predict(task, recipe, adapter_dir):
    from peft import PeftModel

    model = task.build_model(recipe)  # fresh base + LoRA, then the trained adapter's weights
    return PeftModel.from_pretrained(model.get_base_model(), str(adapter_dir))


def test_chat_sft_loss_only_on_assistant_tokens(tiny_llama):
    task = ChatSFT()
    task.build_model(resolve_recipe("chat-sft-lora", "chat_messages", dict(base_model=tiny_llama, max_length=64)))
    ids, labels = task.tokenize_conversation(colour_conversations()[0]["messages"])
    learned = [task.tokenizer.convert_ids_to_tokens(t) for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert learned == ["it", "is", "blue", "<|end|>"]
    assert len(ids) == len(labels) > len(learned)


def test_chat_sft_learns_the_answers(tiny_llama, tmp_path):
    data = colour_conversations()
    recipe = resolve_recipe("chat-sft-lora", "chat_messages",
                            dict(base_model=tiny_llama, max_length=64, batch_size=24, learning_rate=2e-2, epochs=40,
                                 eval_every_steps=10, patience=None, seed=1))
    ckpts = []
    out = train(ChatSFT(), recipe, data, data[:6], tmp_path / "w", tmp_path / "a",
                callbacks=Callbacks(on_checkpoint=ckpts.append))
    assert out.metric_name == "neg_eval_loss"
    assert ckpts[-1].eval_loss < ckpts[0].eval_loss / 2
    assert (out.adapter_dir / "adapter_config.json").exists()


def test_chat_sft_needs_a_chat_template(tmp_path):
    bare = build_tiny_llama(tmp_path / "bare", chat_template=False)
    with pytest.raises(ValueError, match="no chat template"):
        ChatSFT().build_model(resolve_recipe("chat-sft-lora", "chat_messages", dict(base_model=bare)))


def test_deadline_stops_as_timed_out_and_keeps_the_checkpoint(tiny_bert, tmp_path):
    import time

    from services.trainer.app import failure_reason
    from services.trainer.local.engine import TrainingTimedOut

    control = Control(deadline=time.monotonic() - 1)  # already past
    with pytest.raises(TrainingTimedOut) as err:
        train(SequenceClassification(LABEL_SPACE), cls_recipe(tiny_bert), rows(), rows(), tmp_path / "w",
              tmp_path / "a", control=control)
    assert failure_reason(err.value) == "training.timeout"
    assert failure_reason(TrainingCancelled("x")) == "training.cancelled"
    assert failure_reason(TrainingDiverged("x")) == "training.diverged"
    assert failure_reason(RuntimeError("CUDA out of memory. Tried to allocate")) == "training.oom"
    assert failure_reason(OSError("no such model")) == "training.base_model_unavailable"
    assert failure_reason(ValueError("bad")) == "training.runtime_error"


def test_patience_running_out_at_the_last_step_is_not_an_early_stop(tiny_bert, tmp_path):
    # a learning rate too small to change the metric: the second evaluation, at the last step, does not improve
    out = train(SequenceClassification(LABEL_SPACE),
                cls_recipe(tiny_bert, max_steps=2, eval_every_steps=1, patience=1, learning_rate=1e-12),
                rows(), rows(), tmp_path / "w", tmp_path / "a")
    assert out.steps == 2 and not out.stopped_early
