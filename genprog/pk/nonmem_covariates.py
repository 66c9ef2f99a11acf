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
    S = len(ids)
    cov_keys = _resolve(t, covariates, "covariates")
    tv_keys = _resolve(t, time_varying, "time_varying")
    cat_keys = _resolve(t, categorical, "categorical") or []
    candidates = [k for k in t.cols if k not in RESERVED]
    parsed = {}

    def column(key) -> _Column:
        if key not in parsed:
            parsed[key] = _parse_column(t, key, subj, key in cat_keys)
        return parsed[key]

    notes, ignored = [], {}
    implicit_tv = tv_keys is None
    if cov_keys is None:
        cov_keys = [k for k in candidates if k not in (tv_keys or []) and not column(k).varies]
    if tv_keys is None:
        tv_keys = []
        for k in candidates:
            if k in cov_keys or not column(k).varies:
                continue
            if not column(k).numeric and k not in cat_keys:
                ignored[t.label(k)] = ("text that varies within subjects (name it in "
                                       "time_varying= to read it as categorical)")
                notes.append(f"column {t.label(k)} not read: text that varies within a "
                             f"subject ({_first_change(t, column(k), subj, ids)}) - name it "
                             "in time_varying= to read it as a categorical covariate")
                continue
            tv_keys.append(k)
            if implicit_tv:
                notes.append(f"{t.label(k)} varies within a subject "
                             f"({_first_change(t, column(k), subj, ids)}): read as "
                             "time-varying (name it in covariates= to read each subject's "
                             "first value, or in time_varying= to confirm)")
    if not implicit_tv and covariates is None:
        for k in candidates:
            if k not in cov_keys and k not in tv_keys and column(k).varies:
                ignored[t.label(k)] = "varies within subjects (not named in time_varying=)"
    for k in cat_keys:
        if k not in cov_keys and k not in tv_keys:
            raise ValueError(f"categorical: {t.label(k)!r} is not read as a covariate "
                             "(name it in covariates= or time_varying=)")
    categories, baseline, tv = {}, {}, {}
    for k in cov_keys:
        c = column(k)
        first = pd.Series(c.values).groupby(subj).first().reindex(range(S)).to_numpy(np.float64)
        baseline[t.label(k)] = (first, c.categories)
        missing = np.flatnonzero(np.isnan(first))
        if len(missing):
            shown = ", ".join(repr(ids[s]) for s in missing[:5])
            notes.append(f"{t.label(k)} is missing on every row of {len(missing)} subject"
                         f"{'s' if len(missing) > 1 else ''} (ID {shown}"
                         f"{', ...' if len(missing) > 5 else ''}): NaN for them")
    for k in tv_keys:
        c = column(k)
        filled = pd.Series(c.values).groupby(subj).ffill()
        tv[t.label(k)] = (filled.groupby(subj).bfill().to_numpy(np.float64), c.categories)
    for k in (*cov_keys, *tv_keys):
        if column(k).categories is not None:
            categories[t.label(k)] = column(k).categories
    return Covariates(baseline, tv, categories, ignored, notes)


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
