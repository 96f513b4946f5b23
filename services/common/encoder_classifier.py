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
Imports torch: import this module only where a model is built (inside functions elsewhere).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import AutoModel
from transformers.modeling_outputs import SequenceClassifierOutput

POOLINGS = ("cls", "mean")
HEAD_MODULES = {"cls": ["classifier", "score"], "mean": ["classifier"]}


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
