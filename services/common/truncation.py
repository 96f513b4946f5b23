"""Tokenising a text that is longer than the model's window: keep its head, or its head and its tail.

Issue reports open with the title and the first description lines and often end with the part that
decides the label (the expected behaviour, the question asked, a stack trace's last line). "head_tail"
keeps the first half of the window and the last half (Sun et al., "How to Fine-Tune BERT for Text
Classification?", 2019: head + tail beat head-only on long reviews). The trainer encodes with it and
every place that scores the trained model (services/common/classifier_inference.py) does the same,
as the adapter's labels.json records (`truncation`).
"""

from __future__ import annotations

from collections.abc import Sequence

TRUNCATIONS = ("head", "head_tail")


def encode_ids(tokenizer, texts: Sequence[str], max_length: int, truncation: str = "head") -> list[list[int]]:
    """Token ids of each text, special tokens included, at most `max_length` long."""
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    if truncation == "head":
        return list(tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"])
    prefix, suffix = _special_tokens(tokenizer)
    room = max(1, max_length - len(prefix) - len(suffix))
    head = -(-room // 2)  # the head gets the odd token
    out = []
    for ids in tokenizer(list(texts), add_special_tokens=False, truncation=False)["input_ids"]:
        if len(ids) > room:
            ids = ids[:head] + (ids[len(ids) - (room - head):] if room > head else [])
        out.append(prefix + list(ids) + suffix)
    return out


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a single text ([CLS] / [SEP] for BERT)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return list(full[:i]), list(full[i + len(plain):])
    return [], []


def pad_batch(ids: Sequence[Sequence[int]], pad_id: int):
    """(input_ids, attention_mask) as long tensors, right-padded to the longest row."""
    import torch

    width = max(len(r) for r in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, r in enumerate(ids):
        input_ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return input_ids, mask
