"""Covariates of a NONMEM data set (the *covariates* section of
:func:`genprog.pk.read_nonmem`): baseline and time-varying, numeric and categorical.

Every column that is not a NONMEM data item is a covariate. A column constant within each
subject is a baseline covariate (the subject's first non-missing value). A numeric column
that varies within a subject is read as time-varying, and a text column that varies is not
read; when the reader decides this itself (the column is not named in ``covariates=`` or
``time_varying=``) it says so in a note naming the subject and row, because one mistyped
value is enough to make a column vary. A column of numbers with a few entries that are not
numbers is an error naming the first (:meth:`~genprog.pk.nonmem_table.Table.values`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from genprog.pk.nonmem_table import Table

__all__ = ["RESERVED", "Covariates", "read_covariates"]

#: NONMEM data items (never covariates); ``C`` is NONMEM's comment-flag column.
RESERVED = ("ID", "TIME", "DV", "AMT", "EVID", "MDV", "CMT", "RATE", "DUR", "DURATION",
            "II", "ADDL", "SS", "DVID", "CENS", "BLQ", "LIMIT", "LLOQ", "C")


@dataclass(frozen=True)
class Covariates:
    """What the covariate section read.

    Attributes
    ----------
    baseline, time_varying : dict
        Column name -> ``(float64 values with NaN missing, categories or None)``; baseline
        values are per subject ``[S]``, time-varying per row (carried forward and back
        within each subject).
    categories : dict
        Column name -> categories by code, for categorical columns.
    ignored : dict
        Column name -> why it was not read.
    notes : list of str
        Decisions the reader took that the user should know about.
    """

    baseline: dict
    time_varying: dict
    categories: dict
    ignored: dict
    notes: list = field(default_factory=list)


@dataclass
class _Column:
    values: np.ndarray        # float64 (categorical: codes), NaN missing
    categories: list | None
    numeric: bool
    varies: bool


def read_covariates(t: Table, subj: np.ndarray, ids: list, covariates=None,
                    time_varying=None, categorical=None) -> Covariates:
    """Read the covariate columns (see the module docstring and :func:`read_nonmem`)."""
    cat_keys = _resolve(t, categorical, "categorical") or []
    columns = _Columns(t, subj, ids, cat_keys)
    cov_keys, tv_keys, ignored, notes = _choose(columns, _resolve(t, covariates, "covariates"),
                                                _resolve(t, time_varying, "time_varying"))
    for k in cat_keys:
        if k not in cov_keys and k not in tv_keys:
            raise ValueError(f"categorical: {t.label(k)!r} is not read as a covariate "
                             "(name it in covariates= or time_varying=)")
    baseline = {t.label(k): _baseline(columns(k), subj, len(ids)) for k in cov_keys}
    notes += [_missing_note(t.label(k), baseline[t.label(k)][0], ids) for k in cov_keys
              if np.isnan(baseline[t.label(k)][0]).any()]
    tv = {t.label(k): _carried(columns(k), subj) for k in tv_keys}
    categories = {t.label(k): columns(k).categories for k in (*cov_keys, *tv_keys)
                  if columns(k).categories is not None}
    return Covariates(baseline, tv, categories, ignored, notes)


class _Columns:
    """Candidate covariate columns, each parsed once on first use."""

    def __init__(self, t, subj, ids, cat_keys):
        self.t, self.subj, self.ids, self.cat_keys = t, subj, ids, cat_keys
        self.candidates = [k for k in t.cols if k not in RESERVED]
        self._parsed = {}

    def __call__(self, key) -> _Column:
        if key not in self._parsed:
            self._parsed[key] = _parse_column(self.t, key, self.subj, key in self.cat_keys)
        return self._parsed[key]

    def first_change(self, key) -> str:
        return _first_change(self.t, self(key), self.subj, self.ids)


def _choose(columns: _Columns, cov_keys, tv_keys):
    """(baseline keys, time-varying keys, ignored columns, notes) from the arguments (None:
    decide by whether the column varies within subjects, with a note)."""
    t, notes, ignored = columns.t, [], {}
    explicit_tv = tv_keys is not None
    if cov_keys is None:
        cov_keys = [k for k in columns.candidates
                    if k not in (tv_keys or []) and not columns(k).varies]
        if explicit_tv:
            ignored.update({t.label(k): "varies within subjects (not named in time_varying=)"
                            for k in columns.candidates
                            if k not in cov_keys and k not in tv_keys and columns(k).varies})
    if explicit_tv:
        return cov_keys, tv_keys, ignored, notes
    tv_keys = []
    for k in columns.candidates:
        if k in cov_keys or not columns(k).varies:
            continue
        if not columns(k).numeric and k not in columns.cat_keys:
            ignored[t.label(k)] = ("text that varies within subjects (name it in "
                                   "time_varying= to read it as categorical)")
            notes.append(f"column {t.label(k)} not read: text that varies within a subject "
                         f"({columns.first_change(k)}) - name it in time_varying= to read it "
                         "as a categorical covariate")
            continue
        tv_keys.append(k)
        notes.append(f"{t.label(k)} varies within a subject ({columns.first_change(k)}): read "
                     "as time-varying (name it in covariates= to read each subject's first "
                     "value, or in time_varying= to confirm)")
    return cov_keys, tv_keys, ignored, notes


def _baseline(column: _Column, subj, S):
    """Each subject's first non-missing value ``[S]`` (NaN if none), and the categories."""
    first = pd.Series(column.values).groupby(subj).first().reindex(range(S))
    return first.to_numpy(np.float64), column.categories


