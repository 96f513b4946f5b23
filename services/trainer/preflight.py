"""Preflight: everything that can be known about a training run before it trains.

Before any training the trainer checks:
- dependencies: torch, transformers and peft installed and new enough; bitsandbytes for QLoRA;
- the base model: its config is readable (a local directory or a hub id already in the cache), what
  it is (architecture, sizes, causal LM or not, chat template or not) and how many parameters it
  has, counted WITHOUT loading weights (the model is instantiated on torch's meta device);
- capability: the task fits the architecture (chat SFT needs a causal LM, and a chat template for
  chat data; classification needs a model transformers can put a sequence-classification head on;
  the recipe's LoRA target modules exist; max_length fits learned position embeddings; QLoRA has
  CUDA);
- memory fit: weights + gradients + AdamW state + activations against the RAM or VRAM available;
- data sufficiency: prep's warnings (few rows per class / in all) and a missing eval split;
- hosted backends: the API-key variable is set (its value is never read into a message),
  Anthropic is refused (Claude fine-tuning exists only through Amazon Bedrock, D12), and a host or base
  model with an announced cutoff is a warning naming the date (`preflight.hosted_cutoff`).

Strict mode blocks with the list of blockers; fail-open mode reports them as warnings and passes.
Either way the report carries the generated TrainPlan the trainer will follow.

The memory estimate (documented so its numbers can be checked by hand):
- weights: total parameters x bytes per parameter. LoRA loads the base in fp32 (4 bytes, the
  trainer passes no dtype), plus the LoRA matrices and, for classification, the trainable copy of the
  head (peft's modules_to_save). QLoRA: NF4 linear layers at 0.5 byte plus ~3% for the double-quantised
  block constants; embeddings, norms and lm_head stay 16-bit (2 bytes); the LoRA matrices fp32.
- gradients: trainable parameters x 4 (fp32); optimizer: AdamW's two fp32 moments, trainable x 8.
- activations: what autograd saves for backward, times BACKWARD_PEAK (the backward pass's transient
  buffers on top, measured). Saved: per transformer layer s*b*h*(34 + 5*a*s/h) bytes at 16-bit
  (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", eq. 1, no
  recomputation; the 5*a*s/h attention-score term only where the scores are kept: eager attention, or
  any attention dropout), doubled for fp32 compute; the frozen base still stores them because gradients flow
  back through it to the LoRA matrices of earlier layers. LoRA's dropout adds a dropped copy of each
  adapted layer's input and its mask. QLoRA trains with gradient checkpointing (each layer keeps its
  16-bit input, one layer is recomputed at a time). A causal LM adds its logits and their log-softmax
  copy in fp32, 2 x b*s*vocab*4 bytes. Batches are padded to the longest row, so max_length is the
  worst case. (Checked against the tensors autograd actually keeps: within 5-15% on
  all-MiniLM-L6-v2 and within 5% on a small Llama with SDPA attention.)
- fits: total <= 85% of the available bytes (the margin covers the framework, the allocator's
  fragmentation and the tokenizer); unknown availability -> fits None and a warning.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from contracts.common import HostedSettings
from contracts.events import CostEstimate, MemoryEstimate, Notice, PreflightCheck, TrainPlan
from services.trainer.recipes import Recipe, resolve_base_model

MODES = ("strict", "fail_open")
BACKENDS = ("local", "openai", "anthropic")
FIT_MARGIN = 0.85  # the estimate must stay under this share of the available bytes
# the triage model is the same encoder with a head per field; its estimate counts the lead label's head
CLASSIFICATION_TASKS = ("sequence_classification", "multi_label_classification", "multi_field_triage")

# minimum versions: what the trainer's code paths need (peft's modules_to_save + TaskType.SEQ_CLS,
# transformers' chat templates and meta-device from_config, torch's device context manager)
MIN_VERSIONS: dict[str, str] = {"torch": "2.1", "transformers": "4.40", "peft": "0.10"}
QLORA_MIN_VERSIONS: dict[str, str] = {"bitsandbytes": "0.43"}

# Peak memory while training / the tensors saved for backward. During backward the gradients of the
# activations, autograd's temporaries and (on the CPU) glibc's unreturned freed chunks come on top of
# what the forward pass saved. CPU: measured as the peak RSS increase of a few training steps, less the
# weights, over the saved-tensor formula below (fp32, eager loop, LoRA): 1.6-2.5x on all-MiniLM-L6-v2
# over batch 1-32 x length 64-512 (2.1 at 16 x 128), 2.6x on a small Llama (SDPA) at 4 x 1024; 2.5 is
# the conservative end. CUDA: not calibrated here (no GPU on the development machine); the caching
# allocator reuses freed blocks, so the transient is smaller.
BACKWARD_PEAK: dict[str, float] = {"cpu": 2.5, "cuda": 1.3}

GIB = 1024**3
MIB = 1024**2


# --- the device --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceInfo:
    """What preflight measures about the machine (tests pass their own)."""

    kind: str                    # "cpu" or "cuda"
    name: str                    # "cpu (2 cores)" or the GPU's name
    available_bytes: int | None  # RAM: MemAvailable (capped by a cgroup limit); CUDA: free VRAM
    cuda_available: bool


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - psutil missing or unsupported platform: unknown
        return None


def _cgroup_headroom() -> int | None:
    """Bytes left under a container's memory limit (cgroup v2, then v1); None when unlimited."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            raw = Path(limit_file).read_text().strip()
            if raw == "max":
                return None
            limit, usage = int(raw), int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit >= 1 << 60:  # v1 reports "unlimited" as a huge number
            return None
        return max(0, limit - usage)
    return None


