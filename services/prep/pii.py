"""PII and secret scrubbing with placeholders that are consistent over a whole dataset.

The same value always becomes the same placeholder (``<EMAIL_1>``, ``<IP_3>`` ...), numbered per kind
by first appearance in row order, so train and eval (split after scrubbing) agree. The
value->placeholder map lives only in the :class:`Scrubber` object: nothing but placeholders is
ever written. Share one scrubber between the calls whose outputs are compared (e.g. the training
rows and an explicit eval set).

Kinds (placeholder prefix):

* ``email`` (EMAIL): ``local@domain.tld``; the map key is the lowercased address.
* ``phone`` (PHONE): NANP with separators (``555-123-4567``, ``(555) 123-4567``, ``+1 555 123 4567``)
  and international numbers written with a leading ``+`` and a country code (10-15 digits in all; so
  timezone offsets like ``+0530 2016`` are not phones). Bare digit runs are
  never phones: in bug reports they are ids, timestamps, sizes and line numbers.
* ``ipv4`` / ``ipv6`` (IP): see the decision below.
* ``card`` (CARD): 13-19 digits, optionally grouped by single spaces or dashes, that pass the Luhn
  check *and* start with a card network's prefix (Visa 4, Mastercard 51-55/2221-2720, Amex 34/37,
  Discover 6011/644-649/65, Diners 300-305/36/38, JCB 3528-3589, UnionPay 62, Maestro 50/56-69).
  Epoch-millisecond timestamps (13 digits starting with 1) are therefore never cards.
* ``secret`` (SECRET): private-key blocks, Anthropic ``sk-ant-``, OpenAI ``sk-``/``sk-proj-``,
  GitHub ``ghp_/gho_/ghu_/ghs_/ghr_/github_pat_``, AWS access key ids (``AKIA/ASIA/ABIA/ACCA``) and
  ``aws_secret_access_key = ...`` values, Slack ``xox[abposr]-`` tokens and webhook URLs, JWTs,
  ``Bearer <token>``, Google ``AIza`` keys, Stripe ``sk_/rk_live|test_``, GitLab ``glpat-``,
  Hugging Face ``hf_``, npm ``npm_``, SendGrid ``SG.``, ``user:password@`` in URLs, and values
  assigned to ``password/passwd/pwd/secret/api_key/access_token/auth_token/client_secret`` when they
  look like a real value (6+ characters with a letter and a digit, not ``***``, ``${...}`` or ``<...>``).

IP decision. A dotted quad is an IPv4 address when every octet is 0-255 without a leading zero and it
is not part of something longer (no letter, digit, ``.``, ``_`` or ``-`` glued to either side: so
``hadoop-2.7.1.3``, ``v1.2.3.4``, ``1.2.3.4.5`` and ``1.2.3.4-SNAPSHOT`` are versions), and the 30
characters before it do not name a version (``version``, ``release``, ``upgrade``, ``jdk`` ...).
A bare ``2.7.1.3`` in running text with no such word is scrubbed: a false positive costs one token of
a version number, a false negative leaks an address. Loopback (127/8), ``0.0.0.0``, broadcast and
netmasks (first octet 255) identify nobody and are kept. IPv6 needs the full 8-group form or ``::``
with at least two groups, at least one digit, and must parse (``ipaddress``); ``::1`` is kept.
Stack traces (``Foo.java:123``), ports (``host:8080``), timestamps (``20:12:50``), hex ids and UUIDs
match none of the patterns.

Speed. :func:`find_changed` (behind :meth:`Scrubber.scrub_many`) routes each row to the precise
patterns it could match: ASCII rows by one hyperscan scan each (which also gives the text windows
of the digit kinds), other rows by :func:`candidate_kinds`' substring tests (one hyperscan scan each
when hyperscan is installed, a C-level pass per needle over the joined texts otherwise); only those
rows run the precise patterns, a few per cent of the JIRA rows. Finding is stateless and numbering
placeholders (:meth:`Scrubber.apply`, in row order) is separate, so slices of a dataset may be
searched in different processes.
"""

from __future__ import annotations

import bisect
import ipaddress
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

KINDS = ("email", "phone", "ipv4", "ipv6", "card", "secret")
PLACEHOLDER_PREFIX = {"email": "EMAIL", "phone": "PHONE", "ipv4": "IP", "ipv6": "IP", "card": "CARD", "secret": "SECRET"}
# priority when two matches overlap at the same start: the more specific first
_PRIORITY = {"secret": 0, "email": 1, "card": 2, "ipv6": 3, "ipv4": 4, "phone": 5}

