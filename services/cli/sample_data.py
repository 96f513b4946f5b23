"""A generated sample dataset for the demo: support tickets in four categories, plus a few bad rows
so the demo shows rejection accounting.

Hard enough that evaluation has something to decide: every category has many paraphrases of its
request (a row picks one, so the test rows mostly use wordings no train row has: a bag of words
cannot match them, a sentence encoder can), every category talks about the same things (the app,
the account, an order), so no noun gives the label away, and 6% of the labels are wrong, as in a
real export.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

_REQUESTS = {
    "billing": [
        "I was charged twice for {o}", "why is there an extra fee on {o}", "please refund {o}",
        "my invoice is wrong for {o}", "the card payment failed for {o}", "you billed me after I cancelled {o}",
        "the price of {o} went up without notice", "I need a receipt for {o}", "money left my bank account for {o}",
        "the discount code was not applied to {o}", "I paid for {o} but it still says unpaid",
        "how do I get my money back for {o}", "there is a double transaction for {o}",
        "the VAT on {o} looks incorrect", "my credit card was declined when buying {o}",
        "the renewal charge for {o} is higher than agreed", "I want a credit note for {o}",
        "stop taking payments for {o}", "a pending charge for {o} never cleared",
        "the statement shows a cost I do not recognise for {o}",
    ],
    "login": [
        "I cannot sign in to {o}", "password reset does not work for {o}", "the two-factor code never arrives for {o}",
        "I am locked out of {o}", "it keeps saying my credentials are invalid on {o}",
        "the verification email for {o} never comes", "my session expires every minute on {o}",
        "I forgot which email I used for {o}", "single sign-on fails for {o}", "the authenticator app rejects {o}",
        "access denied when I try to get into {o}", "it asks me to log in again and again on {o}",
        "my username is not recognised by {o}", "the captcha loops forever on {o}",
        "I changed my phone and lost access to {o}", "the magic link for {o} has expired immediately",
        "my account got suspended and I cannot enter {o}", "the security question for {o} is wrong",
        "the sign-on page of {o} just spins", "I cannot authenticate with {o} since the update",
    ],
    "shipping": [
        "where is {o}", "the courier lost {o}", "tracking has not updated for {o}", "can you change the address of {o}",
        "I received a damaged box for {o}", "{o} was delivered to the wrong house", "{o} is stuck at customs",
        "the driver never showed up with {o}", "{o} arrived with pieces missing", "how long until {o} gets here",
        "the parcel with {o} was returned to sender", "I need {o} dispatched faster", "{o} says delivered but nothing came",
        "the package for {o} is late by two weeks", "can I pick up {o} at the depot instead",
        "the wrong item came instead of {o}", "the post office has {o} and will not release it",
        "the delivery slot for {o} was missed", "{o} left the warehouse days ago and vanished",
        "please reroute {o} to my office",
    ],
    "bug": [
        "the app crashes when I open {o}", "there is an error 500 on {o}", "nothing happens when I click on {o}",
        "the export button breaks {o}", "the screen goes blank on {o}", "{o} freezes after a few seconds",
        "the numbers on {o} are calculated wrong", "{o} shows a stack trace", "images do not load on {o}",
        "{o} is extremely slow since the update", "the layout of {o} is broken on my phone",
        "saving changes to {o} silently fails", "{o} shows someone else's data", "the notifications for {o} repeat forever",
        "dark mode makes {o} unreadable", "the search on {o} returns nothing", "{o} throws an unexpected exception",
        "the sync of {o} corrupts my files", "the buttons on {o} overlap each other", "{o} logs me an error code 0x80",
    ],
}
# Every category talks about the same things: no object gives the label away.
_OBJECTS = ["my account", "the mobile app", "order 4417", "the premium plan", "my subscription", "the dashboard",
            "the annual plan", "my last order", "the web version", "the replacement part", "my profile",
            "the family plan"]
_TAILS = ["", " since yesterday.", " again, please help.", " — this is urgent.", " for the third time this week.",
          " on Android.", " on the web version.", " after the last update.", " Thanks.", " Any idea?"]
NOISE = 0.06  # the share of rows whose label is another category's


def generate(path: Path, rows_per_label: int = 100, seed: int = 7) -> dict:
    rng = random.Random(seed)
    labels = sorted(_REQUESTS)
    rows = []
    for label in labels:
        for _ in range(rows_per_label):
            text = rng.choice(_REQUESTS[label]).format(o=rng.choice(_OBJECTS)) + rng.choice(_TAILS)
            given = rng.choice([x for x in labels if x != label]) if rng.random() < NOISE else label
            rows.append({"text": text[0].upper() + text[1:], "label": given})
    rng.shuffle(rows)
    lines = [json.dumps(r) for r in rows]
    # Rows a real export would contain, each rejected with its own reason code.
    lines.insert(5, '{"text": "truncated line')
    lines.insert(50, json.dumps({"text": "   ", "label": "bug"}))
    lines.insert(120, json.dumps({"text": "no label on this one"}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return {"path": str(path), "rows": len(lines), "labels": labels}
