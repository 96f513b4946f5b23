"""CSV files with a header row.

Encoding: an explicit `encoding=` wins; else a BOM (UTF-8, UTF-16 LE/BE, UTF-32); else UTF-8 when the
first 64 KiB decode as UTF-8; else charset-normalizer's best guess (describe() reports which, and how
it was found). A guessed ASCII-compatible page is only the fallback: each line that is valid UTF-8 is read
as UTF-8, the others in the page, which is guessed from those other lines alone when the sample has UTF-8
lines too (decoding a mostly-UTF-8 file whole in the guess turned its UTF-8 rows into "cafĂ©");
decoding_report() counts both kinds of rows after load(). Without a BOM, NUL bytes in the first 8 KiB mean UTF-16 when they fall on one side of
nearly every 2-byte unit and nothing else is NUL (UTF-16 written without a BOM, as some Windows tools
do), else a binary file (ingest.binary_source).
When that guess is a Latin-script single-byte code page, the detector's pick among them is close to
arbitrary (French latin-1 came out as iso8859-10, cp1257 and mac-latin2, "très" as "trčs"): the guess
and the Windows pages of the main regions (windows-1252 Western, cp1250 Central European, cp1257
Baltic, cp1254 Turkish) are compared by how many of each decoding's letters beyond ASCII are common
letters of its own languages, ties going to windows-1252 (Windows' and Excel's Western page, holding
latin-1's printable characters, as the WHATWG encoding standard defaults such text to) and then to the
guess (see _latin_page). Mac and DOS code pages put their accented letters at 0x80-0x9F, where
windows-1252 has punctuation (English smart quotes came out as cp852); their guess stands only when a
byte there is one windows-1252 reads as a letter (ƒ ˆ Š Œ Ž š œ ž Ÿ: Mac Roman's ü is Ÿ), which
windows-1252 text rarely has. Non-Latin guesses (cp1251, koi8-r, Greek, shift_jis, gb18030, ...) keep
the detector's answer.

Dialect: csv.Sniffer on the first 16 KiB, delimiters `,;\\t|`, checked against the header (the sniffed
delimiter must split the header at least as well as the others), falling back to excel (comma,
double quote). Quotes are always doubled-quote style (`""` inside a quoted field). Quoted fields may
span lines.

Lines end in LF (or CRLF); a lone CR inside a line is part of it. A file whose first line ends in a
lone CR (classic Mac OS, Excel's "CSV (Macintosh)") is read with universal newlines instead: CR, LF
and CRLF each end a line.

Rows and offsets
    The first record is the header (empty names become `column_N`, repeated names get `_2`, `_3`).
    Each later record becomes a dict header -> string. `row_number` is the 1-based physical LINE
    number where the record starts (the header is line 1), `offset` the BYTE offset of that line in
    the file. Offsets are exact for ASCII-compatible encodings (UTF-8, cp1252, latin-1, ...); for
    UTF-16/32 they are computed by re-encoding the decoded lines, exact unless a line has undecodable
    bytes. Blank lines are not rows.

Bad records never raise; they come back with `error`:
    ingest.ragged_row      the record has a different number of fields than the header;
    ingest.encoding_error  bytes of the record do not decode in the file's encoding;
    ingest.row_too_long    the record (or one field) is longer than `max_row_bytes`; over-long lines
                           are read in bounded chunks and replaced, for the csv parser, by a stand-in
                           that keeps the quote state, so memory stays bounded;
    ingest.unparseable_row any other csv parser error, or a record of several lines that the file
                           ends inside a quoted field of.
A quote that runs over line breaks: when a rejected record of several lines ends with its quoted field
still open (the file ended, or the field passed the size limit) the detail says "an unterminated quote
opened on line K swallowed lines K..M", and reading starts again, with a fresh parser, at line K+1, so
the rows the quote swallowed are read as rows (the rejected record keeps its raw text; row numbers and
offsets stay those of the file). When the quoted field did close (a real multi-line field, or a stray
quote closed by another) the detail names the lines it spans and nothing is read twice: the two
cannot be told apart. Not for UTF-16/32 read with a BOM-dependent codec, or undecodable bytes in a
UTF-16/32 record (offsets there are not exact), where the detail alone is given.
Whole-source failures raise SourceError: ingest.source_not_found, ingest.binary_source,
ingest.empty_source (no header, or a header and no records), ingest.encoding_error (undecodable
header, unknown `encoding=`), ingest.row_too_long (a header longer than the limit),
ingest.header_missing (the first row holds what prep's PII scrubber finds, an email or a phone number
say: a data row where column names go, which would travel in events as column names; the message names
the kinds, not the values).
"""