_SECRET_PATTERNS: list[tuple[re.Pattern, int]] = [  # (pattern, group holding the secret)
    (re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|\Z)", re.S), 0),
    (re.compile(r"sk-ant-[A-Za-z0-9_-]{20,}"), 0),
    (re.compile(r"sk-(?!ant-)(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}"), 0),
    (re.compile(r"g(?:h[pousr]_[A-Za-z0-9]{30,}|ithub_pat_[A-Za-z0-9_]{30,})"), 0),
    (re.compile(r"A(?:KIA|SIA|BIA|CCA)[A-Z0-9]{16}\b"), 0),
    (re.compile(r"(?i)\baws_?secret_?(?:access_?)?key\b[\"']?\s*[:=]\s*[\"']?([A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])"), 1),
    (re.compile(r"xox[abposr]-[A-Za-z0-9-]{10,}"), 0),
    (re.compile(r"https://hooks\.slack\.com/services/[A-Za-z0-9/_-]+"), 0),
    (re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}"), 0),
    (re.compile(r"(?i)\bbearer\s+([A-Za-z0-9._~+/-]{16,}=*)"), 1),
    (re.compile(r"AIza[0-9A-Za-z_-]{35}"), 0),
    (re.compile(r"[sr]k_(?:live|test)_[0-9A-Za-z]{16,}"), 0),
    (re.compile(r"glpat-[0-9A-Za-z_-]{20,}"), 0),
    (re.compile(r"hf_[A-Za-z0-9]{30,}"), 0),
    (re.compile(r"npm_[A-Za-z0-9]{36}"), 0),
    (re.compile(r"SG\.[\w-]{22}\.[\w-]{43}"), 0),
    (re.compile(r"(?<=://)([^\s/:@]{1,64}:[^\s/@]{1,128})(?=@)"), 1),
    # a keyword that ends a name (DB_PASSWORD, GITHUB_TOKEN, OPENAI_API_KEY, spring.datasource.password),
    # maybe followed by _KEY/_VALUE/_TOKEN/_SECRET (SECRET_KEY), then ":" or "=" and a value
    (re.compile(r"(?i)(?<![A-Za-z0-9])(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key)"
                r"(?:[_-]?(?:key|value|token|secret))?[\"']?\s*[:=]\s*[\"']?([^\s\"'`,;<>(){}\[\]]{6,})"), 1),
]
# substrings one of which every secret match contains (searched case-sensitively / in lowercase)
_SECRET_NEEDLES = ("-----BEGIN", "sk-", "sk_", "rk_", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "AKIA",
                   "ASIA", "ABIA", "ACCA", "xox", "hooks.slack.com", "eyJ", "AIza", "glpat-", "hf_", "npm_", "SG.")
_URL_CREDENTIALS = len(_SECRET_PATTERNS) - 2  # needs an "@": run on the email candidates
_SECRET_NEEDLES_LOWER = ("bearer", "passw", "pwd", "secret", "token", "apikey", "api_key", "api-key", "accesskey",
                         "access_key", "access-key", "privatekey", "private_key", "private-key")

# an email is found from its "@": the local part backwards, the domain forwards (fast: "@" is rare)
# (letters and digits of any script: josé@example.com, info@müller.de; [^\W_] is a letter or digit)
_EMAIL_LOCAL = re.compile(r"(?<![\w.%+-])[^\W_][\w.%+-]{0,63}\Z")
_EMAIL_DOMAIN = re.compile(r"(?:[^\W_](?:(?:[^\W_]|-){0,61}[^\W_])?\.)+[^\W\d_]{2,24}(?![\w-])")
# (a full stop may end the number, as at the end of a sentence; ".5" or ".txt" may not)
_NANP = re.compile(r"(?:\+1[-. ]?|1[-. ])?(?:\(\d{3}\)[-. ]?|\d{3}[-. ]?)\d{3}[-. ]\d{4}(?!\w|\.\w|[-/]\d)")
_INTL = re.compile(r"\+(?<![\w.+-]\+)[1-9]\d{0,2}[-. ]?(?:\(\d{1,4}\)[-. ]?)?\d{1,4}(?:[-. ]?\d{2,4}){1,5}(?!\w|\.\w|[-/]\d)")
_IPV4 = re.compile(r"\d(?<![\w.-]\d)\d{0,2}\.(?:\d{1,3}\.){2}\d{1,3}(?![\w-]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}"
                   r"|(?:[0-9A-Fa-f]{1,4}:){0,7}:(?::?[0-9A-Fa-f]{1,4}){0,7})(?![\w:])")