def probe_device() -> DeviceInfo:
    """The device the trainer will use (CUDA when torch sees one, as the training loop does)."""
    try:
        import torch

        if torch.cuda.is_available():
            free, _total = torch.cuda.mem_get_info(0)
            return DeviceInfo("cuda", torch.cuda.get_device_name(0), int(free), True)
    except Exception:  # noqa: BLE001 - no torch or a broken driver: fall back to the CPU
        pass
    ram = _meminfo_available()
    headroom = _cgroup_headroom()
    if ram is not None and headroom is not None:
        ram = min(ram, headroom)
    elif ram is None:
        ram = headroom
    return DeviceInfo("cpu", f"cpu ({os.cpu_count() or 1} cores)", ram, False)


def _count(n: int) -> str:
    """A parameter count for a message: 7.62B, 22.7M, 39.4K."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.3g}{suffix}"
    return str(n)


def _fmt(n: int | float) -> str:
    """Bytes as GiB with one or two decimals, or MiB below 1 GiB."""
    if n >= GIB:
        return f"{n / GIB:.2f} GiB" if n < 10 * GIB else f"{n / GIB:.1f} GiB"
    return f"{n / MIB:.1f} MiB" if n < 10 * MIB else f"{n / MIB:.0f} MiB"


# --- dependencies ------------------------------------------------------------------------------


def _version_tuple(text: str) -> tuple:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(text).release
    except InvalidVersion:
        return tuple(int(p) for p in text.split("+")[0].split(".") if p.isdigit())


def _installed(package: str) -> bool:
    try:
        metadata.version(package)
    except metadata.PackageNotFoundError:
        return False
    return True


def check_dependencies(recipe: Recipe) -> list[PreflightCheck]:
    """One check per package: installed and at least the minimum version (bitsandbytes for QLoRA)."""
    wanted = dict(MIN_VERSIONS)
    if recipe.method == "qlora":
        wanted.update(QLORA_MIN_VERSIONS)
    checks = []
    for package, minimum in wanted.items():
        why = " (QLoRA's 4-bit NF4 kernels)" if package == "bitsandbytes" else ""
        try:
            installed = metadata.version(package)
        except metadata.PackageNotFoundError:
            checks.append(PreflightCheck(
                name="dependencies", status="block", reason_code="preflight.dependency_missing",
                message=f"{package} is not installed{why}; recipe {recipe.name!r} needs {package}>={minimum}: "
                        f"pip install '{package}>={minimum}'"))
            continue
        if _version_tuple(installed) < _version_tuple(minimum):
            checks.append(PreflightCheck(
                name="dependencies", status="block", reason_code="preflight.dependency_missing",
                message=f"{package} {installed} is too old{why}; recipe {recipe.name!r} needs {package}>={minimum}: "
                        f"pip install -U '{package}>={minimum}'"))
        else:
            checks.append(PreflightCheck(name="dependencies", status="ok",
                                         message=f"{package} {installed} (needs >={minimum}){why}"))
    return checks


# --- the base model ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearLayer:
    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ModelFacts:
    """What preflight knows about a base model, read from its config without loading weights."""

    source: str                          # the path or hub id it was read from
    model_type: str
    architectures: tuple[str, ...]
    hidden_size: int
    num_layers: int
    num_heads: int
    vocab_size: int
    max_positions: int | None            # max_position_embeddings / n_positions
    learned_positions: bool              # absolute position embeddings: longer inputs cannot work
    is_causal_lm: bool
    is_encoder_decoder: bool
    has_seqcls_head: bool                # transformers has a *ForSequenceClassification for it
    has_chat_template: bool | None       # None: could not tell (a hub id not in the cache)
    instantiated_as: str                 # the class counted on the meta device
    total_params: int                    # of that class (a classification head counted for 2 labels)
    params_exact: bool                   # False: the class could not be built, counts are a formula
    linear_layers: tuple[LinearLayer, ...] = ()  # LoRA candidates (the classification head excluded)
    head_params_fixed: int = 0           # classification head: params independent of the label count
    head_params_per_label: int = 0       # ... and per label
    head_params_counted: int = 0         # ... as included in total_params (for 2 labels)
    attn_implementation: str | None = None  # eager, sdpa, flash_attention_2, ... (transformers' default)
    attention_dropout: float = 0.0

    @property
    def stores_attention_scores(self) -> bool:
        """Does training keep the s x s attention probabilities? Not with a fused kernel (SDPA's flash or
        memory-efficient path, flash-attention) and no attention dropout; yes otherwise (measured: a
        dropout > 0 sends SDPA to its math path)."""
        fused = (self.attn_implementation or "eager") in ("sdpa", "flash_attention_2", "flash_attention_3",
                                                          "flex_attention")
        return not (fused and self.attention_dropout == 0)

    def lora_targets(self, target_modules: Sequence[str]) -> list[LinearLayer]:
        """Linear layers peft would adapt: the name equals a target or ends with '.' + target."""
        return [layer for layer in self.linear_layers
                if any(layer.name == t or layer.name.endswith("." + t) for t in target_modules)]

    def lora_params(self, recipe: Recipe) -> int:
        layers = self.lora_targets(recipe.target_modules)
        if recipe.pooling == "mean":  # the mean-pooled head loads the encoder without its pooler
            layers = [layer for layer in layers if not _in_pooler(layer.name)]
        return sum(recipe.lora_r * (layer.in_features + layer.out_features) for layer in layers)

    def head_params(self, label_count: int) -> int:
        return self.head_params_fixed + self.head_params_per_label * max(1, label_count)

    def trainable_params(self, recipe: Recipe, label_count: int) -> int:
        """LoRA matrices, plus the classification head (trained in full) for classification tasks; every
        parameter for a fully fine-tuned classifier (method "full")."""
        if recipe.method == "full":  # the mean-pooled head loads the encoder without its pooler (dense + bias)
            pooler = sum(layer.in_features * layer.out_features + layer.out_features
                         for layer in self.linear_layers if _in_pooler(layer.name))
            return self.base_params(recipe, label_count) - (pooler if recipe.pooling == "mean" else 0)
        head = self.head_params(label_count) if recipe.task in CLASSIFICATION_TASKS else 0
        return self.lora_params(recipe) + head

    def base_params(self, recipe: Recipe, label_count: int) -> int:
        """Parameters of the base as the task loads it (the head sized for label_count)."""
        if recipe.task in CLASSIFICATION_TASKS:
            return self.total_params - self.head_params_counted + self.head_params(label_count)
        return self.total_params


def _in_pooler(name: str) -> bool:
    return name.startswith("pooler.") or ".pooler." in name


class BaseModelUnavailable(RuntimeError):
    """The base model's config could not be read (`preflight.base_model_unavailable`)."""


