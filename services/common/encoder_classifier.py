"""The encoder classifier that the trainer trains and the evaluator scores: one definition for both,
so an adapter is always loaded onto the architecture it was trained on.

Two heads, chosen by the recipe's `pooling` and recorded in the adapter's labels.json:

- "cls": transformers' *ForSequenceClassification (BERT: tanh(dense(first token)) -> linear). The
  pooler is whatever the checkpoint holds; for a sentence-embedding model such as all-MiniLM-L6-v2
  it was never trained for this, and the first token carries little of the sentence.
- "mean": the average of the last hidden states over real tokens (attention mask), then dropout and
  a linear layer. Mean pooling is how sentence-transformers models such as all-MiniLM-L6-v2 are
  trained to embed a sentence, so the head starts from a good sentence representation. Measured on
  NLBSE'24 (bench/nlbse.py's prep splits): a logistic regression on frozen mean-pooled embeddings
  scores 0.72 mean macro-F1 over the 5 repositories against 0.62 on the first-token pooler output
  (each the best of three regularisation strengths on the held-out rows: a pointer, not a figure);
  LoRA-tuned for 10 epochs, validation macro-F1 on the tuning repositories rose from 0.683/0.815
  (bitcoin/react, "cls") to 0.730/0.817 ("mean"). L2-normalising the mean (x20) scored the same
  (0.706/0.836), so the simpler head stayed.

The "mean" model answers like a transformers classifier (`.loss`, `.logits`), so the training loop,
PEFT's wrapping and saving (LoRA on the encoder, the head in `modules_to_save`) treat both alike.
The multi-field triage model (`MultiHeadClassifier`) is one mean-pooled encoder with one linear head
per field (softmax for the lead label and every single-valued head, sigmoid for tags), trained on the
weighted sum of the heads' losses; a row with no value for a head (no component) is left out of that
head's loss only (`multi_head_loss`). Its logits are the heads' logits side by side, in head order.
Imports torch: import this module only where a model is built (inside functions elsewhere).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel
from transformers.modeling_outputs import SequenceClassifierOutput

POOLINGS = ("cls", "mean")
HEAD_MODULES = {"cls": ["classifier", "score"], "mean": ["classifier"]}
IGNORE_INDEX = -100  # a softmax head's target for a row with no value: no loss from that row
FULL_WEIGHTS = "model.safetensors"  # a fully fine-tuned classifier's weights (recipe method "full")


def build_encoder_classifier(path: str, label_space: Sequence[str], *, pooling: str = "cls",
                             multi_label: bool = False, dropout: float = 0.1) -> nn.Module:
    """The base model with a fresh head for `label_space` (seed torch first for a reproducible head)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if pooling == "mean":
        return MeanPooledClassifier(path, len(label_space), multi_label=multi_label, dropout=dropout)
    from transformers import AutoModelForSequenceClassification

    id2label = dict(enumerate(label_space))
    return AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(label_space), id2label=id2label, label2id={v: k for k, v in id2label.items()},
        problem_type="multi_label_classification" if multi_label else "single_label_classification",
    )


class MeanPooledClassifier(nn.Module):
    """Encoder -> mean of the last hidden states over real tokens -> dropout -> linear."""

    def __init__(self, path: str, num_labels: int, *, multi_label: bool = False, dropout: float = 0.1):
        super().__init__()
        self.encoder = AutoModel.from_pretrained(path)
        if getattr(self.encoder, "pooler", None) is not None:
            # unused here: dropped so that it holds no memory and LoRA puts nothing on it (not
            # add_pooling_layer=False: only some encoders take it, and the checkpoint's pooler weights
            # would then be reported as unexpected)
            self.encoder.pooler = None
        self.config = self.encoder.config  # PEFT reads model.config
        self.multi_label = multi_label
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.config.hidden_size, num_labels)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def save_pretrained(self, out_dir: str, safe_serialization: bool = True, **_ignored) -> None:
        """The whole model (recipe method "full"): every weight in FULL_WEIGHTS, the encoder's config and
        the tokenizer are not copied (labels.json names the base model, whose tokenizer it is)."""
        from pathlib import Path

        from safetensors.torch import save_file

        Path(out_dir).mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(Path(out_dir) / FULL_WEIGHTS))

    def load_full(self, out_dir: str) -> MeanPooledClassifier:
        """Load the weights `save_pretrained` wrote (strict: a model of another shape is an error)."""
        from pathlib import Path

        from safetensors.torch import load_file

        self.load_state_dict(load_file(str(Path(out_dir) / FULL_WEIGHTS)), strict=True)
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                **_ignored) -> SequenceClassifierOutput:
        logits = self.classifier(self.dropout(self.embed(input_ids, attention_mask)))
        loss = None
        if labels is not None:
            loss = (nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
                    if self.multi_label else nn.functional.cross_entropy(logits, labels))
        return SequenceClassifierOutput(loss=loss, logits=logits)


