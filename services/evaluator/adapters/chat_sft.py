"""Greedy answers of a local chat-SFT candidate (a causal LM, optionally with its LoRA adapter) on the
test rows, rendered with the model's own chat template as the trainer rendered them."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from services.common.logging import get_logger
from services.evaluator.adapters.chat import ScoringError, conversation_prompt, parse_answer
from services.evaluator.scoring import Scored

log = get_logger(__name__)

_PROBE = "TUNELINE_ANSWER_PROBE"


def prompt_messages(row: Mapping[str, Any], system_prompt: str | None = None) -> list[dict[str, str]]:
    """The turns the model answers: the row's conversation without its final assistant turn (as the
    trainer's ChatSFT renders rows: chat rows as they are, other rows as one user turn), behind
    `system_prompt` when the row has no system message of its own."""
    turns = conversation_prompt(row)
    if system_prompt and not any(m["role"] == "system" for m in turns):
        turns = [{"role": "system", "content": system_prompt}, *turns]
    return turns


def turn_end_marker(tokenizer) -> str:
    """What the chat template writes after an assistant turn's content ("<|im_end|>", "<|eot_id|>"),
    found by rendering a probe answer; "" when the template does not render prefix by prefix."""
    asked = [{"role": "user", "content": "q"}]
    try:
        prompt = tokenizer.apply_chat_template(asked, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template([*asked, {"role": "assistant", "content": _PROBE}], tokenize=False)
    except Exception:  # a template that refuses the probe: rely on eos alone
        return ""
    if not full.startswith(prompt) or _PROBE not in full:
        return ""
    return full[len(prompt):].split(_PROBE, 1)[1].strip()


def _stop_ids(tokenizer, model, marker: str) -> list[int]:
    ids: list[int] = []
    for eos in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        ids += [e for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int)]
    if marker:
        marker_id = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(marker_id, int) and marker_id != tokenizer.unk_token_id:
            ids.append(marker_id)
    return sorted(set(ids))


def generate_chat(
    base_model_path: str | Path,
    adapter_dir: str | Path | None,
    rows: Sequence[Mapping[str, Any]],
    *,
    kind: str,
    label_space: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    system_prompt: str | None = None,
    model_name: str = "candidate",
) -> Scored:
    """The model's parsed answers on `rows`, in row order (None where an answer does not parse), with
    each row's latency (the wall time of the batch it was generated in: batch_size 1 measures one
    request's latency), the tokens it generated (up to and including the stop token) and the wall
    seconds of the whole scoring, loading included. Blocking; loads the model on every call.

    Raises ScoringError: eval.capability_unsupported (the tokenizer has no chat template),
    eval.artifact_unreadable (adapter_dir holds no adapter).
    """
    t_start = time.perf_counter()
    if adapter_dir is not None and not (Path(adapter_dir) / "adapter_config.json").exists():
        raise ScoringError("eval.artifact_unreadable", f"{adapter_dir} holds no PEFT adapter (adapter_config.json)")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be at least 1")
    if not rows:
        return Scored(model=model_name, outputs=[], latency_ms=[], tokens=[], compute_s=0.0)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(str(base_model_path))
    if not getattr(tokenizer, "chat_template", None):
        raise ScoringError("eval.capability_unsupported",
                           f"{base_model_path} has no chat template: a chat-SFT candidate cannot be prompted")
    model = AutoModelForCausalLM.from_pretrained(str(base_model_path))
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    model.eval()

    marker = turn_end_marker(tokenizer)
    stop_ids = _stop_ids(tokenizer, model, marker)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues every row from its own last token
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=stop_ids or None, pad_token_id=tokenizer.pad_token_id)
    # the trainer tokenised the rendered text without adding special tokens; so does the prompt here
    prompts = [tokenizer.apply_chat_template(prompt_messages(r, system_prompt), tokenize=False,
                                             add_generation_prompt=True) for r in rows]

    outputs: list[Any] = []
    latency_ms: list[float] = []
    tokens: list[int | None] = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            enc = tokenizer(batch, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
            t0 = time.perf_counter()
            generated = model.generate(**enc, generation_config=config)
            if device.type == "cuda":
                torch.cuda.synchronize()
            batch_ms = (time.perf_counter() - t0) * 1000
            for ids in generated[:, enc["input_ids"].shape[1]:].tolist():
                stop = next((i for i, t in enumerate(ids) if t in stop_ids), None)
                answer_ids = ids if stop is None else ids[:stop]
                text = tokenizer.decode(answer_ids, skip_special_tokens=True)
                if marker and marker in text:
                    text = text.split(marker, 1)[0]
                outputs.append(parse_answer(text, kind, label_space))
                tokens.append(len(ids) if stop is None else stop + 1)
                latency_ms.append(batch_ms)
    unparseable = sum(o is None for o in outputs)
    if unparseable:
        log.info("chat_sft_unparseable", model=model_name, unparseable=unparseable, n=len(outputs))
    return Scored(model=model_name, outputs=outputs, latency_ms=latency_ms, tokens=tokens,
                  compute_s=time.perf_counter() - t_start)
