r"""ODE structural models: any compartment system ``dA/dt = rhs(t, A, params)``, integrated
over a whole population at once by one batched Runge-Kutta loop.

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
central amount is read at the observation times. Segment ``k`` (from event ``k`` to
``k+1``, of length ``L_k``) is mapped onto ``u in [0, 1]``,

.. math:: \frac{dA}{du} = L_k \, \big(\mathrm{rhs}(t_k + u L_k, A, p) + r_k\big),

with ``r_k`` the infusion rates running in the segment, so event times may depend on the
parameters (lag time, F-dependent or modelled infusion durations).

All batch elements are integrated together by one explicit embedded Runge-Kutta loop
(:data:`_TABLEAUS`: Dormand-Prince 5(4) by default), with no loop over subjects or
events: each subject has its own position (event index and ``u``) and its own step size,
chosen from its own error (RMS over its states of the error scaled by ``atol + rtol
max|A|``, with ``max|A|`` the largest amount among its compartments, so an emptied depot
needs no relative accuracy; the largest over the subject's copies: chains, draws,
candidate etas, stencil members), and steps to its next event whenever that is nearer
than its step. The loop runs as many times as the subject that needs the most steps
(not the sum over events of the worst subject's steps, as one solver call per event
would). Everything runs in float64 without an autograd graph.

Derivatives
-----------
When parameters require gradients, the solution is computed at once for a stencil of
parameter sets (``q`` parameters requiring gradients; the centre and ``+-h_j e_j``,
``h_j = 1e-4 |theta_j|``) whose members share every step size: one discretisation
evaluated at nearby parameters, so central differences over the stencil are its
derivatives (truncation ~1e-8 relative, rounding ~1e-10), with no step-size noise. The
result is an autograd node (:class:`_Solution`) whose vector-Jacobian product uses them.
Its backward pass is differentiable too: when a ``create_graph`` gradient is
differentiated again (Hessians in eta, FOCE-I's mixed eta-theta terms), the second
derivatives come from one more solve over the full stencil (``+-(h_j e_j + h_k e_k)``
added, ``1 + q + q^2`` sets; rounding ~1e-7 relative). Third derivatives are zero, so the
gradient of a Laplace (exact-Hessian) objective is approximate; FOCE-I's is not.

All steps are powers of two (in time units): the step sequence, hence the discretisation,
does not change under small parameter changes, so objectives built on the solution are
smooth to the outer searches (an EBE search's central differences, line searches) rather
than noisy at the tolerance's level.

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

from .structural import float_dtype

__all__ = ["ODEModel", "linear_compartments", "michaelis_menten"]

OPTIONAL_PARAMETERS = ("f", "tlag")
ADAPTIVE_METHODS = ("dopri5", "bosh3", "fehlberg2", "adaptive_heun")
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
        An embedded Runge-Kutta pair (names as in ``torchdiffeq``): ``"dopri5"``
        (default, Dormand-Prince 5(4)), ``"bosh3"`` (Bogacki-Shampine 3(2)),
        ``"fehlberg2"`` or ``"adaptive_heun"``.
    dose_cmt : int
        The compartment of doses whose ``dose_cmt`` is 0 (default dose compartment).
    bioavailable_cmts : tuple of int
        Compartments whose doses ``f`` scales and ``tlag`` delays (NONMEM ``F1``/``ALAG1``
        style: the depot for oral models, the central compartment for IV ones).
    duration : str, optional
        Name of a parameter holding a modelled zero-order input duration: every dose into
        ``bioavailable_cmts`` is then infused over it (NONMEM ``RATE = -2``).
    max_steps : int
        Most solver steps (accepted or rejected) of one element between two events; beyond
        it a ``RuntimeError`` (usually a stiff system or extreme parameters). An element
        whose state becomes non-finite gives NaN concentrations instead.
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
            raise ValueError(f"{where}: method must be an adaptive Runge-Kutta method "
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
        dtype = float_dtype(tensors)
        device = obs_time.device
        p = {k: torch.as_tensor(v, dtype=dtype, device=device) for k, v in zip(names, values)}
        if dose_time.dim() != 2 or obs_time.dim() != 2:
            raise ValueError(f"dose tensors must be [S, D] and obs_time [S, T], got "
                             f"{tuple(dose_time.shape)} and {tuple(obs_time.shape)}")
        S = dose_time.shape[0]
        batch = torch.broadcast_shapes(*(v.shape for v in p.values()), (S,))
        if batch[-1] != S:
            raise ValueError(f"{self._label()}: parameters must broadcast to [..., S] with "
                             f"S = {S} subjects, got shapes { {k: tuple(v.shape) for k, v in p.items()} }")
        # The solution and its derivatives (a stencil of parameter sets sharing the step
        # sizes) are computed in float64 without a graph; see the module docstring.
        work = torch.float64
        wrt = [k for k in names if torch.is_grad_enabled() and p[k].requires_grad]
        base = {k: v.detach().to(work).expand(batch) for k, v in p.items()}
        steps = [STENCIL_STEP * torch.where(base[k] != 0, base[k].abs(), torch.ones_like(base[k]))
                 for k in wrt]

        def at(offsets):  # concentrations [M, ..., S, T] at the stencil offsets [M, q]
            M = offsets.shape[0]
            shaped = {k: v.expand((M,) + batch) for k, v in base.items()}
            for j, k in enumerate(wrt):
                shaped[k] = base[k] + offsets[:, j].reshape((M,) + (1,) * len(batch)) * steps[j]
            with torch.no_grad():
                return self._integrate(shaped, (M,) + batch, dose_time, dose_amt, dose_rate,
                                       dose_cmt, dose_mask, obs_time, obs_mask, work)

        if not wrt:
            return at(torch.zeros(1, 0, dtype=work, device=device))[0].to(dtype)
        q = len(wrt)
        jets = _Jets(at(_stencil(q, work, device, second=False)), steps,
                     lambda: at(_stencil(q, work, device)))
        theta = [p[k].to(work).expand(batch) for k in wrt]
        return _Solution.apply(jets, *theta).to(dtype)

    def _integrate(self, p, batch, dose_time, dose_amt, dose_rate, dose_cmt, dose_mask,
                   obs_time, obs_mask, dtype):
        """Concentrations ``[*batch, T]`` (``batch`` ends with S) for parameters ``{name:
        [*batch]}``: the event table, then :meth:`_march` over it."""
        device = obs_time.device
        dose_time, dose_amt, dose_rate, obs_time = (
            torch.as_tensor(x, dtype=dtype, device=device) for x in (dose_time, dose_amt, dose_rate, obs_time))
        dose_mask = torch.as_tensor(dose_mask, dtype=torch.bool, device=device)
        obs_mask = torch.as_tensor(obs_mask, dtype=torch.bool, device=device)
        dose_cmt = torch.as_tensor(dose_cmt, device=device)
        T = obs_time.shape[-1]
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

        # Events in tie order (doses, infusion ends, observations), sorted per element by
        # the first parameter set's times (every set of the stencil keeps that order).
        onehot = torch.nn.functional.one_hot(cmt, n).to(dtype)                        # [S, D, n]
        times = [start, end] if bool(infusion.any()) else [start]
        jumps = [bolus.unsqueeze(-1) * onehot] + [zero.expand(end.shape + (n,))] * (len(times) - 1)
        rates = [inrate.unsqueeze(-1) * onehot]
        rates = rates + [-rates[0]] if len(times) == 2 else rates
        times.append(t_obs)
        jumps.append(zero.expand(t_obs.shape + (n,)))
        rates.append(zero.expand(t_obs.shape + (n,)))
        times = torch.cat([x.expand(batch + x.shape[-1:]) for x in times], -1)         # [M, ..., S, E]
        jumps = torch.cat([x.expand(batch + x.shape[-2:]) for x in jumps], -2)         # [M, ..., S, E, n]
        rates = torch.cat([x.expand(batch + x.shape[-2:]) for x in rates], -2)
        E = times.shape[-1]
        M = batch[0]
        times = times.reshape(M, -1, E)
        B = times.shape[1]
        order = torch.sort(times[0], dim=-1, stable=True).indices                       # [B, E]
        times = times.gather(-1, order.expand(M, B, E))
        jumps = jumps.reshape(M, B, E, n).gather(-2, order[..., None].expand(M, B, E, n))
        rates = rates.reshape(M, B, E, n).gather(-2, order[..., None].expand(M, B, E, n))
        flat = {k: v.reshape(M, B) for k, v in p.items()}
        S = batch[-1]
        G = B // S                                                                     # copies per subject
        conc = self._march({k: v.reshape(G * M, S) for k, v in flat.items()}, times.reshape(G * M, S, E),
                           jumps.reshape(G * M, S, E, n), rates.reshape(G * M, S, E, n),
                           flat[self.volume].reshape(G * M, S)).reshape(M, B, E)
        position = torch.empty_like(order).scatter_(
            -1, order, torch.arange(E, device=device).expand(order.shape))
        conc = conc.gather(-1, position[:, E - T:].expand(M, B, T))
        return conc.reshape(batch + (T,))

    def _march(self, p, times, jumps, rates, volume):
        """Integrate every subject through its sorted events with its own step sizes.

        ``times [G, S, E]``, ``jumps`` and ``rates [G, S, E, n]`` (the amounts added and the
        change of the input rates at each event), parameters and ``volume`` ``[G, S]``, for
        ``G`` copies of each of ``S`` subjects (stencil members, chains, draws, candidate
        etas). The copies of a subject share its event index, position and step sizes
        (their largest scaled error decides), so they are one discretisation: differences
        between copies (the derivative stencil, an EBE search's central differences) carry
        no step-size noise. Returns the central concentration just after each event,
        ``[G, S, E]`` (NaN for a copy whose state or error became non-finite; it no longer
        takes part in the step-size choice)."""
        G, S, E = times.shape
        dtype, device = times.dtype, times.device
        c, A, b, e, order = _TABLEAUS[self.method]
        stages = len(c)
        central = self.central_cmt - 1
        idx = torch.arange(S, device=device)
        x = jumps[:, :, 0].clone()
        r = rates[:, :, 0].clone()
        conc = torch.full((G, S, E + 1), torch.nan, dtype=dtype, device=device)  # column E: a sink
        conc[:, :, 0] = x[..., central] / volume
        k = torch.zeros(S, dtype=torch.long, device=device)
        u = torch.zeros(S, dtype=dtype, device=device)          # position in the segment, [0, 1]
        h_time = torch.full((S,), torch.inf, dtype=dtype, device=device)
        n_steps = torch.zeros(S, dtype=torch.long, device=device)
        failed = torch.zeros(G, S, dtype=torch.bool, device=device)
        done = torch.full((S,), E == 1, dtype=torch.bool, device=device)
        shape = (G, S, self.n_states)
        K = torch.empty((stages, G * S * self.n_states), dtype=dtype, device=device)  # step x slopes
        A = [torch.tensor(row, dtype=dtype, device=device) for row in A]
        weights = torch.tensor([b, e], dtype=dtype, device=device)                    # [2, stages]
        c = torch.tensor(c, dtype=dtype, device=device)[:, None, None]
        while not bool(done.all()):
            t0 = times[:, idx, k]
            L = times[:, idx, (k + 1).clamp_max(E - 1)] - t0                           # [G, S]
            length = torch.where(torch.isfinite(L), L, torch.zeros_like(L)).amax(0)       # [S]
            room = 1.0 - u
            hu = torch.where(length > 0, h_time / length.clamp_min(torch.finfo(dtype).tiny), room)
            last = hu >= room
            hu = torch.where(last, room, hu)
            H = (hu * L)[..., None]                                                  # [G, S, 1]
            Hr = H * r
            t_stage = t0 + (u + c * hu) * L                                            # [stages, G, S]
            x_flat = x.reshape(-1)
            for i in range(stages):   # K[i] = H (rhs + r) at stage i
                xi = x if i == 0 else torch.addmv(x_flat, K[:i].T, A[i - 1]).view(shape)
                torch.addcmul(Hr, H, self.rhs(t_stage[i], xi, p), out=K[i].view(shape))
            combined = (weights @ K).view((2,) + shape)
            x_new = x + combined[0]
            err = combined[1]
            scale = self.atol + self.rtol * torch.maximum(x.abs(), x_new.abs()).amax(-1, keepdim=True)
            ratio = (err / scale).pow(2).mean(-1).sqrt()                             # [G, S]
            finite = torch.isfinite(ratio) & torch.isfinite(x_new).all(-1)
            failed = failed | ~finite
            ratio = torch.where(failed, torch.zeros_like(ratio), ratio).amax(0)       # [S]
            go = ~done
            accept = go & (ratio <= 1.0)
            x = torch.where(accept[:, None] & ~failed[..., None], x_new, x)
            u = torch.where(accept, u + hu, u)
            factor = torch.where(ratio > 0, (0.9 * ratio.pow(-1.0 / order)).clamp(0.2, 10.0),
                                 torch.full_like(ratio, 10.0))
            # steps are powers of two: the step sequence, hence the discretisation, does not
            # change under small parameter changes (smooth objectives for outer searches)
            # (a step cut short at an event keeps the longer step it was cut from)
            proposal = torch.exp2(torch.floor(torch.log2(hu * length * factor)))
            proposal = torch.where(accept & last, torch.maximum(proposal, h_time), proposal)
            h_time = torch.where(go & (length > 0), proposal, h_time)
            n_steps = n_steps + go
            arrived = accept & last
            if bool(arrived.any()):
                k = k + arrived
                here = arrived[:, None]
                x = x + torch.where(here, jumps[:, idx, k], 0.0)
                r = r + torch.where(here, rates[:, idx, k], 0.0)
                u = torch.where(arrived, torch.zeros_like(u), u)
                conc[:, idx, torch.where(arrived, k, E)] = x[..., central] / volume
                n_steps = torch.where(arrived, torch.zeros_like(n_steps), n_steps)
                done = done | (k >= E - 1)
            if bool((n_steps > self.max_steps).any()):
                raise RuntimeError(f"{self._label()}: more than max_steps = {self.max_steps} solver "
                                   "steps between two events; the system may be stiff for these "
                                   "parameters")
        conc = conc[..., :E]
        return torch.where(failed[..., None], torch.full_like(conc, torch.nan), conc)


STENCIL_STEP = 1e-4
"""Relative step of the parameter stencil whose solutions give first and second derivatives
(central differences of one discretisation: truncation ~1e-8, rounding ~1e-8 relative)."""


def _stencil(q, dtype, device, second=True):
    """Offsets (units of the parameter steps): 0 and ``+-e_j`` (``[1 + 2q, q]``, enough for
    first derivatives) and with ``second`` also ``+-(e_j + e_k)`` for every pair ``j < k``
    (``[1 + q + q^2, q]``)."""
    eye = torch.eye(q, dtype=dtype, device=device)
    rows = [torch.zeros(1, q, dtype=dtype, device=device), eye, -eye]
    if second and q > 1:
        j, k = torch.triu_indices(q, q, 1, device=device)
        pairs = eye[j] + eye[k]
        rows += [pairs, -pairs]
    return torch.cat(rows, 0)


class _Jets:
    """The solution at the stencil's centre (``value [..., T]``), its first derivatives in
    each of the ``q`` parameters by central differences (``first [q, ..., T]``) and, on
    demand, the second derivatives (:meth:`second`, ``[q, q, ..., T]``, from a solve over
    the full stencil that ``solve_second()`` returns)."""

    def __init__(self, conc, steps, solve_second):
        self.q = q = len(steps)
        self.steps = torch.stack(steps, 0).unsqueeze(-1)                              # [q, ..., 1]
        self.value = conc[0]
        self.first = (conc[1:q + 1] - conc[q + 1:2 * q + 1]) / (2 * self.steps)
        self._solve_second = solve_second
        self._second = None

    def second(self):
        if self._second is None:
            conc, q, h = self._solve_second(), self.q, self.steps
            f0, plus, minus = conc[0], conc[1:q + 1], conc[q + 1:2 * q + 1]
            out = torch.empty((q, q) + f0.shape, dtype=f0.dtype, device=f0.device)
            for j in range(q):
                out[j, j] = (plus[j] - 2 * f0 + minus[j]) / h[j] ** 2
            if q > 1:
                j_idx, k_idx = torch.triu_indices(q, q, 1).tolist()
                for i, (j, k) in enumerate(zip(j_idx, k_idx)):
                    pp, mm = conc[2 * q + 1 + i], conc[2 * q + 1 + len(j_idx) + i]
                    out[j, k] = out[k, j] = ((pp + mm - plus[j] - minus[j] - plus[k] - minus[k] + 2 * f0)
                                             / (2 * h[j] * h[k]))
            self._second = out
        return self._second


class _Solution(torch.autograd.Function):
    """The ODE solution as a function of the parameters ``theta`` (``q`` tensors ``[...]``):
    its value and vector-Jacobian products come from :class:`_Jets`; the backward pass is
    itself differentiable (:class:`_SolutionGrad`), so Hessians and mixed second
    derivatives are exact to the stencil's accuracy; third derivatives are zero."""

    @staticmethod
    def forward(ctx, jets, *theta):
        ctx.jets = jets
        ctx.save_for_backward(*theta)
        return jets.value.clone()

    @staticmethod
    def backward(ctx, grad):
        out = _SolutionGrad.apply(ctx.jets, grad, *ctx.saved_tensors)
        return (None,) + (tuple(out) if isinstance(out, (tuple, list)) else (out,))


class _SolutionGrad(torch.autograd.Function):
    """``grad -> (sum_t grad_t d value_t / d theta_j)_j``; its backward uses the second
    derivatives, computed only when it runs (a ``create_graph`` gradient differentiated
    again)."""

    @staticmethod
    def forward(ctx, jets, grad, *theta):
        ctx.jets = jets
        ctx.save_for_backward(grad)
        return tuple((grad * jets.first[j]).sum(-1) for j in range(jets.q))

    @staticmethod
    def backward(ctx, *outer):
        grad, = ctx.saved_tensors
        jets = ctx.jets
        w = torch.stack(outer, 0).unsqueeze(-1)                                        # [q, ..., 1]
        d_grad = (w * jets.first).sum(0)
        d_theta = ((jets.second() * w.unsqueeze(1)).sum(0) * grad).sum(-1)              # [q, ...]
        return (None, d_grad) + tuple(d_theta.unbind(0))


# Explicit embedded Runge-Kutta pairs: (c, A rows for stages 2.., b, b - b_embedded, order).
_TABLEAUS = {
    "dopri5": (
        (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
        ((1 / 5,),
         (3 / 40, 9 / 40),
         (44 / 45, -56 / 15, 32 / 9),
         (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
         (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
         (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)),
        (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
        (35 / 384 - 1951 / 21600, 0.0, 500 / 1113 - 22642 / 50085, 125 / 192 - 451 / 720,
         -2187 / 6784 + 12231 / 42400, 11 / 84 - 649 / 6300, -1 / 60),
        5),
    "bosh3": (
        (0.0, 1 / 2, 3 / 4, 1.0),
        ((1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
        (2 / 9, 1 / 3, 4 / 9, 0.0),
        (2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8),
        3),
    "fehlberg2": (
        (0.0, 1 / 2, 1.0),
        ((1 / 2,), (1 / 256, 255 / 256)),
        (1 / 512, 255 / 256, 1 / 512),
        (-1 / 512, 0.0, 1 / 512),
        2),
    "adaptive_heun": (
        (0.0, 1.0),
        ((1.0,),),
        (1 / 2, 1 / 2),
        (1 / 2, -1 / 2),
        2),
}


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
