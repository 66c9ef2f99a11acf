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

Reading goes in four sections, one module each: *parse* (:mod:`genprog.pk.nonmem_parse`:
encoding, header, comment rows, malformed rows), *events* (:mod:`genprog.pk.nonmem_events`),
*covariates* (:mod:`genprog.pk.nonmem_covariates`) and *checks*
(:mod:`genprog.pk.nonmem_checks`: accepted oddities). Every column goes through one
validation layer (:mod:`genprog.pk.nonmem_table`), once, in the dtype it will be stored in.

Errors. Every problem raises ``ValueError`` naming the source, the row (for a file, the
1-based data row, header and comment rows not counted, followed by its line in the file;
for a DataFrame, its index label), the column, the value and what would be valid.

Oddities. What is accepted but may be a mistake (duplicated dose or observation rows, MDV
0 on a dose row, II without ADDL or SS, SS outside 0-3, comment rows skipped, a file that
is not UTF-8, a column read as time-varying because it varies, a covariate missing for a
whole subject) is listed in ``summary["notes"]``, printed by :func:`describe`, and issued
as ONE :class:`DataWarning`. :func:`check_compartments` checks CMT values against a
structural model (where the model meets the data).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from genprog.pk.dataset import Dataset
from genprog.pk.nonmem_checks import DataWarning, check_compartments, event_oddities, warn_oddities
from genprog.pk.nonmem_covariates import read_covariates
from genprog.pk.nonmem_events import expand_doses, read_events
from genprog.pk.nonmem_parse import parse_file
from genprog.pk.nonmem_table import Table, subject_ids
from genprog.pk.sharding import shard_dataset

__all__ = ["DataWarning", "check_compartments", "describe", "read_nonmem"]

