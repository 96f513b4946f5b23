"""Locators: where a team's labelled data is, as one line of text.

    jsonl:PATH                       a JSON Lines file
    csv:PATH                         a CSV file (encoding and dialect detected)
    hf:ID:SPLIT[:REVISION]           a Hugging Face dataset: a hub id (`PolyAI/banking77`, one `/` at
                                     most) or a local directory (saved with `save_to_disk`, or holding
                                     data files); the directory must start with `/`, `./`, `../` or `~`
                                     (or exist) and must not contain `:`
    pg:DSN_ENV?query=SQL             a PostgreSQL query; DSN_ENV is the NAME of the environment
                                     variable holding the DSN (the DSN itself never appears in a
                                     locator); SQL is URL-encoded or plain (see `_decode_query`)

`parse_locator` checks the form only; `open_source` resolves file paths against the allowed roots and
builds the connector. `str(locator)` is canonical and parses back to an equal locator.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote_plus

from services.common.redact import url_passwords
from services.ingest.sources.base import Source, SourceError

SCHEMES = ("jsonl", "csv", "hf", "pg")
_EXAMPLES = {
    "jsonl": "jsonl:data/train.jsonl",
    "csv": "csv:data/train.csv",
    "hf": "hf:PolyAI/banking77:train (or hf:ID:SPLIT:REVISION, or hf:./local_dir:train)",
    "pg": "pg:TRAINING_DB_DSN?query=SELECT%20text,%20label%20FROM%20tickets (DSN_ENV names an environment variable)",
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_SPLIT = re.compile(r"[A-Za-z0-9_][\w.-]*")
_REVISION = re.compile(r"[\w][\w./-]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class LocatorError(SourceError):
    """A locator that does not parse, names an unknown scheme, or points outside the roots."""


@dataclass(frozen=True)
class Locator:
    scheme: str

    @property
    def location(self) -> str:
        """What the locator points at, for messages and describe(): never a secret."""
        raise NotImplementedError


@dataclass(frozen=True)
class FileLocator(Locator):
    path: str

    def __str__(self) -> str:
        return f"{self.scheme}:{self.path}"

    @property
    def location(self) -> str:
        return self.path


@dataclass(frozen=True)
class HfLocator(Locator):
    dataset: str
    split: str
    revision: str | None = None

    def __str__(self) -> str:
        tail = f":{self.revision}" if self.revision else ""
        return f"hf:{self.dataset}:{self.split}{tail}"

    @property
    def location(self) -> str:
        return str(self)[3:]


@dataclass(frozen=True)
class PgLocator(Locator):
    dsn_env: str
    query: str

    def __str__(self) -> str:
        return f"pg:{self.dsn_env}?query={quote(self.query, safe='')}"

    @property
    def location(self) -> str:
        return self.query


def redact(text: str) -> str:
    """Hide what looks like a password in a URL (`//user:pw@`) or a key=value DSN (`password=pw`)."""
    text = url_passwords(text)
    return re.sub(r"(?i)\b(password|passwd|pwd)=[^\s&;]*", r"\1=***", text)


def _invalid(text: str, scheme: str, problem: str) -> LocatorError:
    return LocatorError("ingest.locator_invalid", f"locator {redact(text)!r}: {problem}; expected e.g. {_EXAMPLES[scheme]}")


def _decode_query(raw: str) -> str:
    """A query containing whitespace is taken as plain SQL; otherwise it is URL-decoded (`%XX`, and `+`
    for a space, as a form would encode it). So `SELECT * FROM t WHERE a LIKE '%x'` and
    `SELECT%20*%20FROM%20t` both work; a plain query with no whitespace and a `+` or `%XX` in it must
    be URL-encoded."""
    if any(c.isspace() for c in raw):
        return raw
    return unquote_plus(raw)


def _looks_like_path(ident: str) -> bool:
    return ident.startswith(("/", "./", "../", "~")) or ident in (".", "..") or os.path.isdir(ident)


def parse_locator(text: str) -> Locator:
    if not isinstance(text, str):
        raise LocatorError("ingest.locator_invalid", f"a locator must be a string, not {type(text).__name__}")
    scheme, sep, rest = text.strip().partition(":")
    if not sep or not scheme:
        raise LocatorError("ingest.locator_invalid",
                           f"locator {redact(text)!r} does not parse: expected SCHEME:..., e.g. "
                           + "; ".join(_EXAMPLES[s] for s in SCHEMES))
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
        raise LocatorError("ingest.locator_invalid",
                           f"locator {redact(text)!r}: scheme {scheme!r} must be lower-case letters, e.g. {_EXAMPLES['jsonl']}")
    if scheme not in SCHEMES:
        raise LocatorError("ingest.locator_unsupported",
                           f"locator {redact(text)!r}: scheme {scheme!r} is not supported (supported: {', '.join(SCHEMES)})")
    if not rest:
        raise _invalid(text, scheme, "nothing after the scheme")
    if scheme in ("jsonl", "csv"):
        if "\x00" in rest:
            raise _invalid(text, scheme, "the path contains a NUL character")
        return FileLocator(scheme, rest)
    if scheme == "hf":
        parts = rest.split(":")
        if len(parts) not in (2, 3):
            raise _invalid(text, scheme, "expected ID:SPLIT or ID:SPLIT:REVISION")
        ident, split = parts[0], parts[1]
        revision = parts[2] if len(parts) == 3 else None
        if not ident:
            raise _invalid(text, scheme, "the dataset id is empty")
        if not _looks_like_path(ident) and not _HUB_ID.fullmatch(ident):
            raise _invalid(text, scheme, f"{ident!r} is neither a hub id (NAME or OWNER/NAME) nor a local directory")
        if not _SPLIT.fullmatch(split):
            raise _invalid(text, scheme, f"split {split!r} is not a split name")
        if revision is not None and not _REVISION.fullmatch(revision):
            raise _invalid(text, scheme, f"revision {revision!r} is not a branch, tag or commit")
        return HfLocator("hf", ident, split, revision)
    # pg
    env, sep, params = rest.partition("?")
    if not _ENV_NAME.fullmatch(env):
        problem = ("the part before '?' must be the NAME of an environment variable holding the DSN, not the DSN itself"
                   if any(c in env for c in "/@=:") else "the part before '?' is not an environment variable name")
        # the text is not echoed: it may be a DSN with a password in it
        raise LocatorError("ingest.locator_invalid", f"pg locator: {problem}; expected e.g. {_EXAMPLES['pg']}")
    if not sep or not params.startswith("query="):
        raise _invalid(text, scheme, "missing '?query=SQL' after the environment variable name")
    query = _decode_query(params[len("query="):]).strip()
    if not query:
        raise _invalid(text, scheme, "the query is empty")
    return PgLocator("pg", env, query)


ROOTS_HINT = ("the roots are TUNELINE_INGEST_ROOTS, a JSON list of directories read when the services start: "
              "move the file into a root, or run `tuneline down`, then "
              "`TUNELINE_INGEST_ROOTS='[\"/path/to/data\"]' tuneline up`")


def _inside_roots(loc: Locator, raw_path: str, roots: Sequence[str | os.PathLike]) -> Path:
    if not roots:
        raise LocatorError("ingest.locator_outside_roots", f"locator {str(loc)!r}: no ingest roots are configured, so no file "
                           f"may be read; {ROOTS_HINT}")
    resolved = _resolve_quietly(loc, Path(raw_path).expanduser())  # follows symlinks, normalises ..
    resolved_roots = _resolved_roots(roots)
    if not _within(resolved, resolved_roots):
        shown = f"{raw_path} (resolves to {resolved})" if str(resolved) != raw_path else raw_path
        raise LocatorError("ingest.locator_outside_roots",
                           f"locator {str(loc)!r}: {shown} is outside the allowed ingest roots: "
                           + ", ".join(str(r) for r in resolved_roots) + f"; {ROOTS_HINT}")
    return resolved


def _resolve_dir(loc: HfLocator, roots: Sequence[str | os.PathLike]) -> Path:
    """A local HF directory, held to the roots like a file, and so is everything the datasets library
    would read through it: every file and link under it (a link to a file or directory outside the
    roots refuses the whole directory; a linked directory inside them is walked too), and the paths
    its own metadata names (a saved dataset's split directories and arrow files, the data_files of a
    README.md / .huggingface.yaml config). Nothing outside the roots is opened."""
    resolved = _inside_roots(loc, loc.dataset, roots)
    if not resolved.is_dir():
        raise LocatorError("ingest.dataset_unavailable", f"locator {str(loc)!r}: {loc.dataset} is not a directory")
    resolved_roots = _resolved_roots(roots)
    _check_tree(loc, resolved, resolved_roots)
    from services.ingest.sources.hf import local_read_paths

    for named in local_read_paths(resolved, loc.revision):  # lazily: each is checked before anything in it is read
        if "://" in named or "::" in named:
            raise _dir_outside(loc, named, None, resolved_roots, what="is a remote path, not a file inside the allowed ingest roots")
        target = _resolve_quietly(loc, Path(named))
        if not _within(target, resolved_roots):
            shown = os.path.relpath(named, resolved) if os.path.isabs(named) else named
            raise _dir_outside(loc, shown, target, resolved_roots)
    return resolved


def _resolved_roots(roots: Sequence[str | os.PathLike]) -> list[Path]:
    return [Path(r).expanduser().resolve() for r in roots]


def _within(path: Path, resolved_roots: Sequence[Path]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in resolved_roots)


def _resolve_quietly(loc: Locator, path: Path) -> Path:
    try:
        return path.resolve(strict=False)
    except (OSError, RuntimeError) as exc:  # symlink loops
        raise LocatorError("ingest.source_not_found", f"locator {str(loc)!r}: cannot resolve {path}: {exc}") from None


def _dir_outside(loc: HfLocator, rel: str, target: Path | None, resolved_roots: Sequence[Path],
                 what: str = "resolves outside the allowed ingest roots") -> LocatorError:
    to = f" (to {target})" if target is not None else ""
    return LocatorError("ingest.locator_outside_roots",
                        f"locator {str(loc)!r}: {rel} in {loc.dataset} {what}{to}; the directory is refused "
                        "(allowed ingest roots: " + ", ".join(str(r) for r in resolved_roots) + ")")


def _check_tree(loc: HfLocator, top: Path, resolved_roots: Sequence[Path]) -> None:
    """Walk `top` (resolved, inside the roots) without following links blindly: a link whose target
    is outside the roots raises; a linked directory inside them is walked as well (each real directory
    once, so link loops end). Only directory entries are listed; no file is opened."""
    pending: list[tuple[Path, str]] = [(top, "")]
    seen = {top}
    while pending:
        real, rel = pending.pop()
        try:
            with os.scandir(real) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            why = exc.strerror or exc
            raise LocatorError("ingest.dataset_unavailable",
                               f"locator {str(loc)!r}: cannot list {rel or '.'} in {loc.dataset}: {why}") from None
        for entry in entries:
            name = f"{rel}/{entry.name}" if rel else entry.name
            if entry.is_symlink():
                target = _resolve_quietly(loc, Path(entry.path))
                if not _within(target, resolved_roots):
                    raise _dir_outside(loc, name, target, resolved_roots)
                if target.is_dir() and target not in seen:
                    seen.add(target)
                    pending.append((target, name))
            elif entry.is_dir(follow_symlinks=False):
                sub = Path(entry.path)
                if sub not in seen:
                    seen.add(sub)
                    pending.append((sub, name))


def _resolve_file(loc: FileLocator, roots: Sequence[str | os.PathLike]) -> Path:
    resolved = _inside_roots(loc, loc.path, roots)
    if not resolved.exists():
        raise LocatorError("ingest.source_not_found", f"locator {str(loc)!r}: {loc.path} does not exist")
    if not resolved.is_file():
        raise LocatorError("ingest.source_not_found", f"locator {str(loc)!r}: {loc.path} is not a file")
    return resolved


def open_source(locator: Locator | str, *, roots: Sequence[str | os.PathLike] = (), env: Any = None, **limits: Any) -> Source:
    """Build the connector for a locator. File paths (relative ones against the working directory)
    are resolved, symlinks followed, and refused unless inside one of `roots`; a local HF directory
    also unless every link under it and every file its metadata names is (see _resolve_dir). `limits` go to the
    connector (e.g. max_row_bytes, encoding for csv, prefetch for pg); `env` to PgSource."""
    loc = parse_locator(locator) if isinstance(locator, str) else locator
    if isinstance(loc, FileLocator):
        path = _resolve_file(loc, roots)
        if loc.scheme == "jsonl":
            from services.ingest.sources.jsonl import JsonlSource

            return JsonlSource(path, **limits)
        from services.ingest.sources.csv import CsvSource

        return CsvSource(path, **limits)
    if isinstance(loc, HfLocator):
        from services.ingest.sources.hf import HfSource

        dataset = loc.dataset
        if _looks_like_path(dataset):  # a local directory is held to the roots like a file
            dataset = str(_resolve_dir(loc, roots))
        return HfSource(dataset, loc.split, revision=loc.revision, **limits)
    if isinstance(loc, PgLocator):
        from services.ingest.sources.pg import PgSource

        return PgSource(loc.dsn_env, loc.query, env=os.environ if env is None else env, **limits)
    raise LocatorError("ingest.locator_unsupported", f"locator {loc!r}: no connector for scheme {loc.scheme!r}")
