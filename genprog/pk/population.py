"""``PopulationModel``: a nonlinear mixed-effects (NLME) PK model as a genprog Model.

The generative story, for subjects ``i = 1..S`` and PK parameters ``p`` (e.g. ka, cl, v):

* typical values ``tv_p ~ LogNormal(log guess_p, 1)`` (sites named ``"ka"``, ``"cl"``, ...;
  ``guess_p`` from a quick non-compartmental look at the data unless given);
* inter-individual variability on the log scale: ``eta_i ~ MVN(0, Omega)`` with
  ``Omega = diag(omega) R diag(omega)``, ``omega ~ HalfNormal(1)`` (site ``"omega"``,
  one SD per random effect) and, with ``omega="block"``, ``R = L L^T``,
  ``L ~ LKJCholesky(P, 2)`` (site ``"omega_corr"``); written non-centred
  (``eta_raw ~ N(0, I)``, ``eta = diag(omega) L eta_raw``);
* covariate effects on typical values: power ``(cov/median)^beta`` (allometric when the
  exponent is fixed to 0.75 for clearances, 1 for volumes), linear ``1 + beta (cov -
  median)``, categorical ``exp(beta_k)``, threshold (indicator) ``1 + theta`` when the
  covariate is below (or above) a cut, else 1 (sites ``"beta_{param}_{cov}"``); a power
  effect may have a fixed exponent and a fixed reference (``CL = TVCL * WT`` per kg);
* optional structural parameters estimated like the others (``extra_parameters``: lag
  time ``tlag``, relative bioavailability ``f``);
* inter-occasion variability (``iov``, ``occasion``): a second level of log-normal effects
  ``kappa_ik ~ N(0, omega_iov^2)`` per subject and occasion (site ``"omega_iov"``, one SD
  per parameter; non-centred ``kappa_raw``), so ``p_ik = tv_p * cov * exp(eta_ip + kappa_ikp)``;
  an observation is predicted with the parameters of its occasion, all doses superposed
  (exact when occasions are separated by washout, as in crossover studies);
* individual parameters ``p_i = tv_p * covariate effects * exp(eta_ip)``;
* predicted concentrations by a structural model (closed form or ODE);
* residual error: additive ``sd = sigma_add``, proportional ``sd = sigma_prop * c``,
  combined ``sd = sqrt(sigma_add^2 + (sigma_prop c)^2)``, or exponential
  (``log DV ~ Normal(log c, sigma_exp)``); the observed site is ``"dv"`` ``[S, T]``, padding
  masked out; BLQ observations by the M3 likelihood ``log Phi((LLOQ - c) / sd)``.

``model(data)`` returns a :class:`genprog.Model` conditioned on the data, so sample,
log_prob, log_marginal, fit and to_arviz all apply.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import AffineTransform
from torch.distributions import constraints

from ..fit import Fit
from ..model import Model
from ..threads import threads_for, using_threads
from .data import check_compartments
from .dataset import Dataset
from .distributed import fit_distributed
from .estimation import PopulationFit, fit_mle
from .likelihood import ERROR_MODELS, censored_z, observation_distribution, residual_sd, sigma_sites
from .random_effects import (
    cat_effects,
    etas_from_raw,
    kappas_from_raw,
    omega_scale_tril,
    posterior_etas,
)
from .saem import fit_saem
from .structural import Compartments
from .summary import bayesian_summary

COVARIATE_KINDS = ("power", "allometric", "linear", "categorical", "threshold")
_ALLOMETRIC = {"cl": 0.75, "q": 0.75, "q3": 0.75, "v": 1.0, "v1": 1.0, "v2": 1.0, "v3": 1.0}


@dataclass(frozen=True)
class CovariateEffect:
    """One covariate effect on a typical value.

    Attributes
    ----------
    param : str
        The PK parameter it acts on.
    covariate : str
        The data set's covariate name (as in ``Dataset.covariates``, case-insensitive).
    kind : str
        ``"power"`` (estimated exponent), ``"allometric"`` (fixed exponent 0.75 for
        clearances, 1 for volumes), ``"linear"``, ``"categorical"``, or ``"threshold"``
        (an indicator effect: factor ``1 + theta`` when the covariate is below ``below``
        (or above ``above``), else 1; ``theta > -1``).
    below, above : float, optional
        The cut of a threshold effect (exactly one of them): ``x < below`` / ``x > above``.
    exponent : float, optional
        A power effect's fixed exponent (not estimated): ``exponent=1`` with
        ``reference=1`` is ``TV * WT``, i.e. the typical value is per unit of the covariate.
    reference : float, optional
        Reference value of a power, allometric or linear effect (default: the median over
        subjects), e.g. 70 kg.

    Examples
    --------
    >>> CovariateEffect("v", "APGR", kind="threshold", below=5).site
    'beta_v_apgr'
    """

    param: str
    covariate: str
    kind: str = "power"
    below: float | None = None
    above: float | None = None
    exponent: float | None = None
    reference: float | None = None

    @property
    def site(self) -> str:
        return f"beta_{self.param}_{self.covariate.lower()}"

    @property
    def estimated(self) -> bool:
        """Whether the effect has a coefficient to estimate (a site)."""
        return not (self.kind == "allometric" or (self.kind == "power" and self.exponent is not None))

    def indicator(self, x: torch.Tensor) -> torch.Tensor:
        """A threshold effect's indicator ``[S]`` (1 where the effect applies)."""
        hit = x < self.below if self.below is not None else x > self.above
        return hit.to(x.dtype)


