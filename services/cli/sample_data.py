"""A generated sample dataset for the demo: support tickets in four categories, plus a few bad rows
so the demo shows rejection accounting."""

from __future__ import annotations

import json
import random
from pathlib import Path

_TOPICS = {
    "billing": (["I was charged twice for", "Why is there an extra fee on", "Please refund", "My invoice is wrong for",
                 "The card payment failed for"], ["my subscription", "last month's bill", "the annual plan", "order 4417",
                                                  "the premium upgrade"]),
    "login": (["I cannot sign in to", "Password reset does not work for", "Two-factor code never arrives for",
               "I am locked out of", "The login page rejects"], ["my account", "the mobile app", "the admin console",
                                                               "my work email", "the new laptop"]),
    "shipping": (["Where is", "The courier lost", "Tracking has not updated for", "Can you change the address of",
                  "I received a damaged box for"], ["my parcel", "order 9921", "the replacement part", "my delivery",
                                                   "the express shipment"]),
    "bug": (["The app crashes when I open", "There is an error 500 on", "Nothing happens when I click",
             "The export button breaks", "Screen goes blank on"], ["the dashboard", "the settings page", "the report view",
                                                                  "the search results", "the calendar"]),
}
_TAILS = ["", " since yesterday.", " again, please help.", " — this is urgent.", " for the third time this week.",
          " on Android.", " on the web version.", " after the last update."]


def generate(path: Path, rows_per_label: int = 100, seed: int = 7) -> dict:
    rng = random.Random(seed)
    rows = []
    for label, (openings, objects) in _TOPICS.items():
        for _ in range(rows_per_label):
            rows.append({"text": f"{rng.choice(openings)} {rng.choice(objects)}{rng.choice(_TAILS)}", "label": label})
    rng.shuffle(rows)
    lines = [json.dumps(r) for r in rows]
    # Rows a real export would contain, each rejected with its own reason code.
    lines.insert(5, '{"text": "truncated line')
    lines.insert(50, json.dumps({"text": "   ", "label": "bug"}))
    lines.insert(120, json.dumps({"text": "no label on this one"}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return {"path": str(path), "rows": len(lines), "labels": sorted(_TOPICS)}