def lora_task_type(pooling: str):
    """PEFT's task type for the head: SEQ_CLS for transformers' classifiers; none for the mean-pooled
    module, which PEFT then wraps as a plain model, passing keyword arguments through."""
    from peft import TaskType

    return TaskType.SEQ_CLS if pooling == "cls" else None


@dataclass(frozen=True)
class HeadSpec:
    """One field of a triage model: its name in the row's answer, its label space, and whether it is
    a set of tags (one sigmoid per label) rather than one label (softmax)."""

    name: str
    labels: tuple[str, ...]
    multi_label: bool = False

    def as_json(self) -> dict:
        return {"name": self.name, "labels": list(self.labels), "multi_label": self.multi_label}

    @classmethod
    def from_json(cls, d: dict) -> HeadSpec:
        return cls(str(d["name"]), tuple(d["labels"]), bool(d.get("multi_label")))


def multi_head_modules(heads: Sequence[HeadSpec]) -> list[str]:
    """The head modules PEFT trains in full and saves with the adapter (`modules_to_save`)."""
    return [f"heads.{i}" for i in range(len(heads))]


def multi_head_loss(logits: Sequence[torch.Tensor], heads: Sequence[HeadSpec], labels: torch.Tensor | None,
                    tag_labels: torch.Tensor | None, weights: Sequence[float]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(the weighted sum of the heads' losses, each head's loss). `labels` holds one column per softmax
    head, in head order, IGNORE_INDEX where the row has no value: each softmax head's loss is the mean
    cross-entropy over the rows that have a value (0 when none has), so a missing value neither counts
    as a class nor dilutes the head's loss. `tag_labels` holds the multi-label heads' 0/1 targets side
    by side (BCE over every row: an empty tag set is a value)."""
    per_head: list[torch.Tensor] = []
    col = width = 0
    for head, out in zip(heads, logits, strict=True):
        if head.multi_label:
            target = tag_labels[:, width : width + len(head.labels)].to(out.dtype)
            width += len(head.labels)
            per_head.append(nn.functional.binary_cross_entropy_with_logits(out, target))
        else:
            target = labels[:, col]
            col += 1
            has_value = target != IGNORE_INDEX
            if bool(has_value.any()):
                per_head.append(nn.functional.cross_entropy(out[has_value], target[has_value]))
            else:
                per_head.append(out.sum() * 0.0)  # keeps the graph (and the device) without a contribution
    total = sum(w * loss for w, loss in zip(weights, per_head, strict=True))
    return total, per_head


class MultiHeadClassifier(nn.Module):
    """Encoder -> mean of the last hidden states over real tokens -> dropout -> one linear layer per field.

    `forward` answers like a transformers classifier: `.logits` are the heads' logits concatenated in
    head order (`split` cuts them apart), `.loss` the weighted sum of the heads' losses when targets
    are given (`labels`: one column per softmax head; `tag_labels`: the multi-label heads' targets)."""

    def __init__(self, path: str, heads: Sequence[HeadSpec], *, weights: Sequence[float] | None = None,
                 dropout: float = 0.1):
        super().__init__()
        if not heads:
            raise ValueError("a multi-head classifier needs at least one head")
        names = [h.name for h in heads]
        if len(set(names)) != len(names):
            raise ValueError(f"head names repeat: {names}")
        self.encoder = AutoModel.from_pretrained(path)
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None  # unused, as in MeanPooledClassifier
        self.config = self.encoder.config  # PEFT reads model.config
        self.head_specs = list(heads)
        self.weights = [1.0] * len(heads) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(heads):
            raise ValueError(f"{len(self.weights)} loss weights for {len(heads)} heads")
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleList(nn.Linear(self.config.hidden_size, len(h.labels)) for h in heads)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def split(self, logits: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(logits, [len(h.labels) for h in self.head_specs], dim=-1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                tag_labels: torch.Tensor | None = None, **_ignored) -> SequenceClassifierOutput:
        pooled = self.dropout(self.embed(input_ids, attention_mask))
        parts = [head(pooled) for head in self.heads]
        loss = None
        if labels is not None or tag_labels is not None:
            loss, _ = multi_head_loss(parts, self.head_specs, labels, tag_labels, self.weights)
        return SequenceClassifierOutput(loss=loss, logits=torch.cat(parts, dim=-1))


def decode_heads(heads: Sequence[HeadSpec], logits: torch.Tensor, threshold: float = 0.5) -> list[dict]:
    """Each row's answer from a MultiHeadClassifier's concatenated logits: the arg-max label of every
    softmax head, the labels whose sigmoid reaches `threshold` for a multi-label head."""
    parts = torch.split(logits, [len(h.labels) for h in heads], dim=-1)
    columns = []
    for head, part in zip(heads, parts):
        if head.multi_label:
            on = (torch.sigmoid(part) >= threshold).tolist()
            columns.append([[head.labels[j] for j, v in enumerate(row) if v] for row in on])
        else:
            columns.append([head.labels[j] for j in part.argmax(dim=-1).tolist()])
    return [{h.name: col[i] for h, col in zip(heads, columns)} for i in range(logits.shape[0])]