class RelativeChange(dist.TransformedDistribution):
    """Prior of a relative change ``theta = r - 1`` with ``r ~ LogNormal(0, scale)``: support
    ``theta > -1`` (so ``1 + theta`` stays positive), median 0."""

    arg_constraints: dict = {}
    support = constraints.greater_than(-1.0)
    median_is_zero = True  # optimisers start a relative change at 0 (no effect)

    def __init__(self, scale=0.5, validate_args=None):
        super().__init__(dist.LogNormal(0.0, scale), [AffineTransform(-1.0, 1.0)], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(RelativeChange, _instance)
        return super().expand(batch_shape, _instance=new)


def _covariate_effects(covariates) -> tuple:
    effects = []
    for param, spec in (covariates or {}).items():
        specs = spec if isinstance(spec, list) else [spec]
        for one in specs:
            if isinstance(one, CovariateEffect):
                effects.append(one)
            elif isinstance(one, str):
                effects.append(CovariateEffect(param, one))
            elif isinstance(one, tuple) and len(one) == 2:
                effects.append(CovariateEffect(param, one[0], one[1]))
            else:
                raise TypeError(
                    f"covariates[{param!r}]: expected a covariate name, (name, kind) or "
                    f"CovariateEffect, got {one!r}"
                )
    for e in effects:
        if e.kind not in COVARIATE_KINDS:
            raise ValueError(f"covariate effect {e.site}: unknown kind {e.kind!r}; choose from {COVARIATE_KINDS}")
        if e.kind == "threshold" and (e.below is None) == (e.above is None):
            raise ValueError(f"covariate effect {e.site}: a threshold effect needs exactly one of "
                             "below= or above= (the cut)")
        if e.kind != "threshold" and (e.below is not None or e.above is not None):
            raise ValueError(f"covariate effect {e.site}: below=/above= apply to kind='threshold' only")
        if e.exponent is not None and e.kind != "power":
            raise ValueError(f"covariate effect {e.site}: a fixed exponent= applies to kind='power' only")
        if e.reference is not None and e.kind not in ("power", "allometric", "linear"):
            raise ValueError(f"covariate effect {e.site}: reference= applies to power, allometric "
                             "and linear effects")
        if e.reference is not None and e.kind != "linear" and not e.reference > 0:
            raise ValueError(f"covariate effect {e.site}: a power effect's reference must be > 0")
    sites = [e.site for e in effects if e.estimated]
    dup = sorted({x for x in sites if sites.count(x) > 1})
    if dup:
        raise ValueError(f"covariate effects: {dup} given twice")
    return tuple(effects)


def steady_state_parts(data: Dataset):
    """The doses of ``data`` split into two designs whose concentrations add up to
    ``data``'s, or None when no dose is at steady state.

    A closed-form structure evaluates every dose at every observation time, and the
    steady-state formula costs about three ordinary ones; a design with one steady-state
    dose among many (a validation design: daily doses, then SS=1 at 216 h) spends most of
    its time on steady-state terms it then discards. Here the steady-state doses (their
    dose dim compacted, ``[S, D_ss]``) and the others are separate designs. An SS=1 (or 3)
    dose resets the system: the doses before it stop acting at its time. That rule is
    kept in both parts by folding the reset segments into the epochs (segment = number
    of resets of the subject's epoch at or before the event's time; a dose acts on the
    observations of its own epoch and segment only), so both parts predict exactly what
    the whole design does.
    """
    ss = data.dose_mask & (data.dose_ss > 0)
    if not bool(ss.any()):
        return None
    reset = ss & ((data.dose_ss == 1) | (data.dose_ss == 3))
    big = torch.finfo(data.dose_time.dtype).max

    def segment(times, epochs):  # resets of the same epoch at or before each time, [S, n]
        rt = torch.where(reset, data.dose_time, torch.full_like(data.dose_time, big))
        hit = (rt[:, None, :] <= times[:, :, None]) & (data.dose_epoch[:, None, :] == epochs[:, :, None])
        return hit.sum(-1)

    n_seg = int(reset.sum(-1).max()) + 1
    dose_epoch = data.dose_epoch * n_seg + segment(data.dose_time, data.dose_epoch)
    obs_epoch = data.obs_epoch * n_seg + segment(data.obs_time, data.obs_epoch)
    return (_only_doses(data, data.dose_mask & ~ss, dose_epoch, obs_epoch),
            _only_doses(data, ss, dose_epoch, obs_epoch))


def _only_doses(data: Dataset, keep, dose_epoch, obs_epoch) -> Dataset:
    """``data`` with the doses ``keep [S, D]`` only, moved to the front of the dose dim and
    the rest of it cut (``[S, max_i sum keep_i]``), and the given epochs."""
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices
    order = order[:, :max(int(keep.sum(-1).max()), 1)]

    def take(x):
        return torch.gather(x, 1, order)

    return dataclasses.replace(
        data, dose_time=take(data.dose_time), dose_amt=take(data.dose_amt), dose_cmt=take(data.dose_cmt),
        dose_rate=take(data.dose_rate), dose_ss=take(data.dose_ss), dose_ii=take(data.dose_ii),
        dose_epoch=take(dose_epoch), dose_mask=take(keep), obs_epoch=obs_epoch)


def _draws(value, event_dim: int):
    """Drop the two plate slots (subject, time) from a global site's value traced under
    genprog's particle plate: ``[N, 1, 1, *event] -> [N, *event]``; unbatched values pass."""
    batch = value.shape[: value.dim() - event_dim]
    if len(batch) >= 3:
        return value.reshape(*batch[:-2], *value.shape[value.dim() - event_dim:])
    return value


def initial_estimates(data: Dataset, parameters, mask=None) -> dict:
    """Rough typical values from the data (a non-compartmental look), used to centre the
    default priors and start optimisers: CL = dose / AUC, k from the terminal log-linear
    slope, V = CL / k, ka from the time of the peak, peripheral volumes = V, Q = CL, F = 1,
    and tlag between the last non-measurable and the first measurable concentration after
    the first dose (median over the subjects that have both; else half the earliest first
    measurable time; with ``tlag`` among ``parameters`` the time of the peak for ka is
    counted from the lag). ``mask [S, T]`` picks the observations to
    use (default: all; a model passes its DVID's)."""
    base = data.obs_mask if mask is None else mask
    t, c, m = data.obs_time, data.obs_dv, base & ~data.obs_blq & (data.obs_dv > 0)
    dose = (data.dose_amt * data.dose_mask).sum(-1)
    guesses = {}
    cl_s, k_s, tmax_s = [], [], []
    for i in range(data.n_subjects):
        mi, dose_i = m[i], float(dose[i])
        doses = data.dose_time[i][data.dose_mask[i]]
        if doses.numel() > 1:
            # several doses: the first dose's interval alone when it has enough samples
            # (separate occasions, washouts); else all (repeated dosing, as before)
            first = doses.min()
            later = doses[doses > first]
            end = later.min() if later.numel() else torch.tensor(float("inf"))
            window = mi & (t[i] > first) & (t[i] <= end)
            if int(window.sum()) >= 3:
                mi = window
                dose_i = float(data.dose_amt[i][data.dose_mask[i]][doses == first].sum())
        ti, ci = t[i][mi].double(), c[i][mi].double()
        if ti.numel() < 3 or dose_i <= 0:
            continue
        auc = torch.trapezoid(ci, ti)
        tail = min(3, ti.numel())
        slope = -torch.linalg.lstsq(torch.stack([torch.ones(tail, dtype=ti.dtype), ti[-tail:]], -1),
                                    ci[-tail:].log()[:, None]).solution[1, 0]
        k = float(slope) if float(slope) > 1e-4 else 0.1
        auc_inf = float(auc) + float(ci[-1]) / k
        if auc_inf > 0:
            cl_s.append(dose_i / auc_inf)
            k_s.append(k)
            tmax_s.append(float(ti[ci.argmax()] - data.dose_time[i][data.dose_mask[i]].min()))
    cl = float(torch.tensor(cl_s).median()) if cl_s else 1.0
    k = float(torch.tensor(k_s).median()) if k_s else 0.1
    # V from the first dose: its amount over the peak observed before the next dose (robust
    # for sparse, repeated-dose data where the AUC and terminal slope are poorly defined)
    v_s = []
    for i in range(data.n_subjects):
        doses = data.dose_time[i][data.dose_mask[i]]
        if doses.numel() == 0:
            continue
        first = float(doses.min())
        later = doses[doses > first]
        end = float(later.min()) if later.numel() else float("inf")
        window = m[i] & (t[i] > first) & (t[i] <= end)
        if bool(window.any()):
            amount = float(data.dose_amt[i][data.dose_mask[i]][doses == first].sum())
            v_s.append(amount / float(c[i][window].max()))
    v = float(torch.tensor(v_s).median()) if v_s else cl / k
    if len(v_s) and not cl_s:
        cl = v * k
    k = cl / v
    # ka from the median time of the peak: tmax = log(ka/k) / (ka - k), solved by bisection
    tlag = _lag_guess(data, base, m)
    tmax = float(torch.tensor(tmax_s).median()) if tmax_s else 0.0
    if "tlag" in parameters:
        tmax = tmax - tlag
    ka = 3 * k
    if tmax > 0:
        lo, hi = 1.0001 * k, 1000.0 * k
        for _ in range(100):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if math.log(mid / k) / (mid - k) > tmax else (lo, mid)
        ka = math.sqrt(lo * hi)
    for p in parameters:
        # Michaelis-Menten: km at the typical concentration, vmax so that vmax/km = CL
        c_typ = float(c[m].median()) if bool(m.any()) else 1.0
        guesses[p] = {"cl": cl, "v": v, "v1": v, "v2": v, "v3": v, "q": cl, "q3": cl,
                      "ka": ka, "f": 1.0, "tlag": tlag, "km": c_typ, "vmax": cl * c_typ,
                      "d1": 1.0}.get(p, 1.0)
    return guesses


def _lag_guess(data: Dataset, observed: torch.Tensor, measurable: torch.Tensor) -> float:
    """Lag time guess: the median over subjects with a non-measurable observation (DV <= 0
    or BLQ) before their first measurable one after the first dose of the midpoint of the
    two; without such subjects, half the earliest first measurable time."""
    brackets, firsts = [], []
    t = data.obs_time
    for i in range(data.n_subjects):
        doses = data.dose_time[i][data.dose_mask[i]]
        if doses.numel() == 0:
            continue
        first = float(doses.min())
        after = observed[i] & (t[i] > first)
        hits = after & measurable[i]
        if not bool(hits.any()):
            continue
        t1 = float(t[i][hits].min())
        firsts.append(t1 - first)
        before = after & ~measurable[i] & (t[i] < t1)
        if bool(before.any()):
            brackets.append(0.5 * (float(t[i][before].max()) + t1) - first)
    if brackets:
        return float(torch.tensor(brackets).median())
    return 0.5 * min(firsts) if firsts else 0.1


@dataclass(frozen=True)
class PopulationModel:
    """A population PK model (see the module docstring for the generative story).

    Parameters
    ----------
    structure : genprog.pk.structural.Compartments or ODE model
        The structural model; it provides ``.parameters`` and ``.concentration(params, data)``.
    random_effects : sequence of str
        PK parameters with log-normal inter-individual variability.
    error : {"additive", "proportional", "combined", "exponential"}
    covariates : dict
        ``{param: "WT"}`` (power), ``{param: ("WT", "allometric")}``, or lists of these /
        :class:`CovariateEffect`.
    omega : {"diagonal", "block"}
        Independent etas, or a full omega block with an LKJ(2) prior on correlations.
    priors : dict
        Site name -> distribution, replacing a default prior.
    initial : dict
        PK parameter -> typical value used to centre the default prior (default: data).
    dvid : str or int, optional
        For data sets with several observation types, which one the model describes.
    ka_above_k : bool
        Parameterise ``ka = k + exp(...)`` so ka > k = CL/V always (removes the flip-flop
        mode); the site ``"ka_minus_k"`` replaces ``"ka"`` and ``ka`` is deterministic.
    extra_parameters : sequence of str
        Optional structural parameters to estimate: ``"tlag"`` (lag time of depot doses,
        prior centred on the data's first measurable concentration) and/or ``"f"``
        (relative bioavailability; identifiable with IIV only, or with IV and oral doses:
        fix its typical value with ``fit_mle(..., fixed={"f": 1.0})`` or
        ``fit(..., fixed=...)``). A random effect or covariate on one of them implies it.
    iov : sequence of str
        PK parameters with log-normal inter-occasion variability (site ``"omega_iov"``).
    occasion : str, optional
        The data set's occasion column (time-varying or baseline covariate; its values are
        coded 0..K-1 in sorted order); needed with ``iov``.

    Examples
    --------
    >>> from genprog import pk
    >>> m = pk.PopulationModel(pk.OneCompartment(), ["ka", "cl", "v"], "additive",
    ...                        extra_parameters=["tlag"])
    >>> m.parameters
    ('cl', 'v', 'ka', 'tlag')
    """

    structure: object
    random_effects: tuple = ()
    error: str = "combined"
    covariates: dict = field(default_factory=dict)
    omega: str = "diagonal"
    priors: dict = field(default_factory=dict)
    initial: dict = field(default_factory=dict)
    dvid: object = None
    ka_above_k: bool = False
    extra_parameters: tuple = ()
    iov: tuple = ()
    occasion: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "random_effects", tuple(self.random_effects))
        object.__setattr__(self, "iov", tuple(self.iov))
        optional = tuple(getattr(self.structure, "optional_parameters", ()))
        base = tuple(self.structure.parameters)
        effects = _covariate_effects(self.covariates)
        implied = [p for p in (*self.extra_parameters, *self.random_effects, *self.iov,
                               *(e.param for e in effects)) if p in optional and p not in base]
        bad = [p for p in self.extra_parameters if p not in optional]
        if bad:
            raise ValueError(f"PopulationModel: extra_parameters {bad} are not optional parameters "
                             f"of the structure (it has {list(optional)})")
        object.__setattr__(self, "extra_parameters", tuple(dict.fromkeys(implied)))
        params = self.parameters
        if self.error not in ERROR_MODELS:
            raise ValueError(f"PopulationModel: unknown error model {self.error!r}; choose from {ERROR_MODELS}")
        if self.omega not in ("diagonal", "block"):
            raise ValueError(f"PopulationModel: omega must be 'diagonal' or 'block', got {self.omega!r}")
        unknown = [p for p in self.random_effects if p not in params]
        if unknown:
            raise ValueError(f"PopulationModel: random effects on unknown parameter(s) {unknown}; "
                             f"the structure has {list(params)}")
        bad = [e.param for e in effects if e.param not in params]
        if bad:
            raise ValueError(f"PopulationModel: covariate effects on unknown parameter(s) {bad}")
        if self.ka_above_k and "ka" not in params:
            raise ValueError("PopulationModel: ka_above_k needs a first-order absorption structure")
        unknown = [p for p in self.iov if p not in params]
        if unknown:
            raise ValueError(f"PopulationModel: inter-occasion variability on unknown parameter(s) "
                             f"{unknown}; the model has {list(params)}")
        if len(set(self.iov)) != len(self.iov) or len(set(self.random_effects)) != len(self.random_effects):
            raise ValueError("PopulationModel: a parameter is listed twice in random_effects or iov")
        if self.iov and not self.occasion:
            raise ValueError("PopulationModel: iov needs occasion= (the data set's occasion column)")
        object.__setattr__(self, "_effects", effects)

    # ------------------------------------------------------------------ pieces
    @property
    def parameters(self) -> tuple:
        """Estimated structural parameters: the structure's, then ``extra_parameters``."""
        return tuple(self.structure.parameters) + tuple(self.extra_parameters)

    def occasions(self, data: Dataset):
        """Occasion code of every observation slot ``[S, T]`` (LongTensor, 0..K-1 in sorted
        order of the occasion column's values) and the number of occasions K."""
        tv = {k.lower(): k for k in data.time_varying}
        base = {k.lower(): k for k in data.covariates}
        key = self.occasion.lower()
        if key in tv:
            x = data.time_varying[tv[key]]
        elif key in base:
            x = data.covariates[base[key]][:, None].expand_as(data.obs_time)
        else:
            raise ValueError(f"PopulationModel: occasion column {self.occasion!r} not in the data set "
                             f"(time-varying: {sorted(data.time_varying)}, baseline: {sorted(data.covariates)})")
        mask = self.observation_mask(data)
        values = torch.unique(x[mask])
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"PopulationModel: occasion column {self.occasion!r} is missing on some observations")
        codes = torch.searchsorted(values, x.contiguous()).clamp_max(len(values) - 1)
        return codes, len(values)

    def n_random(self, data: Dataset) -> int:
        """Random effects per subject: IIV etas, then IOV kappas (occasion-major)."""
        return len(self.random_effects) + (len(self.iov) * self.occasions(data)[1] if self.iov else 0)

    @property
    def covariate_effects(self) -> tuple:
        return self._effects

    def observation_mask(self, data: Dataset) -> torch.Tensor:
        """``[S, T]`` True for observations this model describes (not padding, right DVID)."""
        mask = data.obs_mask
        if self.dvid is not None:
            if not isinstance(self.dvid, int) and self.dvid not in data.dvid_names:
                raise ValueError(f"PopulationModel: dvid {self.dvid!r} is not in the data set; "
                                 f"its observation types are {data.dvid_names}")
            code = self.dvid if isinstance(self.dvid, int) else data.dvid_names.index(self.dvid)
            mask = mask & (data.obs_dvid == code)
        elif len(data.dvid_names) > 1:
            raise ValueError(
                f"PopulationModel: the data set has observation types {data.dvid_names}; "
                "choose one with dvid=..."
            )
        return mask

    def check_data(self, data: Dataset) -> None:
        """Errors naming what the model needs and the data set lacks."""
        if not isinstance(data, Dataset):
            raise TypeError(f"PopulationModel: expected a pk.Dataset, got {type(data).__name__}")
        names = {k.lower(): k for k in data.covariates}
        for e in self._effects:
            if e.covariate.lower() not in names:
                raise ValueError(f"PopulationModel: covariate {e.covariate!r} not in the data set "
                                 f"(it has {sorted(data.covariates)})")
        if hasattr(self.structure, "check_dataset"):
            self.structure.check_dataset(data)
        # a dose into a compartment the structure lacks is an error (the reader's DataWarning
        # already lists observations outside the central compartment)
        check_compartments(data, self.structure, warn=False)
        if self.iov:
            self.occasions(data)
        mask = self.observation_mask(data)
        if not bool(mask.any()):
            raise ValueError("PopulationModel: the data set has no observations for this model")
        if self.error == "exponential":
            bad = mask & ~data.obs_blq & (data.obs_dv <= 0)
            if bool(bad.any()):
                where = [(data.ids[i], float(data.obs_time[i, j])) for i, j in bad.nonzero().tolist()[:5]]
                raise ValueError(
                    f"PopulationModel: error='exponential' needs DV > 0, but {int(bad.sum())} "
                    f"observation(s) have DV <= 0 (ID, TIME: {where}); drop them, mark them BLQ, "
                    "or use another error model")

    def covariate_factor(self, param: str, betas: dict, data: Dataset) -> torch.Tensor | float:
        """Product of covariate effects on ``param``'s typical value, ``[..., S]``."""
        names = {k.lower(): k for k in data.covariates}
        factor = 1.0
        for e in self._effects:
            if e.param != param:
                continue
            x = data.covariates[names[e.covariate.lower()]]
            if e.kind in ("power", "allometric", "linear"):
                ref = (torch.quantile(x.to(torch.float64), 0.5).to(x.dtype) if e.reference is None
                       else torch.as_tensor(e.reference, dtype=x.dtype, device=x.device))
            if e.kind in ("power", "allometric"):
                if e.kind == "allometric":
                    beta = _ALLOMETRIC.get(param, 0.75)
                elif e.exponent is not None:
                    beta = float(e.exponent)
                else:
                    beta = betas[e.site][..., None]
                factor = factor * torch.exp(beta * torch.log(x / ref))
            elif e.kind == "linear":
                factor = factor * (1 + betas[e.site][..., None] * (x - ref))
            elif e.kind == "threshold":
                factor = factor * (1 + betas[e.site][..., None] * e.indicator(x))
            else:
                codes = x.long()
                b = torch.cat([torch.zeros_like(betas[e.site][..., :1]), betas[e.site]], -1)
                factor = factor * torch.exp(b[..., codes])
        return factor

    def individual_parameters(self, typical: dict, betas: dict, eta, data: Dataset) -> dict:
        """Individual PK parameters ``{p: [..., S]}`` from typical values ``{p: [...]}``,
        covariate coefficients and etas ``[..., S, P]`` (None: typical subject).

        With inter-occasion variability, etas ``[..., S, P + K Q]`` (kappas after the etas,
        occasion-major) give parameters per occasion ``{p: [..., K, S]}``; etas with only
        the ``P`` IIV columns give the subject level (kappa = 0), ``[..., S]``."""
        P = len(self.random_effects)
        kappa = None
        if eta is not None and self.iov and eta.shape[-1] > P:
            kappa = eta[..., P:].unflatten(-1, (-1, len(self.iov)))  # [..., S, K, Q]
            kappa = kappa.movedim(-3, -1)  # [..., K, Q, S]
        eta_iiv = eta[..., :P] if eta is not None else None

        def level(p, value):
            if eta_iiv is not None and p in self.random_effects:
                value = value * torch.exp(eta_iiv[..., self.random_effects.index(p)])
            if kappa is not None:
                value = value[..., None, :] if torch.is_tensor(value) and value.dim() else value
                if p in self.iov:
                    value = value * torch.exp(kappa[..., self.iov.index(p), :])
            return value

        out = {}
        for p in self.parameters:
            if p == "ka" and self.ka_above_k:
                continue
            out[p] = level(p, typical[p][..., None] * self.covariate_factor(p, betas, data))
        if self.ka_above_k:
            v = out["v"] if "v" in out else out["v1"]
            k = out["cl"] / v
            out["ka"] = k + level("ka", typical["ka_minus_k"][..., None])
        return out

    def has_kappas(self, eta) -> bool:
        """Whether random effects ``[..., S, n]`` include IOV kappas (``n > P``)."""
        return eta is not None and bool(self.iov) and eta.shape[-1] > len(self.random_effects)

    def predict(self, ind: dict, data: Dataset, per_occasion: bool = False) -> torch.Tensor:
        """Concentrations ``[..., S, T]`` from individual parameters ``{p: [..., S]}``; with
        ``per_occasion`` the parameters are ``[..., K, S]`` and each observation takes its
        occasion's prediction."""
        parts = steady_state_parts(data) if isinstance(self.structure, Compartments) else None
        if parts is None:
            pred = self.structure.concentration(ind, data)
        else:
            pred = sum(self.structure.concentration(ind, part) for part in parts)
        if not per_occasion:
            return pred
        codes, K = self.occasions(data)
        onehot = (codes == torch.arange(K, device=codes.device)[:, None, None]).to(pred.dtype)
        return (pred * onehot).sum(-3)

    def residual_sd(self, pred: torch.Tensor, sigma: dict) -> torch.Tensor:
        """Residual SD ``[..., S, T]`` of this model's error model (see :mod:`.likelihood`)."""
        return residual_sd(self.error, pred, sigma)

    def sigma_sites(self) -> tuple:
        """The residual-error parameter sites of this model's error model."""
        return sigma_sites(self.error)

    def default_priors(self, data: Dataset) -> dict:
        """Weakly informative priors scaled by the data: ``LogNormal(log guess, 1)`` for
        typical values (``guess`` from :func:`initial_estimates`, divided by the median
        covariate factor where an effect has a fixed reference; ``f``:
        ``LogNormal(0, 0.5)``), ``HalfNormal(1)`` omegas (IIV and IOV), ``Normal`` covariate
        coefficients (power: centred on the allometric exponent), threshold effects
        ``1 + theta ~ LogNormal(0, 0.5)``, ``HalfNormal`` residual SDs (additive: half the
        median observation)."""
        guess = {**initial_estimates(data, self.parameters, self.observation_mask(data))}
        centre = {e.site: torch.tensor(_ALLOMETRIC.get(e.param, 0.0) if e.kind == "power" else 0.0)
                  for e in self._effects if e.estimated and e.kind != "categorical"}
        for e in self._effects:
            if e.reference is not None and e.param in guess:
                factor = self.covariate_factor(e.param, centre, data)
                if torch.is_tensor(factor):
                    guess[e.param] = guess[e.param] / float(factor.double().median())
        guess.update(self.initial)
        dv = data.obs_dv[self.observation_mask(data) & ~data.obs_blq]
        dv_scale = float(dv.abs().median()) if dv.numel() else 1.0
        priors = {}
        for p in self.parameters:
            if p == "ka" and self.ka_above_k:
                v = guess.get("v", guess.get("v1"))
                delta = max(guess["ka"] - guess["cl"] / v, 1e-3)
                priors["ka_minus_k"] = dist.LogNormal(math.log(delta), 1.0)
            elif p == "f":
                priors[p] = dist.LogNormal(math.log(guess[p]), 0.5)
            else:
                priors[p] = dist.LogNormal(math.log(guess[p]), 1.0)
        p_eta = len(self.random_effects)
        if p_eta:
            priors["omega"] = dist.HalfNormal(torch.ones(p_eta)).to_event(1)
            if self.omega == "block" and p_eta > 1:
                priors["omega_corr"] = dist.LKJCholesky(p_eta, 2.0)
        if self.iov:
            priors["omega_iov"] = dist.HalfNormal(torch.ones(len(self.iov))).to_event(1)
        for e in self._effects:
            if not e.estimated:
                continue  # allometric or fixed exponent: nothing to estimate
            if e.kind == "power":
                priors[e.site] = dist.Normal(_ALLOMETRIC.get(e.param, 0.0), 0.5)
            elif e.kind == "linear":
                priors[e.site] = dist.Normal(0.0, 0.1)
            elif e.kind == "threshold":
                priors[e.site] = RelativeChange(0.5)
            elif e.kind == "categorical":
                names = {k.lower(): k for k in data.covariates}
                k = int(data.covariates[names[e.covariate.lower()]].max()) + 1
                priors[e.site] = dist.Normal(torch.zeros(max(k - 1, 1)), 0.5).to_event(1)
        scales = {"sigma_add": 0.5 * dv_scale, "sigma_prop": 0.5, "sigma_exp": 0.5}
        for s in self.sigma_sites():
            priors[s] = dist.HalfNormal(scales[s])
        return priors

    def priors_for(self, data: Dataset) -> dict:
        priors = self.default_priors(data)
        unknown = set(self.priors) - set(priors)
        if unknown:
            raise ValueError(f"PopulationModel: priors for unknown site(s) {sorted(unknown)}; "
                             f"sites: {sorted(priors)}")
        priors.update(self.priors)
        return priors

    # ------------------------------------------------------------------ the Pyro model
    def program(self, data: Dataset, dv=None, priors=None):
        """The generative story as a Pyro model function of the data set."""
        priors = priors or self.priors_for(data)
        typical = {name: _draws(pyro.sample(name, priors[name]), 0) for name in
                   [p for p in self.parameters if not (p == "ka" and self.ka_above_k)]
                   + (["ka_minus_k"] if self.ka_above_k else [])}
        betas = {e.site: _draws(pyro.sample(e.site, priors[e.site]), priors[e.site].event_dim)
                 for e in self._effects if e.estimated}
        sigma = {s: pyro.sample(s, priors[s]) for s in self.sigma_sites()}  # [..., 1, 1]
        if self.iov:
            _, K = self.occasions(data)
            omega_iov = _draws(pyro.sample("omega_iov", priors["omega_iov"]), 1)  # [..., Q]
        p_eta = len(self.random_effects)
        S, T = data.obs_dv.shape
        eta = None
        if p_eta:
            omega = _draws(pyro.sample("omega", priors["omega"]), 1)  # [..., P]
            corr = (_draws(pyro.sample("omega_corr", priors["omega_corr"]), 2)
                    if "omega_corr" in priors else None)
            scale_tril = omega_scale_tril(omega, corr)
        if self.ka_above_k:
            v = typical["v" if "v" in typical else "v1"]
            pyro.deterministic("ka", typical["ka_minus_k"] + typical["cl"] / v)
        with pyro.plate("subject", S, dim=-2):
            if p_eta:
                eta_raw = pyro.sample("eta_raw", dist.Normal(0.0, 1.0).expand([p_eta]).to_event(1))
                eta = etas_from_raw(scale_tril, eta_raw)  # [..., S, P]
            if self.iov:
                n_kappa = K * len(self.iov)
                kappa_raw = pyro.sample("kappa_raw", dist.Normal(0.0, 1.0).expand([n_kappa]).to_event(1))
                kappa = kappas_from_raw(omega_iov, kappa_raw)  # [..., S, K*Q]
                eta = kappa if eta is None else cat_effects(eta, kappa)
            ind = self.individual_parameters(typical, betas, eta, data)  # {p: [..., (K,) S]}
            pred = self.predict(ind, data, per_occasion=bool(self.iov))  # [..., S, T]
            with pyro.plate("time", T, dim=-1):
                return self._observe(pred, sigma, data, dv)

    def _observe(self, pred, sigma, data, dv):
        """The observation sites: ``"dv"`` (measured observations) and the M3 factor
        ``"blq_m3"`` of BLQ ones (the likelihood of :mod:`.likelihood`)."""
        mask = self.observation_mask(data)
        observed = mask & ~data.obs_blq
        sd = self.residual_sd(pred, sigma).clamp_min(1e-9)
        d = observation_distribution(self.error, pred, sd)
        if dv is not None:
            safe = torch.where(observed, dv, torch.ones_like(dv) if self.error == "exponential" else pred.detach())
        else:
            safe = None
        y = pyro.sample("dv", d.mask(observed), obs=safe)
        if bool(data.obs_blq.any()):
            log_cdf = torch.special.log_ndtr(censored_z(self.error, pred, sd, data.obs_lloq))
            pyro.factor("blq_m3", torch.where(mask & data.obs_blq, log_cdf, torch.zeros_like(log_cdf)))
        return y

    def __call__(self, data: Dataset) -> Model:
        """The model conditioned on the data set's observations (a :class:`genprog.Model`)."""
        self.check_data(data)
        priors = self.priors_for(data)
        observed = self.observation_mask(data) & ~data.obs_blq
        pad = 1.0 if self.error == "exponential" else 0.0  # masked entries: any in-support value
        dv = torch.where(observed, data.obs_dv, torch.full_like(data.obs_dv, pad)).nan_to_num(pad)
        pk = self

        def population_pk(data, dv=None):
            return pk.program(data, dv, priors)

        return Model(population_pk, data).condition(dv=dv).with_coords(subject=list(data.ids))

    def initial_values(self, fit, data: Dataset, max_abs_raw: float = 3.0) -> dict:
        """Starting values of the Bayesian program from a population ML fit
        (``fit(data, "nuts", init=mle_fit)``): its estimates by site and each subject's
        ``eta_raw = chol(Omega)^-1 EBE`` ``[S, 1, P]`` (non-centred), from EBEs that the
        guarded inner problem found (a fresh start at the population, flip-flop modes
        mirrored). Entries of ``eta_raw`` beyond ``max_abs_raw`` prior SDs are clipped to
        it, so no chain starts in a mode far out in the eta prior."""
        priors = self.priors_for(data)
        init = {k: torch.as_tensor(v).detach() for k, v in fit.estimates.items() if k in priors}
        P = len(self.random_effects)
        if P and fit.eta.shape[-1] >= P:
            L = omega_scale_tril(init["omega"], init.get("omega_corr"))
            raw = torch.linalg.solve_triangular(L, fit.eta[:, :P].detach().to(L.dtype)[..., None],
                                                upper=False).squeeze(-1)
            init["eta_raw"] = raw.clamp(-max_abs_raw, max_abs_raw)[:, None, :]
        return init

    def fit(self, data: Dataset, method: str = "nuts", **options):
        """``model(data).fit(method, ...)``; ``method="mle"`` is population maximum
        likelihood with the etas integrated out per subject (FOCE-I by default, or the
        Laplace approximation; see :func:`genprog.pk.estimation.fit_mle`).

        A Bayesian fit may start from an ML fit: ``init=mle_fit`` (see
        :meth:`initial_values`).

        ``threads=`` (every method): torch's intra-op thread count during the fit
        (restored afterwards); default: chosen for the size of the work by
        :func:`genprog.threads.threads_for` (one thread for usual population sizes).
        ``distributed=True``: subjects sharded over torch.distributed ranks
        (:func:`genprog.pk.distributed.fit_distributed`)."""
        if options.pop("distributed", False):
            fit = fit_distributed(self, data, method, **options)
            if method == "vi":  # the posterior of this rank's data set, as a population fit
                return PopulationBayesFit.wrap(fit, self, fit.model.args[0])
            return fit
        if method == "mle":
            return fit_mle(self, data, **options)
        if method == "saem":  # SAEM (Monolix / nlmixr2): see genprog.pk.saem.fit_saem
            return fit_saem(self, data, **options)
        if isinstance(options.get("init"), PopulationFit):
            options["init"] = self.initial_values(options["init"], data)
        threads = options.pop("threads", None)
        if threads is not None and method in ("nuts", "hmc", "chees"):
            options["threads"] = threads  # the sampler holds this count while it samples
        S, T = data.obs_dv.shape
        work = S * T * max(int(data.dose_time.shape[-1]), 1) * max(int(options.get("chains", 4) or 1), 1)
        with using_threads(threads_for(work, threads)):
            return PopulationBayesFit.wrap(self(data).fit(method, **options), self, data)


