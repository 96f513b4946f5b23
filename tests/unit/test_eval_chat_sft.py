"""A local chat-SFT candidate generating through `generate_chat`: tiny Llamas built from configs (no hub
downloads), untrained (garbage answers must parse to None, not crash) and trained for a few steps on
the colour conversations (answers must come back as the trainer taught them)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from services.evaluator.adapters.chat import ScoringError  # noqa: E402
from services.evaluator.adapters.chat_sft import generate_chat, prompt_messages, turn_end_marker  # noqa: E402
from tests.tiny_models import build_tiny_llama, colour_conversations  # noqa: E402

COLOURS = ["blue", "green", "white"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-eval"))


@pytest.fixture(scope="module")
def fresh_adapter(tiny_llama, tmp_path_factory):
    """An untrained LoRA adapter saved with peft, as the trainer saves one."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("fresh-adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model = get_peft_model(base, LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8,
                                            target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def trained_adapter(tiny_llama, tmp_path_factory):
    from services.trainer.local.engine import train
    from services.trainer.local.tasks import ChatSFT
    from services.trainer.recipes import resolve_recipe

    work = tmp_path_factory.mktemp("chat-sft-train")
    data = colour_conversations()
    recipe = resolve_recipe("chat-sft-lora", "chat_messages",
                            dict(base_model=tiny_llama, max_length=64, batch_size=24, learning_rate=2e-2, epochs=30,
                                 eval_every_steps=10, patience=None, seed=1))
    return train(ChatSFT(), recipe, data, data[:6], work / "w", work / "a").adapter_dir


def test_rows_are_rendered_without_their_final_answer_and_with_the_generation_prompt(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    row = colour_conversations()[0]
    prompt = tok.apply_chat_template(prompt_messages(row), tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|> what is the colour of the sky <|end|> <|assistant|> "
    assert prompt_messages({"text": "Ann, 34", "target": {"name": "Ann"}}, "extract") == [
        {"role": "system", "content": "extract"}, {"role": "user", "content": "Ann, 34"}]
    assert prompt_messages({"prompt": "say", "completion": "it"}) == [{"role": "user", "content": "say"}]
    assert turn_end_marker(tok) == "<|end|>"


def test_an_untrained_model_answering_garbage_is_parsed_to_none(tiny_llama, fresh_adapter):
    rows = [{"row_id": f"j{i}", "text": "what is the colour of the snow", "target": {"colour": "white"}}
            for i in range(5)]
    scored = generate_chat(tiny_llama, fresh_adapter, rows, kind="json", label_space=[], max_new_tokens=6,
                           batch_size=2)
    assert scored.outputs == [None] * 5  # the vocabulary has no braces: no JSON can come out
    assert len(scored.latency_ms) == 5 and all(ms > 0 for ms in scored.latency_ms)
    assert all(1 <= t <= 6 for t in scored.tokens)
    assert scored.compute_s > 0 and scored.usd is None

    labelled = generate_chat(tiny_llama, None, colour_conversations()[:4], kind="single_label", label_space=COLOURS,
                             max_new_tokens=6, batch_size=4)
    assert all(o is None or o in COLOURS for o in labelled.outputs)


def test_a_trained_candidate_answers_as_it_was_taught(tiny_llama, trained_adapter):
    rows = colour_conversations()[:6]
    gold = [r["messages"][-1]["content"] for r in rows]
    text = generate_chat(tiny_llama, trained_adapter, rows, kind="text", label_space=[], max_new_tokens=8,
                         batch_size=4)
    assert text.outputs == gold
    assert text.tokens == [4] * 6  # "it is <colour> <|end|>": the stop marker ends generation
    labels = generate_chat(tiny_llama, trained_adapter, rows, kind="single_label", label_space=COLOURS,
                           max_new_tokens=8, batch_size=1)
    assert labels.outputs == [g.split()[-1] for g in gold]


def test_a_model_without_a_chat_template_cannot_be_prompted(tmp_path):
    bare = build_tiny_llama(tmp_path / "bare", chat_template=False)
    with pytest.raises(ScoringError) as err:
        generate_chat(bare, None, colour_conversations()[:1], kind="text", label_space=[], max_new_tokens=2,
                      batch_size=1)
    assert err.value.reason_code == "eval.capability_unsupported"


def test_a_missing_adapter_is_an_unreadable_artifact(tiny_llama, tmp_path):
    with pytest.raises(ScoringError) as err:
        generate_chat(tiny_llama, tmp_path / "nothing-here", colour_conversations()[:1], kind="text", label_space=[],
                      max_new_tokens=2, batch_size=1)
    assert err.value.reason_code == "eval.artifact_unreadable"
