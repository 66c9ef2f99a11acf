"""Accepted oddities of a NONMEM data set (the *checks* section of
:func:`genprog.pk.read_nonmem`), and the check where a structural model meets the data.

An oddity is something the reader accepts but a user should know about: duplicated dose
or observation rows, MDV 0 on a dose row, an II that does nothing (no ADDL, no SS), an SS
value read as "not at steady state", comment rows skipped, a file that is not UTF-8, a
column read as time-varying because it varies. Each is one line in ``summary["notes"]``
(printed by :func:`~genprog.pk.data.describe`), and :func:`warn_oddities` issues them as
ONE :class:`~genprog.errors.DataWarning`.

:func:`check_compartments` is where a structural model meets the data: doses into a
compartment the model does not have are an error; observations in a compartment other
than the central one are a note (the model predicts the central concentration).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch

from genprog.errors import DataWarning
from genprog.pk.nonmem_events import Events
from genprog.pk.nonmem_table import Table

__all__ = ["DataWarning", "check_compartments", "event_oddities", "warn_oddities"]


def event_oddities(t: Table, ev: Events, ids: list) -> list:
    """Notes on the accepted oddities of the event rows (see the module docstring)."""
    notes = []
    dose_key = (ev.subj, ev.epoch, ev.time, ev.dose_cmt, ev.amt, ev.rate, ev.ii, ev.addl, ev.ss)
    notes += _duplicates(t, ev.is_dose, dose_key, "dose row", "each is a dose: the subject "
                         "gets both")
    obs_key = (ev.subj, ev.epoch, ev.time, ev.cmt, ev.dvid, np.nan_to_num(ev.dv, nan=-1.0),
               ev.blq)
    notes += _duplicates(t, ev.is_obs, obs_key, "observation row", "both are used")
    if t.has("EVID") and t.has("MDV"):
        mdv = t.number("MDV")
        notes += _rows(t, ev.is_dose & (mdv == 0), "dose row", "with MDV 0 (read as a dose "
                       "only, NONMEM wants MDV 1 on dose rows)")
    useless_ii = ev.is_dose & (ev.ii > 0) & (ev.addl == 0) & (ev.ss == 0)
    notes += _rows(t, useless_ii, "dose row", "with II > 0 but neither ADDL nor SS "
                   "(II ignored: one dose)")
    if t.has("ADDL"):
        stray = ~ev.is_dose & (np.nan_to_num(t.number("ADDL")) > 0)
        notes += _rows(t, stray, "row", "with ADDL > 0 that is not a dose (ADDL ignored)")
    if ev.ss_ignored and t.has("SS"):
        raw = t.number("SS")
        odd = ev.is_dose & ~np.isnan(raw) & ~np.isin(raw, (0, 1, 2, 3))
        notes += _rows(t, odd, "dose row", "with SS outside 0-3 (read as not steady state)")
    return notes


def warn_oddities(source: str, notes: list, stacklevel: int = 3) -> None:
    """Issue ``notes`` as one :class:`DataWarning` (nothing when there are none)."""
    if notes:
        warnings.warn(f"{source}: read with {len(notes)} oddit{'ies' if len(notes) > 1 else 'y'}"
                      " (also in describe()): " + "; ".join(notes), DataWarning,
                      stacklevel=stacklevel)


def check_compartments(data, structure, *, warn: bool = True) -> list:
    """Check a data set's compartment numbers against a structural model.

    Parameters
    ----------
    data : genprog.pk.Dataset
    structure : structural model
        A :class:`~genprog.pk.structural.Compartments` (``n``, ``absorption``,
        ``central_cmt``) or an :class:`~genprog.pk.ode.ODEModel` (``n_states``,
        ``central_cmt``, ``dose_cmt``).
    warn : bool
        Issue the notes as one :class:`DataWarning`.

    Returns
    -------
    list of str
        Notes: observations in a compartment other than the central one.

    Raises
    ------
    ValueError
        For a dose into a compartment the model does not have, naming the subject, the
        dose time, the CMT and the valid ones.
    """
    dose_cmts, central, label = _structure_compartments(structure)
    source = data.summary.get("source", "the data set")
    mask = data.dose_mask
    cmt = data.dose_cmt
    bad = mask & (cmt != 0) & ~_isin(cmt, dose_cmts)
    if bool(bad.any()):
        s, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"{source}: subject {data.ids[s]!r}, dose at TIME {float(data.dose_time[s, j]):g}: "
            f"CMT {int(cmt[s, j])} is not a dose compartment of {label} (valid: "
            f"{', '.join(map(str, dose_cmts))}, or 0 for the default; {int(bad.sum())} such "
            "dose(s)); fix CMT or choose the structure that has it")
    obs = data.obs_mask & (data.obs_cmt != 0) & (data.obs_cmt != central)
    notes = []
    if bool(obs.any()):
        found = sorted(set(data.obs_cmt[obs].tolist()))
        s, j = (int(x) for x in obs.nonzero()[0])
        notes.append(f"{int(obs.sum())} observation(s) in compartment(s) {found}, not the "
                     f"central compartment {central} of {label} (first: subject "
                     f"{data.ids[s]!r} at TIME {float(data.obs_time[s, j]):g}): the model "
                     "predicts the central concentration for them")
    if warn:
        warn_oddities(source, notes)
    return notes


def _structure_compartments(structure):
    """(dose compartments, central compartment, label) of a structural model."""
    central = int(structure.central_cmt)
    label = getattr(structure, "name", None) or repr(structure)
    n_states = getattr(structure, "n_states", None)
    if n_states is not None:                     # an ODE model: any of its states
        return tuple(range(1, int(n_states) + 1)), central, label
    if central == 2:                             # closed form, depot 1 + central 2
        return (1, 2), central, label
    return (1,), central, label


def _isin(x, values):
    return torch.as_tensor(np.isin(x.cpu().numpy(), values), device=x.device)


def _duplicates(t, rows, key, what, consequence) -> list:
    frame = pd.DataFrame({f"k{j}": np.asarray(k)[rows] for j, k in enumerate(key)})
    dup = frame.duplicated(keep="first").to_numpy()
    mask = np.zeros(t.n, bool)
    mask[np.flatnonzero(rows)[dup]] = True
    return _rows(t, mask, f"duplicated {what}", f"({consequence})")


def _rows(t, mask, what, detail) -> list:
    where = np.flatnonzero(mask)
    if not len(where):
        return []
    shown = ", ".join(t.where(int(i)) if k == 0 else _row_number(t, int(i))
                      for k, i in enumerate(where[:5]))
    more = f", ... ({len(where) - 5} more)" if len(where) > 5 else ""
    plural = "s" if len(where) > 1 else ""
    return [f"{len(where)} {what}{plural} {detail}: {shown}{more}"]


def _row_number(t, i) -> str:
    return t.row(i).removeprefix(f"{t.name} ")
