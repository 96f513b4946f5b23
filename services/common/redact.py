"""Passwords out of text that is shown or logged: one rule for every URL that may carry one."""

from __future__ import annotations

import re

_URL_PASSWORD = re.compile(r"(//[^/@:\s]*:)[^@\s]*@")  # a password may hold "/"


def url_passwords(text: str) -> str:
    """`text` with the password of every `scheme://user:password@host` in it replaced by ***."""
    return _URL_PASSWORD.sub(r"\1***@", text) if "//" in text else text