def _looks_like_path(name: str) -> bool:
    return os.path.isabs(name) or name.startswith(("./", "../", "~"))


def _local_text(path: str, filename: str) -> str | None:
    """A small file of the model: from the directory, or from the hub cache (never downloaded)."""
    if os.path.isdir(path):
        file = Path(path) / filename
        return file.read_text(encoding="utf-8") if file.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, filename)
    except Exception:  # noqa: BLE001 - not a valid repo id, no hub library: unknown
        return None
    if isinstance(cached, str) and os.path.isfile(cached):
        return Path(cached).read_text(encoding="utf-8")
    return None


def _chat_template(path: str) -> bool | None:
    """Does the tokenizer carry a chat template? Read from the files, never by loading the tokenizer."""
    for name in ("chat_template.jinja", "chat_template.json"):
        if _local_text(path, name):
            return True
    if os.path.isdir(path) and (Path(path) / "additional_chat_templates").is_dir():
        if any((Path(path) / "additional_chat_templates").glob("*.jinja")):
            return True
    raw = _local_text(path, "tokenizer_config.json")
    if raw is None:
        return False if os.path.isdir(path) else None
    try:
        template = json.loads(raw).get("chat_template")
    except (json.JSONDecodeError, AttributeError):
        return None
    return bool(template)


def inspect_base_model(base_model: str, task: str | None = None) -> ModelFacts:
    """Facts about `base_model` (a path or hub id; the recipes' short names are resolved).

    `task` picks the class that is counted: chat_sft a causal LM, classification a model with a
    sequence-classification head, None the natural one (causal LM, else classifier, else the bare
    model). Cached per (path, task, config mtime). Raises BaseModelUnavailable.
    """
    path = resolve_base_model(base_model)
    if _looks_like_path(path) and not os.path.exists(os.path.expanduser(path)):
        raise BaseModelUnavailable(f"no such directory: {path}")
    path = os.path.expanduser(path)
    try:
        stamp = os.stat(Path(path) / "config.json").st_mtime_ns if os.path.isdir(path) else 0
    except OSError:
        stamp = -1
    return _inspect(path, task, stamp)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0].rstrip(". ") if text else ""
    return f"{type(exc).__name__}: {first[:300]}"


