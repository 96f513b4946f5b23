"""The classification system prompt: what prep writes into the OpenAI chat fine-tuning files and what
the evaluator asks a hosted fine-tune or a prompt baseline with, so both see the same words."""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_SYSTEM_TEMPLATE = (
    "You are a text classifier. Read the user's text and answer with exactly one label from this list, "
    "and nothing else: {labels}."
)


def system_prompt(label_space: Sequence[str], template: str = DEFAULT_SYSTEM_TEMPLATE) -> str:
    if not label_space:
        raise ValueError("empty label space")
    return template.format(labels=", ".join(str(label) for label in label_space))
