"""The validation layer of :func:`genprog.pk.read_nonmem`: every column is converted and
checked once, in the dtype it will be stored in, and every error names the source, the
row, the column and what would be valid.

A :class:`Table` wraps the rows being read (a parsed file or a user's DataFrame). Its
:meth:`Table.number` is the one way a NONMEM data item becomes numbers:

* text that is not a number is an error (``'abc' is not a number``);
* ``inf`` is an error (``LIMIT`` may be infinite: no limit);
* a value that the storage dtype cannot hold is an error: beyond its range (``1e300``
  becomes ``inf`` in float32) or a non-zero value that becomes 0;
* integer items (``CMT``, ``ADDL``) must be whole numbers within the int32 range;
* the values are returned as the storage dtype will hold them, so every later check
  (time order, limits, durations) sees the stored numbers.

Subject IDs (:func:`subject_ids`) keep every digit: an ID beyond 2^53 (where floating point
loses integers) and two spellings of one number (``1`` and ``1.0``) are errors.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

__all__ = ["COLUMN_KINDS", "Table", "subject_ids"]

#: How each NONMEM data item is stored: ``"float"`` (torch's default float dtype),
#: ``"float_or_inf"`` (the same, ``inf`` allowed), ``"integer"`` (int64, whole numbers),
#: ``"code"`` (a number compared against its allowed codes). Covariates are ``"float"``.
COLUMN_KINDS = {
    "TIME": "float", "DV": "float", "AMT": "float", "RATE": "float", "DUR": "float",
    "DURATION": "float", "II": "float", "LLOQ": "float", "LIMIT": "float_or_inf",
    "CMT": "integer", "ADDL": "integer",
    "EVID": "code", "MDV": "code", "SS": "code", "CENS": "code", "BLQ": "code",
}
_INTEGER_WORDS = {"CMT": "a positive integer", "ADDL": "a whole number"}
_INT_MAX = 2 ** 31 - 1
_EXACT_INT = 2 ** 53


class Table:
    """The rows being read, their columns by NONMEM name, and how to name a row.

    Parameters
    ----------
    frame : pandas.DataFrame
        The rows (text cells from a file, or a user's DataFrame).
    name : str
        The source in messages: the file name, or ``"DataFrame"``.
    lines : numpy.ndarray of int, optional
        1-based file line of each row (files only).
    dtype : torch.dtype, optional
        The float dtype the data set will be stored in (default: torch's default).
    numbers : dict, optional
        Column name -> float64 values already parsed (a file's all-number columns).
    """

    def __init__(self, frame: pd.DataFrame, name: str, lines=None, dtype=None, numbers=None):
        self.df, self.name, self.n = frame, name, len(frame)
        self.lines = lines
        self.dtype = dtype or torch.get_default_dtype()
        self.cols = {}
        self._numbers, self._floats = {}, {}
        for c, values in (numbers or {}).items():
            key = str(c).strip().lstrip("#").strip().upper()
            self._floats[key] = (values, np.zeros(len(values), bool))
        for c in frame.columns:
            key = str(c).strip().lstrip("#").strip().upper()
            if key in self.cols:
                raise ValueError(f"{name}: columns {self.cols[key]!r} and {c!r} have the "
                                 "same name (column names are case-insensitive)")
            self.cols[key] = c

    @property
    def from_file(self) -> bool:
        return self.lines is not None

    def has(self, key: str) -> bool:
        return key in self.cols

    def label(self, key: str) -> str:
        """The column's name as the source spells it."""
        return str(self.cols.get(key, key))

    def row(self, i: int) -> str:
        """``"data.csv row 3"`` (data rows from 1, header and comment rows not counted) or
        ``"DataFrame index 7"`` (the index label)."""
        if self.from_file:
            return f"{self.name} row {i + 1}"
        label = self.df.index[i]
        label = label.item() if isinstance(label, np.generic) else label
        return f"{self.name} index {label!r}" if isinstance(label, str) \
            else f"{self.name} index {label}"

    def line(self, i: int) -> str:
        """``" (line 4 of data.csv)"`` for a file, ``""`` for a DataFrame."""
        return f" (line {int(self.lines[i])} of {self.name})" if self.from_file else ""

    def where(self, i: int) -> str:
        """The row and, for a file, its line: for notes."""
        return self.row(i) + self.line(i)

    def fail(self, bad, key: str, problem) -> None:
        """Raise ``ValueError`` for the first row where ``bad`` (a row mask) is True.

        ``problem`` is the message, or a function of the row position giving it.
        """
        bad = np.broadcast_to(np.asarray(bad, bool), (self.n,))
        if not bad.any():
            return
        where = np.flatnonzero(bad)
        i = int(where[0])
        msg = problem(i) if callable(problem) else problem
        more = f" ({len(where) - 1} more such row{'s' if len(where) > 2 else ''})" \
            if len(where) > 1 else ""
        raise ValueError(f"{self.row(i)}, column {self.label(key)}: {msg}{self.line(i)}{more}")

    def cell(self, key: str, i: int):
        """The raw entry of column ``key`` at row ``i``."""
        return self.df[self.cols[key]].iloc[i]

    def number(self, key: str) -> np.ndarray:
        """Column ``key`` as float64 holding the stored values (NaN where missing), checked
        once for its kind (:data:`COLUMN_KINDS`; other columns are ``"float"``)."""
        if key not in self._numbers:
            kind = COLUMN_KINDS.get(key, "float")
            values = self._parse(key)
            if kind != "float_or_inf":
                self.fail(np.isinf(values), key, lambda i: (
                    f"{self.label(key)} is infinite ({self.cell(key, i)!r}); give a finite "
                    "number, or leave it empty or '.' if missing"))
            if kind in ("float", "float_or_inf"):
                values = self._stored(key, values)
            elif kind == "integer":
                self._check_integer(key, values)
            self._numbers[key] = values
        return self._numbers[key]

    def values(self, key: str, *, labels: bool = False):
        """``(values, numeric)`` of a covariate or label column: float64 (stored values,
        NaN missing) when every entry is a number, else text (``None`` missing).

        A column of numbers with a few entries that are not numbers is an error naming
        the first, unless ``labels`` (categories, DVID) where text is as good as numbers.
        """
        s = self.df[self.cols[key]]
        values, bad = self.floats(key)
        if not bad.any():
            if labels:
                self.fail(np.isinf(values), key, f"{self.label(key)} is infinite")
                return values, True
            return self.number(key), True
        n_numbers = int((~np.isnan(values)).sum())
        if not labels and n_numbers >= int(bad.sum()):
            self.fail(bad, key, lambda i: (
                f"{s.iloc[i]!r} is not a number, but {n_numbers} other value"
                f"{'s' if n_numbers > 1 else ''} of {self.label(key)} are: fix it, leave it "
                "empty or '.' if missing, or name the column in categorical= to read it as "
                "categories"))
        text = s.astype("string").str.strip()
        text = text.mask(text.isin(["", "."]))
        return text.to_numpy(dtype=object, na_value=None), False

    # ---- checks ---------------------------------------------------------------------
    def floats(self, key: str):
        """``(float64 values, NaN missing; mask of entries that are not numbers)``,
        parsed once per column."""
        if key not in self._floats:
            self._floats[key] = _to_float(self.df[self.cols[key]], clean=self.from_file)
        return self._floats[key]

    def _parse(self, key):
        s = self.df[self.cols[key]]
        values, bad = self.floats(key)
        self.fail(bad, key, lambda i: f"{s.iloc[i]!r} is not a number")
        return values

    def _stored(self, key, values):
        """``values`` as ``self.dtype`` holds them; overflow and underflow to 0 raise."""
        stored = torch.tensor(values, dtype=torch.float64).to(self.dtype).double().numpy()
        finfo = torch.finfo(self.dtype)
        self.fail(np.isfinite(values) & ~np.isfinite(stored), key, lambda i: (
            f"{self.label(key)} {values[i]:g} is beyond the range of {_dtype_name(self.dtype)} "
            f"(largest {finfo.max:.3g}), the dtype the data set is stored in; rescale the "
            "column (another unit) or read it with torch.set_default_dtype(torch.float64)"))
        self.fail((values != 0) & (stored == 0) & np.isfinite(values), key, lambda i: (
            f"{self.label(key)} {values[i]:g} becomes 0 in {_dtype_name(self.dtype)} "
            f"(smallest {finfo.tiny:.3g}), the dtype the data set is stored in; rescale the "
            "column (another unit)"))
        return np.where(np.isnan(values), np.nan, stored)

    def _check_integer(self, key, values):
        word = _INTEGER_WORDS.get(key, "a whole number")
        finite = np.nan_to_num(values)
        self.fail(np.abs(finite) > _INT_MAX, key, lambda i: (
            f"{self.label(key)} must be {word} (got {values[i]:g}, beyond {_INT_MAX})"))
        self.fail(finite != np.round(finite), key, lambda i: (
            f"{self.label(key)} must be {word} (got {values[i]:g})"))


def subject_ids(t: Table):
    """``(subject index per row, IDs in order of first appearance)``.

    Numeric IDs become ``int`` (or ``float`` when not whole); text IDs stay text. Raises
    ``ValueError`` for a missing ID, an ID beyond 2^53, two spellings of one number, and a
    subject whose rows are not contiguous.
    """
    key = "ID"
    s = t.df[t.cols[key]]
    canonical = _canonical_ids(t, s)
    t.fail(pd.isna(pd.Series(canonical, dtype=object)).to_numpy(), key, "ID is missing")
    subj, uniques = pd.factorize(pd.Series(canonical, dtype=object), sort=False)
    subj = subj.astype(np.int64)
    first = pd.Series(np.arange(t.n)).groupby(subj).first().to_numpy()
    _check_spellings(t, s, subj, first)
    t.fail(np.r_[False, subj[1:] < subj[:-1]], key, lambda i: (
        f"subject {uniques[subj[i]]!r} appears again after other subjects (first at "
        f"{t.where(int(first[subj[i]]))}); a subject's rows must be contiguous"))
    return subj, list(uniques)


def _canonical_ids(t, s):
    """Each row's ID as int / float / str (None missing), exactly as written."""
    raw = s.to_numpy(dtype=object)
    parsed = {}
    numeric = True
    for u in pd.unique(s.dropna()):
        value = _id_value(u)
        parsed[u] = value
        numeric &= not isinstance(value, str)
    present = s.notna().to_numpy(bool)
    out = np.full(len(raw), None, dtype=object)
    if numeric:
        out[present] = s[present].map(parsed).to_numpy(dtype=object)
    else:
        out[present] = [str(u).strip() for u in raw[present]]
    if numeric:
        t.fail([isinstance(v, float) and not np.isfinite(v) for v in out], "ID", lambda i: (
            f"ID is infinite ({raw[i]!r})"))
        big = np.array([v is not None and abs(v) > _EXACT_INT for v in out], dtype=bool)
        t.fail(big, "ID", lambda i: (
            f"ID {raw[i]} is beyond 2^53 = {_EXACT_INT}: such IDs lose digits as "
            "floating-point numbers, and two subjects can merge; renumber the subjects "
            "(or make the IDs text, e.g. with a letter in front)"))
    return out


def _id_value(u):
    """int, float or str for one raw ID entry."""
    if isinstance(u, (bool, np.bool_)):
        return int(u)
    if isinstance(u, (int, np.integer)):
        return int(u)
    if isinstance(u, (float, np.floating)):
        return int(u) if float(u).is_integer() and abs(u) <= _EXACT_INT else float(u)
    text = str(u).strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return text
    if not np.isfinite(value):
        return value
    return int(value) if value.is_integer() and abs(value) <= _EXACT_INT else value


def _check_spellings(t, s, subj, first):
    """Two different texts for one numeric ID (``1`` and ``1.0``, ``01``) are an error."""
    if pd.api.types.is_numeric_dtype(s):
        return
    text = s.to_numpy(dtype=object) if t.from_file else \
        s.astype("string").str.strip().to_numpy(dtype=object, na_value=None)
    spelled = text[first][subj]
    t.fail(text != spelled, "ID", lambda i: (
        f"ID {text[i]!r} is the same number as ID {spelled[i]!r} at "
        f"{t.where(int(first[subj[i]]))}; write each subject's ID the same way"))


def _to_float(s: pd.Series, clean: bool = False):
    """(values as float64 with NaN for missing, mask of entries that are not numbers);
    ``clean``: the cells are stripped text or None (a parsed file), a faster path."""
    if clean and s.dtype == object:
        num = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        return num, np.isnan(num) & s.notna().to_numpy(bool)
    if pd.api.types.is_bool_dtype(s) or pd.api.types.is_numeric_dtype(s):
        if pd.api.types.is_complex_dtype(s):
            bad = np.imag(s.to_numpy()) != 0
            return np.real(s.to_numpy()).astype(np.float64), bad
        return s.to_numpy(dtype=np.float64, na_value=np.nan), np.zeros(len(s), bool)
    text = s.astype("string").str.strip()
    missing = (text.isna() | text.isin(["", "."])).to_numpy(bool)
    num = pd.to_numeric(text.mask(missing), errors="coerce").to_numpy(dtype=np.float64,
                                                                      na_value=np.nan)
    return num, np.isnan(num) & ~missing


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")