@functools.lru_cache(maxsize=64)
def _inspect(path: str, task: str | None, _stamp: int) -> ModelFacts:
    from transformers import AutoConfig

    try:
        # a directory, or a hub id already in the cache: no network (and no retries when offline)
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read the config is the same finding
        if os.path.isdir(path):
            raise BaseModelUnavailable(_first_line(exc)) from exc
        try:  # a hub id not cached yet: the hub, unless HF_HUB_OFFLINE says there is none
            config = AutoConfig.from_pretrained(path)
        except Exception as exc2:  # noqa: BLE001
            raise BaseModelUnavailable(_first_line(exc2)) from exc2

    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(config, "model_type", "") or ""
    is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    # BERT-like encoders also have a *LMHeadModel in the causal mapping, usable only as a decoder
    # (config.is_decoder); an encoder checkpoint is not a causal LM to fine-tune for chat.
    is_causal = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES or bool(getattr(config, "is_decoder", False)))
    has_seqcls = model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    hidden = int(getattr(text, "hidden_size", None) or getattr(text, "n_embd", None)
                 or getattr(text, "d_model", 0) or 0)
    layers = int(getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
                 or getattr(text, "num_layers", 0) or 0)
    heads = int(getattr(text, "num_attention_heads", None) or getattr(text, "n_head", None)
                or getattr(text, "num_heads", 0) or 0)
    vocab = int(getattr(text, "vocab_size", 0) or 0)
    max_positions = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)

    if task == "chat_sft":
        kind = "causal_lm" if is_causal else "base"
    elif task in CLASSIFICATION_TASKS:
        kind = "seqcls" if has_seqcls else "base"
    else:
        kind = "causal_lm" if is_causal else ("seqcls" if has_seqcls else "base")

    counted = _count_on_meta(config, kind)
    if counted is None:  # a class that cannot be built here (remote code, ...): the textbook formula
        intermediate = int(getattr(text, "intermediate_size", 0) or 4 * hidden)
        total = layers * (4 * hidden * hidden + 2 * hidden * intermediate) + vocab * hidden
        counted = dict(instantiated_as=f"{model_type} (formula)", total_params=total, params_exact=False,
                       linear_layers=(), learned_positions=False, head_fixed=0, head_per_label=0, head_counted=0)

    return ModelFacts(
        source=path, model_type=model_type, architectures=tuple(getattr(config, "architectures", None) or ()),
        hidden_size=hidden, num_layers=layers, num_heads=heads, vocab_size=vocab,
        max_positions=int(max_positions) if max_positions else None,
        learned_positions=counted["learned_positions"], is_causal_lm=is_causal,
        is_encoder_decoder=is_encoder_decoder, has_seqcls_head=has_seqcls, has_chat_template=_chat_template(path),
        instantiated_as=counted["instantiated_as"], total_params=counted["total_params"],
        params_exact=counted["params_exact"], linear_layers=counted["linear_layers"],
        head_params_fixed=counted["head_fixed"], head_params_per_label=counted["head_per_label"],
        head_params_counted=counted["head_counted"], attn_implementation=counted.get("attn_implementation"),
        attention_dropout=float(next((v for v in (getattr(text, k, None) for k in (
            "attention_dropout", "attention_probs_dropout_prob", "attn_pdrop", "attention_dropout_prob"))
            if isinstance(v, (int, float))), 0.0)),
    )


def _count_on_meta(config: Any, kind: str) -> dict[str, Any] | None:
    """Build the model on the meta device (shapes, no memory, no weights read) and count."""
    import copy

    import torch
    from torch import nn
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - always there in supported versions
        Conv1D = ()  # noqa: N806

    config = copy.deepcopy(config)
    auto = {"causal_lm": AutoModelForCausalLM, "seqcls": AutoModelForSequenceClassification, "base": AutoModel}[kind]
    if kind == "seqcls":
        config.num_labels = 2
    try:
        with torch.device("meta"):
            model = auto.from_config(config)
    except Exception:  # noqa: BLE001 - e.g. a config only remote code can build
        return None

    head_prefixes: tuple[str, ...] = ()
    if kind == "seqcls":
        backbone = getattr(model, "base_model_prefix", "") or ""
        head_prefixes = tuple(name for name, _ in model.named_children() if name != backbone)

    def in_head(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in head_prefixes)

    linear, learned_positions, head_last = [], False, None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            shape = (module.in_features, module.out_features)
        elif Conv1D and isinstance(module, Conv1D):
            shape = tuple(module.weight.shape)  # (in, out) for GPT-2's Conv1D
        else:
            if isinstance(module, nn.Embedding) and ("position" in name or name.endswith("wpe")):
                learned_positions = True
            continue
        if in_head(name):
            if shape[1] == 2:
                head_last = (shape[0], module.bias is not None)
            continue
        linear.append(LinearLayer(name, int(shape[0]), int(shape[1])))

    total = sum(p.numel() for p in model.parameters())  # shared (tied) tensors once
    head_counted = sum(p.numel() for n, p in model.named_parameters() if in_head(n))
    per_label = (head_last[0] + int(head_last[1])) if head_last else 0
    return dict(instantiated_as=type(model).__name__, total_params=int(total), params_exact=True,
                linear_layers=tuple(linear), learned_positions=learned_positions,
                head_fixed=int(head_counted - 2 * per_label), head_per_label=int(per_label),
                head_counted=int(head_counted),
                attn_implementation=getattr(model.config, "_attn_implementation", None))