# the rest of an IPv4 address written in IPv6 (::ffff:192.168.1.10): _IPV6 stops at the first "."
_IPV6_V4_TAIL = re.compile(r"(?:\.\d{1,3}){3}(?![\w-]|\.\d)")
_CARD = re.compile(r"\d(?<![\w.-]\d)(?:[ -]?\d){12,18}(?![\w-]|\.\w|[ -]\d)")
_VERSION_CONTEXT = re.compile(r"(?i)(?:version|release|upgrad|downgrad|build|jdk|jre|\bver\b|\bv)[^\n]{0,30}$")

_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_IPV4_TRIGGER = re.compile(rb"0\.0{1,3}\.0{1,3}\.0")
_PHONE_TRIGGER = re.compile(rb"000[-. ]0000|\+0")
_CARD_TRIGGER = re.compile(rb"0(?:[ -]?0){12}")  # 13 digits ("0000[ -]?0000" missed "411 111 111 111 1111")
_IPV6_TRIGGER = re.compile(rb":[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:")


def _WORDISH(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def luhn_ok(digits: str) -> bool:
    total, alt = 0, False
    for ch in reversed(digits):
        d = ord(ch) - 48
        if alt:
            d *= 2
            if d > 9:
                d -= 9
        total += d
        alt = not alt
    return total % 10 == 0


def _card_brand_ok(d: str) -> bool:
    n = len(d)
    p2, p3, p4 = int(d[:2]), int(d[:3]), int(d[:4])
    if d[0] == "4":
        return n in (13, 16, 19)
    if 51 <= p2 <= 55 or 2221 <= p4 <= 2720:
        return n == 16
    if p2 in (34, 37):
        return n == 15
    if p4 == 6011 or 644 <= p3 <= 649 or p2 == 65:
        return 16 <= n <= 19
    if 300 <= p3 <= 305 or p2 in (36, 38):
        return 14 <= n <= 19
    if 3528 <= p4 <= 3589:
        return 16 <= n <= 19
    if p2 == 62:
        return 16 <= n <= 19
    if p2 == 50 or 56 <= p2 <= 69:
        return 12 <= n <= 19
    return False


def _valid_card(s: str) -> str | None:
    seps = {c for c in s if not c.isdigit()}
    if len(seps) > 1:
        return None
    d = "".join(c for c in s if c.isdigit())
    return d if 13 <= len(d) <= 19 and _card_brand_ok(d) and luhn_ok(d) else None


def _valid_ipv4(text: str, m: re.Match) -> str | None:
    parts = m.group().split(".")
    if any(len(p) > 1 and p[0] == "0" for p in parts):
        return None
    octets = [int(p) for p in parts]
    if max(octets) > 255 or octets[0] in (0, 127, 255):  # this-network/unspecified, loopback, masks
        return None
    if _VERSION_CONTEXT.search(text, max(0, m.start() - 40), m.start()):
        return None
    return m.group()


def _valid_ipv6(s: str) -> str | None:
    if "::" not in s and s.count(":") != 7:
        return None
    if sum(1 for g in s.split(":") if g) < 2 or not any(c.isdigit() for c in s):
        return None
    try:
        addr = ipaddress.IPv6Address(s)
    except ValueError:
        return None
    if addr.is_loopback or addr.is_unspecified:
        return None
    return addr.compressed


def _secret_value_ok(pattern_index: int, value: str) -> bool:
    if pattern_index in (2, 9):  # OpenAI sk-..., Bearer: random tokens carry digits; prose does not
        return any(c.isdigit() for c in value)
    if pattern_index == len(_SECRET_PATTERNS) - 1:  # keyword assignment
        low = value.lower()
        if value.startswith(("$", "%", "*", "<", "#")) or set(value) <= set("*x.-_") or low in ("null", "none", "true", "false"):
            return False
        return any(c.isdigit() for c in value) and any(c.isalpha() for c in value)
    return True


def _finditer(pat: re.Pattern, text: str, windows: list[tuple[int, int, int]] | None):
    """``pat.finditer(text)``, searching only ``windows`` (see :meth:`Scrubber.find`)."""
    if windows is None:
        yield from pat.finditer(text)
        return
    pos = 0
    for lo, hi, endpos in windows:
        pos = max(pos, lo)
        while pos <= hi:
            m = pat.search(text, pos, endpos)
            if m is None or m.start() > hi:
                break
            yield m
            pos = m.end() if m.end() > m.start() else m.end() + 1


@dataclass
class ScrubResult:
    text: str
    counts: Counter = field(default_factory=Counter)  # kind -> matches replaced in this text


class Scrubber:
    """Holds the value -> placeholder map for one dataset (never persisted)."""

    def __init__(self) -> None:
        self._map: dict[tuple[str, str], str] = {}
        self._next: Counter = Counter()

    @property
    def distinct_values(self) -> Counter:
        """Distinct values seen per placeholder prefix (counts only, never the values)."""
        return Counter(k for k, _ in self._map)

    def placeholder(self, kind: str, value: str) -> str:
        prefix = PLACEHOLDER_PREFIX[kind]
        key = (prefix, value)
        ph = self._map.get(key)
        if ph is None:
            self._next[prefix] += 1
            ph = self._map[key] = f"<{prefix}_{self._next[prefix]}>"
        return ph

    # ---------- detection ----------

    @staticmethod
    def find(text: str, kinds: Iterable[str] = KINDS, secret_patterns: Iterable[int] | None = None,
             windows: dict[str, list[tuple[int, int, int]]] | None = None) -> list[tuple[int, int, str, str]]:
        """Non-overlapping (start, end, kind, canonical value) in text order.

        ``secret_patterns`` (indices into the secret pattern list) restricts which secret patterns
        run; by default all when ``secret`` is in ``kinds`` (the URL-credentials one also for ``email``).
        ``windows`` (kind -> sorted, disjoint (first start, last start, endpos)) promises that every
        match of that kind's patterns starts inside a window and ends, look-ahead included, before
        its endpos; only those windows are searched."""
        windows = windows or {}
        spans: list[tuple[int, int, str, str]] = []
        kinds = set(kinds)
        if secret_patterns is not None:
            secret_patterns = [(i, _SECRET_PATTERNS[i]) for i in sorted(secret_patterns)]
        else:
            secret_patterns = list(enumerate(_SECRET_PATTERNS)) if "secret" in kinds else (
                [(_URL_CREDENTIALS, _SECRET_PATTERNS[_URL_CREDENTIALS])] if "email" in kinds else [])
        if secret_patterns:
            for i, (pat, grp) in secret_patterns:
                for m in pat.finditer(text):
                    v = m.group(grp)
                    if grp == 0 and i > 0 and m.start() and _WORDISH(text[m.start() - 1]):
                        continue  # glued to a word: "task-..." is not an "sk-" key
                    if v and _secret_value_ok(i, v):
                        spans.append((m.start(grp), m.end(grp), "secret", v))
        if "email" in kinds:
            at = text.find("@")
            while at > 0:
                local = _EMAIL_LOCAL.search(text, max(0, at - 64), at)
                dom = _EMAIL_DOMAIN.match(text, at + 1) if local else None
                if dom:
                    spans.append((local.start(), dom.end(), "email", text[local.start():dom.end()].lower()))
                at = text.find("@", at + 1)
        if "card" in kinds:
            for m in _finditer(_CARD, text, windows.get("card")):
                d = _valid_card(m.group())
                if d:
                    spans.append((m.start(), m.end(), "card", d))
        if "ipv6" in kinds:
            for m in _IPV6.finditer(text):
                end, v = m.end(), None
                tail = _IPV6_V4_TAIL.match(text, end) if text.startswith(".", end) else None
                if tail:  # the whole ::ffff:a.b.c.d if it parses, else what _IPV6 matched
                    v = _valid_ipv6(text[m.start():tail.end()])
                    end = tail.end() if v else end
                v = v or _valid_ipv6(m.group())
                if v:
                    spans.append((m.start(), end, "ipv6", v))
        if "ipv4" in kinds:
            for m in _finditer(_IPV4, text, windows.get("ipv4")):
                v = _valid_ipv4(text, m)
                if v:
                    spans.append((m.start(), m.end(), "ipv4", v))
        if "phone" in kinds:
            for pat in (_NANP, _INTL):
                for m in _finditer(pat, text, windows.get("phone")):
                    if m.start() and (_WORDISH(text[m.start() - 1]) or text[m.start() - 1] in ".+-"):
                        continue
                    d = "".join(c for c in m.group() if c.isdigit())
                    if pat is _NANP:
                        if len(d) == 10 or len(d) == 11 and d[0] == "1":
                            spans.append((m.start(), m.end(), "phone", d[-10:]))
                    elif 10 <= len(d) <= 15:
                        spans.append((m.start(), m.end(), "phone", d))
        spans.sort(key=lambda s: (s[0], -(s[1] - s[0]), _PRIORITY[s[2]]))
        out, end = [], -1
        for s in spans:
            if s[0] >= end:
                out.append(s)
                end = s[1]
        return out

    def scrub(self, text: str, kinds: Iterable[str] = KINDS, secret_patterns: Iterable[int] | None = None,
              windows: dict[str, list[tuple[int, int, int]]] | None = None) -> ScrubResult:
        return self.apply(text, self.find(text, kinds, secret_patterns, windows))

    def apply(self, text: str, spans: Sequence[tuple[int, int, str, str]]) -> ScrubResult:
        """Replace ``spans`` (from :meth:`find`) with their placeholders, numbering new values now."""
        if not spans:
            return ScrubResult(text)
        parts, pos, counts = [], 0, Counter()
        for start, end, kind, value in spans:
            parts.append(text[pos:start])
            parts.append(self.placeholder(kind, value))
            counts[kind] += 1
            pos = end
        parts.append(text[pos:])
        return ScrubResult("".join(parts), counts)

    def scrub_many(self, texts: Sequence[str]) -> list[ScrubResult]:
        """Same as ``[scrub(t) for t in texts]`` (same placeholders, same order), much faster."""
        changed = self.scrub_changed(texts)
        return [changed.get(i) or ScrubResult(t) for i, t in enumerate(texts)]

    def scrub_strings_in(self, value: Any) -> Any:
        """A JSON-like value (dicts, lists, scalars) with every string in it scrubbed, in document order
        (as scrub() one string after the other), dict keys and integers included (see
        :func:`string_leaves`); other values as they are."""
        strings = list(string_leaves(value, keys_and_integers=True))
        changed = self.scrub_changed(strings)
        return with_string_leaves(value, iter(changed[i].text if i in changed else t for i, t in enumerate(strings)),
                                  keys_and_integers=True)

    def scrub_changed(self, texts: Sequence[str]) -> dict[int, ScrubResult]:
        """Like :meth:`scrub_many`, but only the results of the texts that held PII, by index."""
        return {i: self.apply(texts[i], spans) for i, spans in find_changed(texts).items()}


def _scrubbable_int(value: Any) -> bool:
    """An integer (not a bool) short enough to be a card or phone number's digits (and for str())."""
    return type(value) is int and -10**25 < value < 10**25


def string_leaves(value: Any, *, keys_and_integers: bool = False) -> Iterator[str]:
    """The strings of a JSON-like value in document order (dict values, list items).

    ``keys_and_integers``: also each dict key (before its value) and each integer as its decimal
    text, which is what PII scrubbing needs: a card number stored as an integer, or an email address
    used as a key (``{"alice@example.com": "admin"}``), is as personal as one in a string."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, x in value.items():
            if keys_and_integers:
                yield str(k)
            yield from string_leaves(x, keys_and_integers=keys_and_integers)
    elif isinstance(value, list):
        for x in value:
            yield from string_leaves(x, keys_and_integers=keys_and_integers)
    elif keys_and_integers and _scrubbable_int(value):
        yield str(value)


def with_string_leaves(value: Any, strings: Iterator[str], *, keys_and_integers: bool = False) -> Any:
    """`value` with its strings (string_leaves order, with the same ``keys_and_integers``) taken from
    `strings` in turn. An integer whose text comes back changed (a scrubbed card number) becomes that
    text, a placeholder string; one that comes back as it was stays an integer."""
    if isinstance(value, str):
        return next(strings)
    if isinstance(value, dict):
        out = {}
        for k, x in value.items():
            key = next(strings) if keys_and_integers else k
            out[key] = with_string_leaves(x, strings, keys_and_integers=keys_and_integers)
        return out
    if isinstance(value, list):
        return [with_string_leaves(x, strings, keys_and_integers=keys_and_integers) for x in value]
    if keys_and_integers and _scrubbable_int(value):
        text = next(strings)
        return value if text == str(value) else text
    return value


def find_changed(texts: Sequence[str], encoded: Sequence[bytes] | None = None) -> dict[int, list[tuple[int, int, str, str]]]:
    """Index -> :meth:`Scrubber.find` spans of each text that holds PII, in index order. Stateless
    (no placeholders are numbered), so disjoint slices of a dataset may be searched apart and their
    spans applied in row order (:meth:`Scrubber.apply`) with the same result as one
    :meth:`Scrubber.scrub_changed` call. ``encoded``: the texts' UTF-8, when the caller has it."""
    find = Scrubber.find
    out: dict[int, list[tuple[int, int, str, str]]] = {}
    if _HS_DB is None:
        for i, kinds in sorted(candidate_kinds(texts).items()):
            spans = find(texts[i], kinds)
            if spans:
                out[i] = spans
        return out
    # ASCII rows: one hyperscan pass routes each row to the patterns (and, for the digit kinds,
    # the text windows) it could match; other rows: the substring pre-scan of candidate_kinds
    other = [i for i, t in enumerate(texts) if not t.isascii()]
    other_kinds = _candidate_kinds_each([texts[i] for i in other], None if encoded is None else [encoded[i] for i in other]
                                        ) if other else {}
    other_pos = {i: k for k, i in enumerate(other)}
    scan, scratch = _HS_DB.scan, _HS_SCRATCH
    hits: list[int] = []
    ends: list[int] = []
    on_match = _hs_collector(hits, ends)
    targets = _HS_TARGETS
    for i, t in enumerate(texts):
        if other_pos:
            k = other_pos.get(i)
            if k is not None:
                kinds = other_kinds.get(k)
                if kinds:
                    spans = find(t, kinds)
                    if spans:
                        out[i] = spans
                continue
        scan(t.encode("ascii") if encoded is None else encoded[i], match_event_handler=on_match, scratch=scratch)
        if not hits:
            continue
        kinds, secret, win = set(), [], {}
        for h, e in zip(hits, ends):
            target = targets[h]
            if target.__class__ is int:
                secret.append(target)
                continue
            kinds.add(target)
            back_fwd = _HS_WINDOWS.get(h)
            if back_fwd is not None:
                win.setdefault(target, []).append((e - back_fwd[0], e, e + back_fwd[1]))
        hits.clear()
        ends.clear()
        if _URL_CREDENTIALS in secret and "email" not in kinds:
            secret.remove(_URL_CREDENTIALS)  # user:password@ needs the "@"
        if secret:
            kinds.add("secret")
        if not kinds:
            continue
        for kind, ws in win.items():
            win[kind] = _merge_windows(ws, len(t))
        spans = find(t, kinds, secret, win)
        if spans:
            out[i] = spans
    return out


def _merge_windows(ws: list[tuple[int, int, int]], n: int) -> list[tuple[int, int, int]]:
    ws.sort()
    out = []
    for lo, hi, endpos in ws:
        lo, endpos = max(lo, 0), min(endpos, n)
        if out and lo <= out[-1][1] + 1:
            plo, phi, pend = out[-1]
            out[-1] = (plo, max(phi, hi), max(pend, endpos))
        else:
            out.append((lo, hi, endpos))
    return out


def _hs_collector(hits: list[int], ends: list[int]):
    def on_match(pid: int, start: int, end: int, flags: int, context: object) -> None:
        hits.append(pid)
        ends.append(end)
    return on_match


# Hyperscan triggers for ASCII text: each is a necessary condition of its target's precise pattern(s)
# (a secret pattern index, or a kind), so a row none of them hits holds no PII. ``\s`` of Python's
# ``re`` on ASCII text is [\t-\r\x1c-\x20].
_HS_TRIGGER_LIST: list[tuple[bytes, bool, int | str]] = [  # (pattern, caseless, target)
    (rb"-----BEGIN ", False, 0),
    (rb"sk-ant-", False, 1),
    (rb"sk-", False, 2),
    (rb"gh[pousr]_|github_pat_", False, 3),
    (rb"A(?:KIA|SIA|BIA|CCA)", False, 4),
    (rb"aws_?secret_?(?:access_?)?key[\"']?[\t-\r\x1c-\x20]*[:=]", True, 5),
    (rb"xox[abposr]-", False, 6),
    (rb"https://hooks\.slack\.com/services/", False, 7),
    (rb"eyJ", False, 8),
    (rb"bearer", True, 9),
    (rb"AIza", False, 10),
    (rb"[sr]k_(?:live|test)_", False, 11),
    (rb"glpat-", False, 12),
    (rb"hf_", False, 13),
    (rb"npm_", False, 14),
    (rb"SG\.", False, 15),
    (rb"://[^\t-\r\x1c-\x20/:@]{1,64}:[^\t-\r\x1c-\x20/@]{1,128}@", False, _URL_CREDENTIALS),
    (rb"(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key)"
     rb"(?:[_-]?(?:key|value|token|secret))?[\"']?[\t-\r\x1c-\x20]*[:=]", True, len(_SECRET_PATTERNS) - 1),
    (rb"@", False, "email"),
    (rb"::|:[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:", False, "ipv6"),
    (rb"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]", False, "ipv4"),
    (rb"[0-9]{3}[-. ][0-9]{4}", False, "phone"),
    (rb"\+[1-9]", False, "phone"),
    # a card match starts at a digit with no [\w.-] before it (the pattern's look-behind): long digit
    # runs (ids, epoch milliseconds) then trigger once, not at every 13th digit
    (rb"(?:^|[^0-9A-Za-z_.-])[0-9](?:[ -]?[0-9]){12}", False, "card"),
]
_HS_TARGETS = [t for _, _, t in _HS_TRIGGER_LIST]
# trigger index -> (back, fwd): each of the kind's matches starts at most ``back`` characters before
# the end of one of this trigger's matches (all ends are reported) and, look-ahead included, ends
# fewer than ``fwd`` characters after it:
#   IPv4: "a.b.c.d" starts <= 12 before the 4th octet's first digit, is <= 15 long (+2 look-ahead);
#   NANP: ends where "ddd[-. ]dddd" ends, <= 18 long; international: starts at the "+", <= 41 long;
#   card: 13 digits (with separators: <= 25 characters) from its start, <= 37 long.
_HS_WINDOWS = {len(_HS_TRIGGER_LIST) - 4: (13, 24), len(_HS_TRIGGER_LIST) - 3: (20, 24),
               len(_HS_TRIGGER_LIST) - 2: (2, 56), len(_HS_TRIGGER_LIST) - 1: (25, 48)}


def _hs_compile():
    try:
        import hyperscan
    except ImportError:  # optional: without it scrub_many uses the pure-Python pre-scan
        return None, None
    db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    flags = [(0 if i in _HS_WINDOWS else hyperscan.HS_FLAG_SINGLEMATCH) | (hyperscan.HS_FLAG_CASELESS if c else 0)
             for i, (_, c, _) in enumerate(_HS_TRIGGER_LIST)]
    db.compile(expressions=[p for p, _, _ in _HS_TRIGGER_LIST], ids=list(range(len(_HS_TRIGGER_LIST))),
               elements=len(_HS_TRIGGER_LIST), flags=flags)
    return db, hyperscan.Scratch(db)


_HS_DB, _HS_SCRATCH = _hs_compile()


def _candidate_patterns() -> list[tuple[bytes, bool, str]]:
    """:func:`candidate_kinds`' tests as (pattern over the UTF-8 bytes, caseless, kind): its needles
    (the lowercase ones caseless: ``bytes.lower`` changes ASCII letters only, as hyperscan's caseless
    mode does) and its patterns over the digits-to-0 copy with [0-9] for 0."""
    def lit(n: str) -> bytes:
        return b"".join(b"\\x%02x" % c for c in n.encode())

    return ([(b"@", False, "email")] + [(lit(n), False, "secret") for n in _SECRET_NEEDLES]
            + [(lit(n), True, "secret") for n in _SECRET_NEEDLES_LOWER]
            + [(b"::", False, "ipv6"), (_IPV6_TRIGGER.pattern, False, "ipv6")]
            + [(rb"[0-9]\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]", False, "ipv4"),  # _IPV4_TRIGGER
               (rb"[0-9]{3}[-. ][0-9]{4}|\+[0-9]", False, "phone"),  # _PHONE_TRIGGER
               (rb"[0-9](?:[ -]?[0-9]){12}", False, "card")])  # _CARD_TRIGGER


def _hs_compile_candidates():
    if _HS_DB is None:
        return None, None, []
    import hyperscan

    pats = _candidate_patterns()
    db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    db.compile(expressions=[p for p, _, _ in pats], ids=list(range(len(pats))), elements=len(pats),
               flags=[hyperscan.HS_FLAG_SINGLEMATCH | (hyperscan.HS_FLAG_CASELESS if c else 0) for _, c, _ in pats])
    return db, hyperscan.Scratch(db), [k for _, _, k in pats]


_HS_CAND_DB, _HS_CAND_SCRATCH, _HS_CAND_KINDS = _hs_compile_candidates()


# Characters beyond ASCII that the precise patterns match where the triggers, which look for ASCII,
# would not see them: Python's re matches U+017F (long s), U+212A (Kelvin sign), U+0130 and U+0131
# (dotted capital and dotless i) case-insensitively to s, k and i, and `\d` matches every Unicode
# decimal digit. A non-ASCII row is shown to the triggers with these replaced by the ASCII letters and
# digits they stand for, so that the triggers stay a superset of the patterns ("paſſword=...", "apİ_key=...",
# an address in Arabic-Indic digits). tests/unit/test_pii.py checks this table against every code point.
_FOLD_TO_ASCII = {"\u017f": "s", "\u212a": "k", "\u0130": "i", "\u0131": "i"}
_FOLDABLE = re.compile("[%s]|(?![0-9])\\d" % "".join(_FOLD_TO_ASCII))


def _fold_char(m: re.Match) -> str:
    c = m.group()
    return _FOLD_TO_ASCII.get(c) or str(unicodedata.decimal(c))


def trigger_text(text: str) -> str:
    """The text as the triggers see it: see _FOLD_TO_ASCII (the text itself when nothing folds)."""
    return text if text.isascii() or _FOLDABLE.search(text) is None else _FOLDABLE.sub(_fold_char, text)


def _candidate_kinds_each(texts: Sequence[str], encoded: Sequence[bytes] | None) -> dict[int, set[str]]:
    """:func:`candidate_kinds`, the same sets, by one hyperscan scan per text."""
    if _HS_CAND_DB is None:
        return candidate_kinds(texts)
    kinds_of, scan, scratch = _HS_CAND_KINDS, _HS_CAND_DB.scan, _HS_CAND_SCRATCH
    found: dict[int, set[str]] = {}
    hit: set[str] = set()

    def on_match(pid: int, start: int, end: int, flags: int, context: object) -> None:
        hit.add(kinds_of[pid])

    for i, t in enumerate(texts):
        folded = trigger_text(t)
        data = folded.encode() if folded is not t or encoded is None else encoded[i]
        scan(data, match_event_handler=on_match, scratch=scratch)
        if hit:
            found[i] = set(hit)
            hit.clear()
    return found


def candidate_kinds(texts: Sequence[str]) -> dict[int, set[str]]:
    """Row index -> the kinds that row could contain (a superset; cheap, C-level scans)."""
    joined = "\x00".join(texts)
    if not joined.isascii():
        texts = [trigger_text(t) for t in texts]
        joined = "\x00".join(texts)
    if joined.isascii():
        starts, acc = [], 0
        for t in texts:
            starts.append(acc)
            acc += len(t) + 1
        raw = joined.encode("ascii")
    else:
        enc = [t.encode() for t in texts]
        starts, acc = [], 0
        for e in enc:
            starts.append(acc)
            acc += len(e) + 1
        raw = b"\x00".join(enc)
    found: dict[int, set[str]] = {}

    def mark_needle(buf: bytes, needle: bytes, kind: str) -> None:
        pos = buf.find(needle)
        while pos >= 0:
            row = bisect.bisect_right(starts, pos) - 1
            found.setdefault(row, set()).add(kind)
            nxt = starts[row + 1] if row + 1 < len(starts) else len(buf)
            pos = buf.find(needle, nxt)

    def mark_regex(buf: bytes, pat: re.Pattern, kind: str) -> None:
        m = pat.search(buf)
        while m:
            row = bisect.bisect_right(starts, m.start()) - 1
            found.setdefault(row, set()).add(kind)
            nxt = starts[row + 1] if row + 1 < len(starts) else len(buf)
            m = pat.search(buf, nxt)

    mark_needle(raw, b"@", "email")
    for n in _SECRET_NEEDLES:
        mark_needle(raw, n.encode(), "secret")
    low = raw.lower()
    for n in _SECRET_NEEDLES_LOWER:
        mark_needle(low, n.encode(), "secret")
    mark_needle(raw, b"::", "ipv6")
    mark_regex(raw, _IPV6_TRIGGER, "ipv6")
    digits = raw.translate(_DIGITS_TO_ZERO)
    mark_regex(digits, _IPV4_TRIGGER, "ipv4")
    mark_regex(digits, _PHONE_TRIGGER, "phone")
    mark_regex(digits, _CARD_TRIGGER, "card")
    return found
