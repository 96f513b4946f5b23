"""The exported classifier as a standard transformers model: the LoRA merged into the encoder, loadable
with transformers alone, with a parity check against the adapter as the evaluator loads it.

The "cls" head is transformers' *ForSequenceClassification, so its merged folder loads with
AutoModelForSequenceClassification. The "mean" head (services/common/encoder_classifier.py) has no stock
transformers class for BERT-family encoders (only architectures such as ModernBERT pool by mean), so its
folder is the merged encoder (AutoModel) plus the linear head in classifier.safetensors, and the few lines
in MEAN_POOLED_SNIPPET apply it. Either way config.json carries id2label/label2id and the tokenizer's
model_max_length is the trained max_length, so `truncation=True` cuts where the evaluator cuts. A model
trained with head + tail truncation (labels.json `truncation`, services/common/truncation.py) gets the same
lines with the tokenizer call replaced by HEAD_TAIL_LINES (config.json `tuneline_truncation` says which), and
a fully fine-tuned one (recipe method "full") has no adapter to merge: its own weights are saved the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

HEAD_FILE = "classifier.safetensors"
LABELS_FILE = "labels.json"
CARD_FILE = "README.md"
CLASSIFICATION_TASKS = ("sequence_classification", "multi_label_classification")
# logits of the merged model may differ from the unmerged adapter's by float rounding only
PARITY_ATOL = 1e-4
PROBE_TEXTS = (
    "The app crashes when I open the settings page.",
    "Please add an option to export my data as CSV.",
    "How do I reset my password?",
    "great",
    "",
    # longer than any trained window: the parity covers where the text is cut (head, or head + tail)
    "The installer stops " + "and then it retries the download " * 60 + "so how do I install it offline?",
)

# Kept in step with README.md's "Loading an exported model" (tests/unit/test_export_standard_load.py runs it).
MEAN_POOLED_SNIPPET = '''\
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

tok, encoder = AutoTokenizer.from_pretrained(d), AutoModel.from_pretrained(d).eval()
head = load_file(f"{d}/classifier.safetensors")
batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
with torch.no_grad():
    hidden, mask = encoder(**batch).last_hidden_state, batch["attention_mask"].unsqueeze(-1).float()
    logits = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)) @ head["weight"].T + head["bias"]
labels = [encoder.config.id2label[i] for i in logits.argmax(-1).tolist()]
'''
TOKENIZE_HEAD = 'batch = tok(texts, padding=True, truncation=True, return_tensors="pt")\n'
# services/common/truncation.py's head_tail in tokenizer calls: the first half of the room and the last half
HEAD_TAIL_LINES = '''\
# head + tail truncation, as the model was trained: the special tokens around a text, then half the room each
a, a_full = tok("a", add_special_tokens=False)["input_ids"], tok("a")["input_ids"]
pre, post = a_full[:a_full.index(a[0])], a_full[a_full.index(a[0]) + len(a):]
room = tok.model_max_length - len(pre) - len(post)
ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
ids = [i if len(i) <= room else i[:(room + 1) // 2] + i[len(i) - room // 2:] for i in ids]
batch = tok.pad({"input_ids": [pre + i + post for i in ids]}, return_tensors="pt")
'''

CLS_SNIPPET = '''\
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

tok, model = AutoTokenizer.from_pretrained(d), AutoModelForSequenceClassification.from_pretrained(d).eval()
with torch.no_grad():
    logits = model(**tok(texts, padding=True, truncation=True, return_tensors="pt")).logits
labels = [model.config.id2label[i] for i in logits.argmax(-1).tolist()]
'''


class MergeError(ValueError):
    """The adapter cannot be merged, or the merged model does not answer like the adapter."""


def snippet_for(pooling: str, truncation: str = "head") -> str:
    """The lines that load a merged folder `d` and label `texts` (a list of strings) with stock classes,
    cutting long texts as the model was trained (the head, or head + tail)."""
    snippet = MEAN_POOLED_SNIPPET if pooling == "mean" else CLS_SNIPPET
    if truncation == "head":
        return snippet
    if pooling != "mean":  # the stock class's one-liner, split into the batch and the call
        snippet = snippet.replace("with torch.no_grad():\n    logits = model(**tok(texts, padding=True, truncation=True, "
                                  'return_tensors="pt")).logits\n',
                                  TOKENIZE_HEAD + "with torch.no_grad():\n    logits = model(**batch).logits\n")
    assert TOKENIZE_HEAD in snippet
    return snippet.replace(TOKENIZE_HEAD, HEAD_TAIL_LINES)


def classifier_metadata(adapter_dir: Path) -> dict | None:
    """labels.json of a classification adapter; None for other tasks (nothing to merge here)."""
    try:
        meta = json.loads((Path(adapter_dir) / LABELS_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("task") not in CLASSIFICATION_TASKS or not meta.get("label_space"):
        return None
    return meta


def standard_logits(merged_dir: Path, texts: list[str]):
    """Logits of a merged folder loaded as MEAN_POOLED_SNIPPET / CLS_SNIPPET load it."""
    # the documented lines themselves run, so what the card and README show is what the parity check checked
    scope = {"d": str(merged_dir), "texts": list(texts)}
    config = json.loads((Path(merged_dir) / "config.json").read_text())
    exec(snippet_for(config.get("classifier_pooling", "cls"), config.get("tuneline_truncation", "head")), scope)
    return scope["logits"]


def write_merged_model(adapter_dir: Path, base_model_path: str, out_dir: Path) -> dict:
    """Merge the adapter into its base (a fully fine-tuned classifier: load its own weights) and save it under
    out_dir; returns what the manifest records (pooling, truncation, labels, the largest logit difference from
    the model as the evaluator loads it, on PROBE_TEXTS cut as it was trained)."""
    import torch
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer

    from services.common.encoder_classifier import build_encoder_classifier
    from services.common.truncation import encode_ids, pad_batch

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    meta = classifier_metadata(adapter_dir)
    if meta is None:
        raise MergeError(f"{adapter_dir} holds no classification adapter ({LABELS_FILE} names no label_space)")
    label_space = list(meta["label_space"])
    pooling = meta.get("pooling") or "cls"
    multi_label = meta["task"] == "multi_label_classification"
    max_length = int(meta.get("max_length") or 128)
    truncation = meta.get("truncation") or "head"
    full = meta.get("method") == "full"

    try:
        tokenizer = AutoTokenizer.from_pretrained(base_model_path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the head's initial values are overwritten by the adapter's
            model = build_encoder_classifier(base_model_path, label_space, pooling=pooling, multi_label=multi_label)
        trained = model.load_full(str(adapter_dir)).eval() if full else PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    except (OSError, ValueError, RuntimeError) as exc:
        raise MergeError(f"cannot load the {'model' if full else 'adapter'} onto base model {base_model_path}: {exc}") from exc
    ids, mask = pad_batch(encode_ids(tokenizer, list(PROBE_TEXTS), max_length, truncation), tokenizer.pad_token_id or 0)
    with torch.no_grad():
        reference = trained(input_ids=ids, attention_mask=mask).logits
    merged = trained if full else trained.merge_and_unload().eval()

    out_dir.mkdir(parents=True, exist_ok=True)
    id2label = dict(enumerate(label_space))
    if pooling == "mean":
        encoder = merged.encoder
        # the mean head never uses the pooler; restored from the base so the checkpoint loads complete
        encoder.pooler = getattr(AutoModel.from_pretrained(base_model_path), "pooler", None)
        encoder.config.classifier_pooling = "mean"
        target = encoder
        save_file({"weight": merged.classifier.weight.detach().contiguous(),
                   "bias": merged.classifier.bias.detach().contiguous()}, str(out_dir / HEAD_FILE))
    else:
        target = merged
        target.config.classifier_pooling = "cls"
    target.config.id2label = id2label
    target.config.label2id = {label: i for i, label in id2label.items()}
    target.config.problem_type = "multi_label_classification" if multi_label else "single_label_classification"
    target.config.tuneline_truncation = truncation
    if multi_label:
        target.config.multi_label_threshold = float(meta.get("threshold") or 0.5)
    target.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / CARD_FILE).write_text(model_card(pooling, label_space, max_length, multi_label, truncation, full))

    got = standard_logits(out_dir, list(PROBE_TEXTS))
    diff = float((got - reference).abs().max())
    if diff > PARITY_ATOL or not torch.equal(got.argmax(-1), reference.argmax(-1)):
        raise MergeError(f"merged model differs from the adapter on the probe texts (max |logit diff| {diff:.2e})")
    return {"pooling": pooling, "truncation": truncation, "method": "full" if full else "lora",
            "label_space": label_space, "max_length": max_length, "max_abs_logit_diff": diff,
            "probe_rows": len(PROBE_TEXTS)}


def model_card(pooling: str, label_space: list[str], max_length: int, multi_label: bool, truncation: str = "head",
               full: bool = False) -> str:
    head = ("mean of the encoder's last hidden states over real tokens, then the linear layer in "
            f"`{HEAD_FILE}` (no stock transformers class pools BERT-family encoders by mean)"
            if pooling == "mean" else "transformers' *ForSequenceClassification (first-token pooler)")
    decision = ("sigmoid(logits) >= config.multi_label_threshold for each label" if multi_label
                else "argmax of the logits, mapped through config.id2label")
    what = ("The fully fine-tuned encoder (every weight trained, no adapter)" if full
            else "The LoRA adapter merged into its base encoder")
    cut = (f"Inputs are truncated at {max_length} tokens (the tokenizer's model_max_length)" if truncation == "head"
           else f"Inputs longer than {max_length} tokens (the tokenizer's model_max_length) keep their first and last "
                "tokens, half of the window each, as the model was trained (head + tail truncation; "
                "`truncation=True` alone would keep only the head and score long texts differently)")
    return (
        "# Merged classifier (Tuneline export)\n\n"
        f"{what}. Head: {head}. Labels: {', '.join(label_space)}. {cut}. Prediction: {decision}.\n\n"
        "Load it with transformers alone (`d` is this folder, `texts` a list of strings):\n\n"
        f"```python\n{snippet_for(pooling, truncation)}```\n"
    )