# --- memory ------------------------------------------------------------------------------------


def _weight_bytes(recipe: Recipe, facts: ModelFacts, base_params: int, trainable: int) -> int:
    if recipe.method == "qlora":
        quantised = sum(layer.in_features * layer.out_features for layer in facts.linear_layers
                        if not layer.name.endswith("lm_head"))
        quantised = min(quantised, base_params)
        return int(quantised * 0.5 * 1.03 + (base_params - quantised) * 2 + trainable * 4)
    return (base_params + trainable) * 4  # fp32 base, plus the LoRA matrices and the head's trainable copy


def saved_activation_bytes(recipe: Recipe, facts: ModelFacts) -> int:
    """Tensors autograd keeps for the backward pass at recipe.batch_size x recipe.max_length (module doc)."""
    s, b, h = recipe.max_length, recipe.batch_size, max(1, facts.hidden_size)
    a = max(1, facts.num_heads)
    layers = max(1, facts.num_layers) * (2 if facts.is_encoder_decoder else 1)
    # 34 sbh: the layer's activations; 5 a s^2 b: attention scores, softmax and its dropout mask, which a
    # fused attention kernel without dropout never materialises
    per_layer_16bit = s * b * h * (34 + (5 * a * s / h if facts.stores_attention_scores else 0))
    if recipe.method == "qlora":
        # bf16 compute with gradient checkpointing (prepare_model_for_kbit_training turns it on): each
        # layer keeps its 16-bit input, and one layer at a time is recomputed in full
        total = layers * 2 * s * b * h + per_layer_16bit
        elem = 2
    else:
        total = layers * per_layer_16bit * 2  # fp32: twice the 16-bit figure
        elem = 4
    if recipe.lora_dropout > 0 and recipe.method != "full":
        # peft applies the adapter's dropout to each adapted layer's input separately: a dropped copy of
        # the input and its mask per adapted layer (q, k and v each keep their own)
        total += sum(b * s * layer.in_features * (elem + 1) for layer in facts.lora_targets(recipe.target_modules))
    if recipe.task == "chat_sft" and facts.is_causal_lm:
        total += 2 * b * s * facts.vocab_size * 4  # fp32 logits and their log-softmax copy
    return int(total)


def activation_bytes(recipe: Recipe, facts: ModelFacts, device_kind: str = "cpu") -> int:
    """Saved activations times the backward pass's peak factor for the device (see BACKWARD_PEAK)."""
    return int(saved_activation_bytes(recipe, facts) * BACKWARD_PEAK.get(device_kind, BACKWARD_PEAK["cpu"]))


def estimate_memory(recipe: Recipe, facts: ModelFacts, device: DeviceInfo, train_rows: int,
                    label_count: int = 2) -> MemoryEstimate:
    """Bytes to train `recipe` on `facts`' model against `device`; a batch never exceeds the data."""
    if 0 < train_rows < recipe.batch_size:
        recipe = recipe.model_copy(update={"batch_size": train_rows})
    base = facts.base_params(recipe, label_count)
    trainable = facts.trainable_params(recipe, label_count)
    weights = _weight_bytes(recipe, facts, base, trainable)
    gradients = trainable * 4
    optimizer = trainable * 8
    activations = activation_bytes(recipe, facts, device.kind)
    total = weights + gradients + optimizer + activations
    available = device.available_bytes
    fits = None if available is None else total <= FIT_MARGIN * available
    return MemoryEstimate(device=device.kind, weights=weights, gradients=gradients, optimizer=optimizer,
                          activations=activations, total=total, available=available, fits=fits,
                          total_params=base + trainable, trainable_params=trainable)