from __future__ import annotations

import codecs
import csv
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.ingest.sources.base import (
    MAX_RAW_KEPT,
    SourceDescription,
    SourceError,
    SourceRecord,
    new_record,
    open_file,
)

DEFAULT_MAX_ROW_BYTES = 1 << 20
BINARY_SNIFF_BYTES = 8192
SAMPLE_BYTES = 64 * 1024
SNIFF_CHARS = 16 * 1024
DELIMITERS = ",;\t|"
_CHUNK = 64 * 1024
_MARK = "tuneline.surrogatemark"
_MARKED = re.compile("[\udc00-\udcff]")
_BOMS = (  # longest first: the UTF-32 LE BOM starts with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"),
)
# Latin-script single-byte code pages charset-normalizer may guess (codecs names). It tells them
# apart poorly: French came out as iso8859-10, cp1257 and mac-latin2. So between its guess and the
# Windows pages of the main Latin-script regions, the decoding whose letters beyond ASCII are the
# common ones of its own languages wins (ties: windows-1252, the most used, then the guess): French read
# as cp1250 has "č" for "è" and "ŕ" for "à"; Czech read as windows-1252 has "ø" for "ř" and no "ě";
# Lithuanian read as cp1250 has "ţ", "đ", "ŕ"; a symbol between two letters ("nepøi¹la") counts against.
_LATIN_GUESSES = frozenset({
    "iso8859-1", "iso8859-2", "iso8859-3", "iso8859-4", "iso8859-9", "iso8859-10", "iso8859-13", "iso8859-14",
    "iso8859-15", "iso8859-16", "cp1250", "cp1254", "cp1257", "cp1258", "hp-roman8",
})
_COMMON_LETTERS = {  # page -> the letters beyond ASCII its languages write most
    "cp1252": "éèêëàâäáãåæçîïíìôöóòõøœùûüúÿñß",            # French, German, Spanish, Portuguese, Italian, Nordic
    "cp1250": "áäčďéěíľĺňóôöőŕřšťúůüűýžąćęłńśźżăâîşţđ",     # Czech, Slovak, Polish, Hungarian, Romanian, Croatian
    "cp1257": "ąčęėįšųūžāēģīķļņōõäöü",                        # Lithuanian, Latvian, Estonian
    "cp1254": "çğıöşüâî",                                     # Turkish
}
_COMMON_LETTERS = {page: frozenset(letters + letters.upper() + ("İ" if page == "cp1254" else ""))
                   for page, letters in _COMMON_LETTERS.items()}
_FAMILY = {"iso8859-1": "cp1252", "iso8859-15": "cp1252", "iso8859-2": "cp1250", "iso8859-16": "cp1250",
           "iso8859-4": "cp1257", "iso8859-13": "cp1257", "iso8859-9": "cp1254"}
_BEYOND_ASCII = re.compile(r"[^\x00-\x7f]")
_BETWEEN_LETTERS = re.compile(r"(?<=[^\W\d_])[^\x00-\x7f](?=[^\W\d_])")


def _common_share(text: str, letters: frozenset[str]) -> float:
    """The share of the text's letters beyond ASCII that are common ones in `letters`, a symbol beyond
    ASCII between two letters counting as a foreign letter ("nepøi¹la": ¹ was one); 1.0 for none."""
    beyond = [c for c in _BEYOND_ASCII.findall(text) if c.isalpha()]
    total = len(beyond) + sum(not c.isalpha() for c in _BETWEEN_LETTERS.findall(text))
    return sum(c in letters for c in beyond) / total if total else 1.0


def _latin_page(sample: bytes, guess: str) -> tuple[str, float | None]:
    """The Latin code page to read `sample` with, given the detector's guess (see _LATIN_GUESSES), and
    its score (None when no candidate decodes the bytes: then the guess)."""
    candidates = ["cp1252", guess] + [p for p in ("cp1250", "cp1257", "cp1254") if p != guess]
    scores = {}
    for page in dict.fromkeys(candidates):
        try:
            text = sample.decode(page)
        except UnicodeDecodeError:
            continue  # bytes this page has no character for: not it
        scores[page] = _common_share(text, _COMMON_LETTERS.get(_FAMILY.get(page, page), frozenset()))
    if not scores:
        return guess, None
    page = max(scores, key=lambda page: (scores[page], page == "cp1252", page == guess))
    return page, scores[page]


