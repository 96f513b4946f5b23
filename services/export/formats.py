"""Export formats beyond the PEFT adapter, each written to a temporary folder, smoke-checked with parity in
its own runtime (a fresh load, the test rows, compared with the trained model's in-memory PyTorch outputs)
and only then renamed to its final name inside the export folder.

Formats per model shape (labels.json `task`):

- classifier (single/multi-label) and triage (MultiHeadClassifier): `merged` (the LoRA merged into the
  encoder, loadable with transformers alone), `onnx` (the merged model and its head(s), fp32, run with
  onnxruntime) and `onnx-int8` (onnxruntime dynamic quantisation of the fp32 graph).
- chat (a causal LM): `merged` (AutoModelForCausalLM) and `gguf` (F32), `gguf-q8_0`, `gguf-q4_k_m`, written
  with the `gguf` package's GGUFWriter for the architectures in GGUF_ARCHITECTURES (llama.cpp's converter
  is not in the pip package; this is the conversion for the llama layout, including its q/k permutation).

Parity: fp32 formats must give the same predicted labels and max |logit diff| <= FP32_ATOL; quantised
formats are measured (accuracy on the test rows against the fp32 reference, label agreement, max |logit
diff|) and fail only when the accuracy drops by more than the allowed amount. No GGUF runtime is
installable here (llama-cpp-python ships no binary wheel on the package index: `pip download
llama-cpp-python --only-binary :all:` finds none), so a GGUF file is checked by reading it back with
gguf.GGUFReader, dequantising every tensor into a fresh transformers model built from the GGUF's own
metadata, and running that: the record says so (`runtime`).

Torch 2.13's default ONNX exporter (dynamo) needs onnxscript, which is not installed; the TorchScript
exporter (`dynamo=False`) handles these encoders and is the one used.
"""

from __future__ import annotations

import errno
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contracts.errors import ReasonCodedError

ADAPTER = "peft-adapter"
MERGED = "merged"
ONNX = "onnx"
ONNX_INT8 = "onnx-int8"
GGUF = "gguf"
GGUF_Q8_0 = "gguf-q8_0"
GGUF_Q4_K_M = "gguf-q4_k_m"
ALL_FORMATS = (ADAPTER, MERGED, ONNX, ONNX_INT8, GGUF, GGUF_Q8_0, GGUF_Q4_K_M)
SHAPE_FORMATS = {
    "classifier": (ADAPTER, MERGED, ONNX, ONNX_INT8),
    "triage": (ADAPTER, MERGED, ONNX, ONNX_INT8),
    "chat": (ADAPTER, MERGED, GGUF, GGUF_Q8_0, GGUF_Q4_K_M),
}
QUANTISED = {ONNX_INT8: ONNX, GGUF_Q8_0: GGUF, GGUF_Q4_K_M: GGUF}  # -> the fp32 format it is measured with
FP32_ATOL = 1e-4
TRIAGE_TASK = "multi_field_triage"
HEADS_FILE = "heads.safetensors"
ONNX_FILE = "model.onnx"
ONNX_CONFIG = "onnx_config.json"
GGUF_FILE = "model.gguf"
# HF architectures whose tensors this converter maps onto llama.cpp's "llama" layout
GGUF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
GGUF_RUNTIME = ("gguf.GGUFReader + transformers (dequantised into a fresh LlamaForCausalLM built from the "
                "GGUF metadata; no llama.cpp runtime is installable here)")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "merges.txt", "vocab.json", "tokenizer.model", "added_tokens.json", "chat_template.jinja")

# Kept in step with the merged triage folder's README (formats.triage_card) and run by the parity check.
TRIAGE_SNIPPET = '''\
import json, torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

tok, encoder = AutoTokenizer.from_pretrained(d), AutoModel.from_pretrained(d).eval()
heads, spec = load_file(f"{d}/heads.safetensors"), encoder.config.tuneline_heads
batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
with torch.no_grad():
    hidden, mask = encoder(**batch).last_hidden_state, batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    logits = torch.cat([pooled @ heads[f"{i}.weight"].T + heads[f"{i}.bias"] for i in range(len(spec))], -1)
'''


