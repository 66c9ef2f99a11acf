"""Read a NONMEM-style PK data set (a CSV file or a pandas DataFrame) into a :class:`Dataset`.

One row is one event of one subject: a dose, an observation, or another event. The
reader follows NONMEM's conventions (column names case-insensitive):

========  ===========================================================================
ID        subject; its rows must be contiguous. Subjects keep their order of first
          appearance.
TIME      event time, >= 0, never decreasing within a subject except at a reset.
DV        the observation (may be absent when there are no observations).
AMT       dose amount (required when there are doses).
EVID      0 observation, 1 dose, 2 other event, 3 reset, 4 reset and dose, 101 dose
          (rxode2's code for a dose into the compartment given by CMT, default 1).
MDV       1 = no observation. Without EVID: MDV 1 and AMT > 0 is a dose, MDV 0 an
          observation, MDV 1 and AMT 0 another (excluded) event. Without EVID and MDV,
          a row with AMT > 0 is a dose and every other row an observation.
CMT       compartment, NONMEM numbering from 1 (0 allowed on non-dose rows: default).
RATE      zero-order infusion rate (0 = bolus). RATE -1/-2 (modelled rate/duration) are
          not supported.
DUR       infusion duration (also DURATION): the rate is AMT/DUR.
II, ADDL  ADDL additional doses at TIME + k*II, k = 1..ADDL. A reset (EVID 3/4)
          cancels the additional doses at or after its time.
SS        1 steady state, 2 steady state added to what is there, 3 read as 1; any
          other value (0, missing, sentinels such as 99) means not at steady state.
DVID      observation type, numbers or text, coded 0..K-1 by first appearance among
          observations (``Dataset.dvid_names``).
CENS/BLQ  1 = below the limit of quantification; -1 (above ULOQ) not supported.
LIMIT     limit for censored rows (see below).
LLOQ      per-row limit: an observation with DV < LLOQ is BLQ.
========  ===========================================================================

Censoring. A row is BLQ when CENS (or BLQ) is 1, or when DV is below its limit (the
LLOQ column, else the ``lloq=`` argument). For a CENS = 1 row the limit is the largest
of DV, LIMIT, LLOQ and ``lloq=`` that is given: a DV placeholder (0, LLOQ/2) never exceeds
the real limit, and Monolix/nlmixr2 files put the limit in DV. A positive LIMIT below DV
(nlmixr2's interval censoring) is rejected.

Covariates. Every other column is a covariate. By default the columns constant within
each subject are baseline covariates (``Dataset.covariates``, the subject's first
non-missing value) and the numeric columns that vary within a subject are time-varying
(``Dataset.time_varying``, the last value carried forward to each observation; before the
first value, the first value). Text columns are categorical: codes 0..K-1 in sorted
order of the categories (``Dataset.categories``), -1 where missing; codes are
``LongTensor``. Text that varies within a subject is not read unless named in
``time_varying=`` (it is listed in ``summary["ignored_columns"]``).

Padding. Subjects are padded to the longest one. Times, epochs, compartments, types and
time-varying covariates are padded with the subject's last value (times stay
non-decreasing), amounts, rates, II and SS with 0, DV with 0, LLOQ with NaN and masks
with False, so a padded dose is inert.

Every problem raises ``ValueError`` naming the row (for a file, the 1-based data row,
header not counted; for a DataFrame, its index label), the column and the problem.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from genprog.pk.dataset import Dataset

__all__ = ["describe", "read_nonmem"]

_RESERVED = ("ID", "TIME", "DV", "AMT", "EVID", "MDV", "CMT", "RATE", "DUR", "DURATION",
             "II", "ADDL", "SS", "DVID", "CENS", "BLQ", "LIMIT", "LLOQ")
_DOSE_EVID = (1, 4, 101)
_EVIDS = (0, 1, 2, 3, 4, 101)


def read_nonmem(source, *, covariates=None, categorical=None, lloq=None,
                time_varying=None) -> Dataset:
    """Read NONMEM-style PK data into a :class:`~genprog.pk.dataset.Dataset`.

    Parameters
    ----------
    source : str, os.PathLike or pandas.DataFrame
        A CSV file ("." and empty fields read as missing) or a DataFrame. Column names
        are case-insensitive; the conventions are in the module docstring.
    covariates : list of str, optional
        Baseline covariates to read (a varying one gives the subject's first value).
        Default: every non-NONMEM column constant within each subject.
    categorical : list of str, optional
        Numeric covariate columns to read as categories (text columns always are).
    lloq : float, optional
        Limit of quantification: an observation with DV < ``lloq`` is BLQ (an LLOQ
        column, where given, takes precedence row by row).
    time_varying : list of str, optional
        Covariates to read at each observation time (last value carried forward).
        Default: every numeric non-NONMEM column that varies within a subject and is not
        named in ``covariates``.

    Returns
    -------
    Dataset
        Padded tensors in torch's default float dtype; ``summary`` counts what was read:
        ``rows``, ``subjects``, ``doses`` (after ADDL expansion), ``dose_rows``,
        ``observations``, ``blq``, ``excluded_rows`` and ``excluded_reasons`` (rows that
        are neither doses nor observations, by reason), ``resets``, ``addl_cancelled``,
        ``ss_ignored`` (dose rows whose SS value is outside 0-3), ``covariates``,
        ``time_varying``, ``ignored_columns``, ``missing_baseline``.

    Raises
    ------
    ValueError
        On a malformed row or column, naming the row, the column and the problem.

    Examples
    --------
    >>> import pandas as pd
    >>> df = pd.DataFrame({"ID": [1, 1, 1], "TIME": [0.0, 1.0, 4.0], "AMT": [100, 0, 0],
    ...                    "EVID": [1, 0, 0], "DV": [0.0, 5.0, 3.0], "WT": [70, 70, 70]})
    >>> data = read_nonmem(df)
    >>> data.obs_time.tolist(), data.dose_amt.tolist(), data.covariates["WT"].tolist()
    ([[1.0, 4.0]], [[100.0]], [70.0])
    """
    t = _open(source)
    n = t.n
    if n == 0:
        raise ValueError(f"{t.name}: no data rows")
    for key in ("ID", "TIME"):
        if not t.has(key):
            raise ValueError(f"{t.name}: required column {key} is missing "
                             f"(columns: {', '.join(map(str, t.df.columns))})")
    lloq = _check_lloq(lloq)

    subj, ids = _subjects(t)
    S = len(ids)
    time = t.number("TIME")
    t.fail(np.isnan(time), "TIME", "TIME is missing")
    t.fail(time < 0, "TIME", lambda i: f"TIME is negative ({time[i]:g})")

    # ---- event types ------------------------------------------------------------------
    amt = t.number("AMT") if t.has("AMT") else np.zeros(n)
    t.fail(amt < 0, "AMT", lambda i: f"AMT is negative ({amt[i]:g})")
    mdv = t.number("MDV") if t.has("MDV") else None
    if mdv is not None:
        t.fail(~np.isnan(mdv) & ~np.isin(mdv, (0, 1)), "MDV",
               lambda i: f"MDV must be 0 or 1 (got {mdv[i]:g})")
    reasons = {}
    if t.has("EVID"):
        evid = t.number("EVID")
        t.fail(np.isnan(evid), "EVID", "EVID is missing")
        t.fail(~np.isin(evid, _EVIDS), "EVID", lambda i: (
            f"EVID {evid[i]:g} is not one of 0 (observation), 1 (dose), 2 (other), "
            "3 (reset), 4 (reset and dose), 101 (dose, rxode2)"))
        is_dose = np.isin(evid, _DOSE_EVID)
        no_obs = np.zeros(n, bool)
        if mdv is not None:
            t.fail((evid == 0) & np.isnan(mdv), "MDV", "MDV is missing on an EVID 0 row")
            no_obs = (evid == 0) & (mdv == 1)
        is_obs = (evid == 0) & ~no_obs
        t.fail(~is_dose & (np.nan_to_num(amt) > 0), "AMT", lambda i: (
            f"AMT is {amt[i]:g} on a row that is not a dose (EVID {evid[i]:g}); "
            "a dose needs EVID 1 or 4"))
        _count(reasons, evid == 2, "EVID 2 (other event)")
        _count(reasons, evid == 3, "EVID 3 (reset)")
        _count(reasons, no_obs, "EVID 0 with MDV 1 (no observation)")
        if not t.has("AMT"):
            t.fail(is_dose, "EVID", lambda i: (
                f"the row is a dose (EVID {evid[i]:g}) but there is no AMT column"))
    elif mdv is not None:
        t.fail(np.isnan(mdv), "MDV", "MDV is missing (and there is no EVID column)")
        a = np.nan_to_num(amt)
        t.fail((mdv == 0) & (a > 0), "AMT", lambda i: (
            f"AMT is {amt[i]:g} on an observation row (MDV 0); a dose needs MDV 1"))
        is_dose = (mdv == 1) & (a > 0)
        is_obs = mdv == 0
        _count(reasons, (mdv == 1) & ~is_dose,
               "MDV 1 with AMT 0 (neither dose nor observation; no EVID column)")
        evid = np.where(is_dose, 1.0, np.where(is_obs, 0.0, 2.0))
    else:
        is_dose = np.nan_to_num(amt) > 0
        is_obs = ~is_dose
        evid = np.where(is_dose, 1.0, 0.0)
    t.fail(is_dose & np.isnan(amt), "AMT", "AMT is missing on a dose row")
    t.fail(is_dose & (amt == 0), "AMT", lambda i: (
        f"AMT is 0 on a dose row (EVID {evid[i]:g}); a dose needs AMT > 0"))
    amt = np.where(is_dose, amt, 0.0)
    reset = np.isin(evid, (3, 4))
    epoch = pd.Series(reset.astype(np.int64)).groupby(subj).cumsum().to_numpy()

    same = np.r_[False, subj[1:] == subj[:-1]]
    back = same & np.r_[False, time[1:] < time[:-1]] & ~reset
    t.fail(back, "TIME", lambda i: (
        f"TIME goes backwards within subject {ids[subj[i]]!r} ({time[i - 1]:g} then "
        f"{time[i]:g}); only a reset (EVID 3 or 4) may restart time"))

    # ---- compartments, infusions, additional doses, steady state ------------------
    if t.has("CMT"):
        raw = t.number("CMT")
        t.fail(is_dose & np.isnan(raw), "CMT", "CMT is missing on a dose row")
        c = np.nan_to_num(raw)
        t.fail(c != np.round(c), "CMT", lambda i: f"CMT must be a positive integer (got {c[i]:g})")
        t.fail(c < 0, "CMT", lambda i: (
            f"CMT must be a positive integer (got {c[i]:g}; negative CMT, switching a "
            "compartment off, is not supported)"))
        t.fail(is_dose & (c == 0), "CMT", "CMT must be a positive integer on a dose row (got 0)")
        cmt = c.astype(np.int64)
        dose_cmt_rows = cmt
    else:
        cmt = np.zeros(n, np.int64)
        dose_cmt_rows = np.ones(n, np.int64)

    rate = np.zeros(n)
    if t.has("RATE"):
        r = np.nan_to_num(t.number("RATE"))
        t.fail(is_dose & (r == -2), "RATE", (
            "RATE -2 (infusion duration modelled with D1) is not supported yet; give the "
            "duration in a DUR column or the rate in RATE"))
        t.fail(is_dose & (r == -1), "RATE", (
            "RATE -1 (infusion rate modelled with R1) is not supported; give the rate in RATE"))
        t.fail(is_dose & (r < 0), "RATE", lambda i: f"RATE is negative ({r[i]:g})")
        rate = np.where(is_dose, r, 0.0)
    if t.has("DUR") and t.has("DURATION"):
        raise ValueError(f"{t.name}: both DUR and DURATION columns; keep one")
    dur_key = "DUR" if t.has("DUR") else "DURATION" if t.has("DURATION") else None
    if dur_key is not None:
        d = np.nan_to_num(t.number(dur_key))
        t.fail(is_dose & (d < 0), dur_key, lambda i: f"{t.label(dur_key)} is negative ({d[i]:g})")
        timed = is_dose & (d > 0)
        from_dur = np.divide(amt, d, out=np.zeros(n), where=timed)
        t.fail(timed & (rate > 0) & ~np.isclose(rate, from_dur, rtol=1e-6, atol=0), dur_key,
               lambda i: (f"RATE {rate[i]:g} and {t.label(dur_key)} {d[i]:g} disagree "
                          f"(AMT/{t.label(dur_key)} = {from_dur[i]:g})"))
        rate = np.where(timed, from_dur, rate)

    ii = np.nan_to_num(t.number("II")) if t.has("II") else np.zeros(n)
    t.fail(is_dose & (ii < 0), "II", lambda i: f"II is negative ({ii[i]:g})")
    addl = np.nan_to_num(t.number("ADDL")) if t.has("ADDL") else np.zeros(n)
    t.fail(is_dose & (addl < 0), "ADDL", lambda i: (
        f"ADDL is negative ({addl[i]:g}); NONMEM's empirical steady state is not supported"))
    t.fail(is_dose & (addl != np.round(addl)), "ADDL",
           lambda i: f"ADDL must be a whole number (got {addl[i]:g})")
    addl = np.where(is_dose, addl, 0).astype(np.int64)
    t.fail(is_dose & (addl > 0) & (ii <= 0), "II", lambda i: (
        f"II is {ii[i]:g} but ADDL is {addl[i]}: additional doses need II > 0"))
    ss_raw = t.number("SS") if t.has("SS") else np.zeros(n)
    ss = np.where(np.isin(ss_raw, (1, 2, 3)) & is_dose, ss_raw, 0).astype(np.int64)
    ss[ss == 3] = 1
    ss_ignored = int((is_dose & ~np.isnan(ss_raw) & ~np.isin(ss_raw, (0, 1, 2, 3))).sum())
    t.fail((ss > 0) & (ii <= 0), "II", lambda i: (
        f"II is {ii[i]:g} but SS is {ss_raw[i]:g}: a steady-state dose needs II > 0"))
    t.fail((ss > 0) & (rate > 0) & (addl > 0), "ADDL",
           "ADDL must be 0 for a steady-state infusion")

    # ---- observations: DV, censoring, types -----------------------------------------
    if t.has("DV"):
        dv = t.number("DV")
    else:
        t.fail(is_obs, "DV", "the row is an observation but there is no DV column")
        dv = np.full(n, np.nan)
    if t.has("CENS") and t.has("BLQ"):
        raise ValueError(f"{t.name}: both CENS and BLQ columns; keep one")
    flagged = np.zeros(n, bool)
    cens_key = "CENS" if t.has("CENS") else "BLQ" if t.has("BLQ") else None
    if cens_key is not None:
        cflag = np.nan_to_num(t.number(cens_key))
        t.fail(is_obs & (cflag == -1), cens_key, (
            f"{t.label(cens_key)} -1 (above the upper limit of quantification) is not supported"))
        t.fail(is_obs & ~np.isin(cflag, (0, 1)), cens_key, lambda i: (
            f"{t.label(cens_key)} must be 0 or 1 (1 = below LLOQ), got {cflag[i]:g}"))
        flagged = is_obs & (cflag == 1)
    row_lloq = np.full(n, np.nan if lloq is None else lloq)
    if t.has("LLOQ"):
        col = t.number("LLOQ")
        row_lloq = np.where(np.isnan(col), row_lloq, col)
    limit = t.number("LIMIT", finite=False) if t.has("LIMIT") else np.full(n, np.nan)
    limit = np.where(np.isfinite(limit), limit, np.nan)
    t.fail(flagged & (limit > 0) & (limit < dv), "LIMIT", lambda i: (
        f"LIMIT {limit[i]:g} is below DV {dv[i]:g} on a censored row: interval censoring "
        "(LIMIT < value < DV) is not supported"))
    flag_lloq = np.fmax(np.fmax(dv, limit), row_lloq)
    t.fail(flagged & np.isnan(flag_lloq), "DV", (
        "the row is censored (CENS 1) but there is no limit: DV is missing and there is no "
        "LIMIT, LLOQ or lloq= value"))
    below = is_obs & ~flagged & (dv < row_lloq)
    blq = flagged | below
    obs_lloq = np.where(flagged, flag_lloq, np.where(below, row_lloq, np.nan))
    t.fail(is_obs & ~blq & np.isnan(dv), "DV", (
        "DV is missing on an observation row (EVID 0, MDV 0); set MDV 1 (or EVID 2) to "
        "skip the row, or CENS 1 if it is below the limit of quantification"))
    dv = np.where(np.isnan(dv), obs_lloq, dv)

    dvid = np.zeros(n, np.int64)
    dvid_names = ["dv"]
    if t.has("DVID"):
        values, _ = _column(t, "DVID")
        missing = pd.isna(values)
        t.fail(is_obs & missing, "DVID", "DVID is missing on an observation row")
        codes, uniques = pd.factorize(pd.Series(values[is_obs]), sort=False)
        dvid[is_obs] = codes
        if len(uniques):
            dvid_names = [_name(u) for u in uniques]

    # ---- covariates -----------------------------------------------------------------
    cov, tv, categories, ignored = _covariates(t, subj, S, covariates, time_varying,
                                               categorical)

    # ---- doses: expand ADDL, cancel at resets, sort -----------------------------------
    d = np.flatnonzero(is_dose)
    reps = addl[d] + 1
    src = np.repeat(d, reps)
    k = np.arange(len(src)) - np.repeat(np.cumsum(reps) - reps, reps)
    dtime = time[src] + k * ii[src]
    dsubj, depoch = subj[src], epoch[src]
    r = np.flatnonzero(reset & (epoch > 0))
    end = np.full(len(src), np.nan)   # time of the reset that ends each dose's epoch
    if len(r) and len(src):
        ends = pd.Series(time[r], index=pd.MultiIndex.from_arrays([subj[r], epoch[r] - 1]))
        end = ends.reindex(pd.MultiIndex.from_arrays([dsubj, depoch])).to_numpy(np.float64)
    cancelled = (k > 0) & (dtime >= end)
    keep = np.flatnonzero(~cancelled)
    src, k, dtime, dsubj, depoch = src[keep], k[keep], dtime[keep], dsubj[keep], depoch[keep]
    order = np.lexsort((k, src, dtime, depoch, dsubj))
    src, k, dtime, dsubj, depoch = src[order], k[order], dtime[order], dsubj[order], depoch[order]
    dss = np.where(k == 0, ss[src], 0)
    dii = np.where(dss > 0, ii[src], 0.0)

    o = np.flatnonzero(is_obs)
    osubj = subj[o]

    fdt = torch.get_default_dtype()
    dpad = _Pad(dsubj, S)
    opad = _Pad(osubj, S)

    def f(x):
        return torch.tensor(np.ascontiguousarray(x, dtype=np.float64), dtype=fdt)

    def i64(x):
        return torch.tensor(np.ascontiguousarray(x, dtype=np.int64))

    def b(x):
        return torch.tensor(np.ascontiguousarray(x, dtype=bool))

    time_varying_out = {}
    for name, (values, cats) in tv.items():
        v = values[o]
        if cats is None:
            time_varying_out[name] = f(opad(v, edge=True, default=np.nan))
        else:
            time_varying_out[name] = i64(opad(np.nan_to_num(v, nan=-1).astype(np.int64),
                                               edge=True, default=-1))
    covariates_out = {}
    for name, (values, cats) in cov.items():
        covariates_out[name] = f(values) if cats is None else \
            i64(np.nan_to_num(values, nan=-1).astype(np.int64))

    summary = {
        "rows": n,
        "subjects": S,
        "doses": len(src),
        "dose_rows": int(is_dose.sum()),
        "observations": int(is_obs.sum()),
        "blq": int(blq.sum()),
        "excluded_rows": int(sum(reasons.values())),
        "excluded_reasons": reasons,
        "resets": int(reset.sum()),
        "addl_cancelled": int(cancelled.sum()),
        "ss_ignored": ss_ignored,
        "covariates": list(cov),
        "time_varying": list(tv),
        "ignored_columns": ignored,
        "missing_baseline": {name: int(np.isnan(v).sum()) for name, (v, _) in cov.items()
                             if np.isnan(v).any()},
    }
    return Dataset(
        ids=ids,
        dose_time=f(dpad(dtime, edge=True)),
        dose_amt=f(dpad(amt[src])),
        dose_cmt=i64(dpad(dose_cmt_rows[src], edge=True, default=1)),
        dose_rate=f(dpad(rate[src])),
        dose_ss=i64(dpad(dss)),
        dose_ii=f(dpad(dii)),
        dose_epoch=i64(dpad(depoch, edge=True)),
        dose_mask=b(dpad(np.ones(len(src), bool), fill=False)),
        obs_time=f(opad(time[o], edge=True)),
        obs_dv=f(opad(dv[o])),
        obs_cmt=i64(opad(cmt[o], edge=True)),
        obs_dvid=i64(opad(dvid[o], edge=True)),
        obs_blq=b(opad(blq[o], fill=False)),
        obs_lloq=f(opad(obs_lloq[o], fill=np.nan)),
        obs_epoch=i64(opad(epoch[o], edge=True)),
        obs_mask=b(opad(np.ones(len(o), bool), fill=False)),
        covariates=covariates_out,
        time_varying=time_varying_out,
        dvid_names=dvid_names,
        categories=categories,
        summary=summary,
    )


def describe(dataset: Dataset) -> str:
    """A short human-readable summary of ``dataset`` (print it).

    >>> import pandas as pd
    >>> df = pd.DataFrame({"ID": [1, 1, 2, 2], "TIME": [0, 1, 0, 1], "AMT": [5, 0, 5, 0],
    ...                    "DV": [0, 2.0, 0, 3.0], "EVID": [1, 0, 1, 0]})
    >>> print(describe(read_nonmem(df)).splitlines()[0])
    2 subjects, 2 doses, 2 observations (0 BLQ)
    """
    s = dataset.summary
    n_dose = dataset.dose_mask.sum(-1)
    n_obs = dataset.obs_mask.sum(-1)
    lines = [(f"{dataset.n_subjects} subjects, {int(n_dose.sum())} doses, "
              f"{int(n_obs.sum())} observations ({int(dataset.obs_blq.sum())} BLQ)")]
    if dataset.n_subjects:
        lines.append(f"per subject: {int(n_dose.min())}-{int(n_dose.max())} doses, "
                     f"{int(n_obs.min())}-{int(n_obs.max())} observations")
    if len(dataset.dvid_names) > 1:
        counts = [int(((dataset.obs_dvid == j) & dataset.obs_mask).sum())
                  for j in range(len(dataset.dvid_names))]
        lines.append("observation types: " + ", ".join(
            f"{name} ({c})" for name, c in zip(dataset.dvid_names, counts)))

    def names(d):
        return ", ".join(
            f"{k} [{'/'.join(map(str, dataset.categories[k]))}]" if k in dataset.categories
            else k for k in d) or "none"

    lines.append(f"baseline covariates: {names(dataset.covariates)}")
    if dataset.time_varying:
        lines.append(f"time-varying covariates: {names(dataset.time_varying)}")
    excluded = s.get("excluded_reasons", {})
    lines.append("excluded rows: " + (", ".join(f"{c} {why}" for why, c in excluded.items())
                                      if excluded else "none"))
    extra = [f"{s[k]} {what}" for k, what in (
        ("resets", "resets (EVID 3/4)"), ("addl_cancelled", "additional doses cancelled by a reset"),
        ("ss_ignored", "dose rows with SS outside 0-3 read as not steady state")) if s.get(k)]
    if s.get("ignored_columns"):
        extra.append("columns not read: " + ", ".join(s["ignored_columns"]))
    if extra:
        lines.append("; ".join(extra))
    return "\n".join(lines)


# ---- helpers -------------------------------------------------------------------------


class _Table:
    """The rows being read and how to name one in an error message."""

    def __init__(self, df, name, from_file):
        self.df, self.name, self.from_file, self.n = df, name, from_file, len(df)
        self.cols = {}
        for c in df.columns:
            key = str(c).strip().lstrip("#").strip().upper()
            if key in self.cols:
                raise ValueError(f"{name}: columns {self.cols[key]!r} and {c!r} have the "
                                 "same name (column names are case-insensitive)")
            self.cols[key] = c

    def has(self, key):
        return key in self.cols

    def label(self, key):
        return str(self.cols.get(key, key))

    def row(self, i):
        if self.from_file:
            return f"{self.name} row {i + 1}"
        label = self.df.index[i]
        label = label.item() if isinstance(label, np.generic) else label
        return f"{self.name} index {label!r}" if isinstance(label, str) \
            else f"{self.name} index {label}"

    def fail(self, bad, key, problem):
        """Raise for the first row where ``bad`` is True (a mask over the rows)."""
        bad = np.broadcast_to(np.asarray(bad, bool), (self.n,))
        if not bad.any():
            return
        where = np.flatnonzero(bad)
        i = int(where[0])
        msg = problem(i) if callable(problem) else problem
        more = f" ({len(where) - 1} more such row{'s' if len(where) > 2 else ''})" \
            if len(where) > 1 else ""
        raise ValueError(f"{self.row(i)}, column {self.label(key)}: {msg}{more}")

    def number(self, key, finite=True):
        """Column ``key`` as float64 (NaN where missing); text or inf raises."""
        s = self.df[self.cols[key]]
        values, bad = _to_float(s)
        self.fail(bad, key, lambda i: f"{s.iloc[i]!r} is not a number")
        if finite:
            self.fail(np.isinf(values), key, lambda i: f"{self.label(key)} is infinite")
        return values


class _Pad:
    """Scatter per-event values (grouped by subject, in order) into ``[S, L]`` arrays."""

    def __init__(self, subj, S):
        self.subj = subj
        self.counts = np.bincount(subj, minlength=S) if len(subj) else np.zeros(S, np.int64)
        self.L = int(self.counts.max()) if S else 0
        start = np.cumsum(self.counts) - self.counts
        self.pos = np.arange(len(subj)) - np.repeat(start, self.counts)

    def __call__(self, values, fill=0, edge=False, default=0):
        values = np.asarray(values)
        S = len(self.counts)
        out = np.full((S, self.L), fill, dtype=values.dtype)
        out[self.subj, self.pos] = values
        if edge and self.L:
            last = np.full(S, default, dtype=values.dtype)
            has = self.counts > 0
            last[has] = out[has, self.counts[has] - 1]
            out = np.where(np.arange(self.L) >= self.counts[:, None], last[:, None], out)
        return out


def _open(source):
    if isinstance(source, pd.DataFrame):
        return _Table(source, "DataFrame", from_file=False)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        df = pd.read_csv(path, na_values=["."], skipinitialspace=True)
        if df.shape[1] == 1 and len(str(df.columns[0]).split()) > 1:   # whitespace-separated
            df = pd.read_csv(path, na_values=["."], sep=r"\s+")
        return _Table(df, path.name, from_file=True)
    raise TypeError(f"read_nonmem: source must be a path or a pandas DataFrame, "
                    f"not {type(source).__name__}")


def _to_float(s):
    """(values as float64 with NaN for missing, mask of entries that are not numbers)."""
    if pd.api.types.is_bool_dtype(s) or pd.api.types.is_numeric_dtype(s):
        return s.to_numpy(dtype=np.float64, na_value=np.nan), np.zeros(len(s), bool)
    text = s.astype("string").str.strip()
    missing = (text.isna() | text.isin(["", "."])).to_numpy(bool)
    num = pd.to_numeric(text.mask(missing), errors="coerce").to_numpy(dtype=np.float64,
                                                                      na_value=np.nan)
    return num, np.isnan(num) & ~missing


def _column(t, key):
    """(values, numeric): numbers as float64 (NaN missing) if every entry parses, else text."""
    s = t.df[t.cols[key]]
    values, bad = _to_float(s)
    if not bad.any():
        return values, True
    text = s.astype("string").str.strip()
    text = text.mask(text.isin(["", "."]))
    return text.to_numpy(dtype=object, na_value=None), False


def _subjects(t):
    s = t.df[t.cols["ID"]]
    values, bad = _to_float(s)
    numeric = not bad.any()
    if numeric:
        missing = np.isnan(values)
    else:
        values, _ = _column(t, "ID")
        missing = pd.isna(values)
    t.fail(missing, "ID", "ID is missing")
    if numeric:
        t.fail(np.isinf(values), "ID", "ID is infinite")
    subj, uniques = pd.factorize(pd.Series(values), sort=False)
    subj = subj.astype(np.int64)
    first = pd.Series(np.arange(t.n)).groupby(subj).first().to_numpy()
    t.fail(np.r_[False, subj[1:] < subj[:-1]], "ID", lambda i: (
        f"subject {_id(uniques[subj[i]])!r} appears again after other subjects (first at "
        f"{t.row(int(first[subj[i]]))}); a subject's rows must be contiguous"))
    return subj, [_id(u) for u in uniques]


def _id(u):
    if isinstance(u, (float, np.floating)) and float(u).is_integer():
        return int(u)
    return u.item() if isinstance(u, np.generic) else u


def _name(u):
    u = _id(u)
    return str(u)


def _count(reasons, mask, why):
    c = int(np.count_nonzero(mask))
    if c:
        reasons[why] = c


def _check_lloq(lloq):
    if lloq is None:
        return None
    if isinstance(lloq, bool) or not isinstance(lloq, (int, float, np.number)):
        raise TypeError(f"lloq must be a number, not {type(lloq).__name__}")
    if not np.isfinite(lloq) or lloq < 0:
        raise ValueError(f"lloq must be a finite number >= 0, got {lloq}")
    return float(lloq)


def _covariates(t, subj, S, covariates, time_varying, categorical):
    """Baseline and time-varying covariates: name -> (float values with NaN, categories)."""
    reserved = set(_RESERVED)

    def resolve(names, arg):
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
            if key in reserved:
                raise ValueError(f"{arg}: {t.label(key)!r} is a NONMEM data item, "
                                 "not a covariate")
            keys.append(key)
        return keys

    cov_keys = resolve(covariates, "covariates")
    tv_keys = resolve(time_varying, "time_varying")
    cat_keys = resolve(categorical, "categorical") or []
    candidates = [k for k in t.cols if k not in reserved]
    parsed = {}

    def column(key):
        if key not in parsed:
            values, numeric = _column(t, key)
            cats = None
            if not numeric or key in cat_keys:
                codes, uniques = pd.factorize(pd.Series(values), sort=True)
                values = np.where(codes < 0, np.nan, codes).astype(np.float64)
                cats = [_id(u) for u in uniques]
            varies = bool(len(values)) and \
                int(pd.Series(values).groupby(subj).nunique().max()) > 1
            parsed[key] = (values, cats, numeric, varies)
        return parsed[key]

    ignored = {}
    if cov_keys is None:
        cov_keys = [k for k in candidates if k not in (tv_keys or []) and not column(k)[3]]
    if tv_keys is None:
        tv_keys = []
        for k in candidates:
            if k in cov_keys or not column(k)[3]:
                continue
            if not column(k)[2] and k not in cat_keys:
                ignored[t.label(k)] = ("text that varies within subjects (name it in "
                                       "time_varying= to read it as categorical)")
                continue
            tv_keys.append(k)
    for k in cat_keys:
        if k not in cov_keys and k not in tv_keys:
            raise ValueError(f"categorical: {t.label(k)!r} is not read as a covariate "
                             "(name it in covariates= or time_varying=)")

    categories, cov, tv = {}, {}, {}
    for k in cov_keys:
        values, cats, _, _ = column(k)
        first = pd.Series(values).groupby(subj).first().reindex(range(S)).to_numpy(np.float64)
        cov[t.label(k)] = (first, cats)
        if cats is not None:
            categories[t.label(k)] = cats
    for k in tv_keys:
        values, cats, _, _ = column(k)
        filled = pd.Series(values).groupby(subj).ffill()
        filled = filled.groupby(subj).bfill().to_numpy(np.float64)
        tv[t.label(k)] = (filled, cats)
        if cats is not None:
            categories[t.label(k)] = cats
    return cov, tv, categories, ignored