class PopulationBayesFit(Fit):
    """A :class:`genprog.Fit` of a population model whose ``summary()`` speaks
    pharmacometrics (see :func:`genprog.pk.summary.bayesian_summary`); the ArviZ table is
    ``summary(kind="arviz")``."""

    population = None
    dataset = None

    @classmethod
    def wrap(cls, fit: Fit, population, data) -> PopulationBayesFit:
        new = cls(fit.method, fit.model, fit.draws, fit.sample_stats, fit.seed, fit.info)
        new.population = population
        new.dataset = data
        return new

    def summary(self, kind: str = "pk", prob: float = 0.95, **arviz_options):
        if kind == "arviz":
            return super().summary(**arviz_options)
        if kind != "pk":
            raise ValueError(f"summary: kind must be 'pk' or 'arviz', got {kind!r}")
        return bayesian_summary(self, self.population, prob=prob)

    def individual_parameters(self):
        """Posterior means of each subject's PK parameters (DataFrame, one row per ID)."""
        import pandas as pd

        pop, data = self.population, self.dataset
        flat = {k: v.detach().reshape(-1, *v.shape[2:]) for k, v in self.draws.items()}
        typical = {k: flat[k] for k in list(pop.parameters) + ["ka_minus_k"] if k in flat and
                   not (k == "ka" and pop.ka_above_k)}
        betas = {e.site: flat[e.site] for e in pop.covariate_effects if e.estimated}
        eta = posterior_etas(pop, flat)
        if eta is not None:
            eta = eta[..., :len(pop.random_effects)]  # subject level (kappa = 0)
        ind = pop.individual_parameters(typical, betas, eta, data)
        return pd.DataFrame({k: v.mean(0).cpu().numpy() for k, v in ind.items()},
                            index=pd.Index(data.ids, name="ID"))

    # the population-fit protocol (genprog.pk.population_fit.PopulationResult)
    def fitted_data(self) -> Dataset:
        """The data set of the fit."""
        return self.dataset

    def flat_draws(self) -> dict:
        """Draws ``[chain, draw, ...] -> [n, ...]`` in float64, plus the sites the fit held
        fixed (repeated ``n`` times)."""
        draws = {k: v.detach().double().reshape(-1, *v.shape[2:]) for k, v in self.draws.items()}
        n = next(iter(draws.values())).shape[0]
        for k, v in (getattr(self.model, "fixed", None) or {}).items():
            v = torch.as_tensor(v).double()
            draws.setdefault(k, v.expand(n, *v.shape))
        return draws

    def population_point(self):
        """``(population, data, values, eta)`` in float64: posterior medians of the
        population parameters by site (the correlation factor from the posterior-mean
        correlation matrix) and the posterior-mean etas ``[S, P]``."""
        pop, data = self.population, self.dataset.to(dtype=torch.float64)
        draws = self.flat_draws()
        sites = list(pop.priors_for(data))
        missing = [s for s in sites if s not in draws]
        if missing:
            raise ValueError(f"diagnostics: the fit has no draws of site(s) {missing}")
        values = {}
        for s in sites:
            if s == "omega_corr":
                corr = draws[s] @ draws[s].transpose(-1, -2)
                values[s] = torch.linalg.cholesky(corr.mean(0))
            else:
                values[s] = draws[s].median(0).values
        eta = posterior_etas(pop, draws)
        eta = eta.mean(0) if eta is not None else torch.zeros(
            data.n_subjects, 0, dtype=torch.float64, device=data.obs_dv.device)
        return pop, data, values, eta

    def replicate_parameters(self, n: int, gen: torch.Generator):
        """``(population, data, values, eta, batched=True)``: ``n`` posterior draws picked at
        random by ``gen`` (``values[site]`` with a leading dim ``n``) and the same draws'
        etas ``[n, S, P]``."""
        pop, data = self.population, self.dataset.to(dtype=torch.float64)
        draws = self.flat_draws()
        n_draws = next(iter(draws.values())).shape[0]
        idx = torch.randint(n_draws, (n,), generator=gen, device=gen.device)
        picked = {k: v[idx.to(v.device)] for k, v in draws.items()}
        values = {s: picked[s] for s in pop.priors_for(data)}
        eta = posterior_etas(pop, picked)
        if eta is None:
            eta = torch.zeros(n, data.n_subjects, 0, dtype=torch.float64, device=data.obs_dv.device)
        return pop, data, values, eta, True

    def eta_and_omega(self):
        """``(population, eta [S, P] or None, omega [P] or None)``: posterior-mean etas and
        posterior-mean omega."""
        draws = self.flat_draws()
        eta = posterior_etas(self.population, draws)
        omega = draws["omega"].mean(0) if "omega" in draws else None
        return self.population, None if eta is None else eta.mean(0), omega
