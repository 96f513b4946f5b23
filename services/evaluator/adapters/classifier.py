"""Batch label prediction with an encoder classifier, either the bare base model or base + LoRA adapter."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

LABELS_FILE = "labels.json"


def check_adapter_labels(adapter_dir: Path, label_space: Sequence[str]) -> None:
    """The head's output indices only mean something in the label order the adapter was trained with."""
    labels_path = Path(adapter_dir) / LABELS_FILE
    if not labels_path.exists():
        return
    trained = json.loads(labels_path.read_text()).get("label_space")
    if trained is not None and list(trained) != list(label_space):
        raise ValueError(f"adapter was trained on label_space {trained}, asked to predict {list(label_space)}")


def predict_labels(
    base_model: str,
    adapter_dir: Path | None,
    texts: Sequence[str],
    label_space: Sequence[str],
    max_length: int = 128,
    batch_size: int = 64,
    seed: int = 13,
) -> list[str]:
    """Predict one label per text. Blocking and CPU/GPU-bound; loads the model on every call.

    With adapter_dir None the head is freshly initialised from `seed`, which makes the
    untuned baseline deterministic (and, as expected, close to chance).
    """
    if len(label_space) < 2:
        raise ValueError(f"need at least 2 labels, got {list(label_space)}")
    if not texts:
        return []
    if adapter_dir is not None:
        check_adapter_labels(Path(adapter_dir), label_space)

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    id2label = {i: label for i, label in enumerate(label_space)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = AutoTokenizer.from_pretrained(base_model)
        model = AutoModelForSequenceClassification.from_pretrained(
            base_model,
            num_labels=len(label_space),
            id2label=id2label,
            label2id={label: i for i, label in id2label.items()},
        )
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    model.eval()
    predictions: list[str] = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(device)
            logits = model(**enc).logits
            predictions.extend(id2label[i] for i in logits.argmax(dim=-1).tolist())
    return predictions
