"""Hosted fine-tuning paths with an announced end: a small dated table, each row with its source.

Checked by preflight (`preflight.hosted_cutoff`, a warning naming the date) and listed by `tuneline recipes`.
Add a row when a provider announces an end; the table says when it was last checked.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from urllib.parse import urlparse

CHECKED_ON = dt.date(2026, 12, 7)


@dataclass(frozen=True)
class HostedCutoff:
    host: str                  # the API host the cutoff applies to
    model_prefix: str | None   # None: every base model on that host
    date: dt.date
    what: str
    source: str


CUTOFFS = (
    HostedCutoff(
        host="api.openai.com", model_prefix=None, date=dt.date(2027, 1, 6),
        what="OpenAI stops accepting new self-serve fine-tuning jobs (organisations with no fine-tuned-model "
             "inference in the last 60 days were cut off on 2026-07-02; existing fine-tuned models serve until "
             "their base model is retired)",
        source="OpenAI API deprecations page, announced 2026-05-07, as reported by "
               "https://aihola.com/article/openai-ends-fine-tuning-2027 and "
               "https://techscurrent.com/2026/07/openai-fine-tuning-cutoff-migration-clock/"),
    HostedCutoff(
        host="api.openai.com", model_prefix="gpt-4.1-nano", date=dt.date(2026, 10, 23),
        what="gpt-4.1-nano is retired: fine-tuned models built on it stop serving with it",
        source="OpenAI API deprecations page, as reported by https://aihola.com/article/openai-ends-fine-tuning-2027"),
)

ALTERNATIVES = ("local training (`--backend local`, recipes chat-sft-lora / chat-sft-qlora for chat models) or an "
                "OpenAI-compatible fine-tuning host (`--hosted-base-url`)")


def host_for(base_url: str | None) -> str:
    return "api.openai.com" if not base_url else (urlparse(base_url).hostname or "")


def cutoffs_for(base_url: str | None, model: str) -> list[HostedCutoff]:
    """The announced cutoffs a hosted run on this host and base model meets, earliest first."""
    host = host_for(base_url)
    return sorted((c for c in CUTOFFS if c.host == host and (c.model_prefix is None or model.startswith(c.model_prefix))),
                  key=lambda c: c.date)


def describe(cutoff: HostedCutoff, today: dt.date | None = None) -> str:
    today = today or dt.date.today()
    when = "passed on" if cutoff.date <= today else "on"
    return f"{when} {cutoff.date.isoformat()}: {cutoff.what} (source: {cutoff.source})"


def closing_lines(today: dt.date | None = None) -> list[str]:
    """What `tuneline recipes` prints about the hosted paths that are closing."""
    lines = [f"hosted paths closing (announced cutoffs, checked {CHECKED_ON.isoformat()}):"]
    for c in sorted(CUTOFFS, key=lambda c: c.date):
        scope = c.host + (f" {c.model_prefix}*" if c.model_prefix else " (every base model)")
        lines.append(f"  {scope}: {describe(c, today)}")
    lines.append(f"  instead: {ALTERNATIVES}; keep the record of past jobs with `tuneline import openai-jobs`")
    return lines
