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
import itertools
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
#: A line that is a comment (first field starts with # or @, or is C) or has no value.
_SPECIAL_LINE = re.compile(r"^[ \t]*(?:[#@]|[Cc][ \t]*(?:,|$)|,*[ \t]*$)", re.MULTILINE)
_PADDED = re.compile(r"[ \t](?:,|$)", re.MULTILINE)
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
    numbers : dict
        Column name -> float64 values (NaN missing) for the columns whose every entry is
        a number (pandas' C parser; the text in ``frame`` stays for messages and IDs).
    """

    frame: pd.DataFrame
    lines: np.ndarray
    notes: list = field(default_factory=list)
    numbers: dict = field(default_factory=dict)


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
    text, encoding = decode(path.read_bytes(), name)
    notes = []
    if encoding in ("cp1252", "latin-1"):
        notes.append(f"the file is not UTF-8: read as {_ENCODING_NAMES[encoding]}")
    lines = text.splitlines()
    at = _header_at(lines, name)
    comma = "," in lines[at]
    if comma and '"' in text:      # quoted fields: the csv module, record by record
        header, rows, numbers, skipped = _quoted_rows(text, at, name)
        frame, parsed = _frame(header, rows, name), {}
    else:                          # the common case: one record per line, pandas' C parser
        header, kept, numbers, skipped = _plain_lines(lines, at, comma, name)
        frame, parsed = _read_plain(header, kept, comma, name)
    if header and header[0].upper() == "C":    # NONMEM's comment-flag column
        parsed.pop(frame.columns[0], None)
        frame = frame.drop(columns=frame.columns[0])
    if skipped:
        notes.append(f"{len(skipped)} comment row{'s' if len(skipped) > 1 else ''} skipped "
                     f"(NONMEM's IGNORE=#/@/C: line{'s' if len(skipped) > 1 else ''} "
                     f"{_lines(skipped)})")
    return ParsedFile(frame, np.asarray(numbers, dtype=np.int64), notes, parsed)


def _header_at(lines, name) -> int:
    """Index of the header line: the first non-blank one naming an ID column among the
    leading comment lines, else the first non-blank one."""
    filled = (k for k, ln in enumerate(lines) if ln.strip())
    first = next(filled, None)
    if first is None:
        raise ValueError(f"{name}: the file is empty (no header, no data rows)")
    for k in (first, *itertools.islice(filled, 1000)):
        fields = re.split(r"[,;\s]+", lines[k].strip())
        if "ID" in (f.strip().lstrip("#@").strip().upper() for f in fields):
            return _check_separator(lines, k, name)
        if lines[k].strip()[:1] not in ("#", "@"):
            break
    return _check_separator(lines, first, name)


def _check_separator(lines, at, name) -> int:
    if "," not in lines[at] and ";" in lines[at]:
        raise ValueError(f"{name} line {at + 1}: the separator is ';'; genprog reads comma- or "
                         "whitespace-separated files: save it as CSV with ',' between values "
                         "and '.' as the decimal mark")
    return at


def _plain_lines(lines, at, comma, name):
    """(header, kept lines, their line numbers, skipped comment line numbers)."""
    header = _names(lines[at].split(",") if comma else lines[at].split())
    skipped = [k + 1 for k in range(at) if lines[k].strip()]
    width = len(header)
    body = lines[at + 1:]
    if comma and all(ln.count(",") == width - 1 for ln in body) and \
            not _SPECIAL_LINE.search("\n".join(body)):      # the common case, at C speed
        return header, body, list(range(at + 2, len(lines) + 1)), skipped
    kept, numbers = [], []
    for k in range(at + 1, len(lines)):
        ln = lines[k]
        first = (ln.split(",", 1)[0] if comma else ln.split(None, 1)[0] if ln.strip() else "")
        first = first.strip()
        if not first and not (ln.replace(",", "").strip() if comma else ln.strip()):
            continue                                    # blank, or nothing but commas
        if first[:1] in ("#", "@") or first in ("C", "c"):
            skipped.append(k + 1)
            continue
        n_fields = ln.count(",") + 1 if comma else len(ln.split())
        if n_fields != width:
            raise _field_count_error(name, k + 1, n_fields, header, width)
        kept.append(ln)
        numbers.append(k + 1)
    return header, kept, numbers, skipped


def _read_plain(header, kept, comma, name):
    """(text cells, {column: float64 values} for the all-number columns)."""
    if not kept:
        return _frame(header, [], name), {}
    names = list(range(len(header)))
    body = "\n".join(kept)
    options = {"sep": "," if comma else r"\s+", "header": None, "names": names,
                   "skipinitialspace": True, "quoting": csv.QUOTE_NONE, "engine": "c"}
    frame = pd.read_csv(io.StringIO(body), dtype=str, keep_default_na=False, na_filter=False,
                        skip_blank_lines=False, **options)
    numeric = pd.read_csv(io.StringIO(body), keep_default_na=False, na_values=sorted(MISSING),
                          **options)
    padded = comma and _PADDED.search(body) is not None
    columns = {}
    for j, h in enumerate(header):
        col = frame[j].str.strip() if padded else frame[j]      # (strip: slow, rarely needed)
        col = col.where(~col.isin(MISSING), None)
        if not h:
            if col.notna().any():
                raise ValueError(f"{name}: column {j + 1} has values but no name in the "
                                 "header; name it (or remove it)")
            continue
        columns[j] = col
    out = pd.DataFrame(columns)
    out.columns = [header[j] for j in columns]
    numbers = {header[j]: numeric[j].to_numpy(dtype=np.float64) for j in columns
               if pd.api.types.is_float_dtype(numeric[j])
               or pd.api.types.is_integer_dtype(numeric[j])}
    return out, numbers


def _quoted_rows(text, at, name):
    """(header, rows of cells, line numbers, skipped comment lines) by the csv module."""
    reader = csv.reader(io.StringIO(text), skipinitialspace=True)
    records, start = [], 1
    try:
        for fields in reader:
            records.append((start, fields))
            start = reader.line_num + 1
    except csv.Error as e:
        raise ValueError(f"{name} line {reader.line_num}: malformed CSV ({e})") from None
    k = next(i for i, (line, _) in enumerate(records) if line == at + 1)
    header = _names(records[k][1])
    skipped = [line for line, fields in records[:k] if fields]
    rows, numbers = [], []
    width = len(header)
    for line, fields in records[k + 1:]:
        if not fields or all(not f.strip() for f in fields):
            continue
        if _is_comment(fields):
            skipped.append(line)
            continue
        if len(fields) != width:
            raise _field_count_error(name, line, len(fields), header, width)
        rows.append([_cell(f) for f in fields])
        numbers.append(line)
    header, rows = _drop_empty_unnamed(header, rows, name)
    return header, rows, numbers, skipped


def _field_count_error(name, line, n_fields, header, width):
    return ValueError(
        f"{name} line {line}: {n_fields} field{'s' if n_fields != 1 else ''} but the header "
        f"has {width} ({', '.join(h or '(no name)' for h in header)}); every row needs one "
        "value per column (empty or '.' for missing)")


def _frame(header, rows, name) -> pd.DataFrame:
    header = [h for h in header if h] if not rows else header
    if rows:
        return pd.DataFrame(rows, columns=header, dtype=object)
    return pd.DataFrame({h: pd.Series([], dtype=object) for h in header})


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