# ... and Mac and DOS ones, with accented letters at 0x80-0x9F
_MAC_DOS_LATIN = frozenset({
    "cp437", "cp775", "cp850", "cp852", "cp857", "cp858", "cp860", "cp861", "cp863", "cp865",
    "mac-roman", "mac-latin2", "mac-iceland", "mac-turkish",
})
# the bytes at 0x80-0x9F that windows-1252 reads as letters (ƒ ˆ Š Œ Ž š œ ž Ÿ), not as punctuation
_CP1252_LETTERS_80_9F = re.compile(rb"[\x83\x88\x8a\x8c\x8e\x9a\x9c\x9e\x9f]")
_FIRST_LINE_END = re.compile("\r(?!\n)|\n")


_LINE_END = re.compile(rb"[\r\n]")  # LF, CRLF, or the lone CR of a Mac file


def wide_encoding(head: bytes) -> str | None:
    """The UTF-16 or UTF-32 encoding a file starting with `head` is in, by its byte-order mark or, for
    UTF-16 without one, its NUL pattern (:func:`_utf16_without_bom`); None for anything else."""
    for bom, name in _BOMS:
        if head.startswith(bom):
            return None if name == "utf-8" else name
    return _utf16_without_bom(head) if b"\x00" in head else None


def _utf16_without_bom(head: bytes) -> str | None:
    """"utf-16-le" or "utf-16-be" when `head` reads as UTF-16 text with no byte-order mark (Windows
    tools write it so): NUL as the high byte of most code units on one side, as Latin text has, few
    on the other (U+0100, U+2500, an emoji's low surrogate DE00 have one there), and the
    whole decoding cleanly (a character cut at the end of `head` is not an error); else None."""
    n = len(head) // 2 * 2
    if n < 16:
        return None
    units = n // 2
    even, odd = head[0:n:2].count(0), head[1:n:2].count(0)
    for encoding, zeros, other in (("utf-16-le", odd, even), ("utf-16-be", even, odd)):
        if zeros >= 0.8 * units and other <= 0.1 * units:
            try:
                codecs.getincrementaldecoder(encoding)().decode(head[:n], final=False)
            except UnicodeDecodeError:
                return None
            return encoding
    return None


def _legacy_lines(sample: bytes, complete: bool) -> tuple[bytes, int]:
    """The lines of `sample` that are ASCII or not valid UTF-8, joined, and how many of its lines are
    UTF-8 beyond ASCII (a last line the sample cut is left out: the cut may split a character)."""
    lines = sample.splitlines(keepends=True)
    if not complete and lines:
        lines.pop()
    legacy, utf8 = [], 0
    for line in lines:
        if line.isascii():
            legacy.append(line)  # context for the detector, no bias
            continue
        try:
            line.decode("utf-8")
            utf8 += 1
        except UnicodeDecodeError:
            legacy.append(line)
    return b"".join(legacy), utf8


def _decode_utf8_first(data: bytes, fallback: str) -> str:
    """Each line as UTF-8 when it is valid UTF-8, else in the fallback page (undecodable bytes marked)."""
    out = []
    for line in data.splitlines(keepends=True):
        try:
            out.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(line.decode(fallback, _MARK))
    return "".join(out)


def _mark_undecodable(exc: UnicodeError):
    """Codec error handler: each undecodable byte becomes U+DC00+byte, a lone surrogate that no valid
    decoding produces, so a record's text tells whether it had undecodable bytes."""
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    return "".join(chr(0xDC00 + b) for b in exc.object[exc.start:exc.end]), exc.end


codecs.register_error(_MARK, _mark_undecodable)


@dataclass(frozen=True)
class _Layout:
    encoding: str          # codec for the bytes after the BOM
    encoding_source: str   # "override", "bom", "utf-8", "detected"
    bom_bytes: int
    ascii_compatible: bool
    universal_newlines: bool  # the first line ends in a lone CR: CR, LF and CRLF all end lines
    dialect: type[csv.Dialect]
    header: list[str]
    size: int
    sample_records: int
    sample_bytes: int
    detection: dict[str, Any]
    # a detected single-byte (or other ASCII-compatible) page is the fallback: each line is read as
    # UTF-8 when it is valid UTF-8, so the UTF-8 rows of a file with a few legacy rows stay intact
    utf8_first: bool = False


