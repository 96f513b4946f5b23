"""Validation errors and refusals as the CLI shows them."""

from __future__ import annotations

import sys

from pydantic import ValidationError


def validation_lines(exc: ValidationError, prefix: str, options: dict | None = None, whole: str = "input") -> list[str]:
    """One line per problem in a pydantic ValidationError: `prefix`, the option (a field's location
    mapped through `options`, else the location itself; `whole` for the model as a whole) and pydantic's
    message. Never the input value (it may be a secret), so neither str(exc) nor errors()' `input`/`ctx`."""
    options = options or {}
    lines = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        loc = tuple(err["loc"])
        while loc and loc[0] == "plan":
            loc = loc[1:]
        if loc[:2] in options:
            option, rest = options[loc[:2]], loc[2:]
        elif loc and loc[0] in options:
            option, rest = options[loc[0]], loc[1:]
        else:
            option, rest = ".".join(str(p) for p in loc) or whole, ()
        where = option + (f" ({'.'.join(str(p) for p in rest)})" if rest else "")
        lines.append(f"{prefix}: {where}: {err['msg']}")
    return lines


def refused(prefix: str, reason_code: str, message: object) -> int:
    """A refusal as the CLI shows it, one line on stderr with its reason code; returns the exit status (2)."""
    print(f"{prefix}: [{reason_code}] {message}", file=sys.stderr)
    return 2
