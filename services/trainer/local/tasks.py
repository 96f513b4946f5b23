"""What differs per task for the local loop: the model and its LoRA config, how rows become tensors,
how a batch is padded, how the model is scored mid-training, and what is saved beside the adapter.

- SequenceClassification: single-label (cross-entropy over `label`, scored by macro-F1) or
  multi-label (one sigmoid per label over `tags`, BCE, a threshold, scored by micro-F1).
- MultiFieldTriage: one encoder, one head per field of a triage row (`label`, each of `heads`,
  `tags`), the weighted sum of the heads' losses with missing values masked, scored by the mean of
  the heads' F1.
- ChatSFT: a causal LM on conversations rendered with the model's own chat template, with the
  loss on assistant tokens only (every other token's label is -100), scored by eval loss.

Every task has the same methods: validate, build_model, encode, collate, evaluate, write_metadata.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from services.trainer.local.engine import EvalResult
from services.trainer.recipes import Recipe, resolve_base_model

METADATA_FILE = "labels.json"  # the evaluator and export read the label order from here
IGNORE_INDEX = -100


def _pad(rows: list[list[int]], value: int):
    import torch

    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def _attention(rows: list[list[int]]):
    import torch

    width = max(len(r) for r in rows)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        mask[i, : len(r)] = 1
    return mask


def predict_batches(model, enc: dict, collate, batch_size: int, decode) -> tuple[list, float]:
    """(decode(logits) of every batch, concatenated; mean loss) over an encoded split, in eval mode."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    n = len(enc["input_ids"])
    preds: list = []
    loss_sum = 0.0
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            idx = list(range(start, min(n, start + batch_size)))
            batch = {k: v.to(device) for k, v in collate(enc, idx).items()}
            out = model(**batch)
            loss_sum += float(out.loss) * len(idx)
            preds.extend(decode(out.logits))
    return preds, loss_sum / max(1, n)