def _ascii_compatible(encoding: str) -> bool:
    try:
        return all(c.encode(encoding) == c.encode("ascii") for c in "\n\r,;\t|\"'az09 ")
    except (UnicodeError, LookupError):
        return False


def _dialect(delimiter: str, quotechar: str = '"', skipinitialspace: bool = False) -> type[csv.Dialect]:
    class Detected(csv.Dialect):
        pass

    Detected.delimiter = delimiter
    Detected.quotechar = quotechar
    Detected.doublequote = True
    Detected.escapechar = None
    Detected.skipinitialspace = skipinitialspace
    Detected.lineterminator = "\r\n"
    Detected.quoting = csv.QUOTE_MINIMAL
    Detected.strict = False
    return Detected


def _first_record(text: str, dialect) -> list[str]:
    try:
        return next(csv.reader(io.StringIO(text, newline=""), dialect), [])
    except csv.Error:
        return []


def _sniff(text: str) -> tuple[type[csv.Dialect], str]:
    sample = text[:SNIFF_CHARS]
    cut = sample.rfind("\n")
    if cut > 0 and len(text) > len(sample):
        sample = sample[: cut + 1]
    widths = {d: len(_first_record(text[:SNIFF_CHARS * 4], _dialect(d))) for d in DELIMITERS}
    widest = max(DELIMITERS, key=lambda d: (widths[d], d == ","))
    try:
        sniffed = csv.Sniffer().sniff(sample, delimiters=DELIMITERS)
    except csv.Error:
        return _dialect(widest), "widest header" if widths[widest] > 1 else "excel (default)"
    delimiter = sniffed.delimiter if sniffed.delimiter in DELIMITERS else ","
    quotechar = sniffed.quotechar if sniffed.quotechar in "\"'" else '"'
    if quotechar == "'" and '"' in sample:
        quotechar = '"'
    if widths[delimiter] < widths[widest]:
        return _dialect(widest), "widest header (sniffed delimiter rejected)"
    return _dialect(delimiter, quotechar, bool(sniffed.skipinitialspace)), "sniffed"


def _refuse_data_as_header(path, header: list[str]) -> None:
    """A file without a header row: its first record would become the column names, which go into events
    (the source description, introspection's proposal, the mapping) that the audit log keeps for good,
    and the record itself would not be counted as a row. Told by what a header never holds: an email
    address, a phone number, an IP address, a card number or a secret (prep's PII scrubber)."""
    from services.prep.pii import Scrubber

    kinds = sorted({kind for hit in Scrubber().scrub_changed(header).values() for kind in hit.counts})
    if kinds:
        raise SourceError("ingest.header_missing",
                          f"{path}: its first row holds {', '.join(kinds)} value(s) where column names go, so it is a "
                          f"data row: a CSV source needs a header row naming its columns (add one); values not shown")


def _unique_header(names: list[str]) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for i, name in enumerate(names, start=1):
        name = name.strip() or f"column_{i}"
        base, n = name, 1
        while name in seen:
            n += 1
            name = f"{base}_{n}"
        seen.add(name)
        out.append(name)
    return out


class _Record:
    """What the line feeder knows about the record the csv parser is reading."""

    __slots__ = ("lines", "start", "nbytes", "bad_at", "too_long", "raw", "raw_len", "open_line", "prev_open",
                 "resume_at", "closed", "utf8", "fallback")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.lines = 0
        self.start = 0
        self.nbytes = 0
        self.bad_at: int | None = None
        self.too_long = False
        self.raw: list[str] = []
        self.raw_len = 0
        self.utf8 = False      # a line of it was UTF-8 beyond ASCII (utf8_first layouts)
        self.fallback = False  # a line of it was not UTF-8 and was read in the fallback page
        # A record goes on to another line only while a quoted field is open. A continuation line
        # with an odd run of quotes closes that field (an even run is escaped quotes); if the record
        # still goes on, the odd run opened the next one. So: the line (index in the record) where
        # the quoted field open at the end opened, the byte offset just after that line, the one
        # before it, and whether the last line closed the field (False: still open when it ended).
        self.open_line = 0
        self.prev_open = 0
        self.resume_at = 0
        self.closed = False


