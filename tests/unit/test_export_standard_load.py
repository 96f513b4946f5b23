"""The exported model loads in standard tooling: a fresh Python with transformers + safetensors only (no
`services`) runs the README's lines on the export's merged/ folder and reproduces the evaluator."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from services.evaluator.adapters.classifier import predict  # noqa: E402
from services.export.adapters.merged import CLS_SNIPPET, MEAN_POOLED_SNIPPET  # noqa: E402
from services.export.domain import build_adapter_export, smoke_load, verify_export  # noqa: E402
from services.trainer.local.engine import train  # noqa: E402
from services.trainer.local.tasks import SequenceClassification  # noqa: E402
from services.trainer.recipes import resolve_recipe  # noqa: E402
from tests.tiny_models import LABEL_SPACE, build_tiny_bert, sentiment_rows  # noqa: E402

README = Path(__file__).resolve().parents[2] / "README.md"
MAX_LENGTH = 8  # shorter than the last TEXTS row: the merged tokenizer must truncate where the evaluator does
TEXTS = [*sentiment_rows()[0], "the film was really very very good but the acting was awful", ""]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module", params=["mean", "cls"])
def exported(request, tiny_bert, tmp_path_factory):
    texts, labels = sentiment_rows()
    rows = [{"text": t, "label": lab} for t, lab in zip(texts, labels)]
    recipe = resolve_recipe("seqcls-lora-minilm", "single_label_classification",
                            dict(base_model=tiny_bert, batch_size=40, learning_rate=1e-2, max_length=MAX_LENGTH, seed=2,
                                 epochs=30, eval_every_steps=20, patience=None, pooling=request.param))
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    outcome = train(SequenceClassification(LABEL_SPACE), recipe, rows, rows, root / "w", root / "adapter")
    out = root / "export"
    manifest = build_adapter_export(outcome.adapter_dir, out, run_id="run-1", base_model=tiny_bert, metrics={},
                                    merge_from=tiny_bert)
    return request.param, outcome.adapter_dir, out, manifest


def readme_snippet() -> str:
    section = README.read_text().split("### Loading an exported model", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run_fresh_python(snippet: str, merged_dir: Path, texts: list[str], cwd: Path) -> dict:
    """The snippet in a new interpreter outside the repository, which fails if it imports `services`."""
    program = ("import json, sys\nd, texts = sys.argv[1], json.loads(sys.argv[2])\n" + snippet
               + "assert not any(m == 'services' or m.startswith('services.') for m in sys.modules)\n"
               + "print(json.dumps({'labels': labels, 'logits': logits.tolist()}))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", program, str(merged_dir), json.dumps(texts)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def adapter_logits(base: str, adapter_dir: Path, pooling: str, texts: list[str]):
    """The logits the evaluator's model gives (its predict returns labels only)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from services.common.encoder_classifier import build_encoder_classifier

    model = PeftModel.from_pretrained(build_encoder_classifier(base, LABEL_SPACE, pooling=pooling), str(adapter_dir))
    batch = AutoTokenizer.from_pretrained(base)(texts, padding=True, truncation=True, max_length=MAX_LENGTH,
                                                return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch).logits


def test_fresh_python_reproduces_the_evaluators_predictions(exported, tiny_bert, tmp_path):
    pooling, adapter_dir, out, _ = exported
    # the default head runs the README's lines; the "cls" head is a stock *ForSequenceClassification
    snippet = readme_snippet() if pooling == "mean" else CLS_SNIPPET
    got = run_fresh_python(snippet, out / "merged", TEXTS, tmp_path)

    expected, _ = predict(tiny_bert, adapter_dir, TEXTS, LABEL_SPACE, max_length=MAX_LENGTH)
    assert got["labels"] == expected
    reference = adapter_logits(tiny_bert, adapter_dir, pooling, TEXTS)
    assert torch.allclose(torch.tensor(got["logits"]), reference, atol=1e-4)
    assert len(set(expected)) == 2  # a head that learned something, not one constant answer


def test_readme_shows_the_lines_the_export_card_shows(exported):
    pooling, _, out, _ = exported
    card = (out / "merged" / "README.md").read_text()
    assert (MEAN_POOLED_SNIPPET if pooling == "mean" else CLS_SNIPPET) in card
    assert readme_snippet() == MEAN_POOLED_SNIPPET


def test_configs_name_the_base_model_and_the_labels(exported, tiny_bert):
    pooling, _, out, manifest = exported
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_bert
    config = json.loads((out / "merged" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["label2id"] == {"neg": 0, "pos": 1}
    assert config["classifier_pooling"] == pooling
    assert json.loads((out / "merged" / "tokenizer_config.json").read_text())["model_max_length"] == MAX_LENGTH
    assert manifest["merged"]["pooling"] == pooling and manifest["merged"]["max_abs_logit_diff"] <= 1e-4


def test_merged_files_are_in_the_checksummed_manifest(exported):
    _, _, out, manifest = exported
    paths = {f["path"] for f in manifest["files"]}
    assert {"adapter_model.safetensors", "adapter_config.json", "merged/config.json",
            "merged/model.safetensors"} <= paths
    assert verify_export(out) == [] and smoke_load(out) > 0


def test_tampered_merged_weights_are_named(exported, tmp_path):
    import shutil

    _, _, out, _ = exported
    copy = shutil.copytree(out, tmp_path / "copy")
    weights = copy / "merged" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert verify_export(copy) == ["sha256 mismatch: merged/model.safetensors"]


def test_the_bundled_base_is_named_by_its_hub_id():
    from services.export.domain import base_model_reference

    assert base_model_reference("all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert base_model_reference("/models/my-bert") == "/models/my-bert"