def _memory_check(recipe: Recipe, facts: ModelFacts, device: DeviceInfo, estimate: MemoryEstimate,
                  train_rows: int) -> PreflightCheck:
    parts = (f"weights {_fmt(estimate.weights)}, gradients+optimizer {_fmt(estimate.gradients + estimate.optimizer)}, "
             f"activations {_fmt(estimate.activations)} at batch_size {min(recipe.batch_size, max(1, train_rows))} "
             f"x max_length {recipe.max_length}")
    what = "RAM" if device.kind == "cpu" else "free VRAM"
    if estimate.available is None:
        return PreflightCheck(
            name="memory", status="warn", reason_code="preflight.memory_unknown",
            message=f"needs ~{_fmt(estimate.total)} ({parts}) but the {what} available on {device.name} "
                    f"could not be measured: the fit is unchecked")
    limit = FIT_MARGIN * estimate.available
    if estimate.fits:
        return PreflightCheck(
            name="memory", status="ok",
            message=f"needs ~{_fmt(estimate.total)} ({parts}); {_fmt(estimate.available)} {what} available on "
                    f"{device.name} (limit {FIT_MARGIN:.0%}: {_fmt(limit)})")
    fixed = estimate.weights + estimate.gradients + estimate.optimizer
    batch = min(recipe.batch_size, max(1, train_rows))
    per_row = estimate.activations / batch
    max_batch = int((limit - fixed) // per_row) if per_row and limit > fixed else 0
    if max_batch >= 1:
        advice = f"lower batch_size to {max_batch} or less, or max_length"
    else:
        advice = ("the weights and optimizer state alone exceed it: pick a smaller base model"
                  + ("" if recipe.method == "qlora" else " (or a QLoRA recipe on a GPU)")
                  + " or run the trainer on a machine with more memory")
    return PreflightCheck(
        name="memory", status="block", reason_code="preflight.memory_insufficient",
        message=f"needs ~{_fmt(estimate.total)} ({parts}) but {_fmt(estimate.available)} {what} is available on "
                f"{device.name} (limit {FIT_MARGIN:.0%}: {_fmt(limit)}): {advice}")


# --- capability --------------------------------------------------------------------------------


def _device_checks(recipe: Recipe, device: DeviceInfo) -> list[PreflightCheck]:
    if not (recipe.method == "qlora" or recipe.requires_cuda):
        return []
    if device.kind == "cuda" and device.cuda_available:
        return [PreflightCheck(name="device", status="ok", message=f"CUDA device {device.name} for {recipe.method}")]
    return [PreflightCheck(
        name="device", status="block", reason_code="preflight.cuda_unavailable",
        message=f"recipe {recipe.name!r} ({recipe.method}: 4-bit bitsandbytes kernels) needs a CUDA GPU but the "
                f"trainer runs on {device.name} (CUDA available: {device.cuda_available}): run it on a GPU host "
                f"or pick the LoRA recipe (chat-sft-lora)")]


def check_capability(recipe: Recipe, facts: ModelFacts, shape: str,
                     device: DeviceInfo | None = None) -> list[PreflightCheck]:
    """Does the task fit the model's architecture (and, for QLoRA, the device)?"""
    checks: list[PreflightCheck] = []
    model = f"{facts.source} ({facts.model_type}{', ' + '/'.join(facts.architectures) if facts.architectures else ''})"

    def block(message: str) -> None:
        checks.append(PreflightCheck(name="capability", status="block",
                                     reason_code="preflight.capability_mismatch", message=message))

    if recipe.task == "chat_sft":
        if not facts.is_causal_lm:
            block(f"chat_sft needs a causal (decoder) language model, but {model} is "
                  f"{'an encoder-decoder' if facts.is_encoder_decoder else 'an encoder'}: "
                  f"set base_model to a causal LM (e.g. Qwen/Qwen2.5-0.5B-Instruct) or use a classification recipe")
        elif facts.has_chat_template is False:
            # The engine renders every SFT shape (prompt/completion and JSON extraction as one user and
            # one assistant turn) with the model's template, to train on what the model will be served with.
            block(f"{model} has no chat template (no chat_template in tokenizer_config.json, no chat_template.jinja), "
                  f"so {shape} rows cannot be rendered as conversations: use an instruct/chat variant of the model "
                  f"or add a chat template to its tokenizer")
        elif facts.has_chat_template is None:
            checks.append(PreflightCheck(
                name="capability", status="warn", reason_code="preflight.capability_mismatch",
                message=f"could not tell whether {model} has a chat template (its tokenizer files are not local); "
                        f"chat SFT needs one"))
        else:
            template = "its chat template" if facts.has_chat_template else "no chat template (prompt + completion)"
            checks.append(PreflightCheck(name="capability", status="ok",
                                         message=f"chat_sft on causal LM {model} with {template} for {shape} rows"))
    else:
        if not facts.has_seqcls_head:
            block(f"{recipe.task} needs a model transformers can put a sequence-classification head on, but "
                  f"{model} has no *ForSequenceClassification class: pick an encoder such as all-MiniLM-L6-v2")
        else:
            checks.append(PreflightCheck(name="capability", status="ok",
                                         message=f"{recipe.task} head ({recipe.pooling} pooling) on {model}"))

    if facts.params_exact and facts.linear_layers and recipe.method != "full":  # full: no LoRA targets to match
        targets = facts.lora_targets(recipe.target_modules)
        if not targets:
            suffixes = sorted({layer.name.rsplit(".", 1)[-1] for layer in facts.linear_layers})
            block(f"LoRA target_modules {list(recipe.target_modules)} match no linear layer of {model}; its linear "
                  f"layers are named {suffixes[:12]}: override target_modules")
        else:
            checks.append(PreflightCheck(
                name="capability", status="ok",
                message=f"LoRA r={recipe.lora_r} on {len(targets)} linear layers ({', '.join(recipe.target_modules)})"))

    if facts.max_positions and recipe.max_length > facts.max_positions:
        if facts.learned_positions:
            block(f"max_length {recipe.max_length} exceeds {model}'s {facts.max_positions} learned position "
                  f"embeddings: set max_length to {facts.max_positions} or less")
        else:
            checks.append(PreflightCheck(
                name="capability", status="warn", reason_code="preflight.capability_mismatch",
                message=f"max_length {recipe.max_length} is beyond {model}'s max_position_embeddings "
                        f"{facts.max_positions}: quality may drop past the trained context"))

    checks.extend(_device_checks(recipe, device or probe_device()))
    return checks


# --- data --------------------------------------------------------------------------------------


def data_checks(train_rows: int, eval_rows: int, warnings: Sequence[Notice]) -> list[PreflightCheck]:
    """Prep's sufficiency notices as warnings (same codes), no train rows as a blocker, no eval rows as a warning."""
    checks = [PreflightCheck(name="data", status="warn", reason_code=n.reason_code, message=n.message)
              for n in warnings]
    if train_rows <= 0:
        checks.append(PreflightCheck(name="data", status="block", reason_code="prep.insufficient_data",
                                     message="the train split has 0 rows: nothing to train on"))
    if eval_rows <= 0:
        checks.append(PreflightCheck(
            name="data", status="warn", reason_code="preflight.no_eval_split",
            message=f"the validation split has 0 rows ({train_rows} train rows): no mid-training evaluation, so no "
                    f"best-checkpoint selection or early stopping; the last step's adapter is kept. Add rows or "
                    f"raise --validation-fraction to get them"))
    if not checks:
        checks.append(PreflightCheck(name="data", status="ok",
                                     message=f"{train_rows} train rows, {eval_rows} eval rows"))
    return checks


# --- hosted ------------------------------------------------------------------------------------


ANTHROPIC_REFUSAL = ("Anthropic has no public fine-tuning API: Claude fine-tuning exists only through Amazon Bedrock. "
                     "Use backend 'openai' (or an OpenAI-compatible host via hosted.base_url) or 'local'")


def hosted_checks(hosted: HostedSettings, env: Mapping[str, str], backend: str = "openai") -> list[PreflightCheck]:
    """The API-key variable is set (its value is never looked at beyond that); Anthropic is refused; an announced
    cutoff of the host or base model (services/trainer/hosted/cutoffs.py) is a warning naming its date."""
    from services.trainer.hosted.cutoffs import ALTERNATIVES, cutoffs_for, describe

    if backend == "anthropic":
        return [PreflightCheck(name="backend", status="block", reason_code="training.capability_unsupported",
                               message=ANTHROPIC_REFUSAL)]
    host = "api.openai.com"
    if hosted.base_url:
        host = urlparse(hosted.base_url).hostname or "the configured base_url"  # no userinfo, no path
    checks = []
    if env.get(hosted.api_key_env, "").strip():
        checks.append(PreflightCheck(name="credentials", status="ok",
                                     message=f"{hosted.api_key_env} is set for {host}"))
    else:
        checks.append(PreflightCheck(
            name="credentials", status="block", reason_code="preflight.credentials_missing",
            message=f"environment variable {hosted.api_key_env} is not set (or empty): export the {host} API key "
                    f"in the trainer's environment; keys are never put in a plan"))
    checks.append(PreflightCheck(name="backend", status="ok",
                                 message=f"hosted fine-tuning of {hosted.model} on {host}"))
    for cutoff in cutoffs_for(hosted.base_url, hosted.model):
        checks.append(PreflightCheck(
            name="cutoff", status="warn", reason_code="preflight.hosted_cutoff",
            message=f"{host} / {hosted.model}: {describe(cutoff)}. Keep the record: `tuneline import openai-jobs`; "
                    f"to keep training, {ALTERNATIVES}"))
    return checks


# --- the report --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreflightReport:
    mode: str                                 # "strict" | "fail_open"
    checks: list[PreflightCheck]
    memory: MemoryEstimate | None
    train_plan: TrainPlan | None
    facts: ModelFacts | None = field(default=None, compare=False)

    @property
    def blockers(self) -> list[Notice]:
        return [Notice(reason_code=c.reason_code, message=c.message) for c in self.checks
                if c.status == "block" and c.reason_code]

    @property
    def warnings(self) -> list[Notice]:
        statuses = ("warn", "block") if self.mode == "fail_open" else ("warn",)
        return [Notice(reason_code=c.reason_code, message=c.message) for c in self.checks
                if c.status in statuses and c.reason_code]

    @property
    def passed(self) -> bool:
        return self.mode == "fail_open" or not any(c.status == "block" for c in self.checks)


def _train_plan(recipe: Recipe, *, backend: str, device: str, train_rows: int, eval_rows: int,
                hosted: HostedSettings | None, cost_estimate: CostEstimate | None) -> TrainPlan:
    method, base_model, plan_recipe = recipe.method, recipe.base_model, recipe
    if backend != "local":
        hosted = hosted or HostedSettings()
        method, base_model = "hosted", hosted.model
        update = {k: v for k, v in (("epochs", hosted.n_epochs), ("batch_size", hosted.batch_size)) if v}
        plan_recipe = recipe.model_copy(update=update) if update else recipe
    return TrainPlan(
        recipe=recipe.name, task=recipe.task, backend=backend, method=method, base_model=base_model,
        device=device, train_rows=max(0, train_rows), eval_rows=max(0, eval_rows),
        steps=plan_recipe.steps_for(max(0, train_rows)), epochs=plan_recipe.epochs,
        eval_every_steps=plan_recipe.eval_interval(max(0, train_rows)),
        checkpoint_every_steps=plan_recipe.checkpoint_interval(max(0, train_rows)), patience=recipe.patience,
        settings=recipe.model_dump(mode="json"), cost_estimate=cost_estimate if backend != "local" else None)


def run_preflight(recipe: Recipe, *, backend: str, shape: str, train_rows: int, eval_rows: int, label_count: int,
                  data_warnings: Sequence[Notice], mode: str = "strict", hosted: HostedSettings | None = None,
                  cost_estimate: CostEstimate | None = None, env: Mapping[str, str] | None = None,
                  device: DeviceInfo | None = None) -> PreflightReport:
    """Every check for `backend`, the memory estimate (local) and the generated train plan."""
    if mode not in MODES:
        raise ValueError(f"preflight mode {mode!r} is not one of {MODES}")
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    checks: list[PreflightCheck] = []
    memory: MemoryEstimate | None = None
    facts: ModelFacts | None = None

    if backend == "local":
        device = device or probe_device()
        deps = check_dependencies(recipe)
        checks.extend(deps)
        core_missing = not all(_installed(p) for p in ("torch", "transformers"))
        if core_missing:
            checks.extend(_device_checks(recipe, device))
        else:
            try:
                facts = inspect_base_model(recipe.base_model, recipe.task)
            except BaseModelUnavailable as exc:
                source = resolve_base_model(recipe.base_model)
                checks.append(PreflightCheck(
                    name="base_model", status="block", reason_code="preflight.base_model_unavailable",
                    message=f"cannot read the config of base model {source!r}: {exc}. Give a directory holding "
                            f"config.json, or a hub id already in the local cache (the trainer runs offline)"))
                checks.extend(_device_checks(recipe, device))
            else:
                exact = "" if facts.params_exact else " (estimated by formula: the class could not be built)"
                checks.append(PreflightCheck(
                    name="base_model", status="ok",
                    message=f"{facts.source}: {facts.model_type}, {facts.num_layers} layers x {facts.hidden_size} "
                            f"hidden, {_count(facts.base_params(recipe, label_count))} parameters{exact}, "
                            f"{_count(facts.trainable_params(recipe, label_count))} trainable"))
                checks.extend(check_capability(recipe, facts, shape, device))
                memory = estimate_memory(recipe, facts, device, train_rows, label_count)
                checks.append(_memory_check(recipe, facts, device, memory, train_rows))
        plan_device = device.kind
    else:
        checks.extend(hosted_checks(hosted or HostedSettings(), os.environ if env is None else env, backend))
        plan_device = f"hosted:{backend}"
        if backend == "openai" and cost_estimate is not None:
            checks.append(PreflightCheck(
                name="cost", status="ok",
                message=f"estimated ${cost_estimate.usd:.2f} for {cost_estimate.training_tokens} tokens x "
                        f"{cost_estimate.epochs} epochs on {cost_estimate.model} (prices as of "
                        f"{cost_estimate.prices_as_of}, +{cost_estimate.buffer:.0%} buffer)"))

    if backend != "anthropic":
        checks.extend(data_checks(train_rows, eval_rows, data_warnings))

    plan = _train_plan(recipe, backend=backend, device=plan_device, train_rows=train_rows, eval_rows=eval_rows,
                       hosted=hosted, cost_estimate=cost_estimate)
    return PreflightReport(mode=mode, checks=checks, memory=memory, train_plan=plan, facts=facts)