class CsvSource:
    format = "csv"

    def __init__(self, path: str | os.PathLike, *, encoding: str | None = None,
                 max_row_bytes: int = DEFAULT_MAX_ROW_BYTES, **_ignored):
        if max_row_bytes < 1:
            raise ValueError("max_row_bytes must be positive")
        self.path = Path(path)
        self.encoding = encoding
        self.max_row_bytes = max_row_bytes
        self._layout: _Layout | None = None
        self._utf8_rows = 0
        self._fallback_rows = 0
        self._fallback_lines: list[int] = []

    # -- detection ---------------------------------------------------------------------------

    def _open(self):
        return open_file(self.path, "CSV", _CHUNK * 4)

    def _detect(self) -> _Layout:
        if self._layout is not None:
            return self._layout
        with self._open() as f:
            sample = f.read(SAMPLE_BYTES)
            size = os.fstat(f.fileno()).st_size
            if not _LINE_END.search(sample) and len(sample) < size:
                # a header longer than the sample (thousands of columns): read on to its end, up to the
                # row limit (load() refuses a longer one), and a sample of rows after it; cut short,
                # the header would have lost columns and every record would be a ragged row
                more = bytearray(sample)
                while not _LINE_END.search(more, max(0, len(more) - SAMPLE_BYTES - 1)) and len(more) <= self.max_row_bytes:
                    chunk = f.read(SAMPLE_BYTES)
                    if not chunk:
                        break
                    more += chunk
                sample = bytes(more + f.read(SAMPLE_BYTES))
        complete = size <= len(sample)
        if not sample.strip():
            raise SourceError("ingest.empty_source", f"{self.path} is empty: a CSV source needs a header row and records")
        detection: dict[str, Any] = {}
        bom_enc, bom_len = None, 0
        for bom, name in _BOMS:
            if sample.startswith(bom):
                bom_enc, bom_len = name, len(bom)
                break
        if self.encoding:
            try:
                encoding = codecs.lookup(self.encoding).name
            except LookupError:
                raise SourceError("ingest.encoding_error", f"{self.path}: unknown encoding {self.encoding!r}") from None
            if bom_enc and codecs.lookup(bom_enc).name.replace("-sig", "") != encoding.replace("_sig", "").replace("-sig", ""):
                bom_len = 0  # the override decides; the bytes are not taken as a BOM
            if encoding in ("utf-8-sig", "utf_8_sig"):
                encoding = "utf-8"
            source = "override"
        elif bom_enc:
            encoding, source = bom_enc, "bom"
        elif b"\x00" in sample[:BINARY_SNIFF_BYTES]:
            encoding = _utf16_without_bom(sample[:BINARY_SNIFF_BYTES])
            if encoding is None:
                raise SourceError("ingest.binary_source",
                                  f"{self.path} is a binary file (NUL bytes in its first {BINARY_SNIFF_BYTES} bytes, and not "
                                  "UTF-16 text without a byte-order mark), not CSV text")
            source = "utf-16-pattern"
        else:
            try:
                codecs.getincrementaldecoder("utf-8")().decode(sample, final=complete)
                encoding, source = "utf-8", "utf-8"
            except UnicodeDecodeError:
                legacy, utf8_lines = _legacy_lines(sample, complete)
                # with UTF-8 rows beside them, the page is guessed from the other rows alone: UTF-8
                # read as a single-byte page looks like Central European text ("cafĂ©")
                encoding, proposed = self._guess(legacy if utf8_lines else sample)
                source = "detected"
                detection["guessed_from_bytes"] = len(legacy) if utf8_lines else len(sample)
                if proposed != encoding:
                    detection["detector_proposed"] = proposed
        body = sample[bom_len:]
        if not complete:
            cut = body.rfind(b"\n")
            body = body[: cut + 1] if cut > 0 else body
        utf8_first = source == "detected" and _ascii_compatible(encoding)
        if utf8_first:
            detection["lines_read_utf8_first"] = True
        text = _decode_utf8_first(body, encoding) if utf8_first else body.decode(encoding, _MARK)
        first_end = _FIRST_LINE_END.search(text)
        dialect, how = _sniff(text)
        detection["dialect_source"] = how
        reader = csv.reader(io.StringIO(text, newline=""), dialect)
        header: list[str] = []
        records = 0
        try:
            for row in reader:
                if not row:
                    continue
                if not header:
                    header = row
                else:
                    records += 1
        except csv.Error:
            pass
        if not header:
            raise SourceError("ingest.empty_source", f"{self.path} has no header row")
        if _MARKED.search("".join(header)):
            raise SourceError("ingest.encoding_error", f"{self.path}: the header row does not decode as {encoding}")
        _refuse_data_as_header(self.path, header)
        self._layout = _Layout(encoding, source, bom_len, _ascii_compatible(encoding),
                               first_end is not None and first_end.group() == "\r", dialect, _unique_header(header),
                               size, records, len(body), detection, utf8_first)
        return self._layout

    def _guess(self, sample: bytes) -> tuple[str, str]:
        """(the encoding to read with, charset-normalizer's own guess, "none" when it had none): see
        the module docstring for Latin-script guesses."""
        from charset_normalizer import from_bytes

        best = from_bytes(sample).best()
        if best is None:
            # It gives up on some long single-language samples (64 KiB of Turkish cp1254); text in a Latin
            # page still shows by its letters, where random bytes would not.
            page, score = _latin_page(sample, "cp1252")
            if score is None:
                score = _common_share(sample.decode(page, "replace"), _COMMON_LETTERS[page])
            if score >= 0.9 or _plain_text_bytes(sample):
                return page, "none"
            raise SourceError("ingest.binary_source",
                              f"{self.path} is not text in any encoding charset-normalizer knows (not UTF-8, no BOM): not CSV")
        proposed = codecs.lookup(best.encoding).name
        if not _ascii_compatible(proposed):
            # a CSV in UTF-16/32 has NUL bytes (its commas and newlines have them), and this sample has
            # none: the detector's guess on a few short lines, not the file's encoding
            return _latin_page(sample, "cp1252")[0], proposed
        if proposed in _LATIN_GUESSES:
            return _latin_page(sample, proposed)[0], proposed
        if (proposed in _MAC_DOS_LATIN and not _CP1252_LETTERS_80_9F.search(sample)
                and from_bytes(sample, cp_isolation=["cp1252"]).best() is not None):
            return "cp1252", proposed
        return proposed, proposed

    def describe(self) -> SourceDescription:
        """Reads the first 64 KiB: encoding, dialect, header, a row estimate."""
        lay = self._detect()
        d = lay.dialect
        if lay.size <= lay.sample_bytes + lay.bom_bytes:
            estimate = lay.sample_records
        else:
            estimate = round(lay.sample_records * (lay.size - lay.bom_bytes) / max(lay.sample_bytes, 1))
        shown = "utf-8-sig" if lay.encoding == "utf-8" and lay.bom_bytes else lay.encoding
        return SourceDescription(
            scheme="csv", location=str(self.path), format="csv", size_bytes=lay.size, encoding=shown,
            dialect={"delimiter": d.delimiter, "quotechar": d.quotechar, "doublequote": True,
                     "skipinitialspace": d.skipinitialspace, "header": True},
            columns=list(lay.header), row_estimate=estimate,
            details={"encoding_source": lay.encoding_source, "bom": lay.bom_bytes > 0,
                     "max_row_bytes": self.max_row_bytes, **lay.detection},
        )

    def decoding_report(self) -> dict[str, Any]:
        """After load(), for a file read UTF-8 first (see _Layout.utf8_first): how many accepted rows
        were UTF-8 beyond ASCII and how many were read in the fallback page (the first line numbers of
        those); with both, the file mixes encodings and `warning` names ingest.mixed_encoding."""
        lay = self._detect()
        if not lay.utf8_first:
            return {}
        report: dict[str, Any] = {"encoding_fallback": lay.encoding, "rows_decoded_as_utf8": self._utf8_rows,
                                  "rows_decoded_with_fallback": self._fallback_rows}
        if self._fallback_lines:
            report["fallback_lines"] = list(self._fallback_lines)
        if self._utf8_rows and self._fallback_rows:
            report["warning"] = "ingest.mixed_encoding"
        return report

    # -- reading -------------------------------------------------------------------------------

    def load(self) -> Iterator[SourceRecord]:
        """The records in file order. After a record rejected because a quote opened on line K never
        closed (see _runaway), the file is read again from line K+1 with a fresh parser."""
        lay = self._detect()
        self._utf8_rows, self._fallback_rows, self._fallback_lines = 0, 0, []
        if csv.field_size_limit() < self.max_row_bytes:
            csv.field_size_limit(self.max_row_bytes)  # process-wide; only ever raised
        at: tuple[int, int] | None = (lay.bom_bytes, 1)  # (byte offset, line number) to read from
        seen_header = False
        rows = [0]
        while at is not None:
            with self._open() as f:
                f.seek(at[0])
                rec = _Record()
                reader = csv.reader(self._lines(f, lay, rec, at[0]), lay.dialect)
                at = yield from self._records(reader, rec, lay, at[1], seen_header, rows)
            seen_header = True
        if rows[0] == 0:
            raise SourceError("ingest.empty_source", f"{self.path} has a header row but no records")

    def _lines(self, f, lay: _Layout, rec: _Record, offset: int) -> Iterator[str]:
        """Feed the csv parser one decoded line at a time (never more than max_row_bytes of one line),
        from byte `offset`, noting the record's start offset, size, undecodable bytes, raw text and
        where its open quote opened in `rec`."""
        limit = self.max_row_bytes + 2
        enc = lay.encoding
        q = lay.dialect.quotechar
        eq = re.escape(q)
        odd_run = re.compile(f"(?<!{eq})(?:{eq}{eq})*{eq}(?!{eq})").search
        if lay.ascii_compatible:
            if lay.universal_newlines:
                # binary readline ends lines at LF only; latin-1 maps bytes to characters one to one,
                # so this reads the same bytes split at CR, LF or CRLF
                read_text = io.TextIOWrapper(f, encoding="latin-1", newline="").readline

                def readline(size):
                    return read_text(size).encode("latin-1")

                line_ends = b"\r\n"
            else:
                readline = f.readline
                line_ends = b"\n"

            utf8_first = lay.utf8_first

            def next_line():  # -> (text, bytes, undecodable, cut at the limit)
                line = readline(limit)
                if not line:
                    return None, 0, False, False
                full = len(line) == limit and line[-1] not in line_ends
                if utf8_first:
                    try:
                        text = line.decode("utf-8")
                        if not line.isascii():
                            rec.utf8 = True
                        return text, len(line), False, full
                    except UnicodeDecodeError:
                        rec.fallback = True
                try:
                    return line.decode(enc), len(line), False, full
                except UnicodeDecodeError:
                    return line.decode(enc, _MARK), len(line), True, full
        else:
            text_stream = io.TextIOWrapper(f, encoding=enc, errors=_MARK, newline="")
            char_limit = self.max_row_bytes // 2 + 2
            readline = text_stream.readline

            def next_line():
                line = readline(char_limit)
                if not line:
                    return None, 0, False, False
                full = len(line) == char_limit and not line.endswith("\n")
                return line, len(line.encode(enc, "surrogatepass")), _MARKED.search(line) is not None, full

        while True:
            line, nbytes, bad, full = next_line()
            if line is None:
                return
            if rec.lines == 0:
                rec.start = offset
            cont = rec.lines > 0  # the parser asked for this line: a quoted field is open
            odd = cont and q in line and odd_run(line) is not None
            rec.lines += 1
            offset += nbytes
            if bad and rec.bad_at is None:
                rec.bad_at = offset - nbytes
            over = rec.too_long or rec.nbytes + nbytes > self.max_row_bytes
            rec.nbytes += nbytes
            if rec.raw_len < MAX_RAW_KEPT:
                rec.raw.append(line[: MAX_RAW_KEPT - rec.raw_len])
                rec.raw_len += len(rec.raw[-1])
            if full:
                # an over-long physical line: skip the rest, counting quotes to keep the quote state
                quotes = line.count(q)
                while True:
                    more, n, _, full = next_line()
                    if more is None:
                        break
                    offset += n
                    rec.nbytes += n
                    quotes += more.count(q)
                    if cont and not odd and q in more and odd_run(more) is not None:
                        odd = True
                    if not full:
                        break
                over = True
                line = q * (quotes % 2) + "\n"
            elif over:
                line = q * (line.count(q) % 2) + "\n"
            rec.too_long = over
            if not cont:
                rec.open_line, rec.resume_at, rec.closed = 0, offset, False
            elif odd:
                rec.prev_open, rec.open_line, rec.resume_at, rec.closed = rec.open_line, rec.lines - 1, offset, True
            else:
                rec.closed = False
            yield line

    def _records(self, reader, rec: _Record, lay: _Layout, line_number: int, seen_header: bool,
                 rows: list[int]) -> Iterator[SourceRecord]:
        """Yields the records; returns where to read on from, (byte offset, line number), after a
        record rejected with a quote still open at its end (None at the end of the file).
        `line_number` is the line the reader starts at, `rows[0]` counts the records."""
        header = lay.header
        width = len(header)
        enc = lay.encoding
        limit = self.max_row_bytes
        record = new_record
        resumable = lay.ascii_compatible or codecs.lookup(enc).name not in ("utf-16", "utf-32")
        while True:
            error = None
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                row = None
                if "field larger than field limit" in str(exc):
                    rec.too_long = True
                else:
                    error = ("ingest.unparseable_row", f"line {line_number}: {exc}")
            lines, start, nbytes = rec.lines, rec.start, rec.nbytes
            raw = "".join(rec.raw)
            bad_at, too_long = rec.bad_at, rec.too_long
            open_line, prev_open, resume_at, closed = rec.open_line, rec.prev_open, rec.resume_at, rec.closed
            utf8, fallback = rec.utf8, rec.fallback
            rec.reset()
            number = line_number
            line_number += lines
            if row is not None and not row and not too_long and bad_at is None:
                continue  # a blank line is not a row
            if not seen_header:
                seen_header = True  # the header was read and checked by _detect()
                if too_long:
                    raise SourceError("ingest.row_too_long",
                                      f"{self.path}: the header row is longer than the limit of {limit} bytes")
                continue
            rows[0] += 1
            if bad_at is not None:
                raw = _MARKED.sub("\ufffd", raw)
            raw = raw.rstrip("\r\n")
            if too_long:
                error = ("ingest.row_too_long", f"line {number}: the record is {nbytes} bytes, longer than the limit of {limit} bytes")
            elif bad_at is not None:
                error = ("ingest.encoding_error", f"line {number}: bytes at offset {bad_at} do not decode as {enc}")
            elif error is None and len(row) != width:
                error = ("ingest.ragged_row", f"line {number}: {len(row)} field(s), the header has {width}")
            elif error is None and lines > 1 and not closed:
                error = ("ingest.unparseable_row", f"line {number}: the file ends inside a quoted field")
            resume_line = None
            if lines > 1 and error is not None and error[0] != "ingest.encoding_error":
                error = (error[0], error[1] + self._runaway(number, lines, open_line, prev_open, closed))
                if not closed and resumable and (lay.ascii_compatible or bad_at is None):
                    resume_line = number + open_line + 1
                    error = (error[0], f"{error[1]}; reading resumes at line {resume_line}")
            if error is not None:
                yield record(number, start, raw, None, error)
            else:
                if fallback:
                    self._fallback_rows += 1
                    if len(self._fallback_lines) < 20:
                        self._fallback_lines.append(number)
                elif utf8:
                    self._utf8_rows += 1
                yield record(number, start, raw, dict(zip(header, row)), None)
            if resume_line is not None:
                return resume_at, resume_line
        return None

    @staticmethod
    def _runaway(number: int, lines: int, open_line: int, prev_open: int, closed: bool) -> str:
        """What a rejected record spanning lines number..number+lines-1 says about its quoted field.
        A field still open when the record ended (at the end of the file, or cut at the field size
        limit) is an unterminated quote: each line after the one it opened on was read into it. One
        that closed may be a legitimate multi-line field or a stray quote closed by another: named,
        and the lines are not read again."""
        last = number + lines - 1
        if not closed:
            opened = number + open_line
            return f"; an unterminated quote opened on line {opened} swallowed lines {opened}..{last}"
        opened = number + prev_open
        return (f"; a quoted field opened on line {opened} runs to line {last} (if that quote is a stray one, "
                f"lines {opened + 1}..{last} are inside it)")


def _plain_text_bytes(sample: bytes) -> bool:
    """Too few letters beyond ASCII for a guess by letters, yet plainly text: no control bytes but tab and
    line ends, and at most one byte in four beyond ASCII (random or binary bytes hold about one control
    byte in eight and half beyond ASCII). A few short rows of names in a legacy page look like this."""
    if not sample:
        return False
    controls = sum(1 for b in sample if (b < 0x20 and b not in (9, 10, 13)) or b == 0x7F)
    high = sum(1 for b in sample if b >= 0x80)
    return controls == 0 and high * 4 <= len(sample)
