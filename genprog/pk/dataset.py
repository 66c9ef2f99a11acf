"""``Dataset``: a NONMEM-style PK data set held as padded, batched tensors.

Everything a population model needs is a tensor with a leading subject dim ``S``, padded
to the longest subject (``D`` dose events, ``T`` observations) with boolean masks, so a
whole population is evaluated without a Python loop over subjects.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources

import torch

#: The public data sets shipped with genprog (``genprog/pk/datasets/NAME.csv``).
BUNDLED = ("theo_sd", "warfarin", "pheno_sd")


def dataset_path(name: str) -> str:
    """Path of a bundled public data set: ``"theo_sd"``, ``"warfarin"`` or ``"pheno_sd"``.

    >>> dataset_path("theo_sd").endswith("theo_sd.csv")
    True
    """
    if name not in BUNDLED:
        raise ValueError(f"dataset_path: unknown data set {name!r}; bundled: {BUNDLED}")
    return str(resources.files("genprog.pk") / "datasets" / f"{name}.csv")


@dataclass(frozen=True)
class Dataset:
    """A PK data set (built by :func:`genprog.pk.read_nonmem`).

    Attributes
    ----------
    ids : list
        Original subject IDs, in the order of the subject dim ``S``.
    dose_time : Tensor [S, D]
        Dose times (h, or the file's time unit); additional doses (II/ADDL) expanded.
    dose_amt : Tensor [S, D]
        Dose amounts (the file's unit).
    dose_cmt : LongTensor [S, D]
        Dosing compartment, NONMEM numbering from 1 (1 = depot for oral models).
    dose_rate : Tensor [S, D]
        Zero-order infusion rate (amount / time); 0 for a bolus.
    dose_ss : LongTensor [S, D]
        Steady state: 0 no, 1 steady state (amounts reset), 2 steady state added to
        what is there. Values outside 0-3 in the file (e.g. 99 sentinels) read as 0.
    dose_ii : Tensor [S, D]
        Interdose interval for steady-state doses (0 otherwise).
    dose_epoch : LongTensor [S, D]
        Reset epoch: EVID 3/4 start a new epoch; a dose acts on observations of its epoch.
    dose_mask : BoolTensor [S, D]
        True for real doses, False for padding.
    obs_time, obs_dv : Tensor [S, T]
        Observation times and values (DV).
    obs_cmt : LongTensor [S, T]
        Observed compartment (NONMEM numbering; 0 when the file has no CMT).
    obs_dvid : LongTensor [S, T]
        Observation type code (index into ``dvid_names``; 0 when single type).
    obs_blq : BoolTensor [S, T]
        Below the limit of quantification (censored; DV holds the limit or is ignored).
    obs_lloq : Tensor [S, T]
        The quantification limit for BLQ observations (NaN when not censored).
    obs_epoch : LongTensor [S, T]
    obs_mask : BoolTensor [S, T]
        True for real observations, False for padding.
    covariates : dict[str, Tensor [S]]
        Baseline covariates (the subject's first value); categorical ones coded 0..K-1.
    time_varying : dict[str, Tensor [S, T]]
        Covariates at each observation time (last value carried forward).
    dvid_names : list[str]
        Observation type names by code.
    categories : dict[str, list]
        For categorical covariates, the category of each code.
    summary : dict
        Counts read: subjects, doses, observations, blq, excluded rows (with reasons);
        ``notes``, the accepted oddities (printed by :func:`genprog.pk.describe`); ``source``,
        the file name (see :func:`genprog.pk.read_nonmem`).
    """

    ids: list
    dose_time: torch.Tensor
    dose_amt: torch.Tensor
    dose_cmt: torch.Tensor
    dose_rate: torch.Tensor
    dose_ss: torch.Tensor
    dose_ii: torch.Tensor
    dose_epoch: torch.Tensor
    dose_mask: torch.Tensor
    obs_time: torch.Tensor
    obs_dv: torch.Tensor
    obs_cmt: torch.Tensor
    obs_dvid: torch.Tensor
    obs_blq: torch.Tensor
    obs_lloq: torch.Tensor
    obs_epoch: torch.Tensor
    obs_mask: torch.Tensor
    covariates: dict = field(default_factory=dict)
    time_varying: dict = field(default_factory=dict)
    dvid_names: list = field(default_factory=lambda: ["dv"])
    categories: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)

    @property
    def n_subjects(self) -> int:
        return len(self.ids)

    @property
    def n_observations(self) -> int:
        return int(self.obs_mask.sum())

    def to(self, device=None, dtype=None) -> Dataset:
        """A copy with tensors on ``device``; floating tensors take ``dtype``.

        Raises ``ValueError`` naming the field when a finite value does not fit ``dtype``
        (``1e300`` read in float64 and moved to float32 would become ``inf``).
        """

        def move(x, name):
            if not torch.is_tensor(x):
                return {k: move(v, f"{name}[{k!r}]") for k, v in x.items()} \
                    if isinstance(x, dict) else x
            if x.is_floating_point():
                moved = x.to(device=device, dtype=dtype or x.dtype)
                if dtype is not None and dtype != x.dtype:
                    _check_cast(x, moved, name)
                return moved
            return x.to(device=device)

        return dataclasses.replace(self, **{f.name: move(getattr(self, f.name), f.name)
                                            for f in dataclasses.fields(self)
                                            if f.name not in _NOT_TENSORS})

    def subset(self, index) -> Dataset:
        """The subjects at ``index`` (a list of positions or a boolean mask)."""
        idx = torch.as_tensor(index)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().squeeze(-1)
        ids = [self.ids[i] for i in idx.tolist()]

        def take(x):
            if torch.is_tensor(x):
                return x[idx.to(x.device)]
            if isinstance(x, dict):
                return {k: take(v) for k, v in x.items()}
            return x

        return dataclasses.replace(self, ids=ids, **{f.name: take(getattr(self, f.name))
                                                     for f in dataclasses.fields(self)
                                                     if f.name not in _NOT_TENSORS})


_NOT_TENSORS = ("ids", "dvid_names", "categories", "summary")


def _check_cast(before: torch.Tensor, after: torch.Tensor, name: str) -> None:
    """``ValueError`` when a finite entry became infinite in the cast."""
    lost = torch.isfinite(before) & ~torch.isfinite(after.to(before.device))
    if bool(lost.any()):
        value = float(before[lost][0])
        raise ValueError(f"Dataset.to(dtype={after.dtype}): {name} holds {value:g}, beyond the "
                         f"range of {after.dtype} ({int(lost.sum())} value(s)); rescale the "
                         "data (another unit) or keep the wider dtype")
