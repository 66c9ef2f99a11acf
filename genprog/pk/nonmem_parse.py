"""Parse a NONMEM-style data file into a table of text cells (the *parse* section of
:func:`genprog.pk.read_nonmem`).

What this module decides, and nothing else:

* **encoding**: a byte-order mark (UTF-8, UTF-16, UTF-32) is followed; UTF-16 without a
  mark is recognised by its zero bytes; otherwise UTF-8, then Windows-1252, then Latin-1
  (a file that is not UTF-8 is read with a note). A file with other zero bytes or control
  characters is not text: an error naming the file.
* **separator**: commas, or whitespace when the header has no comma. A header with
  semicolons and no comma is an error that says how to save the file.
* **header**: the first non-blank line whose fields include ``ID``; a leading ``#`` or
  ``@`` on it is dropped. Comment lines before it are skipped.
* **comment rows** (NONMEM's ``IGNORE=#``, ``IGNORE=@`` and ``IGNORE=C``): lines whose first
  non-blank character is ``#`` or ``@``, or whose first field is ``C``, are skipped and
  reported (a first column named ``C``, the comment flag, is dropped too). Blank lines are
  skipped.
* **malformed rows**: a row with more or fewer fields than the header is an error naming
  its line and both counts.

Cells are kept as text (``None`` where missing: empty, ``.``, ``NA``, ``NaN``, ...), so the
validation layer (:mod:`genprog.pk.nonmem_table`) sees exactly what the file says: IDs
keep all their digits and a value is converted once, in the dtype it will be stored in.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["MISSING", "ParsedFile", "decode", "parse_file"]

#: Cell texts read as missing (pandas' defaults plus NONMEM's ".").
MISSING = frozenset({"", ".", "NA", "N/A", "n/a", "NaN", "nan", "NAN", "-NaN", "-nan",
                     "null", "NULL", "None", "<NA>", "#N/A", "#NA", "#N/A N/A",
                     "1.#IND", "-1.#IND", "1.#QNAN", "-1.#QNAN"})

_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))
_ENCODING_NAMES = {"cp1252": "Windows-1252", "latin-1": "Latin-1"}
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass(frozen=True)
class ParsedFile:
    """A data file as text cells.

    Attributes
    ----------
    frame : pandas.DataFrame
        One row per data record, one column per header field; cells are ``str`` or
        ``None`` (missing).
    lines : numpy.ndarray of int
        The 1-based file line of each row.
    notes : list of str
        What was accepted but should be known (encoding, skipped comment rows).
    """

    frame: pd.DataFrame
    lines: np.ndarray
    notes: list = field(default_factory=list)


def parse_file(path: Path) -> ParsedFile:
    """Read ``path`` into a :class:`ParsedFile` (see the module docstring for the rules).

    Raises
    ------
    ValueError
        Naming the file (and the line) when it is not text, has no header, uses ``;``
        separators, or has a row with the wrong number of fields.
    OSError
        When the file cannot be read.
    """
    name = path.name
    raw = path.read_bytes()
    text, encoding = decode(raw, name)
    notes = []
    if encoding in ("cp1252", "latin-1"):
        notes.append(f"the file is not UTF-8: read as {_ENCODING_NAMES[encoding]}")
    records = _records(text, name)
    header_at, header = _header(records, name)
    skipped = [line for line, fields in records[:header_at] if fields]
    rows, lines = [], []
    drop_flag = header and header[0].strip().upper() == "C"
    for line, fields in records[header_at + 1:]:
        if not fields or all(not f.strip() for f in fields):
            continue
        if _is_comment(fields):
            skipped.append(line)
            continue
        if len(fields) != len(header):
            raise ValueError(
                f"{name} line {line}: {len(fields)} field{'s' if len(fields) != 1 else ''} "
                f"but the header has {len(header)} ({', '.join(header)}); every row needs one "
                f"value per column (empty or '.' for missing)")
        rows.append([_cell(f) for f in fields])
        lines.append(line)
    header, rows = _drop_empty_unnamed(header, rows, name)
    frame = pd.DataFrame(rows, columns=header, dtype=object) if rows else \
        pd.DataFrame({h: pd.Series([], dtype=object) for h in header})
    if drop_flag:
        frame = frame.drop(columns=frame.columns[0])
    if skipped:
        notes.append(f"{len(skipped)} comment row{'s' if len(skipped) > 1 else ''} skipped "
                     f"(NONMEM's IGNORE=#/@/C: line{'s' if len(skipped) > 1 else ''} {_lines(skipped)})")
    return ParsedFile(frame, np.asarray(lines, dtype=np.int64), notes)


def decode(raw: bytes, name: str) -> tuple[str, str]:
    """``(text, encoding)`` of a file's bytes: BOM, UTF-16 without BOM, UTF-8, Windows-1252,
    Latin-1; ``ValueError`` naming ``name`` for binary content."""
    for bom, encoding in _BOMS:
        if raw.startswith(bom):
            return _checked(raw.decode(encoding), name, encoding), encoding
    utf16 = _utf16_without_bom(raw)
    if utf16:
        try:
            return _checked(raw.decode(utf16), name, utf16), utf16
        except UnicodeDecodeError:
            pass
    for encoding in ("utf-8", "cp1252", "latin-1"):
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            continue
        return _checked(text, name, encoding), encoding
    raise AssertionError("latin-1 decodes every byte string")  # pragma: no cover


def _utf16_without_bom(raw: bytes) -> str | None:
    """'utf-16-le'/'utf-16-be' when half of the bytes are zeros on one parity."""
    if len(raw) < 4 or b"\x00" not in raw:
        return None
    sample = np.frombuffer(raw[: 4096 - 4096 % 2] if len(raw) >= 2 else raw, dtype=np.uint8)
    sample = sample[: len(sample) - len(sample) % 2]
    even, odd = (sample[0::2] == 0).mean(), (sample[1::2] == 0).mean()
    if odd > 0.9 and even < 0.1:
        return "utf-16-le"
    if even > 0.9 and odd < 0.1:
        return "utf-16-be"
    return None


def _checked(text: str, name: str, encoding: str) -> str:
    found = _CONTROL.search(text)
    if found:
        line = text.count("\n", 0, found.start()) + 1
        raise ValueError(
            f"{name}: not a text file (control character {found.group()!r} on line {line}, "
            f"read as {encoding}); give a CSV file (UTF-8, comma- or whitespace-separated) "
            "- export it again from the program that wrote it")
    return text


def _records(text: str, name: str) -> list:
    """``[(line, fields), ...]``; comma-separated unless the header has no comma."""
    lines = text.splitlines()
    first = _header_line(lines)
    if "," not in first and ";" in first:
        raise ValueError(f"{name} line 1: the separator is ';'; genprog reads comma- or "
                         "whitespace-separated files: save it as CSV with ',' between values "
                         "and '.' as the decimal mark")
    if "," in first:
        reader = csv.reader(io.StringIO(text), skipinitialspace=True)
        out, start = [], 1
        try:
            for fields in reader:
                out.append((start, fields))
                start = reader.line_num + 1
        except csv.Error as e:
            raise ValueError(f"{name} line {reader.line_num}: malformed CSV ({e})") from None
        return out
    return [(i + 1, ln.split()) for i, ln in enumerate(lines)]


def _header_line(lines) -> str:
    """The line that holds the header: the first non-blank one naming an ID column among
    the leading comment lines, else the first non-blank one (it decides the separator)."""
    blank = [ln for ln in lines if ln.strip()]
    for ln in blank:
        if "ID" in (f.strip().lstrip("#@").strip().upper() for f in re.split(r"[,;\s]+", ln)):
            return ln
        if ln.strip()[:1] not in ("#", "@"):
            break
    return blank[0] if blank else ""


def _header(records, name):
    """(position, names): the first non-blank record naming an ID column, else the
    first non-blank record."""
    candidates = [(k, fields) for k, (_, fields) in enumerate(records)
                  if fields and any(f.strip() for f in fields)]
    if not candidates:
        raise ValueError(f"{name}: the file is empty (no header, no data rows)")
    for k, fields in candidates:
        names = _names(fields)
        if "ID" in (n.upper() for n in names):
            return k, names
        if not _is_comment(fields):
            break
    k, fields = candidates[0]
    return k, _names(fields)


def _names(fields):
    names = [f.strip() for f in fields]
    if names and names[0][:1] in ("#", "@"):
        names[0] = names[0][1:].strip()
        if not names[0] and len(names) > 1:   # "# ID TIME ...": the mark stood alone
            names = names[1:]
    return names


def _is_comment(fields) -> bool:
    first = fields[0].strip() if fields else ""
    return first[:1] in ("#", "@") or first in ("C", "c")


def _cell(text: str):
    text = text.strip()
    return None if text in MISSING else text


def _drop_empty_unnamed(header, rows, name):
    """Drop columns with no name and no values (a trailing comma); a nameless column with
    values is an error."""
    keep = []
    for j, h in enumerate(header):
        if h:
            keep.append(j)
            continue
        if any(r[j] is not None for r in rows):
            raise ValueError(f"{name}: column {j + 1} has values but no name in the header; "
                             "name it (or remove it)")
    if len(keep) == len(header):
        return header, rows
    return [header[j] for j in keep], [[r[j] for j in keep] for r in rows]


def _lines(lines, most: int = 8) -> str:
    shown = ", ".join(map(str, lines[:most]))
    return shown + (f", ... ({len(lines) - most} more)" if len(lines) > most else "")