class SequenceClassification:
    """Encoder + classification head, LoRA on the recipe's target modules, the head trained in full."""

    def __init__(self, label_space: Sequence[str], *, multi_label: bool = False, eval_batch_size: int = 64):
        if len(label_space) < (1 if multi_label else 2):
            raise ValueError(f"{'multi' if multi_label else 'single'}-label classification needs "
                             f"{'a label' if multi_label else 'at least 2 labels'}, got {list(label_space)}")
        if len(set(label_space)) != len(label_space):
            raise ValueError(f"label_space has duplicates: {list(label_space)}")
        self.label_space = list(label_space)
        self.multi_label = multi_label
        self.label2id = {label: i for i, label in enumerate(self.label_space)}
        self.metric_name = "micro_f1" if multi_label else "macro_f1"
        self.eval_batch_size = eval_batch_size
        self.tokenizer = None
        self.recipe: Recipe | None = None

    def _labels_of(self, row: dict) -> list[str]:
        return list(row.get("tags") or []) if self.multi_label else [row["label"]]

    def validate(self, train_rows: list[dict], eval_rows: list[dict]) -> None:
        unknown = sorted({lab for r in train_rows + eval_rows for lab in self._labels_of(r)} - set(self.label_space))
        if unknown:
            raise ValueError(f"labels not in label_space: {unknown[:10]}")

    def build_model(self, recipe: Recipe):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoTokenizer

        from services.common.encoder_classifier import HEAD_MODULES, build_encoder_classifier, lora_task_type

        self.recipe = recipe
        path = resolve_base_model(recipe.base_model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        base = build_encoder_classifier(path, self.label_space, pooling=recipe.pooling, multi_label=self.multi_label)
        if recipe.method == "full":
            return base  # every weight trained; saved whole (MeanPooledClassifier.save_pretrained)
        config = LoraConfig(
            task_type=lora_task_type(recipe.pooling), r=recipe.lora_r, lora_alpha=recipe.lora_alpha,
            lora_dropout=recipe.lora_dropout, target_modules=list(recipe.target_modules),
            # the head is new for every label space: trained in full and shipped with the adapter
            modules_to_save=HEAD_MODULES[recipe.pooling],
        )
        return get_peft_model(base, config)

    def encode(self, rows: list[dict]) -> dict:
        """Tokenise once, up front: each step only pads its batch."""
        import torch

        assert self.tokenizer is not None and self.recipe is not None, "build_model first"
        from services.common.truncation import encode_ids

        input_ids = encode_ids(self.tokenizer, [r["text"] for r in rows], self.recipe.max_length, self.recipe.truncation)
        if self.multi_label:
            targets = torch.zeros((len(rows), len(self.label_space)), dtype=torch.float)
            for i, r in enumerate(rows):
                for lab in self._labels_of(r):
                    targets[i, self.label2id[lab]] = 1.0
        else:
            targets = torch.tensor([self.label2id[r["label"]] for r in rows], dtype=torch.long)
        return {"input_ids": input_ids, "targets": targets, "rows": rows}

    def collate(self, enc: dict, idx: list[int]) -> dict:
        ids = [enc["input_ids"][i] for i in idx]
        return {"input_ids": _pad(ids, self.tokenizer.pad_token_id or 0), "attention_mask": _attention(ids),
                "labels": enc["targets"][idx]}

    def predict(self, model, enc: dict) -> tuple[list, float]:
        """(predictions, mean loss) over an encoded split, in eval mode, batch by batch."""
        import torch

        def decode(logits) -> list:
            if self.multi_label:
                on = torch.sigmoid(logits) >= self.recipe.multi_label_threshold
                return [[self.label_space[j] for j in row.nonzero().flatten().tolist()] for row in on]
            return [self.label_space[j] for j in logits.argmax(dim=-1).tolist()]

        return predict_batches(model, enc, self.collate, self.eval_batch_size, decode)

    def evaluate(self, model, enc: dict, recipe: Recipe) -> EvalResult:
        preds, loss = self.predict(model, enc)
        if self.multi_label:
            metric = micro_f1([self._labels_of(r) for r in enc["rows"]], preds)
        else:
            from services.common.metrics import macro_f1

            metric = macro_f1([r["label"] for r in enc["rows"]], preds, self.label_space)
        return EvalResult(self.metric_name, metric, loss)

    def write_metadata(self, out_dir: Path, recipe: Recipe) -> None:
        (Path(out_dir) / METADATA_FILE).write_text(json.dumps({
            "task": "multi_label_classification" if self.multi_label else "sequence_classification",
            "label_space": self.label_space, "base_model": str(recipe.base_model), "max_length": recipe.max_length,
            "pooling": recipe.pooling,  # the head the evaluator must rebuild (services/common/encoder_classifier.py)
            "method": recipe.method,  # "full": the whole model is saved (model.safetensors), not a LoRA adapter
            "truncation": recipe.truncation,  # how a long text is cut (services/common/truncation.py)
            "threshold": recipe.multi_label_threshold if self.multi_label else None,
        }, indent=2))


def micro_f1(y_true: list[list[str]], y_pred: list[list[str]]) -> float:
    """Micro-averaged F1 over every (row, label) decision of a multi-label prediction."""
    tp = fp = fn = 0
    for t, p in zip(y_true, y_pred, strict=True):
        t_set, p_set = set(t), set(p)
        tp += len(t_set & p_set)
        fp += len(p_set - t_set)
        fn += len(t_set - p_set)
    return 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0


TRIAGE_TASK = "multi_field_triage"
LABEL_FIELD, TAGS_FIELD = "label", "tags"


def head_value(v):
    """The value a softmax head learns from a row's head: a label, the first of several (e.g. a report
    filed under two components), or None (no value: masked out of that head's loss)."""
    if isinstance(v, list):
        v = next((x for x in v if x is not None and str(x) != ""), None)
    return None if v is None or str(v) == "" else str(v)


def head_spaces_of(rows: Sequence[dict]) -> dict[str, list[str]]:
    """Each triage head's label space from the rows (sorted values; heads with no value anywhere omitted)."""
    values: dict[str, set[str]] = {}
    for r in rows:
        for name, v in (r.get("heads") or {}).items():
            got = values.setdefault(name, set())
            if (hv := head_value(v)) is not None:
                got.add(hv)
    return {name: sorted(vs) for name, vs in sorted(values.items()) if vs}


class MultiFieldTriage:
    """One encoder, one head per field of a triage row: softmax for the lead `label` and each of
    `heads`, one sigmoid per tag for `tags` (when the run has tags), trained together.

    The loss is the sum of the heads' losses weighted by the recipe's `head_weights` (1 each); a row
    without a value for a head (no component) is masked out of that head's loss and still trains the
    others. Head label spaces come from `head_spaces`, or from the train and validation rows when not
    given (the trainer knows the rows, not the manifest); a value outside a given space is masked
    like a missing one. Scored mid-training by the mean of the heads' F1 on the validation rows
    (macro-F1 over each softmax head's rows with a value, micro-F1 for tags)."""

    metric_name = "mean_head_f1"

    def __init__(self, label_space: Sequence[str], tag_space: Sequence[str] = (),
                 head_spaces: dict[str, Sequence[str]] | None = None, eval_batch_size: int = 64):
        if len(label_space) < 2:
            raise ValueError(f"triage needs at least 2 labels for its lead field, got {list(label_space)}")
        if len(set(label_space)) != len(label_space):
            raise ValueError(f"label_space has duplicates: {list(label_space)}")
        self.label_space = list(label_space)
        self.tag_space = list(tag_space)
        self.head_spaces = {k: list(v) for k, v in head_spaces.items()} if head_spaces is not None else None
        self.eval_batch_size = eval_batch_size
        self.heads = None  # list[HeadSpec], fixed by validate()
        self.tokenizer = None
        self.recipe: Recipe | None = None

    def _specs(self):
        from services.common.encoder_classifier import HeadSpec

        heads = [HeadSpec(LABEL_FIELD, tuple(self.label_space))]
        for name, space in (self.head_spaces or {}).items():
            if name in (LABEL_FIELD, TAGS_FIELD):
                raise ValueError(f"a triage head may not be named {name!r}: the lead label and the tags use that name")
            heads.append(HeadSpec(name, tuple(space)))
        if self.tag_space:
            heads.append(HeadSpec(TAGS_FIELD, tuple(self.tag_space), multi_label=True))
        return heads

    def validate(self, train_rows: list[dict], eval_rows: list[dict]) -> None:
        unknown = sorted({r["label"] for r in train_rows + eval_rows} - set(self.label_space))
        if unknown:
            raise ValueError(f"labels not in label_space: {unknown[:10]}")
        if self.head_spaces is None:
            self.head_spaces = head_spaces_of(train_rows + eval_rows)
        self.heads = self._specs()

    def weights(self, recipe: Recipe) -> list[float]:
        names = [h.name for h in self.heads]
        unknown = sorted(set(recipe.head_weights) - set(names))
        if unknown:
            raise ValueError(f"head_weights name field(s) {unknown} that this run has no head for; heads: {names}")
        weights = [float(recipe.head_weights.get(n, 1.0)) for n in names]
        if not any(weights):
            raise ValueError(f"head_weights {recipe.head_weights} give every head weight 0: nothing would be learned")
        return weights

    def build_model(self, recipe: Recipe):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoTokenizer

        from services.common.encoder_classifier import MultiHeadClassifier, multi_head_modules

        assert self.heads is not None, "validate first: it fixes the heads"
        self.recipe = recipe
        path = resolve_base_model(recipe.base_model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        base = MultiHeadClassifier(path, self.heads, weights=self.weights(recipe))
        config = LoraConfig(
            task_type=None, r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
            target_modules=list(recipe.target_modules),
            modules_to_save=multi_head_modules(self.heads),  # every head is new: trained in full, saved
        )
        return get_peft_model(base, config)

    def encode(self, rows: list[dict]) -> dict:
        import torch

        assert self.tokenizer is not None and self.recipe is not None, "build_model first"
        enc = self.tokenizer([r["text"] for r in rows], truncation=True, max_length=self.recipe.max_length)
        single = [h for h in self.heads if not h.multi_label]
        index = {h.name: {lab: i for i, lab in enumerate(h.labels)} for h in single}
        labels = torch.full((len(rows), len(single)), IGNORE_INDEX, dtype=torch.long)
        for i, r in enumerate(rows):
            for j, h in enumerate(single):
                v = r.get("label") if h.name == LABEL_FIELD else head_value((r.get("heads") or {}).get(h.name))
                labels[i, j] = index[h.name].get(v, IGNORE_INDEX) if v is not None else IGNORE_INDEX
        out = {"input_ids": enc["input_ids"], "labels": labels, "rows": rows}
        if self.tag_space:
            tag_index = {t: i for i, t in enumerate(self.tag_space)}
            tags = torch.zeros((len(rows), len(self.tag_space)), dtype=torch.float)
            for i, r in enumerate(rows):
                for t in r.get(TAGS_FIELD) or []:
                    if t in tag_index:
                        tags[i, tag_index[t]] = 1.0
            out["tag_labels"] = tags
        return out

    def collate(self, enc: dict, idx: list[int]) -> dict:
        ids = [enc["input_ids"][i] for i in idx]
        batch = {"input_ids": _pad(ids, self.tokenizer.pad_token_id or 0), "attention_mask": _attention(ids),
                 "labels": enc["labels"][idx]}
        if "tag_labels" in enc:
            batch["tag_labels"] = enc["tag_labels"][idx]
        return batch

    def predict(self, model, enc: dict) -> tuple[list[dict], float]:
        """(one answer per row: {field: label, ..., "tags": [...]}, mean loss) over an encoded split."""
        from services.common.encoder_classifier import decode_heads

        return predict_batches(model, enc, self.collate, self.eval_batch_size,
                               lambda logits: decode_heads(self.heads, logits.float().cpu(),
                                                           self.recipe.multi_label_threshold))

    def head_f1(self, rows: list[dict], preds: list[dict]) -> dict[str, float]:
        """Each head's F1 on the rows: macro over a softmax head's rows with a value, micro for tags."""
        from services.common.metrics import macro_f1

        out = {}
        for h in self.heads:
            if h.multi_label:
                out[h.name] = micro_f1([[t for t in r.get(TAGS_FIELD) or [] if t in h.labels] for r in rows],
                                       [p[h.name] for p in preds])
                continue
            pairs = [(v, p[h.name]) for r, p in zip(rows, preds)
                     if (v := r.get("label") if h.name == LABEL_FIELD else head_value((r.get("heads") or {}).get(h.name)))
                     in h.labels]
            if pairs:
                out[h.name] = macro_f1([t for t, _ in pairs], [q for _, q in pairs], list(h.labels))
        return out

    def evaluate(self, model, enc: dict, recipe: Recipe) -> EvalResult:
        preds, loss = self.predict(model, enc)
        f1 = self.head_f1(enc["rows"], preds)
        return EvalResult(self.metric_name, sum(f1.values()) / len(f1) if f1 else 0.0, loss)

    def write_metadata(self, out_dir: Path, recipe: Recipe) -> None:
        (Path(out_dir) / METADATA_FILE).write_text(json.dumps({
            "task": TRIAGE_TASK, "label_space": self.label_space,
            # every head in model order: the evaluator and export rebuild the model from this list
            "heads": [h.as_json() for h in self.heads],
            "head_weights": dict(zip([h.name for h in self.heads], self.weights(recipe))),
            "base_model": str(recipe.base_model), "max_length": recipe.max_length, "pooling": "mean",
            "threshold": recipe.multi_label_threshold if self.tag_space else None,
        }, indent=2))


class ChatSFT:
    """A causal LM learning the assistant turns of conversations, on the model's chat template."""

    metric_name = "neg_eval_loss"

    def __init__(self, eval_batch_size: int = 8):
        self.eval_batch_size = eval_batch_size
        self.tokenizer = None
        self.recipe: Recipe | None = None

    @staticmethod
    def conversation(row: dict) -> list[dict]:
        """Every SFT shape as a conversation: chat rows as they are; prompt/completion and JSON
        extraction as one user turn and one assistant turn."""
        if "messages" in row:
            return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        if "completion" in row:
            return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
        if "target" in row:
            return [{"role": "user", "content": row["text"]},
                    {"role": "assistant", "content": json.dumps(row["target"], ensure_ascii=False, sort_keys=True)}]
        raise ValueError(f"row {row.get('row_number')} has no messages, prompt/completion or text/target")

    def validate(self, train_rows: list[dict], eval_rows: list[dict]) -> None:
        for row in train_rows[:1000]:
            if not any(m["role"] == "assistant" for m in self.conversation(row)):
                raise ValueError(f"row {row.get('row_number')} has no assistant turn: nothing to learn from it")

    def build_model(self, recipe: Recipe):
        from peft import LoraConfig, TaskType, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.recipe = recipe
        path = resolve_base_model(recipe.base_model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{recipe.base_model} has no chat template: chat SFT needs one to render conversations")
        kwargs = {}
        if recipe.method == "qlora":
            import torch
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                bnb_4bit_use_double_quant=True)
        base = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        if recipe.method == "qlora":
            from peft import prepare_model_for_kbit_training

            base = prepare_model_for_kbit_training(base)
        names = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
        targets = [t for t in recipe.target_modules if t in names]
        if not targets:
            raise ValueError(f"none of the recipe's target_modules {list(recipe.target_modules)} exist in "
                             f"{recipe.base_model}; override target_modules")
        config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=recipe.lora_r, lora_alpha=recipe.lora_alpha,
                            lora_dropout=recipe.lora_dropout, target_modules=targets)
        return get_peft_model(base, config)

    def tokenize_conversation(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """(input_ids, labels) with labels = -100 everywhere except the assistant turns' tokens.

        Assistant spans are found by rendering: the text of messages[:k] with the generation
        prompt is a prefix of the text of messages[:k+1], and the characters between the two are
        what the model must produce for turn k (content and end-of-turn marker). Tokens whose
        character offsets fall inside those spans are the ones the loss sees.
        """
        tok = self.tokenizer
        full = tok.apply_chat_template(messages, tokenize=False)
        spans: list[tuple[int, int]] = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = tok.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True) if k else ""
            upto = tok.apply_chat_template(messages[: k + 1], tokenize=False)
            if not full.startswith(upto) or not upto.startswith(before):
                raise ValueError("the chat template does not render conversations prefix by prefix; "
                                 "assistant-only loss cannot be located")
            spans.append((len(before), len(upto)))
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True, truncation=True,
                  max_length=self.recipe.max_length)
        labels = [
            tid if any(s <= start < e for s, e in spans) and end > start else IGNORE_INDEX
            for tid, (start, end) in zip(enc["input_ids"], enc["offset_mapping"])
        ]
        return list(enc["input_ids"]), labels

    def encode(self, rows: list[dict]) -> dict:
        ids, labels = [], []
        for row in rows:
            i, lab = self.tokenize_conversation(self.conversation(row))
            ids.append(i)
            labels.append(lab)
        return {"input_ids": ids, "labels": labels, "rows": rows}

    def _pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    def collate(self, enc: dict, idx: list[int]) -> dict:
        ids = [enc["input_ids"][i] for i in idx]
        return {"input_ids": _pad(ids, self._pad_id()), "attention_mask": _attention(ids),
                "labels": _pad([enc["labels"][i] for i in idx], IGNORE_INDEX)}

    def evaluate(self, model, enc: dict, recipe: Recipe) -> EvalResult:
        """Mean loss per assistant token over the eval split; the metric is its negative (higher is better)."""
        import torch

        model.eval()
        device = next(model.parameters()).device
        total, tokens = 0.0, 0
        n = len(enc["input_ids"])
        with torch.inference_mode():
            for start in range(0, n, self.eval_batch_size):
                idx = list(range(start, min(n, start + self.eval_batch_size)))
                batch = {k: v.to(device) for k, v in self.collate(enc, idx).items()}
                count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # the model shifts labels by one
                if count == 0:
                    continue
                total += float(model(**batch).loss) * count
                tokens += count
        loss = total / tokens if tokens else float("nan")
        return EvalResult(self.metric_name, -loss, loss)

    def write_metadata(self, out_dir: Path, recipe: Recipe) -> None:
        (Path(out_dir) / METADATA_FILE).write_text(json.dumps({
            "task": "chat_sft", "base_model": str(recipe.base_model), "max_length": recipe.max_length,
        }, indent=2))


def task_for(recipe: Recipe, label_space: Sequence[str] | None = None, tag_space: Sequence[str] | None = None):
    if recipe.task == "sequence_classification":
        return SequenceClassification(label_space or [])
    if recipe.task == "multi_label_classification":
        return SequenceClassification(tag_space or [], multi_label=True)
    if recipe.task == TRIAGE_TASK:
        return MultiFieldTriage(label_space or [], tag_space or [])
    return ChatSFT()