class FormatError(ReasonCodedError):
    """One format could not be produced or failed its check; `reason_code` is registered."""


def shape_of(meta: dict) -> str:
    task = meta.get("task")
    if task == TRIAGE_TASK:
        return "triage"
    if task == "chat_sft":
        return "chat"
    return "classifier"


def check_formats(shape: str, formats: Sequence[str]) -> list[str]:
    """The formats that `shape` does not know, as messages (empty: all known)."""
    known = SHAPE_FORMATS[shape]
    return [f"format {f!r} is not one of the {shape} model's formats {list(known)}" for f in formats if f not in known]


def storage_error(exc: OSError, where: str) -> FormatError:
    """An OS error writing an export as its reason code (full / read-only), or None for others."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return FormatError("export.directory_full", f"{where}: no space left ({exc.strerror or exc})")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return FormatError("export.directory_read_only", f"{where}: not writable ({exc.strerror or exc})")
    return FormatError("export.directory_unwritable", f"{where}: {exc.strerror or exc}")


def file_sha256(path: Path) -> str:
    from services.export.domain import sha256_of

    return sha256_of(path)


def base_model_pin(base_model: str, base_path: str) -> dict:
    """What the manifest pins of the base model: its id, the sha256 of its weights (the registry's
    algorithm, services/common/model_pins.py) and of each tokenizer file."""
    from services.common.model_pins import weights_sha256

    root = Path(base_path)
    tokenizer = {n: file_sha256(root / n) for n in TOKENIZER_FILES if (root / n).is_file()}
    return {"model": base_model, "path": str(base_path), "weights_sha256": weights_sha256(root),
            "tokenizer_sha256": tokenizer}


def base_model_changed(pin: dict, base_path: str) -> str | None:
    """Why `base_path` is not the pinned base (weights or tokenizer files differ), None when it is."""
    current = base_model_pin(pin.get("model") or "", base_path)
    if pin.get("weights_sha256") and current["weights_sha256"] != pin["weights_sha256"]:
        return (f"base model {pin.get('model')}: weights sha256 {current['weights_sha256']} differ from "
                f"{pin['weights_sha256']} pinned when the run was exported")
    for name, sha in (pin.get("tokenizer_sha256") or {}).items():
        if current["tokenizer_sha256"].get(name) != sha:
            return f"base model {pin.get('model')}: tokenizer file {name} changed since the run was exported"
    return None


# --- the trained model in memory: the reference every format is compared with ----------------------


@dataclass
class Reference:
    """The adapter on its base in PyTorch (as the evaluator loads it), its logits on the smoke rows, and
    the merged model that the formats are written from."""

    shape: str
    meta: dict
    base_path: str
    texts: list[str]
    gold: list | None           # classifier/triage: the rows' labels (lead label for triage)
    logits: list[np.ndarray]    # per batch (encoders) or per conversation (chat)
    tokenizer: object
    merged: object
    max_length: int
    targets: list[np.ndarray] = field(default_factory=list)  # chat: the next token at each position

    def label_space(self) -> list[str]:
        return list(self.meta.get("label_space") or [])

    def truncation(self) -> str:
        return self.meta.get("truncation") or "head"

    def head_json(self) -> dict:
        keys = ("task", "label_space", "heads", "pooling", "threshold", "max_length", "truncation", "head_weights")
        return {k: self.meta[k] for k in keys if k in self.meta}


def smoke_texts(shape: str, rows: Sequence[dict], task: str | None = None) -> tuple[list[str], list | None]:
    """(what each row is fed as, its gold answer): the text and its label (a multi-label model: its sorted
    tags; triage: the lead label), or a chat row's conversation as JSON."""
    if shape == "chat":
        return [json.dumps(chat_messages(r)) for r in rows], None
    texts = [str(r.get("text") or "") for r in rows]
    if task == "multi_label_classification":
        return texts, [sorted(r.get("tags") or []) for r in rows]
    return texts, [r.get("label") for r in rows]