def read_nonmem(source, *, covariates=None, categorical=None, lloq=None,
                time_varying=None, shard: tuple | None = None) -> Dataset:
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
    shard : (rank, world), optional
        Keep only this rank's block of subjects (contiguous in file order, sizes differing
        by at most one, never a subject split; :func:`genprog.pk.sharding.shard_dataset`),
        for subject-sharded fits under ``torch.distributed``. The whole file is parsed so
        that category codes and padded widths agree across ranks.

    Returns
    -------
    Dataset
        Padded tensors in torch's default float dtype; ``summary`` counts what was read:
        ``rows``, ``subjects``, ``doses`` (after ADDL expansion), ``dose_rows``,
        ``observations``, ``blq``, ``excluded_rows`` and ``excluded_reasons`` (rows that
        are neither doses nor observations, by reason), ``resets``, ``addl_cancelled``,
        ``ss_ignored`` (dose rows whose SS value is outside 0-3), ``covariates``,
        ``time_varying``, ``ignored_columns``, ``missing_baseline``, ``notes`` (the
        accepted oddities) and ``source`` (the file name, or ``"DataFrame"``).

    Raises
    ------
    ValueError
        On a malformed file, row or column, naming the source, the row, the column and
        what would be valid.
    TypeError
        When ``source`` is neither a path nor a DataFrame, or ``lloq`` is not a number.

    Warns
    -----
    DataWarning
        Once, listing every accepted oddity (also in ``summary["notes"]``).

    Examples
    --------
    >>> import pandas as pd
    >>> df = pd.DataFrame({"ID": [1, 1, 1], "TIME": [0.0, 1.0, 4.0], "AMT": [100, 0, 0],
    ...                    "EVID": [1, 0, 0], "DV": [0.0, 5.0, 3.0], "WT": [70, 70, 70]})
    >>> data = read_nonmem(df)
    >>> data.obs_time.tolist(), data.dose_amt.tolist(), data.covariates["WT"].tolist()
    ([[1.0, 4.0]], [[100.0]], [70.0])
    """
    t, notes = _open(source)
    if t.n == 0:
        raise ValueError(f"{t.name}: no data rows")
    for key in ("ID", "TIME"):
        if not t.has(key):
            raise ValueError(f"{t.name}: required column {key} is missing "
                             f"(columns: {', '.join(map(str, t.df.columns))})")
    lloq = _check_lloq(lloq)
    subj, ids = subject_ids(t)
    ev = read_events(t, subj, ids, lloq)
    cov = read_covariates(t, subj, ids, covariates, time_varying, categorical)
    notes = [*notes, *event_oddities(t, ev, ids), *cov.notes]
    data = _dataset(t, ev, expand_doses(ev), cov, ids, notes)
    warn_oddities(t.name, notes)
    return data if shard is None else shard_dataset(data, *shard)


def _dataset(t: Table, ev, doses, cov, ids, notes) -> Dataset:
    """Pad the events into ``[S, ...]`` tensors of the storage dtype."""
    S = len(ids)
    o = np.flatnonzero(ev.is_obs)
    fdt = t.dtype
    dpad = _Pad(doses.subj, S)
    opad = _Pad(ev.subj[o], S)

    def f(x):
        return torch.tensor(np.ascontiguousarray(x, dtype=np.float64), dtype=fdt)

    def i64(x):
        return torch.tensor(np.ascontiguousarray(x, dtype=np.int64))

    def b(x):
        return torch.tensor(np.ascontiguousarray(x, dtype=bool))

    def codes(values):
        return np.nan_to_num(values, nan=-1).astype(np.int64)

    time_varying = {
        name: f(opad(values[o], edge=True, default=np.nan)) if cats is None
        else i64(opad(codes(values[o]), edge=True, default=-1))
        for name, (values, cats) in cov.time_varying.items()}
    baseline = {name: f(values) if cats is None else i64(codes(values))
                for name, (values, cats) in cov.baseline.items()}
    src = doses.src
    return Dataset(
        ids=ids,
        dose_time=f(dpad(doses.time, edge=True)),
        dose_amt=f(dpad(ev.amt[src])),
        dose_cmt=i64(dpad(ev.dose_cmt[src], edge=True, default=1)),
        dose_rate=f(dpad(ev.rate[src])),
        dose_ss=i64(dpad(doses.ss)),
        dose_ii=f(dpad(doses.ii)),
        dose_epoch=i64(dpad(doses.epoch, edge=True)),
        dose_mask=b(dpad(np.ones(len(src), bool), fill=False)),
        obs_time=f(opad(ev.time[o], edge=True)),
        obs_dv=f(opad(ev.dv[o])),
        obs_cmt=i64(opad(ev.cmt[o], edge=True)),
        obs_dvid=i64(opad(ev.dvid[o], edge=True)),
        obs_blq=b(opad(ev.blq[o], fill=False)),
        obs_lloq=f(opad(ev.obs_lloq[o], fill=np.nan)),
        obs_epoch=i64(opad(ev.epoch[o], edge=True)),
        obs_mask=b(opad(np.ones(len(o), bool), fill=False)),
        covariates=baseline,
        time_varying=time_varying,
        dvid_names=ev.dvid_names,
        categories=cov.categories,
        summary=_summary(t, ev, doses, cov, ids, notes),
    )


def _summary(t, ev, doses, cov, ids, notes) -> dict:
    return {
        "rows": t.n,
        "subjects": len(ids),
        "doses": len(doses.src),
        "dose_rows": int(ev.is_dose.sum()),
        "observations": int(ev.is_obs.sum()),
        "blq": int(ev.blq.sum()),
        "excluded_rows": int(sum(ev.excluded.values())),
        "excluded_reasons": ev.excluded,
        "resets": int(ev.reset.sum()),
        "addl_cancelled": doses.cancelled,
        "ss_ignored": ev.ss_ignored,
        "covariates": list(cov.baseline),
        "time_varying": list(cov.time_varying),
        "ignored_columns": cov.ignored,
        "missing_baseline": {name: int(np.isnan(v).sum()) for name, (v, _) in cov.baseline.items()
                             if np.isnan(v).any()},
        "notes": list(notes),
        "source": t.name,
    }


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
    notes = s.get("notes") or []
    if notes:
        lines.append(f"notes ({len(notes)}):")
        lines += [f"  - {note}" for note in notes]
    return "\n".join(lines)


# ---- helpers -------------------------------------------------------------------------


def _open(source):
    """(Table, notes from parsing) for a path or a DataFrame."""
    if isinstance(source, pd.DataFrame):
        return Table(source, "DataFrame"), []
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            raise ValueError(f"{path}: is a folder; give a CSV file")
        parsed = parse_file(path)
        return Table(parsed.frame, path.name, lines=parsed.lines, numbers=parsed.numbers), \
            parsed.notes
    raise TypeError(f"read_nonmem: source must be a path or a pandas DataFrame, "
                    f"not {type(source).__name__}")


def _check_lloq(lloq):
    if lloq is None:
        return None
    if isinstance(lloq, bool) or not isinstance(lloq, (int, float, np.number)):
        raise TypeError(f"lloq must be a number, not {type(lloq).__name__}")
    if not np.isfinite(lloq) or lloq < 0:
        raise ValueError(f"lloq must be a finite number >= 0, got {lloq}")
    return float(lloq)


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
