"""Export formats on tiny models: merged, ONNX and ONNX int8 for a classifier (both heads) and a triage model,
merged and GGUF (F32, Q8_0; Q4_K_M refused by the quantiser) for a chat model; each loaded fresh in its own
runtime and compared with the trained model in PyTorch; the failure codes and what is (not) left behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("onnxruntime")
pytest.importorskip("gguf")

from services.export import formats as F  # noqa: E402
from services.export.domain import build_adapter_export, verify_export  # noqa: E402
from services.trainer.local.engine import train  # noqa: E402
from services.trainer.local.tasks import ChatSFT, MultiFieldTriage, SequenceClassification  # noqa: E402
from services.trainer.recipes import resolve_recipe  # noqa: E402
from tests.tiny_models import (  # noqa: E402
    LABEL_SPACE, NEGATIVE, POSITIVE, build_tiny_bert, build_tiny_llama, colour_conversations, sentiment_rows)


def sentiment() -> list[dict]:
    texts, labels = sentiment_rows()
    return [{"text": t, "label": lab} for t, lab in zip(texts, labels)]


def triage_rows() -> list[dict]:
    rows = []
    for word, label in [(w, "pos") for w in POSITIVE] + [(w, "neg") for w in NEGATIVE]:
        for subject in ("movie", "film", "plot", "show"):
            rows.append({"text": f"the {subject} was {word}", "label": label,
                         "heads": {"severity": "Major" if subject in ("movie", "film") else "Minor"},
                         "tags": [subject] if subject in ("plot", "show") else []})
    return rows


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def classifier_adapter(base: str, root: Path, pooling: str) -> Path:
    recipe = resolve_recipe("seqcls-lora-minilm", "single_label_classification",
                            dict(base_model=base, batch_size=40, learning_rate=1e-2, max_length=8, seed=2, epochs=20,
                                 eval_every_steps=20, patience=None, pooling=pooling))
    return train(SequenceClassification(LABEL_SPACE), recipe, sentiment(), sentiment(), root / "w",
                 root / "a").adapter_dir


@pytest.fixture(scope="module")
def mean_adapter(tiny_bert, tmp_path_factory) -> Path:
    return classifier_adapter(tiny_bert, tmp_path_factory.mktemp("mean"), "mean")


@pytest.fixture(scope="module")
def triage_adapter(tiny_bert, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("triage")
    recipe = resolve_recipe(None, "multi_field_triage", dict(base_model=tiny_bert, batch_size=32, learning_rate=2e-2,
                                                             max_length=16, seed=2, epochs=15, eval_every_steps=10,
                                                             patience=None))
    task = MultiFieldTriage(["neg", "pos"], ["plot", "show"])
    return train(task, recipe, triage_rows(), triage_rows(), root / "w", root / "a").adapter_dir


@pytest.fixture(scope="module")
def chat_adapter(tiny_llama, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chat")
    data = colour_conversations()
    recipe = resolve_recipe("chat-sft-lora", "chat_messages",
                            dict(base_model=tiny_llama, max_length=64, batch_size=24, learning_rate=2e-2, epochs=10,
                                 eval_every_steps=10, patience=None, seed=1))
    return train(ChatSFT(), recipe, data, data[:6], root / "w", root / "a").adapter_dir


def export_all(adapter: Path, base: str, rows: list[dict], out: Path, formats=None, **kw):
    ref = F.load_reference(adapter, base, rows)
    build_adapter_export(adapter, out, run_id="run-1", base_model=base, metrics={})
    return ref, F.write_formats(ref, formats or F.SHAPE_FORMATS[ref.shape], out, adapter_dir=adapter, **kw)


def by_format(outcomes) -> dict:
    return {o.format: o for o in outcomes}


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_a_classifier_ships_merged_onnx_and_int8_each_matching_the_trained_model(pooling, tiny_bert, mean_adapter,
                                                                                  tmp_path):
    adapter = mean_adapter if pooling == "mean" else classifier_adapter(tiny_bert, tmp_path / "train", "cls")
    ref, outcomes = export_all(adapter, tiny_bert, sentiment(), tmp_path / "export", max_accuracy_drop=1.0)
    got = by_format(outcomes)
    assert [o.format for o in outcomes] == ["merged", "onnx", "onnx-int8"]
    assert all(o.shipped for o in outcomes), [o.as_json() for o in outcomes]
    for fmt in ("merged", "onnx"):
        p = got[fmt].parity
        assert p["labels_identical"] and p["max_abs_logit_diff"] <= 1e-4 and p["rows"] == 40
        assert p["accuracy"] == p["reference_accuracy"] and p["accuracy"] >= 0.9  # a model that learned
    q = got["onnx-int8"].parity
    assert q["accuracy_drop"] == pytest.approx(q["reference_accuracy"] - q["accuracy"])
    assert (tmp_path / "export" / "onnx" / "model.onnx").is_file()
    assert not [p for p in (tmp_path / "export").iterdir() if p.name.startswith(".tmp")]
    # int8 is a different, smaller graph than fp32
    assert (tmp_path / "export/onnx-int8/model.onnx").stat().st_size < (tmp_path / "export/onnx/model.onnx").stat().st_size


def test_the_onnx_file_runs_in_onnxruntime_alone(tiny_bert, mean_adapter, tmp_path):
    """A fresh interpreter with onnxruntime and tokenizers only (no torch, no services) labels like the model."""
    ref, outcomes = export_all(mean_adapter, tiny_bert, sentiment(), tmp_path / "export", formats=["onnx"])
    assert by_format(outcomes)["onnx"].shipped
    d = tmp_path / "export" / "onnx"
    program = (
        "import json, sys, numpy as np, onnxruntime as ort\nfrom tokenizers import Tokenizer\n"
        "d, texts = sys.argv[1], json.loads(sys.argv[2])\n"
        "cfg = json.load(open(f'{d}/onnx_config.json'))\n"
        "tok = Tokenizer.from_file(f'{d}/tokenizer.json'); tok.enable_truncation(cfg['max_length']); tok.enable_padding()\n"
        "enc = tok.encode_batch(texts)\n"
        "feed = {'input_ids': np.array([e.ids for e in enc], dtype=np.int64),"
        " 'attention_mask': np.array([e.attention_mask for e in enc], dtype=np.int64)}\n"
        "logits = ort.InferenceSession(f'{d}/model.onnx').run(['logits'], feed)[0]\n"
        "assert 'torch' not in sys.modules and not any(m.startswith('services') for m in sys.modules)\n"
        "print(json.dumps([cfg['label_space'][i] for i in logits.argmax(-1)]))\n")
    texts = [r["text"] for r in sentiment()]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([os.sys.executable, "-c", program, str(d), json.dumps(texts)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == F.predictions(ref, ref.logits)


def test_a_triage_model_merges_and_exports_to_onnx_with_every_head(tiny_bert, triage_adapter, tmp_path):
    ref, outcomes = export_all(triage_adapter, tiny_bert, triage_rows(), tmp_path / "export", max_accuracy_drop=1.0)
    got = by_format(outcomes)
    assert all(o.shipped for o in outcomes), [o.as_json() for o in outcomes]
    width = sum(len(h["labels"]) for h in ref.meta["heads"])
    assert ref.logits[0].shape[1] == width == 2 + 2 + 2  # label, severity, tags side by side
    for fmt in ("merged", "onnx"):
        assert got[fmt].parity["labels_identical"] and got[fmt].parity["max_abs_logit_diff"] <= 1e-4
    merged = tmp_path / "export" / "merged"
    assert F.TRIAGE_SNIPPET in (merged / "README.md").read_text()
    config = json.loads((merged / "config.json").read_text())
    assert [h["name"] for h in config["tuneline_heads"]] == [h["name"] for h in ref.meta["heads"]]
    assert json.loads((tmp_path / "export/onnx/onnx_config.json").read_text())["heads"] == ref.meta["heads"]


def test_a_chat_model_ships_gguf_f32_and_q8_0_and_q4_k_m_is_refused_by_the_quantiser(tiny_llama, chat_adapter,
                                                                                        tmp_path):
    rows = colour_conversations()[:6]
    ref, outcomes = export_all(chat_adapter, tiny_llama, rows, tmp_path / "export", max_accuracy_drop=1.0)
    got = by_format(outcomes)
    assert got["merged"].shipped and got["gguf"].shipped and got["gguf-q8_0"].shipped, [o.as_json() for o in outcomes]
    assert got["gguf"].parity["labels_identical"] and got["gguf"].parity["max_abs_logit_diff"] <= 1e-4
    assert got["merged"].parity["max_abs_logit_diff"] <= 1e-4
    assert "GGUFReader" in got["gguf"].runtime
    q8 = got["gguf-q8_0"].parity
    assert q8["accuracy"] is not None and q8["max_abs_logit_diff"] > 0  # really quantised
    q4 = got["gguf-q4_k_m"]
    assert not q4.shipped and q4.reason_code == "export.quantization_failed" and "Q4_K" in q4.message
    assert not (tmp_path / "export" / "gguf-q4_k_m").exists()
    from gguf import GGUFReader

    reader = GGUFReader(str(tmp_path / "export/gguf-q8_0/model.gguf"))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert {t.tensor_type.name for t in reader.tensors} == {"Q8_0", "F32"}


def test_a_chat_model_of_another_architecture_is_refused_by_name_and_the_rest_ships(tmp_path):
    from peft import LoraConfig, TaskType, get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from tests.tiny_models import CHAT_TEMPLATE, CHAT_WORDS

    base = tmp_path / "gpt2"
    raw = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(CHAT_WORDS)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(CHAT_WORDS), n_embd=32, n_layer=1, n_head=2, n_positions=64)
                    ).save_pretrained(str(base))
    tok.save_pretrained(str(base))
    adapter = tmp_path / "adapter"
    get_peft_model(GPT2LMHeadModel.from_pretrained(str(base)),
                   LoraConfig(task_type=TaskType.CAUSAL_LM, r=2, target_modules=["c_attn"])).save_pretrained(str(adapter))
    (adapter / "labels.json").write_text(json.dumps({"task": "chat_sft", "base_model": str(base), "max_length": 32}))
    _, outcomes = export_all(adapter, str(base), colour_conversations()[:3], tmp_path / "export",
                             formats=["merged", "gguf", "gguf-q8_0"])
    got = by_format(outcomes)
    assert got["merged"].shipped
    for fmt in ("gguf", "gguf-q8_0"):
        assert got[fmt].reason_code == "export.format_unsupported"
        assert "GPT2LMHeadModel" in got[fmt].message and "LlamaForCausalLM" in got[fmt].message
    assert sorted(p.name for p in (tmp_path / "export").iterdir() if p.is_dir()) == ["merged"]


def test_a_format_unknown_to_the_shape_is_named_and_the_others_ship(tiny_bert, mean_adapter, tmp_path):
    _, outcomes = export_all(mean_adapter, tiny_bert, sentiment()[:8], tmp_path / "export",
                             formats=["merged", "gguf", "tflite"])
    got = by_format(outcomes)
    assert got["gguf"].reason_code == got["tflite"].reason_code == "export.format_unknown"
    assert "classifier" in got["gguf"].message
    assert got["merged"].shipped


def test_a_smoke_check_that_fails_ships_nothing_under_the_formats_name(tiny_bert, mean_adapter, tmp_path,
                                                                       monkeypatch):
    ref = F.load_reference(mean_adapter, tiny_bert, sentiment())
    ref.logits = [lg + 1.0 for lg in ref.logits]  # a reference the written model cannot match
    out = tmp_path / "export"
    out.mkdir()
    [onnx] = F.write_formats(ref, ["onnx"], out, adapter_dir=mean_adapter)
    assert onnx.reason_code == "export.smoke_failed" and "max |logit diff|" in onnx.message
    assert list(out.iterdir()) == []


def test_the_manifest_pins_the_base_and_a_changed_base_is_named(tiny_bert, tmp_path):
    base = Path(shutil.copytree(tiny_bert, tmp_path / "base"))
    pin = F.base_model_pin("tiny", str(base))
    assert len(pin["weights_sha256"]) == 64 and set(pin["tokenizer_sha256"]) >= {"vocab.txt", "tokenizer.json"}
    assert F.base_model_changed(pin, str(base)) is None
    weights = base / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "weights sha256" in F.base_model_changed(pin, str(base))


@pytest.fixture
def small_mount(tmp_path):
    """A real 1 MiB tmpfs (root only; skipped where mounting is not allowed), unmounted afterwards."""
    point = tmp_path / "mnt"
    point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(point)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_full_export_folder_fails_the_format_by_name_and_leaves_nothing(tiny_bert, mean_adapter, small_mount):
    ref = F.load_reference(mean_adapter, tiny_bert, sentiment()[:8])
    out = small_mount / "export"
    out.mkdir()
    (small_mount / "filler").write_bytes(b"\0" * (1024 * 1024 - 64 * 1024))  # leave ~64 KiB: too little for ONNX
    outcomes = by_format(F.write_formats(ref, ["onnx"], out, adapter_dir=mean_adapter))
    assert outcomes["onnx"].reason_code == "export.directory_full", outcomes["onnx"].as_json()
    assert list(out.iterdir()) == []


def test_a_read_only_export_folder_is_named(tiny_bert, mean_adapter, small_mount):
    ref = F.load_reference(mean_adapter, tiny_bert, sentiment()[:8])
    out = small_mount / "export"
    out.mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(small_mount)], check=True)
    outcomes = by_format(F.write_formats(ref, ["merged", "onnx"], out, adapter_dir=mean_adapter))
    assert {o.reason_code for o in outcomes.values()} == {"export.directory_read_only"}
    assert list(out.iterdir()) == []


def test_merged_and_formats_are_in_the_checksummed_manifest(tiny_bert, mean_adapter, tmp_path):
    from services.export.domain import finish_manifest

    out = tmp_path / "export"
    ref, outcomes = export_all(mean_adapter, tiny_bert, sentiment(), out, formats=["onnx"])
    manifest = finish_manifest(out, ref, outcomes, base_model="tiny", base_path=tiny_bert)
    paths = {f["path"] for f in manifest["files"]}
    assert {"onnx/model.onnx", "onnx/tokenizer.json", "adapter_model.safetensors"} <= paths
    assert manifest["base"]["weights_sha256"] and manifest["head"]["label_space"] == LABEL_SPACE
    assert [f["format"] for f in manifest["formats"]] == ["peft-adapter", "onnx"]
    assert verify_export(out) == []


def test_a_head_and_tail_trained_classifier_is_checked_on_its_own_cut(tiny_bert, tmp_path):
    from services.trainer.recipes import Recipe

    if "truncation" not in Recipe.model_fields:
        pytest.skip("the recipe has no truncation setting")
    long_rows = [{"text": f"{r['text']} the movie was the film was really a show the plot was {r['text']}",
                  "label": r["label"]} for r in sentiment()]
    recipe = resolve_recipe("seqcls-lora-minilm", "single_label_classification",
                            dict(base_model=tiny_bert, batch_size=40, learning_rate=1e-2, max_length=10, seed=2,
                                 epochs=10, eval_every_steps=20, patience=None, pooling="mean",
                                 truncation="head_tail"))
    adapter = train(SequenceClassification(LABEL_SPACE), recipe, long_rows, long_rows, tmp_path / "w",
                    tmp_path / "a").adapter_dir
    ref, outcomes = export_all(adapter, tiny_bert, long_rows, tmp_path / "export", formats=["merged", "onnx"])
    assert ref.truncation() == "head_tail"
    for o in outcomes:
        assert o.shipped and o.parity["max_abs_logit_diff"] <= 1e-4, o.as_json()
    assert json.loads((tmp_path / "export/onnx/onnx_config.json").read_text())["truncation"] == "head_tail"
    # the merged folder's parity ran the card's own lines (head + tail cut by the tokenizer calls it shows)
    card = (tmp_path / "export/merged/README.md").read_text()
    assert "head + tail truncation" in card and "half the room each" in card
    assert json.loads((tmp_path / "export/merged/config.json").read_text())["tuneline_truncation"] == "head_tail"


def test_a_fully_fine_tuned_classifier_exports_its_own_weights_without_peft(tiny_bert, tmp_path):
    from services.export.domain import FULL_FORMAT, finish_manifest, smoke_load

    long_rows = [{"text": f"{r['text']} and then the show went on and on until {r['text']}", "label": r["label"]}
                 for r in sentiment()]
    recipe = resolve_recipe("seqcls-lora-minilm", "single_label_classification",
                            dict(base_model=tiny_bert, batch_size=40, learning_rate=1e-3, max_length=10, seed=2,
                                 epochs=10, eval_every_steps=20, patience=None, method="full", truncation="head_tail"))
    adapter = train(SequenceClassification(LABEL_SPACE), recipe, long_rows, long_rows, tmp_path / "w",
                    tmp_path / "a").adapter_dir
    assert not (adapter / "adapter_model.safetensors").exists()  # no adapter: the whole model
    out = tmp_path / "export"
    ref, outcomes = export_all(adapter, tiny_bert, long_rows, out, formats=["merged", "onnx"])
    for o in outcomes:
        assert o.shipped and o.parity["labels_identical"] and o.parity["max_abs_logit_diff"] <= 1e-4, o.as_json()
    manifest = finish_manifest(out, ref, outcomes, base_model="tiny", base_path=tiny_bert)
    assert manifest["format"] == FULL_FORMAT and manifest["merged"] is None
    assert {"model.safetensors", "labels.json", "merged/model.safetensors", "onnx/model.onnx"} <= {
        f["path"] for f in manifest["files"]}
    assert verify_export(out) == [] and smoke_load(out) > 0
    assert "fully fine-tuned encoder" in (out / "merged/README.md").read_text()
    # the merged folder's weights are the trained ones, not the base's
    from safetensors.torch import load_file

    trained = load_file(str(adapter / "model.safetensors"))
    merged = load_file(str(out / "merged/model.safetensors"))
    key = next(k for k in merged if k.endswith("query.weight"))
    assert torch.equal(merged[key], trained[f"encoder.{key}"])