def chat_messages(row: dict) -> list[dict]:
    from services.trainer.local.tasks import ChatSFT

    return ChatSFT.conversation(row)


ENCODER_BATCH = 32


def load_reference(adapter_dir: Path, base_path: str, rows: Sequence[dict]) -> Reference:
    """Load the adapter onto its base, record its logits on `rows` and merge it (the formats' source)."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from services.common.classifier_inference import trained_metadata

    meta = trained_metadata(Path(adapter_dir))
    shape = shape_of(meta)
    max_length = int(meta.get("max_length") or 128)
    texts, gold = smoke_texts(shape, rows, meta.get("task"))
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # initial head values are overwritten by the adapter's
        if shape == "chat":
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(base_path)
        elif shape == "triage":
            from services.common.encoder_classifier import HeadSpec, MultiHeadClassifier

            base = MultiHeadClassifier(base_path, [HeadSpec.from_json(h) for h in meta["heads"]])
        else:
            from services.common.encoder_classifier import build_encoder_classifier

            base = build_encoder_classifier(base_path, list(meta.get("label_space") or []),
                                            pooling=meta.get("pooling") or "cls",
                                            multi_label=meta.get("task") == "multi_label_classification")
    full = meta.get("method") == "full"  # a fully fine-tuned classifier ships its own weights, no adapter
    model = base.load_full(str(adapter_dir)).eval() if full else PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    ref = Reference(shape, meta, base_path, texts, gold, [], tokenizer, None, max_length)
    with torch.no_grad():
        if shape == "chat":
            for ids in chat_ids(tokenizer, texts, max_length):
                out = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
                ref.logits.append(out)
                ref.targets.append(np.asarray(ids[1:]))
        else:
            for batch in encode_batches(tokenizer, texts, max_length, "pt", ref.truncation()):
                ref.logits.append(model(input_ids=batch["input_ids"],
                                        attention_mask=batch["attention_mask"]).logits.float().numpy())
    ref.merged = model if full else model.merge_and_unload().eval()
    return ref


def encode_batches(tokenizer, texts: Sequence[str], max_length: int, kind: str, truncation: str = "head"):
    """Padded batches of ENCODER_BATCH texts ("pt" or "np" arrays), cut as the model was trained: the head
    (the tokenizer's own truncation) or head and tail (labels.json `truncation`, services/common/truncation.py)."""
    for start in range(0, len(texts), ENCODER_BATCH):
        chunk = list(texts[start:start + ENCODER_BATCH])
        if truncation == "head":
            yield tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors=kind)
            continue
        from services.common.truncation import encode_ids, pad_batch

        ids, mask = pad_batch(encode_ids(tokenizer, chunk, max_length, truncation), tokenizer.pad_token_id or 0)
        yield ({"input_ids": ids, "attention_mask": mask} if kind == "pt"
               else {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})


