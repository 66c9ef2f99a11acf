"""Events of a NONMEM data set (the *events* section of :func:`genprog.pk.read_nonmem`):
which rows are doses and which observations, their times, compartments, infusion rates,
additional and steady-state doses, censoring and observation types; and the expansion of
the dose rows into dose events (ADDL, resets). Conventions: :mod:`genprog.pk.data`.

Every function takes the :class:`~genprog.pk.nonmem_table.Table` being read and raises
``ValueError`` naming the row, the column and what would be valid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from genprog.pk.nonmem_table import Table

__all__ = ["DoseEvents", "Events", "expand_doses", "read_events"]

DOSE_EVIDS = (1, 4, 101)
EVIDS = (0, 1, 2, 3, 4, 101)


@dataclass(frozen=True)
class Events:
    """Per-row event arrays (length = rows read).

    Attributes
    ----------
    subj : int64 array
        Subject index of each row.
    time : float64 array
        TIME as stored.
    evid : float64 array
        EVID (given, or implied by MDV/AMT).
    is_dose, is_obs : bool arrays
        Dose rows; observation rows (an excluded row is neither).
    amt, rate, ii : float64 arrays
        AMT (0 off dose rows), infusion rate (0: bolus), II.
    addl, ss : int64 arrays
        ADDL; SS code (0, 1 steady state, 2 added) on dose rows.
    cmt : int64 array
        CMT as given (0 without a CMT column).
    dose_cmt : int64 array
        The dose compartment (1 without a CMT column).
    reset : bool array
        EVID 3 or 4.
    epoch : int64 array
        Reset epoch of each row.
    dv, obs_lloq : float64 arrays
        DV (a censored row's missing DV holds its limit); the limit of BLQ rows (NaN).
    blq : bool array
    dvid : int64 array
        Observation type code; ``dvid_names`` the names by code.
    excluded : dict
        Reason -> count of rows that are neither doses nor observations.
    ss_ignored : int
        Dose rows whose SS is outside 0-3 (read as not steady state).
    """

    subj: np.ndarray
    time: np.ndarray
    evid: np.ndarray
    is_dose: np.ndarray
    is_obs: np.ndarray
    amt: np.ndarray
    rate: np.ndarray
    ii: np.ndarray
    addl: np.ndarray
    ss: np.ndarray
    cmt: np.ndarray
    dose_cmt: np.ndarray
    reset: np.ndarray
    epoch: np.ndarray
    dv: np.ndarray
    obs_lloq: np.ndarray
    blq: np.ndarray
    dvid: np.ndarray
    dvid_names: list
    excluded: dict
    ss_ignored: int


@dataclass(frozen=True)
class DoseEvents:
    """Dose events after ADDL expansion and reset cancellation, sorted by subject and time.

    ``src`` is the row each event comes from; ``k`` its place in the row's ADDL train (0 the
    row's own dose); ``cancelled`` counts additional doses dropped at a reset.
    """

    src: np.ndarray
    k: np.ndarray
    time: np.ndarray
    subj: np.ndarray
    epoch: np.ndarray
    ss: np.ndarray
    ii: np.ndarray
    cancelled: int


def read_events(t: Table, subj: np.ndarray, ids: list, lloq) -> Events:
    """Read and check the event items of every row (see the module docstring)."""
    time = t.number("TIME")
    t.fail(np.isnan(time), "TIME", "TIME is missing; every row needs a time >= 0")
    t.fail(time < 0, "TIME", lambda i: f"TIME is negative ({time[i]:g}); times must be >= 0")
    evid, is_dose, is_obs, amt, excluded = _event_types(t)
    reset = np.isin(evid, (3, 4))
    epoch = pd.Series(reset.astype(np.int64)).groupby(subj).cumsum().to_numpy()
    _check_time_order(t, time, subj, ids, reset)
    cmt, dose_cmt = _compartments(t, is_dose)
    rate = _infusion_rates(t, is_dose, amt)
    ii, addl, ss, ss_ignored = _repeats(t, is_dose, rate, amt)
    _check_dose_amounts(t, is_dose, amt, evid, ss, rate, ii)
    dv, blq, obs_lloq = _observations(t, is_obs, lloq)
    dvid, dvid_names = _observation_types(t, is_obs)
    return Events(subj=subj, time=time, evid=evid, is_dose=is_dose, is_obs=is_obs,
                  amt=np.where(is_dose, amt, 0.0), rate=rate, ii=ii, addl=addl, ss=ss,
                  cmt=cmt, dose_cmt=dose_cmt, reset=reset, epoch=epoch, dv=dv,
                  obs_lloq=obs_lloq, blq=blq, dvid=dvid, dvid_names=dvid_names,
                  excluded=excluded, ss_ignored=ss_ignored)


# ---- event types ------------------------------------------------------------------------


def _event_types(t: Table):
    """(evid, is_dose, is_obs, amt, excluded reasons) from EVID, MDV and AMT."""
    n = t.n
    amt = t.number("AMT") if t.has("AMT") else np.zeros(n)
    t.fail(amt < 0, "AMT", lambda i: f"AMT is negative ({amt[i]:g}); a dose amount is > 0")
    mdv = t.number("MDV") if t.has("MDV") else None
    if mdv is not None:
        t.fail(~np.isnan(mdv) & ~np.isin(mdv, (0, 1)), "MDV",
               lambda i: f"MDV must be 0 or 1 (got {mdv[i]:g})")
    if t.has("EVID"):
        evid, is_dose, is_obs, excluded = _from_evid(t, amt, mdv)
    elif mdv is not None:
        evid, is_dose, is_obs, excluded = _from_mdv(t, amt, mdv)
    else:
        is_dose = np.nan_to_num(amt) > 0
        is_obs = ~is_dose
        evid, excluded = np.where(is_dose, 1.0, 0.0), {}
    t.fail(is_dose & np.isnan(amt), "AMT", "AMT is missing on a dose row")
    return evid, is_dose, is_obs, amt, excluded


def _from_evid(t, amt, mdv):
    n = t.n
    evid = t.number("EVID")
    t.fail(np.isnan(evid), "EVID", "EVID is missing")
    t.fail(~np.isin(evid, EVIDS), "EVID", lambda i: (
        f"EVID {evid[i]:g} is not one of 0 (observation), 1 (dose), 2 (other), "
        "3 (reset), 4 (reset and dose), 101 (dose, rxode2)"))
    is_dose = np.isin(evid, DOSE_EVIDS)
    no_obs = np.zeros(n, bool)
    if mdv is not None:
        t.fail((evid == 0) & np.isnan(mdv), "MDV", "MDV is missing on an EVID 0 row")
        no_obs = (evid == 0) & (mdv == 1)
    is_obs = (evid == 0) & ~no_obs
    t.fail(~is_dose & (np.nan_to_num(amt) > 0), "AMT", lambda i: (
        f"AMT is {amt[i]:g} on a row that is not a dose (EVID {evid[i]:g}); "
        "a dose needs EVID 1 or 4"))
    excluded = {}
    _count(excluded, evid == 2, "EVID 2 (other event)")
    _count(excluded, evid == 3, "EVID 3 (reset)")
    _count(excluded, no_obs, "EVID 0 with MDV 1 (no observation)")
    if not t.has("AMT"):
        t.fail(is_dose, "EVID", lambda i: (
            f"the row is a dose (EVID {evid[i]:g}) but there is no AMT column"))
    return evid, is_dose, is_obs, excluded


def _from_mdv(t, amt, mdv):
    t.fail(np.isnan(mdv), "MDV", "MDV is missing (and there is no EVID column)")
    a = np.nan_to_num(amt)
    t.fail((mdv == 0) & (a > 0), "AMT", lambda i: (
        f"AMT is {amt[i]:g} on an observation row (MDV 0); a dose needs MDV 1"))
    is_dose = (mdv == 1) & (a > 0)
    is_obs = mdv == 0
    excluded = {}
    _count(excluded, (mdv == 1) & ~is_dose,
           "MDV 1 with AMT 0 (neither dose nor observation; no EVID column)")
    evid = np.where(is_dose, 1.0, np.where(is_obs, 0.0, 2.0))
    return evid, is_dose, is_obs, excluded


def _check_time_order(t, time, subj, ids, reset):
    same = np.r_[False, subj[1:] == subj[:-1]]
    back = same & np.r_[False, time[1:] < time[:-1]] & ~reset
    t.fail(back, "TIME", lambda i: (
        f"TIME goes backwards within subject {ids[subj[i]]!r} ({time[i - 1]:g} then "
        f"{time[i]:g}); sort the subject's rows by time - only a reset (EVID 3 or 4) may "
        "restart time"))


# ---- compartments, infusions, additional doses, steady state ----------------------------


def _compartments(t, is_dose):
    """(cmt as given, dose compartment) per row."""
    n = t.n
    if not t.has("CMT"):
        return np.zeros(n, np.int64), np.ones(n, np.int64)
    raw = t.number("CMT")
    t.fail(is_dose & np.isnan(raw), "CMT", "CMT is missing on a dose row")
    c = np.nan_to_num(raw)
    t.fail(c < 0, "CMT", lambda i: (
        f"CMT must be a positive integer (got {c[i]:g}; negative CMT, switching a "
        "compartment off, is not supported)"))
    t.fail(is_dose & (c == 0), "CMT", "CMT must be a positive integer on a dose row (got 0)")
    cmt = c.astype(np.int64)
    return cmt, cmt


def _infusion_rates(t, is_dose, amt):
    """Zero-order input rate of each dose row (0: bolus), from RATE or DUR/DURATION."""
    n = t.n
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
    key = "DUR" if t.has("DUR") else "DURATION" if t.has("DURATION") else None
    if key is None:
        return rate
    d = np.nan_to_num(t.number(key))
    t.fail(is_dose & (d < 0), key, lambda i: f"{t.label(key)} is negative ({d[i]:g})")
    timed = is_dose & (d > 0)
    from_dur = np.divide(np.nan_to_num(amt), d, out=np.zeros(n), where=timed)
    t.fail(timed & (rate > 0) & ~np.isclose(rate, from_dur, rtol=1e-6, atol=0), key,
           lambda i: (f"RATE {rate[i]:g} and {t.label(key)} {d[i]:g} disagree "
                      f"(AMT/{t.label(key)} = {from_dur[i]:g})"))
    return np.where(timed, from_dur, rate)


def _repeats(t, is_dose, rate, amt):
    """(II, ADDL, SS code, count of SS values read as 0) with their consistency checks."""
    n = t.n
    ii = np.nan_to_num(t.number("II")) if t.has("II") else np.zeros(n)
    t.fail(is_dose & (ii < 0), "II", lambda i: f"II is negative ({ii[i]:g})")
    addl = np.nan_to_num(t.number("ADDL")) if t.has("ADDL") else np.zeros(n)
    t.fail(is_dose & (addl < 0), "ADDL", lambda i: (
        f"ADDL is negative ({addl[i]:g}); NONMEM's empirical steady state is not supported"))
    addl = np.where(is_dose, addl, 0).astype(np.int64)
    t.fail(is_dose & (addl > 0) & (ii <= 0), "II", lambda i: (
        f"II is {ii[i]:g} but ADDL is {addl[i]}: additional doses need II > 0"))
    ss_raw = t.number("SS") if t.has("SS") else np.zeros(n)
    ss = np.where(np.isin(ss_raw, (1, 2, 3)) & is_dose, ss_raw, 0).astype(np.int64)
    ss[ss == 3] = 1
    ss_ignored = int((is_dose & ~np.isnan(ss_raw) & ~np.isin(ss_raw, (0, 1, 2, 3))).sum())
    constant = (ss > 0) & (rate > 0) & (np.nan_to_num(amt) == 0)
    t.fail((ss > 0) & (ii <= 0) & ~constant, "II", lambda i: (
        f"II is {ii[i]:g} but SS is {ss_raw[i]:g}: a steady-state dose needs II > 0 "
        "(or AMT 0 with RATE > 0 for a constant infusion at steady state)"))
    t.fail(constant & (ii > 0), "II", lambda i: (
        f"II is {ii[i]:g} on a constant infusion at steady state (SS {ss_raw[i]:g}, AMT 0, "
        f"RATE {rate[i]:g}); a constant infusion has II 0 - or give the dose in AMT"))
    t.fail((ss > 0) & (rate > 0) & (addl > 0), "ADDL",
           "ADDL must be 0 for a steady-state infusion")
    return ii, addl, ss, ss_ignored


def _check_dose_amounts(t, is_dose, amt, evid, ss, rate, ii):
    constant = (ss > 0) & (rate > 0) & (ii == 0)
    t.fail(is_dose & (amt == 0) & ~constant, "AMT", lambda i: (
        f"AMT is 0 on a dose row (EVID {evid[i]:g}); a dose needs AMT > 0 (AMT 0 only for a "
        "constant infusion at steady state: SS 1, RATE > 0, II 0)"))


# ---- observations: DV, censoring, types -------------------------------------------------


def _observations(t, is_obs, lloq):
    """(DV, BLQ flag, BLQ limit) of every row; see the censoring rules in pk.data."""
    n = t.n
    if t.has("DV"):
        dv = t.number("DV")
    else:
        t.fail(is_obs, "DV", "the row is an observation but there is no DV column")
        dv = np.full(n, np.nan)
    flagged = _censoring_flags(t, is_obs)
    row_lloq = np.full(n, np.nan if lloq is None else lloq)
    if t.has("LLOQ"):
        col = t.number("LLOQ")
        row_lloq = np.where(np.isnan(col), row_lloq, col)
    limit = t.number("LIMIT") if t.has("LIMIT") else np.full(n, np.nan)
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
    return np.where(np.isnan(dv), obs_lloq, dv), blq, obs_lloq


def _censoring_flags(t, is_obs):
    if t.has("CENS") and t.has("BLQ"):
        raise ValueError(f"{t.name}: both CENS and BLQ columns; keep one")
    key = "CENS" if t.has("CENS") else "BLQ" if t.has("BLQ") else None
    if key is None:
        return np.zeros(t.n, bool)
    flag = np.nan_to_num(t.number(key))
    t.fail(is_obs & (flag == -1), key, (
        f"{t.label(key)} -1 (above the upper limit of quantification) is not supported"))
    t.fail(is_obs & ~np.isin(flag, (0, 1)), key, lambda i: (
        f"{t.label(key)} must be 0 or 1 (1 = below LLOQ), got {flag[i]:g}"))
    return is_obs & (flag == 1)


def _observation_types(t, is_obs):
    """(DVID code per row, names by code): codes by first appearance among observations."""
    dvid = np.zeros(t.n, np.int64)
    if not t.has("DVID"):
        return dvid, ["dv"]
    values, _ = t.values("DVID", labels=True)
    t.fail(is_obs & pd.isna(values), "DVID", "DVID is missing on an observation row")
    codes, uniques = pd.factorize(pd.Series(values[is_obs]), sort=False)
    dvid[is_obs] = codes
    return dvid, ([str(_label(u)) for u in uniques] if len(uniques) else ["dv"])


# ---- doses: expand ADDL, cancel at resets, sort -----------------------------------------


def expand_doses(ev: Events) -> DoseEvents:
    """Dose events: each dose row plus its ADDL additional doses, those at or after a
    reset of their epoch cancelled, sorted by subject, epoch and time."""
    d = np.flatnonzero(ev.is_dose)
    reps = ev.addl[d] + 1
    src = np.repeat(d, reps)
    k = np.arange(len(src)) - np.repeat(np.cumsum(reps) - reps, reps)
    dtime = ev.time[src] + k * ev.ii[src]
    dsubj, depoch = ev.subj[src], ev.epoch[src]
    r = np.flatnonzero(ev.reset & (ev.epoch > 0))
    end = np.full(len(src), np.nan)   # time of the reset that ends each dose's epoch
    if len(r) and len(src):
        ends = pd.Series(ev.time[r], index=pd.MultiIndex.from_arrays([ev.subj[r], ev.epoch[r] - 1]))
        end = ends.reindex(pd.MultiIndex.from_arrays([dsubj, depoch])).to_numpy(np.float64)
    cancelled = (k > 0) & (dtime >= end)
    keep = np.flatnonzero(~cancelled)
    src, k, dtime, dsubj, depoch = src[keep], k[keep], dtime[keep], dsubj[keep], depoch[keep]
    order = np.lexsort((k, src, dtime, depoch, dsubj))
    src, k, dtime, dsubj, depoch = src[order], k[order], dtime[order], dsubj[order], depoch[order]
    dss = np.where(k == 0, ev.ss[src], 0)
    dii = np.where(dss > 0, ev.ii[src], 0.0)
    return DoseEvents(src=src, k=k, time=dtime, subj=dsubj, epoch=depoch, ss=dss, ii=dii,
                      cancelled=int(cancelled.sum()))


def _count(reasons, mask, why):
    c = int(np.count_nonzero(mask))
    if c:
        reasons[why] = c


def _label(u):
    if isinstance(u, (float, np.floating)) and float(u).is_integer():
        return int(u)
    return u.item() if isinstance(u, np.generic) else u
