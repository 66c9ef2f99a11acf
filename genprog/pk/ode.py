r"""ODE structural models: any compartment system ``dA/dt = rhs(t, A, params)``, integrated
with ``torchdiffeq`` over a whole population at once.

An :class:`ODEModel` can be used wherever a closed-form
:class:`~genprog.pk.structural.Compartments` is (same ``parameters``,
``optional_parameters``, ``central_cmt``, ``check_parameters`` and
``concentration(params, data) -> [..., S, T]``), e.g. as the ``structure`` of a
:class:`~genprog.pk.PopulationModel`. Ready-made ones: :func:`michaelis_menten` (saturable
elimination) and :func:`linear_compartments` (the linear 1/2/3-compartment systems, for
cross-checks against the closed forms).

Integration
-----------
Every subject (and every leading batch element: chains, draws) has its own sorted list of
events: dose starts (``t_dose + tlag``), infusion ends (start + duration) and observation
times; the state is integrated from one event to the next, so each bolus (added to its
compartment's amount) and each infusion start or stop (a piecewise-constant input rate
per compartment, added inside the right-hand side) is an exact discontinuity, and the
central amount is read at the observation times. All subjects are integrated together in
one batched ``odeint`` call per segment, without a loop over subjects: event ``k`` of every
batch element is processed at the same step, and segment ``k`` (from event ``k`` to ``k+1``,
of length ``L_k`` that differs between elements) is mapped onto ``u in [0, 1]``,

.. math:: \frac{dA}{du} = L_k \, \big(\mathrm{rhs}(t_k + u L_k, A, p) + r_k\big),

with ``r_k`` the infusion rates running in the segment. The number of sequential
``odeint`` calls is the number of events of one subject (``2 D + T`` at most, ``D + T``
without infusions), not the number of distinct event times in the population, and event
times may depend on the parameters (lag time, F-dependent or modelled infusion
durations): gradients reach them through ``t_k`` and ``L_k``. Error control is per batch
element (an RMS over the states of each element, maximised over elements, so a badly
resolved subject is never averaged away) and step-size selection is detached from the
graph; gradients are those of the discretised solution (plain backpropagation through
the solver steps), accurate to the solver tolerance.

Data conventions (NONMEM)
-------------------------
``dose_cmt`` ``k >= 1`` is state ``k - 1``; 0 means :attr:`ODEModel.dose_cmt`. ``RATE > 0`` is
an infusion into that compartment of duration ``AMT / RATE``. Bioavailability ``f`` and lag
time ``tlag`` (optional parameters, per subject) act on doses into
:attr:`ODEModel.bioavailable_cmts`: the amount becomes ``f * AMT``, the input starts at
``t + tlag``, and an infusion keeps its rate and lasts ``f * AMT / RATE`` (as NONMEM and
:mod:`genprog.pk.structural` do). With :attr:`ODEModel.duration` set (zero-order
absorption), every dose into those compartments is instead a zero-order input of the
modelled duration (NONMEM ``RATE = -2``), at rate ``f * AMT / d1``. An observation at a
dose's time sees that dose. Amounts are zero before a subject's first event. Steady-state
doses (``SS > 0``), reset epochs (EVID 3/4) and modelled rates (``RATE < 0``) are not
supported yet (``ValueError``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torchdiffeq import odeint

from .structural import _float_dtype

__all__ = ["ODEModel", "linear_compartments", "michaelis_menten"]

OPTIONAL_PARAMETERS = ("f", "tlag")
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
ABSORPTIONS = ("first_order", "iv", "zero_order")
_DISPOSITION_PARAMETERS = {
    1: ("cl", "v"),
    2: ("cl", "v1", "q", "v2"),
    3: ("cl", "v1", "q", "v2", "q3", "v3"),
}
_ABSORPTION_PARAMETERS = {"first_order": ("ka",), "iv": (), "zero_order": ("d1",)}


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ODEModel:
    """A structural model given by an ODE system for the compartment amounts.

    Parameters
    ----------
    rhs : callable
        ``rhs(t, amounts, params) -> d amounts / dt`` with ``t`` a tensor broadcastable to
        ``[..., S]`` (time of each batch element), ``amounts`` ``[..., S, n_states]`` and
        ``params`` ``{name: [..., S]}`` (every parameter, optional ones included when
        given); it returns ``[..., S, n_states]`` (amount / time). Dosing inputs are added
        by the integrator: ``rhs`` describes only the disposition.
    n_states : int
        Number of compartments (states), NONMEM numbering ``1..n_states``.
    parameters : tuple of str
        Required parameter names.
    central_cmt : int
        NONMEM number of the observed (central) compartment.
    volume : str
        The parameter whose value is the central volume: concentration = amount / volume.
    rtol, atol : float
        Solver tolerances (relative, and absolute in amount units), per batch element.
        For float32 use ``rtol >= 1e-5``.
    method : str
        An adaptive ``torchdiffeq`` method: ``"dopri5"`` (default), ``"dopri8"``,
        ``"bosh3"``, ``"fehlberg2"`` or ``"adaptive_heun"``.
    dose_cmt : int
        The compartment of doses whose ``dose_cmt`` is 0 (default dose compartment).
    bioavailable_cmts : tuple of int
        Compartments whose doses ``f`` scales and ``tlag`` delays (NONMEM ``F1``/``ALAG1``
        style: the depot for oral models, the central compartment for IV ones).
    duration : str, optional
        Name of a parameter holding a modelled zero-order input duration: every dose into
        ``bioavailable_cmts`` is then infused over it (NONMEM ``RATE = -2``).
    max_steps : int
        Most solver steps per segment between two events; beyond it a ``RuntimeError``
        (usually a stiff system or extreme parameters).
    name : str, optional
        Shown in ``repr`` and error messages.

    Examples
    --------
    >>> import torch
    >>> from genprog.pk import read_nonmem
    >>> def rhs(t, a, p):              # one compartment, linear elimination
    ...     return -(p["cl"] / p["v"]).unsqueeze(-1) * a
    >>> m = ODEModel(rhs, 1, ("cl", "v"), central_cmt=1)
    >>> import pandas as pd
    >>> data = read_nonmem(pd.DataFrame({"ID": [1, 1, 1], "TIME": [0.0, 1.0, 5.0],
    ...                                  "AMT": [100.0, 0, 0], "DV": [0, 4.5, 2.0],
    ...                                  "EVID": [1, 0, 0]}))
    >>> p = {"cl": torch.tensor([2.0]), "v": torch.tensor([20.0])}
    >>> c = m.concentration(p, data)
    >>> c.shape
    torch.Size([1, 2])
    >>> round(float(c[0, 0]), 4)       # 100/20 * exp(-0.1)
    4.5242
    """

    rhs: Callable
    n_states: int
    parameters: tuple
    central_cmt: int
    volume: str = "v"
    rtol: float = 1e-6
    atol: float = 1e-9
    method: str = "dopri5"
    dose_cmt: int = 1
    bioavailable_cmts: tuple = (1,)
    duration: str | None = None
    max_steps: int = 100_000
    name: str | None = field(default=None, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "parameters", tuple(self.parameters))
        object.__setattr__(self, "bioavailable_cmts", tuple(self.bioavailable_cmts))
        where = self._label()
        if not callable(self.rhs):
            raise TypeError(f"{where}: rhs must be callable rhs(t, amounts, params)")
        if not isinstance(self.n_states, int) or self.n_states < 1:
            raise ValueError(f"{where}: n_states must be a positive int, got {self.n_states!r}")
        cmts = [("central_cmt", self.central_cmt), ("dose_cmt", self.dose_cmt)]
        cmts += [("bioavailable_cmts", c) for c in self.bioavailable_cmts]
        for what, c in cmts:
            if not isinstance(c, int) or not 1 <= c <= self.n_states:
                raise ValueError(f"{where}: {what} must be a compartment number in "
                                 f"1..{self.n_states}, got {c!r}")
        if self.volume not in self.parameters:
            raise ValueError(f"{where}: volume {self.volume!r} is not one of the parameters "
                             f"{list(self.parameters)}")
        if self.duration is not None and self.duration not in self.parameters:
            raise ValueError(f"{where}: duration {self.duration!r} is not one of the parameters "
                             f"{list(self.parameters)}")
        clash = [p for p in self.parameters if p in OPTIONAL_PARAMETERS]
        if clash:
            raise ValueError(f"{where}: {clash} are optional parameters (F and lag time); "
                             "do not list them in parameters")
        if self.method not in ADAPTIVE_METHODS:
            raise ValueError(f"{where}: method must be an adaptive torchdiffeq method "
                             f"{ADAPTIVE_METHODS}, got {self.method!r}")
        if not (self.rtol > 0 and self.atol > 0):
            raise ValueError(f"{where}: rtol and atol must be positive")

    def _label(self) -> str:
        return self.name or f"ODEModel({self.n_states} states)"

    # ------------------------------------------------------------------ contract
    @property
    def optional_parameters(self) -> tuple:
        """Optional parameter names: bioavailability ``f`` and lag time ``tlag``."""
        return OPTIONAL_PARAMETERS

    def check_parameters(self, params) -> None:
        """Raise ``ValueError`` naming missing or unknown keys of ``params``."""
        if not isinstance(params, dict):
            raise TypeError(f"params must be a dict of tensors, got {type(params).__name__}")
        missing = [k for k in self.parameters if k not in params]
        unknown = [k for k in params if k not in self.parameters + OPTIONAL_PARAMETERS]
        if missing or unknown:
            what = ([f"missing {missing}"] if missing else []) + ([f"unknown {unknown}"] if unknown else [])
            raise ValueError(f"{self._label()}: parameters {'; '.join(what)}; required "
                             f"{list(self.parameters)}, optional {list(OPTIONAL_PARAMETERS)}")

    def check_dataset(self, data) -> None:
        """Raise ``ValueError`` for doses this model cannot take: steady state, reset
        epochs, modelled (negative) rates, compartments outside ``0..n_states``."""
        self._check_doses(data.dose_cmt, data.dose_rate, data.dose_ss, data.dose_mask,
                          data.dose_epoch, data.obs_epoch, data.obs_mask)

    def _check_doses(self, cmt, rate, ss, mask, dose_epoch, obs_epoch, obs_mask):
        where = self._label()
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if bool((mask & (torch.as_tensor(ss) != 0)).any()):
            raise ValueError(f"{where}: steady-state doses (SS > 0) are not supported in ODE "
                             "models yet; use a closed-form Compartments model or give the "
                             "dose history explicitly")
        if dose_epoch is not None and obs_epoch is not None:
            dose_epoch, obs_epoch = torch.as_tensor(dose_epoch), torch.as_tensor(obs_epoch)
            obs_mask = torch.as_tensor(obs_mask, dtype=torch.bool)
            big = torch.iinfo(torch.long).max
            epochs = torch.cat([dose_epoch.long(), obs_epoch.long()], -1)
            real = torch.cat([mask, obs_mask.to(mask.device)], -1)
            lo = torch.where(real, epochs, torch.full_like(epochs, big)).amin(-1)
            hi = torch.where(real, epochs, torch.full_like(epochs, -big)).amax(-1)
            if bool((real.any(-1) & (lo != hi)).any()):
                raise ValueError(f"{where}: reset events (EVID 3/4, several epochs in a "
                                 "subject) are not supported in ODE models yet")
        rate = torch.as_tensor(rate)
        if bool((mask & (rate < 0)).any()):
            raise ValueError(f"{where}: negative RATE (modelled rate or duration) is not "
                             "supported; give the model a duration= parameter for zero-order input")
        cmt = torch.as_tensor(cmt)
        bad = mask & ((cmt < 0) | (cmt > self.n_states))
        if bool(bad.any()):
            raise ValueError(f"{where}: dose compartment(s) {sorted(set(cmt[bad].tolist()))} "
                             f"outside 1..{self.n_states} (0 = default {self.dose_cmt})")

    def concentration(self, params, data) -> torch.Tensor:
        """Central concentrations at a :class:`~genprog.pk.dataset.Dataset`'s observation
        times (see the module docstring for the integration and dose conventions).

        Parameters
        ----------
        params : dict[str, Tensor]
            :attr:`parameters` (and optionally ``f``, ``tlag``), each broadcastable to
            ``[..., S]`` (leading dims for chains or draws).
        data : Dataset

        Returns
        -------
        Tensor [..., S, T]
            Central amount / volume, in the promoted floating dtype of the parameters and
            the data, on their device. Padding observations (``obs_mask`` False) hold the
            value at the subject's last observation.
        """
        self.check_parameters(params)
        self.check_dataset(data)
        return self._solve(params, data.dose_time, data.dose_amt, data.dose_rate,
                           data.dose_cmt, data.dose_mask, data.obs_time, data.obs_mask)

    # ------------------------------------------------------------------ integration
    def _solve(self, params, dose_time, dose_amt, dose_rate, dose_cmt, dose_mask, obs_time,
               obs_mask):
        names = self.parameters + tuple(k for k in OPTIONAL_PARAMETERS if k in params)
        values = [params[k] for k in names]
        floats = [dose_time, dose_amt, dose_rate, obs_time]
        tensors = [x for x in values + floats if torch.is_tensor(x)]
        dtype = _float_dtype(tensors)
        device = obs_time.device
        p = {k: torch.as_tensor(v, dtype=dtype, device=device) for k, v in zip(names, values)}
        dose_time, dose_amt, dose_rate, obs_time = (
            torch.as_tensor(x, dtype=dtype, device=device) for x in floats)
        dose_mask = torch.as_tensor(dose_mask, dtype=torch.bool, device=device)
        obs_mask = torch.as_tensor(obs_mask, dtype=torch.bool, device=device)
        dose_cmt = torch.as_tensor(dose_cmt, device=device)
        if dose_time.dim() != 2 or obs_time.dim() != 2:
            raise ValueError(f"dose tensors must be [S, D] and obs_time [S, T], got "
                             f"{tuple(dose_time.shape)} and {tuple(obs_time.shape)}")
        S = dose_time.shape[0]
        T = obs_time.shape[-1]
        batch = torch.broadcast_shapes(*(v.shape for v in p.values()), (S,))
        if batch[-1] != S:
            raise ValueError(f"{self._label()}: parameters must broadcast to [..., S] with "
                             f"S = {S} subjects, got shapes { {k: tuple(v.shape) for k, v in p.items()} }")
        p = {k: v.expand(batch) for k, v in p.items()}
        zero = torch.zeros((), dtype=dtype, device=device)
        n = self.n_states

        # Each subject's horizon: its last real observation (later events cannot matter).
        t_end = torch.where(obs_mask, obs_time, torch.full_like(obs_time, -torch.inf)).amax(-1)
        t_end = torch.where(torch.isfinite(t_end), t_end, zero)                       # [S]
        t_obs = torch.where(obs_mask, obs_time, t_end.unsqueeze(-1))                   # [S, T]
        t_obs = torch.minimum(t_obs, t_end.unsqueeze(-1))

        # Doses: compartment index, F, lag, amounts, rates, durations; [..., S, D].
        cmt = torch.where(dose_cmt == 0, torch.full_like(dose_cmt, self.dose_cmt), dose_cmt)
        cmt = torch.where(dose_mask, cmt, torch.ones_like(cmt)).long() - 1
        amt = torch.where(dose_mask, dose_amt, zero)
        rate = torch.where(dose_mask, dose_rate, zero)
        time = torch.where(dose_mask, dose_time, zero)
        avail = torch.zeros_like(dose_mask)
        for c in self.bioavailable_cmts:
            avail = avail | (cmt == c - 1)
        f = torch.where(avail, p["f"].unsqueeze(-1), 1.0) if "f" in p else torch.ones_like(amt)
        amt = f * amt
        start = time + torch.where(avail, p["tlag"].unsqueeze(-1), 0.0) if "tlag" in p else time
        rate_safe = torch.where(rate > 0, rate, 1.0)
        dur = torch.where(rate > 0, amt / rate_safe, 0.0)        # NONMEM keeps the rate
        infusion = rate > 0
        if self.duration is not None:                            # modelled duration d1
            d1 = p[self.duration].unsqueeze(-1)
            infusion = infusion | avail
            dur = torch.where(avail, d1, dur)
            rate = torch.where(avail, amt / d1, rate)
        active = dose_mask & (start <= t_end.unsqueeze(-1))
        bolus = torch.where(active & ~infusion, amt, 0.0)
        inrate = torch.where(active & infusion, rate, 0.0)
        horizon = t_end.unsqueeze(-1)
        start = torch.where(dose_mask, torch.minimum(start, horizon), horizon)
        end = torch.where(dose_mask, torch.minimum(start + dur, horizon), horizon)

        # Events in tie order (doses, infusion ends, observations): stable sort per element.
        onehot = torch.nn.functional.one_hot(cmt, n).to(dtype)                        # [S, D, n]
        times = [start, end] if bool(infusion.any()) else [start]
        jumps = [bolus.unsqueeze(-1) * onehot] + [zero.expand(end.shape + (n,))] * (len(times) - 1)
        rates = [inrate.unsqueeze(-1) * onehot]
        rates = rates + [-rates[0]] if len(times) == 2 else rates
        times.append(t_obs)
        jumps.append(zero.expand(t_obs.shape + (n,)))
        rates.append(zero.expand(t_obs.shape + (n,)))
        times = torch.cat([x.expand(batch + x.shape[-1:]) for x in times], -1)         # [..., S, E]
        jumps = torch.cat([x.expand(batch + x.shape[-2:]) for x in jumps], -2)         # [..., S, E, n]
        rates = torch.cat([x.expand(batch + x.shape[-2:]) for x in rates], -2)
        E = times.shape[-1]
        times, order = torch.sort(times, dim=-1, stable=True)
        jumps = jumps.gather(-2, order.unsqueeze(-1).expand(jumps.shape))
        rates = rates.gather(-2, order.unsqueeze(-1).expand(rates.shape))

        x = torch.zeros(batch + (n,), dtype=dtype, device=device)
        r = torch.zeros_like(x)
        central = self.central_cmt - 1
        volume = p[self.volume]
        conc = []
        for k in range(E):
            x = x + jumps[..., k, :]
            r = r + rates[..., k, :]
            conc.append(x[..., central] / volume)
            if k + 1 < E:
                length = times[..., k + 1] - times[..., k]
                if bool((length > 0).any()):
                    x = self._segment(x, r, times[..., k], length, p)
        conc = torch.stack(conc, -1)                                                   # [..., S, E]
        position = torch.empty_like(order).scatter_(
            -1, order, torch.arange(E, device=device).expand(order.shape))
        return conc.gather(-1, position[..., E - T:])

    def _segment(self, x, r, t0, length, p):
        """Integrate from ``t0`` over ``length`` (both ``[..., S]``) with input rates ``r``."""
        scale = length.unsqueeze(-1)

        def f(u, a):
            t = t0 + u.to(a.dtype) * length
            return scale * (self.rhs(t, a, p) + r)

        u = torch.tensor([0.0, 1.0], dtype=x.dtype, device=x.device)
        try:
            return odeint(f, x, u, rtol=self.rtol, atol=self.atol, method=self.method,
                          options={"norm": _elementwise_norm, "max_num_steps": self.max_steps})[-1]
        except AssertionError as e:   # torchdiffeq signals step failures by assert
            raise RuntimeError(f"{self._label()}: the ODE solver failed ({e}); the system may be "
                               "stiff for these parameters, or the parameters non-finite") from e


def _elementwise_norm(scaled_error):
    """Step-error norm: RMS over the states of each batch element, maximised over elements
    (the default RMS over everything would let many easy subjects hide a hard one).
    Detached: step sizes are not differentiated."""
    e = scaled_error.detach()
    return e.pow(2).mean(-1).sqrt().amax()


# --------------------------------------------------------------------------- ready-made systems


@dataclass(frozen=True)
class _LinearRHS:
    """Linear mammillary disposition (``n`` compartments) with an optional depot (state 0)."""

    n: int
    depot: bool

    def __call__(self, t, a, p):
        c0 = 1 if self.depot else 0
        v1 = p["v"] if self.n == 1 else p["v1"]
        central = a[..., c0]
        d_central = -p["cl"] / v1 * central
        out = []
        if self.depot:
            out.append(-p["ka"] * a[..., 0])
            d_central = d_central + p["ka"] * a[..., 0]
        periph = []
        for j, (q, v) in enumerate((("q", "v2"), ("q3", "v3"))[: self.n - 1]):
            amount = a[..., c0 + 1 + j]
            flow = p[q] * (central / v1 - amount / p[v])
            d_central = d_central - flow
            periph.append(flow)
        return torch.stack(out + [d_central] + periph, -1)


@dataclass(frozen=True)
class _MichaelisMentenRHS:
    """One compartment with elimination ``vmax C / (km + C)``, optional depot (state 0)."""

    depot: bool

    def __call__(self, t, a, p):
        c0 = 1 if self.depot else 0
        conc = a[..., c0] / p["v"]
        d_central = -p["vmax"] * conc / (p["km"] + conc)
        if not self.depot:
            return d_central.unsqueeze(-1)
        absorbed = p["ka"] * a[..., 0]
        return torch.stack([-absorbed, d_central + absorbed], -1)


def _absorption(absorption):
    if absorption not in ABSORPTIONS:
        raise ValueError(f"absorption must be one of {ABSORPTIONS}, got {absorption!r}")
    return absorption == "first_order"


def linear_compartments(n: int = 1, absorption: str = "first_order", **solver) -> ODEModel:
    """The linear ``n``-compartment model (n = 1, 2, 3) as an ODE, parameterised exactly
    like :class:`~genprog.pk.structural.Compartments` (``cl, v`` / ``cl, v1, q, v2`` /
    ``+ q3, v3``; ``ka`` or ``d1``), with its compartment numbering (depot 1 and central 2
    for first-order absorption, central 1 otherwise) and its F / tlag conventions.

    ``solver``: ``rtol``, ``atol``, ``method``, ``max_steps`` of :class:`ODEModel`.

    >>> linear_compartments(2, "iv").parameters
    ('cl', 'v1', 'q', 'v2')
    """
    if n not in (1, 2, 3):
        raise ValueError(f"n must be 1, 2 or 3 compartments, got {n!r}")
    depot = _absorption(absorption)
    return ODEModel(_LinearRHS(n, depot), n + depot,
                    _DISPOSITION_PARAMETERS[n] + _ABSORPTION_PARAMETERS[absorption],
                    central_cmt=1 + depot, volume="v" if n == 1 else "v1",
                    duration="d1" if absorption == "zero_order" else None,
                    name=f"linear_compartments({n}, {absorption!r})", **solver)


def michaelis_menten(absorption: str = "first_order", **solver) -> ODEModel:
    """One compartment with saturable (Michaelis-Menten) elimination
    ``dA/dt = -vmax C / (km + C)``, ``C = A / v``: parameters ``vmax`` (amount/time),
    ``km`` (concentration), ``v``, and ``ka`` (depot 1, central 2) or ``d1``.

    ``solver``: ``rtol``, ``atol``, ``method``, ``max_steps`` of :class:`ODEModel`.

    >>> michaelis_menten().parameters
    ('vmax', 'km', 'v', 'ka')
    """
    depot = _absorption(absorption)
    return ODEModel(_MichaelisMentenRHS(depot), 1 + depot,
                    ("vmax", "km", "v") + _ABSORPTION_PARAMETERS[absorption],
                    central_cmt=1 + depot, volume="v",
                    duration="d1" if absorption == "zero_order" else None,
                    name=f"michaelis_menten({absorption!r})", **solver)
