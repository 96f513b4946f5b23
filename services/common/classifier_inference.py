"""Batch prediction with an encoder classifier (single- or multi-label, or a multi-field triage model), the
bare base model or base + LoRA adapter: shared by the evaluator (scoring) and the registry (the smoke check
before a promotion)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

LABELS_FILE = "labels.json"
TRIAGE_TASK = "multi_field_triage"  # labels.json `task` of a multi-head triage adapter (services/trainer/local/tasks.py)


def check_adapter_labels(adapter_dir: Path, label_space: Sequence[str]) -> None:
    """The head's output indices only mean something in the label order the adapter was trained with."""
    labels_path = Path(adapter_dir) / LABELS_FILE
    if not labels_path.exists():
        return
    trained = json.loads(labels_path.read_text()).get("label_space")
    if trained is not None and list(trained) != list(label_space):
        raise ValueError(f"adapter was trained on label_space {trained}, asked to predict {list(label_space)}")


def trained_pooling(adapter_dir: Path | None) -> str:
    """The head an adapter was trained with (labels.json `pooling`); adapters from before the field
    existed were all transformers' *ForSequenceClassification ("cls")."""
    if adapter_dir is None:
        return "cls"
    try:
        return json.loads((Path(adapter_dir) / LABELS_FILE).read_text()).get("pooling") or "cls"
    except (OSError, ValueError, AttributeError):
        return "cls"


def trained_metadata(adapter_dir: Path) -> dict:
    """The adapter's labels.json (task, label_space, max_length, pooling, threshold), {} when absent."""
    try:
        meta = json.loads((Path(adapter_dir) / LABELS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def predict_labels(
    base_model: str,
    adapter_dir: Path | None,
    texts: Sequence[str],
    label_space: Sequence[str],
    max_length: int = 128,
    batch_size: int = 64,
    seed: int = 13,
    pooling: str | None = None,
) -> list[str]:
    """Predict one label per text (see `predict`)."""
    return predict(base_model, adapter_dir, texts, label_space, max_length, batch_size, seed, pooling)[0]


def predict(
    base_model: str,
    adapter_dir: Path | None,
    texts: Sequence[str],
    label_space: Sequence[str],
    max_length: int = 128,
    batch_size: int = 64,
    seed: int = 13,
    pooling: str | None = None,
    multi_label: bool = False,
    threshold: float = 0.5,
) -> tuple[list, list[float]]:
    """(one prediction per text, the milliseconds each took). Blocking and CPU/GPU-bound; loads the
    model on every call. A prediction is a label, or with `multi_label` the list of labels whose
    sigmoid reaches `threshold`. Rows are scored in batches, so a row's latency is its batch's wall
    time shared among the batch's rows (tokenising included).

    The head is the one the adapter was trained with (`pooling` from its labels.json); give
    `pooling` to score the bare base model with the same head as a candidate. With adapter_dir None
    the head is freshly initialised from `seed` (deterministic, and close to chance: no baseline).
    A triage adapter (labels.json task multi_field_triage) answers a dict per text (`predict_triage`).
    """
    import time

    if adapter_dir is not None and trained_metadata(Path(adapter_dir)).get("task") == TRIAGE_TASK:
        check_adapter_labels(Path(adapter_dir), label_space)
        return predict_triage(base_model, Path(adapter_dir), texts, max_length, batch_size, seed)
    if len(label_space) < (1 if multi_label else 2):
        raise ValueError(f"need at least {1 if multi_label else 2} labels, got {list(label_space)}")
    if not texts:
        return [], []
    meta = trained_metadata(Path(adapter_dir)) if adapter_dir is not None else {}
    if adapter_dir is not None:
        check_adapter_labels(Path(adapter_dir), label_space)
        trained = trained_pooling(adapter_dir)
        if pooling is not None and pooling != trained:
            # PEFT would only warn about the adapter keys the other head lacks, and score a broken model
            raise ValueError(f"adapter was trained with {trained} pooling, asked to score it with {pooling} pooling")
        pooling = trained

    import torch
    from transformers import AutoTokenizer

    from services.common.encoder_classifier import build_encoder_classifier
    from services.common.truncation import encode_ids, pad_batch

    truncation = meta.get("truncation") or "head"  # as trained (adapters from before the field: the head)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = AutoTokenizer.from_pretrained(base_model)
        model = build_encoder_classifier(base_model, label_space, pooling=pooling or "cls", multi_label=multi_label)
    if adapter_dir is not None and meta.get("method") == "full":
        model.load_full(str(adapter_dir))  # a fully fine-tuned classifier: its own weights, no adapter
    elif adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    model.eval()
    predictions: list = []
    latency_ms: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            t0 = time.perf_counter()
            batch = list(texts[start : start + batch_size])
            ids, mask = pad_batch(encode_ids(tokenizer, batch, max_length, truncation), tokenizer.pad_token_id or 0)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            if multi_label:
                on = torch.sigmoid(logits) >= threshold
                predictions.extend([label_space[j] for j in row.nonzero().flatten().tolist()] for row in on)
            else:
                predictions.extend(label_space[i] for i in logits.argmax(dim=-1).tolist())
            latency_ms.extend([(time.perf_counter() - t0) * 1000 / len(batch)] * len(batch))
    return predictions, latency_ms


def predict_triage(
    base_model: str,
    adapter_dir: Path,
    texts: Sequence[str],
    max_length: int | None = None,
    batch_size: int = 64,
    seed: int = 13,
) -> tuple[list[dict], list[float]]:
    """(one answer per text: {"label": ..., each head: ..., "tags": [...]}, the milliseconds each took) from
    a multi-field triage adapter, its heads rebuilt from labels.json (`heads`, in model order). Latency
    as in `predict`; `max_length` defaults to the trained one."""
    import time

    import torch
    from transformers import AutoTokenizer

    from services.common.encoder_classifier import HeadSpec, MultiHeadClassifier, decode_heads

    meta = trained_metadata(Path(adapter_dir))
    if meta.get("task") != TRIAGE_TASK or not meta.get("heads"):
        raise ValueError(f"{adapter_dir} holds no triage adapter (its {LABELS_FILE} lists no heads)")
    heads = [HeadSpec.from_json(h) for h in meta["heads"]]
    threshold = float(meta.get("threshold") or 0.5)
    max_length = int(max_length or meta.get("max_length") or 128)
    if not texts:
        return [], []
    from peft import PeftModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = AutoTokenizer.from_pretrained(base_model)
        model = PeftModel.from_pretrained(MultiHeadClassifier(base_model, heads), str(adapter_dir))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    model.eval()
    predictions: list[dict] = []
    latency_ms: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            t0 = time.perf_counter()
            batch = list(texts[start : start + batch_size])
            enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            predictions.extend(decode_heads(heads, logits.float().cpu(), threshold))
            latency_ms.extend([(time.perf_counter() - t0) * 1000 / len(batch)] * len(batch))
    return predictions, latency_ms