def _carried(column: _Column, subj):
    """Per row: the last value carried forward within the subject (before the first
    value, the first value), and the categories."""
    filled = pd.Series(column.values).groupby(subj).ffill()
    return filled.groupby(subj).bfill().to_numpy(np.float64), column.categories


def _missing_note(label, first, ids) -> str:
    missing = np.flatnonzero(np.isnan(first))
    shown = ", ".join(repr(ids[s]) for s in missing[:5])
    return (f"{label} is missing on every row of {len(missing)} subject"
            f"{'s' if len(missing) > 1 else ''} (ID {shown}"
            f"{', ...' if len(missing) > 5 else ''}): NaN for them")


def _resolve(t, names, arg):
    """Column keys named by a ``covariates=``-style argument (None: not given)."""
    if names is None:
        return None
    if isinstance(names, str):
        names = [names]
    keys = []
    for name in names:
        key = str(name).strip().upper()
        if key not in t.cols:
            raise ValueError(f"{arg}: no column {name!r} in {t.name} "
                             f"(columns: {', '.join(map(str, t.df.columns))})")
        if key in RESERVED:
            raise ValueError(f"{arg}: {t.label(key)!r} is a NONMEM data item, not a covariate")
        keys.append(key)
    return keys


def _parse_column(t, key, subj, categorical) -> _Column:
    values, numeric = t.values(key, labels=categorical)
    cats = None
    if not numeric or categorical:
        codes, uniques = pd.factorize(pd.Series(values), sort=True)
        values = np.where(codes < 0, np.nan, codes).astype(np.float64)
        cats = [_label(u) for u in uniques]
    varies = bool(len(values)) and int(pd.Series(values).groupby(subj).nunique().max()) > 1
    return _Column(values, cats, numeric, varies)


def _first_change(t, column: _Column, subj, ids) -> str:
    """Where a column first differs from its subject's first value, for a note."""
    values = column.values
    first = pd.Series(values).groupby(subj).transform("first").to_numpy(np.float64)
    changed = np.flatnonzero(~np.isnan(values) & (values != first))
    n_subjects = len(np.unique(subj[changed]))
    i = int(changed[0])
    others = f", and {n_subjects - 1} more subject{'s' if n_subjects > 2 else ''}" \
        if n_subjects > 1 else ""
    return (f"subject {ids[subj[i]]!r} at {t.where(i)}: {_show(column, values[i])} after "
            f"{_show(column, first[i])}{others}")


def _show(column: _Column, value: float) -> str:
    if column.categories is not None:
        return repr(column.categories[int(value)])
    return f"{value:g}"


def _label(u):
    if isinstance(u, (float, np.floating)) and float(u).is_integer():
        return int(u)
    return u.item() if isinstance(u, np.generic) else u