def chat_ids(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Each conversation rendered with the model's chat template and tokenised as the trainer does."""
    out = []
    for text in texts:
        rendered = tokenizer.apply_chat_template(json.loads(text), tokenize=False)
        ids = tokenizer(rendered, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
        out.append(list(ids) or [tokenizer.eos_token_id or 0])
    return out


# --- comparing a format's outputs with the reference ---------------------------------------------------


def predictions(ref: Reference, logits: list[np.ndarray]) -> list:
    """Decisions from logits: labels (classifier), each head's decision (triage), next tokens (chat)."""
    if ref.shape == "chat":
        return [lg.argmax(-1).tolist() for lg in logits]
    flat = np.concatenate(logits) if logits else np.zeros((0, 0))
    threshold = float(ref.meta.get("threshold") or 0.5)
    if ref.shape == "triage":
        import torch

        from services.common.encoder_classifier import HeadSpec, decode_heads

        heads = [HeadSpec.from_json(h) for h in ref.meta["heads"]]
        return decode_heads(heads, torch.from_numpy(flat), threshold)
    labels = ref.label_space()
    if ref.meta.get("task") == "multi_label_classification":
        on = 1.0 / (1.0 + np.exp(-flat)) >= threshold
        return [sorted(labels[j] for j in np.flatnonzero(row)) for row in on]
    return [labels[i] for i in flat.argmax(-1).tolist()]


def accuracy(ref: Reference, preds: list) -> float | None:
    """Accuracy on the smoke rows: the label (triage: the lead label; multi-label: the exact tag set);
    chat: next-token accuracy over every position."""
    if ref.shape == "chat":
        hits = total = 0
        for p, t in zip(preds, ref.targets):
            hits += int(np.sum(np.asarray(p[:-1]) == t))
            total += len(t)
        return hits / total if total else None
    if not ref.gold:
        return None
    got = [p.get("label") for p in preds] if ref.shape == "triage" else preds
    pairs = [(g, q) for g, q in zip(ref.gold, got) if g is not None]
    return sum(g == q for g, q in pairs) / len(pairs) if pairs else None


def compare(ref: Reference, logits: list[np.ndarray]) -> dict:
    """Parity of `logits` (same batching as the reference) with the reference."""
    if not ref.texts:
        raise FormatError("export.smoke_failed", "no test rows to check the format on")
    diff = max((float(np.abs(a - b).max()) for a, b in zip(logits, ref.logits) if a.size), default=0.0)
    mine, theirs = predictions(ref, logits), predictions(ref, ref.logits)
    agree = sum(a == b for a, b in zip(mine, theirs))
    acc, ref_acc = accuracy(ref, mine), accuracy(ref, theirs)
    return {"rows": len(ref.texts), "labels_identical": agree == len(theirs), "label_agreement":
            agree / len(theirs) if theirs else 1.0, "max_abs_logit_diff": diff, "accuracy": acc,
            "reference_accuracy": ref_acc,
            "accuracy_drop": None if acc is None or ref_acc is None else ref_acc - acc}


def judge(fmt: str, parity: dict, max_accuracy_drop: float) -> None:
    """Raise export.smoke_failed when `fmt`'s parity is not good enough."""
    if fmt in QUANTISED:
        drop = parity.get("accuracy_drop")
        if drop is not None and drop > max_accuracy_drop:
            raise FormatError("export.smoke_failed", f"{fmt}: accuracy on the {parity['rows']} test rows dropped by "
                                                     f"{drop:.3f} (> {max_accuracy_drop:.3f} allowed)")
        return
    if not parity["labels_identical"] or parity["max_abs_logit_diff"] > FP32_ATOL:
        what = "predicted labels differ from the trained model's" if not parity["labels_identical"] else "logits differ"
        raise FormatError("export.smoke_failed",
                          f"{fmt}: {what} on {parity['rows']} test rows (max |logit diff| "
                          f"{parity['max_abs_logit_diff']:.2e}, {FP32_ATOL:g} allowed)")


# --- merged Hugging Face model -------------------------------------------------------------------------


def save_tokenizer(ref: Reference, out: Path) -> None:
    ref.tokenizer.model_max_length = ref.max_length
    ref.tokenizer.save_pretrained(str(out))


def write_merged(ref: Reference, out: Path) -> dict:
    from safetensors.torch import save_file
    from transformers import AutoModel

    m = ref.merged
    if ref.shape == "chat":
        m.save_pretrained(str(out), safe_serialization=True)
    elif ref.shape == "triage":
        encoder = m.encoder
        encoder.pooler = getattr(AutoModel.from_pretrained(ref.base_path), "pooler", None)
        encoder.config.tuneline_heads = ref.meta["heads"]
        encoder.config.classifier_pooling = "mean"
        encoder.config.multi_label_threshold = float(ref.meta.get("threshold") or 0.5)
        encoder.save_pretrained(str(out), safe_serialization=True)
        save_file({f"{i}.{k}": v.detach().contiguous() for i, head in enumerate(m.heads)
                   for k, v in head.state_dict().items()}, str(out / HEADS_FILE))
        (out / "README.md").write_text(triage_card(ref))
    else:
        # the classifier's layout, card and parity are services/export/adapters/merged.py's
        raise AssertionError("classifiers are merged by adapters.merged.write_merged_model")
    save_tokenizer(ref, out)
    return {"loads_with": "AutoModelForCausalLM" if ref.shape == "chat" else f"AutoModel + {HEADS_FILE}"}


def triage_card(ref: Reference) -> str:
    heads = ", ".join(f"{h['name']} ({'sigmoid' if h.get('multi_label') else 'softmax'}, {len(h['labels'])})"
                      for h in ref.meta["heads"])
    return ("# Merged multi-field triage model (Tuneline export)\n\n"
            f"The LoRA adapter merged into its base encoder, mean-pooled, one linear head per field: {heads}; "
            f"the heads' weights are in `{HEADS_FILE}`, their names and labels in config.json `tuneline_heads`. "
            f"Inputs are truncated at {ref.max_length} tokens.\n\n"
            f"Load it with transformers alone (`d` is this folder, `texts` a list of strings):\n\n"
            f"```python\n{TRIAGE_SNIPPET}```\n")


def merged_logits(ref: Reference, out: Path) -> list[np.ndarray]:
    """The merged folder loaded fresh with stock transformers classes, on the smoke rows."""
    import torch

    if ref.shape == "chat":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
        tok = AutoTokenizer.from_pretrained(str(out))
        with torch.no_grad():
            return [model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
                    for ids in chat_ids(tok, ref.texts, ref.max_length)]
    if ref.shape == "triage" and ref.truncation() != "head":
        return stock_logits(ref, out)  # the triage card's lines cut the head only
    logits = []
    for start in range(0, len(ref.texts), ENCODER_BATCH):
        texts = ref.texts[start:start + ENCODER_BATCH]
        if ref.shape == "triage":
            scope = {"d": str(out), "texts": list(texts)}
            exec(TRIAGE_SNIPPET, scope)  # the lines the card documents are the lines checked
            logits.append(scope["logits"].float().numpy())
        else:
            from services.export.adapters.merged import standard_logits

            logits.append(standard_logits(out, list(texts)).float().numpy())
    return logits


def stock_logits(ref: Reference, out: Path) -> list[np.ndarray]:
    """The merged folder loaded fresh with stock transformers classes, fed the trained model's own cut of
    each text (a head + tail truncation is not something a tokenizer's settings can say)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    pooling = json.loads((out / "config.json").read_text()).get("classifier_pooling", "cls")
    tok = AutoTokenizer.from_pretrained(str(out))
    if ref.shape == "classifier" and pooling == "cls":
        model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()

        def run(b):
            return model(**b).logits
    else:
        encoder = AutoModel.from_pretrained(str(out)).eval()
        if ref.shape == "triage":
            hs = load_file(str(out / HEADS_FILE))
            heads = [(hs[f"{i}.weight"], hs[f"{i}.bias"]) for i in range(len(ref.meta["heads"]))]
        else:
            from services.export.adapters.merged import HEAD_FILE

            h = load_file(str(out / HEAD_FILE))
            heads = [(h["weight"], h["bias"])]

        def run(b):
            hidden, mask = encoder(**b).last_hidden_state, b["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            return torch.cat([pooled @ w.T + bias for w, bias in heads], -1)
    with torch.no_grad():
        return [run(b).float().numpy() for b in encode_batches(tok, ref.texts, ref.max_length, "pt", ref.truncation())]


# --- ONNX ----------------------------------------------------------------------------------------------


def write_onnx(ref: Reference, out: Path) -> dict:
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    sample = ref.tokenizer(["a sample", "a longer sample text"], padding=True, return_tensors="pt")
    wrapper = Logits(ref.merged).eval()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's tracer warnings
        torch.onnx.export(wrapper, (sample["input_ids"], sample["attention_mask"]), str(out / ONNX_FILE),
                          dynamo=False, input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                        "attention_mask": {0: "batch", 1: "sequence"}, "logits": {0: "batch"}},
                          opset_version=17)
    save_tokenizer(ref, out)
    (out / ONNX_CONFIG).write_text(json.dumps({"inputs": ["input_ids", "attention_mask"], "output": "logits",
                                               **ref.head_json()}, indent=2, sort_keys=True))
    return {"exporter": f"torch.onnx.export (TorchScript, dynamo=False) torch {torch.__version__}", "opset": 17}


def write_onnx_int8(ref: Reference, out: Path, fp32_dir: Path | None) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="onnx-fp32-") as tmp:
        if fp32_dir is None or not (fp32_dir / ONNX_FILE).is_file():
            fp32_dir = Path(tmp)
            write_onnx(ref, fp32_dir)
        try:
            quantize_dynamic(str(fp32_dir / ONNX_FILE), str(out / ONNX_FILE), weight_type=QuantType.QInt8)
        except OSError:
            raise  # a full or read-only folder: storage_error names it
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            raise FormatError("export.quantization_failed", f"onnxruntime dynamic quantisation: {exc}") from exc
    save_tokenizer(ref, out)
    (out / ONNX_CONFIG).write_text(json.dumps({"inputs": ["input_ids", "attention_mask"], "output": "logits",
                                                   **ref.head_json()}, indent=2, sort_keys=True))
    return {"quantiser": "onnxruntime.quantization.quantize_dynamic (QInt8 weights)"}


def onnx_logits(ref: Reference, out: Path) -> list[np.ndarray]:
    """The ONNX folder loaded fresh: onnxruntime and the folder's own tokenizer."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    session = ort.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
    tok = AutoTokenizer.from_pretrained(str(out))
    return [session.run(["logits"], {"input_ids": b["input_ids"].astype(np.int64),
                                     "attention_mask": b["attention_mask"].astype(np.int64)})[0]
            for b in encode_batches(tok, ref.texts, ref.max_length, "np", ref.truncation())]


# --- GGUF (llama layout) -------------------------------------------------------------------------------


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (its convert_hf_to_gguf.py LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_qtype(fmt: str):
    import gguf

    return {GGUF: gguf.GGMLQuantizationType.F32, GGUF_Q8_0: gguf.GGMLQuantizationType.Q8_0,
            GGUF_Q4_K_M: gguf.GGMLQuantizationType.Q4_K}[fmt]


def gguf_convertible(config) -> str | None:
    """Why the model's architecture has no GGUF conversion here, None when it has one."""
    archs = list(getattr(config, "architectures", None) or [type(config).__name__])
    if not any(a in GGUF_ARCHITECTURES for a in archs):
        return (f"no GGUF converter for architecture {', '.join(archs)} (model_type "
                f"{getattr(config, 'model_type', '?')}); this converter supports {', '.join(GGUF_ARCHITECTURES)}")
    return None


def write_gguf(ref: Reference, out: Path, fmt: str) -> dict:
    import gguf
    from gguf.quants import QuantError, quantize

    config = ref.merged.config
    why = gguf_convertible(config)
    if why is not None:
        raise FormatError("export.format_unsupported", why)
    qtype = gguf_qtype(fmt)
    n_head, n_kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    n_blocks = config.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    tensors: list[tuple[str, np.ndarray]] = []
    for hf_name, t in ref.merged.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise FormatError("export.format_unsupported", f"no GGUF tensor name for {hf_name}")
        data = t.detach().float().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = llama_permute(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = llama_permute(data, n_kv)
        tensors.append((name, data))
    if getattr(config, "tie_word_embeddings", False):
        tensors = [(n, d) for n, d in tensors if n != "output.weight"]

    path = out / GGUF_FILE
    writer = gguf.GGUFWriter(str(path), "llama")
    try:
        writer.add_name("tuneline-export")
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(n_blocks)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_rope_dimension_count(config.hidden_size // n_head)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_rope_freq_base(float(rope_theta(config)))
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type({GGUF: gguf.LlamaFileType.ALL_F32, GGUF_Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
                              GGUF_Q4_K_M: gguf.LlamaFileType.MOSTLY_Q4_K_M}[fmt])
        vocab = [None] * config.vocab_size
        for token, i in ref.tokenizer.get_vocab().items():
            if i < len(vocab):
                vocab[i] = token
        writer.add_tokenizer_model("none")  # a word-level vocabulary is not one of llama.cpp's tokenizers
        writer.add_token_list([t if t is not None else f"[unused{i}]" for i, t in enumerate(vocab)])
        for key, tid in (("bos", ref.tokenizer.bos_token_id), ("eos", ref.tokenizer.eos_token_id),
                         ("pad", ref.tokenizer.pad_token_id)):
            if tid is not None:
                getattr(writer, f"add_{key}_token_id")(int(tid))
        if getattr(ref.tokenizer, "chat_template", None):
            writer.add_chat_template(ref.tokenizer.chat_template)
        for name, data in tensors:
            if qtype != gguf.GGMLQuantizationType.F32 and data.ndim == 2:
                try:
                    q = quantize(data.astype(np.float32), qtype)
                except (NotImplementedError, QuantError, ValueError) as exc:
                    raise FormatError("export.quantization_failed",
                                      f"gguf {gguf_version()} quantiser, tensor {name}: {exc}") from exc
                writer.add_tensor(name, q, raw_dtype=qtype)
            else:
                writer.add_tensor(name, data.astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    save_tokenizer(ref, out)
    return {"converter": f"services.export.formats (gguf {gguf_version()} GGUFWriter, llama layout)",
            "tensor_type": qtype.name}


def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and params.get("rope_theta"):
        return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", None) or 10000.0)


def gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")


def gguf_logits(ref: Reference, out: Path) -> list[np.ndarray]:
    """The GGUF file read back with GGUFReader and dequantised into a fresh LlamaForCausalLM configured from
    the file's own metadata; the folder's tokenizer renders the conversations."""
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    reader = GGUFReader(str(out / GGUF_FILE))

    def kv(key):
        return reader.fields[f"llama.{key}"].contents()

    n_head, n_kv = int(kv("attention.head_count")), int(kv("attention.head_count_kv"))
    tensors = {t.name: t for t in reader.tensors}
    vocab = int(reader.fields["llama.vocab_size"].contents())
    tied = "output.weight" not in tensors
    config = LlamaConfig(vocab_size=vocab, hidden_size=int(kv("embedding_length")),
                         intermediate_size=int(kv("feed_forward_length")), num_hidden_layers=int(kv("block_count")),
                         num_attention_heads=n_head, num_key_value_heads=n_kv,
                         max_position_embeddings=int(kv("context_length")),
                         rms_norm_eps=float(kv("attention.layer_norm_rms_epsilon")),
                         rope_theta=float(kv("rope.freq_base")), tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).eval()
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    state = {}
    for hf_name, param in model.state_dict().items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None or name not in tensors:
            if tied and hf_name == "lm_head.weight":
                continue
            raise FormatError("export.smoke_failed", f"the GGUF file has no tensor for {hf_name}")
        t = tensors[name]
        data = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(param.shape)
        if hf_name.endswith("q_proj.weight"):
            data = llama_unpermute(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = llama_unpermute(data, n_kv)
        state[hf_name] = torch.from_numpy(data.copy())
    model.load_state_dict(state, strict=not tied)
    if tied:
        model.tie_weights()
    tok = AutoTokenizer.from_pretrained(str(out))
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
                for ids in chat_ids(tok, ref.texts, ref.max_length)]


# --- writing one format: temp folder, parity, rename -----------------------------------------------------


@dataclass
class Outcome:
    format: str
    shipped: bool
    path: str | None = None
    reason_code: str | None = None
    message: str | None = None
    parity: dict | None = None
    runtime: str | None = None
    info: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        return {"format": self.format, "status": "shipped" if self.shipped else "failed", "path": self.path,
                "reason_code": self.reason_code, "message": self.message, "parity": self.parity,
                "runtime": self.runtime, **({"info": self.info} if self.info else {})}


RUNTIMES = {MERGED: "transformers (fresh from_pretrained, no peft)", ONNX: "onnxruntime CPUExecutionProvider",
            ONNX_INT8: "onnxruntime CPUExecutionProvider", GGUF: GGUF_RUNTIME, GGUF_Q8_0: GGUF_RUNTIME,
            GGUF_Q4_K_M: GGUF_RUNTIME}


def write_format(ref: Reference, fmt: str, out_dir: Path, *, adapter_dir: Path, max_accuracy_drop: float) -> Outcome:
    """Write `fmt` under out_dir/<fmt> through a temporary folder beside it, renamed (one filesystem: atomic)
    once its check passed; the outcome names the reason when it did not ship. Never leaves a partial
    out_dir/<fmt> nor the temporary folder."""
    final = out_dir / fmt
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{fmt}-", dir=out_dir))
    except OSError as exc:
        err = storage_error(exc, f"export folder {out_dir}")
        return Outcome(fmt, False, reason_code=err.reason_code, message=str(err))
    try:
        info, logits = produce(ref, fmt, tmp, adapter_dir, out_dir)
        parity = compare(ref, logits)
        judge(fmt, parity, max_accuracy_drop)
        tmp.rename(final)
        return Outcome(fmt, True, path=fmt, parity=parity, runtime=RUNTIMES.get(fmt), info=info)
    except FormatError as exc:
        return Outcome(fmt, False, reason_code=exc.reason_code, message=str(exc), runtime=RUNTIMES.get(fmt))
    except OSError as exc:
        err = storage_error(exc, f"writing {fmt}")
        return Outcome(fmt, False, reason_code=err.reason_code, message=str(err))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def produce(ref: Reference, fmt: str, tmp: Path, adapter_dir: Path, out_dir: Path) -> tuple[dict, list]:
    """(what the manifest records of the writer, the format's logits on the smoke rows)."""
    if fmt == MERGED:
        if ref.shape == "classifier":
            from services.export.adapters.merged import MergeError, write_merged_model

            try:
                info = write_merged_model(adapter_dir, ref.base_path, tmp)
            except MergeError as exc:
                raise FormatError("export.smoke_failed", str(exc)) from exc
        else:
            info = write_merged(ref, tmp)
        return info, merged_logits(ref, tmp)
    if fmt == ONNX:
        return write_onnx(ref, tmp), onnx_logits(ref, tmp)
    if fmt == ONNX_INT8:
        fp32 = out_dir / ONNX
        return write_onnx_int8(ref, tmp, fp32 if fp32.is_dir() else None), onnx_logits(ref, tmp)
    if fmt in (GGUF, GGUF_Q8_0, GGUF_Q4_K_M):
        return write_gguf(ref, tmp, fmt), gguf_logits(ref, tmp)
    raise FormatError("export.format_unknown", f"no writer for format {fmt!r}")


def write_formats(ref: Reference, formats: Sequence[str], out_dir: Path, *, adapter_dir: Path,
                  max_accuracy_drop: float = 0.05,
                  on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Every format of `formats` but the adapter (which build_adapter_export writes), each independent:
    one that fails is recorded and the others still ship."""
    outcomes = []
    for fmt in formats:
        if fmt == ADAPTER:
            continue
        if fmt not in SHAPE_FORMATS[ref.shape]:
            outcome = Outcome(fmt, False, reason_code="export.format_unknown", message=check_formats(ref.shape, [fmt])[0])
        else:
            outcome = write_format(ref, fmt, out_dir, adapter_dir=adapter_dir, max_accuracy_drop=max_accuracy_drop)
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)
    return outcomes
