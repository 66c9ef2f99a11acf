r"""Closed-form linear compartment models: unit responses, steady state, superposition.

Everything here is a pure, differentiable torch function of the PK parameters (gradients
reach every parameter, for NUTS and VI) and is vectorized over leading batch dims
(chains, draws), subjects, doses and observation times: there is no Python loop over any
of them.

Disposition
-----------
A mammillary model with ``n`` = 1, 2 or 3 compartments is parameterised by clearances and
volumes: ``CL, V1`` (``v`` for one compartment), ``Q2 = q, V2`` and ``Q3 = q3, V3``, with
micro-constants ``k10 = CL/V1``, ``k12 = Q2/V1``, ``k21 = Q2/V2``, ``k13 = Q3/V1``,
``k31 = Q3/V3``. The concentration in the central compartment after a unit bolus into it
is a sum of exponentials

.. math:: u(t) = \sum_i A_i e^{-\lambda_i t},
          \qquad A_i = \frac{1}{V_1} \prod_{j \ge 2} (k_{j1} - \lambda_i)
                       \Big/ \prod_{m \ne i} (\lambda_m - \lambda_i),

where the ``lambda_i > 0`` are the eigenvalues of the disposition matrix:

* 1 compartment: ``lambda = k10``, ``A = 1/V``.
* 2 compartments: roots of ``lambda^2 - (k10 + k12 + k21) lambda + k10 k21``; the
  discriminant is computed as ``(k10 - k21)^2 + k12 (k12 + 2 k10 + 2 k21)`` (a sum of
  non-negative terms, so no cancellation), ``alpha = (s + sqrt(disc)) / 2`` and
  ``beta = k10 k21 / alpha`` (no cancellation for the small root); ``alpha - beta =
  sqrt(disc)`` exactly.
* 3 compartments: roots of ``lambda^3 - a2 lambda^2 + a1 lambda - a0`` with
  ``a2 = k10 + k12 + k13 + k21 + k31``,
  ``a1 = k10 k21 + k10 k31 + k21 k31 + k13 k21 + k12 k31``, ``a0 = k10 k21 k31``.
  The largest root comes from the trigonometric (Viete) form of the depressed cubic
  ``y^3 + p y + q`` (``lambda = y + a2/3``, ``p = a1 - a2^2/3``,
  ``q = -2 a2^3/27 + a1 a2/3 - a0``, ``r = sqrt(-p/3)``):
  ``lambda_1 = a2/3 + 2 r cos(arccos(-q / (2 r^3)) / 3)``. The two smaller roots are then
  found by deflation, from ``lambda_2 lambda_3 = a0 / lambda_1`` and
  ``lambda_2 + lambda_3 = (a1 - a0/lambda_1) / lambda_1`` with the stable quadratic
  formula, because ``a2/3 + y`` loses relative precision for a root much smaller than
  ``a2`` (the usual situation for the terminal phase).

The eigenvalues must be distinct (true whenever ``Q2, Q3 > 0`` and the peripheral
compartments are distinguishable); a double root has an infinite derivative.

Inputs (per unit dose, ``s`` = time since dose, 0 for ``s < 0``)
-------------------------------------------------------------------
With ``phi(x) = (1 - e^{-x}) / x = -expm1(-x)/x`` (``phi(0) = 1``, a series below 1e-3) and
the divided difference of the exponential
``E(p, q) = (e^{-p} - e^{-q}) / (q - p) = e^{-min(p, q)} phi(|q - p|)``
(never ``e^{+x}``, no cancellation; when ``|q - p| < 1e-3`` the smooth symmetric form
``e^{-(p+q)/2} sinh(z)/z``, ``z = (q - p)/2``, whose limit is ``e^{-p}``), every exponential
term ``e^{-lambda s}`` of a unit bolus becomes:

* zero-order infusion of duration ``T`` (rate ``1/T``), during and after it in one formula,
  with ``s1 = min(s, T)``: ``(s1 / T) phi(lambda s1) e^{-lambda (s - s1)}``
  (``T = 0`` is the bolus);
* first-order absorption from a depot with rate ``ka``:
  ``ka (e^{-lambda s} - e^{-ka s}) / (ka - lambda) = ka s E(lambda s, ka s)``, finite and
  exact through the flip-flop limit ``ka = lambda`` (value ``ka s e^{-ka s}``), with
  exact gradients and Hessians there too.

Steady state (NONMEM ``SS = 1`` or ``2``; ``tau`` = ``II``)
--------------------------------------------------------------
The dose is the last of an infinite train with interval ``tau``; its contribution at
``s >= 0`` is ``sum_{k >= 0} u(s + k tau)`` (past doses only, so the formulas hold for every
``s >= 0``, not only ``s < tau``):

* bolus: ``e^{-lambda s} / (1 - e^{-lambda tau})``;
* first-order absorption (``1 - e^{-x tau}`` written ``-expm1(-x tau)``):

  .. math:: ka \frac{ s\,E(\lambda s, k_a s) - (s - \tau)\,
            E(\lambda s + k_a \tau, k_a s + \lambda \tau)}
            {(1 - e^{-\lambda \tau})(1 - e^{-k_a \tau})},

  which is ``ka [e^{-lambda s}/(1-e^{-lambda tau}) - e^{-ka s}/(1-e^{-ka tau})]/(ka - lambda)``
  rewritten so that it stays exact at ``ka = lambda`` (for ``s < tau`` both terms are
  positive: no cancellation);
* infusion of duration ``T``: with ``K`` the number of train members still running at
  ``s`` (``K = ceil((T - s)/tau)`` if ``s < T`` else 0; ``K <= 1`` when ``T <= tau``),

  .. math:: \underbrace{\sum_{k<K} \frac{s_k}{T} \phi(\lambda s_k)}_{\text{running}}
            + \phi(\lambda T) \frac{e^{-\lambda (s + K\tau - T)}}{1 - e^{-\lambda\tau}},
            \qquad s_k = s + k\tau.

  For ``T <= tau`` this is the standard formula: during the infusion
  ``(1/(lambda T)) [1 - e^{-lambda s} + (1 - e^{-lambda T}) e^{-lambda (s + tau - T)} /
  (1 - e^{-lambda tau})]`` and after it
  ``(1/(lambda T)) (1 - e^{-lambda T}) e^{-lambda (s - T)} / (1 - e^{-lambda tau})``. The
  running sum for ``K >= 2`` (infusions longer than the interval) is
  ``K [1 - e^{-lambda s} phi(lambda K tau) / phi(lambda tau)] / (lambda T)``.
* a constant infusion at steady state (``AMT = 0``, ``RATE > 0``, ``II = 0``):
  ``RATE * sum_i A_i / lambda_i`` (``= RATE / CL``).

With a lag time, a steady-state dose observed before its lagged input arrives
(``0 <= t - t_dose < tlag``) sees the earlier members of the train:
``s`` is taken modulo ``tau`` into ``[0, tau)``.

Data conventions (NONMEM)
-------------------------
For first-order absorption (ADVAN2/4/12 numbering) ``dose_cmt`` 1 is the depot (F and
tlag apply; ``RATE`` must be 0) and 2 the central compartment (bolus if ``RATE == 0``,
else an infusion of duration ``AMT/RATE``; no F, no lag). For IV models (ADVAN1/3/11)
``dose_cmt`` 1 is the central compartment; F and tlag apply to every dose and an
infusion lasts ``F*AMT/RATE`` (NONMEM keeps the rate). For zero-order absorption every
dose enters the central compartment at a constant rate over the modelled duration ``d1``
(NONMEM's ``RATE = -2``; the data's rate is not used), with F and tlag. ``dose_cmt`` 0
means the default dose compartment. ``SS = 1`` (and 3) reset: doses before a
steady-state dose of the same epoch stop contributing from its time on; ``SS = 2`` adds to
what is there. An observation at a dose's time sees that dose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "Compartments",
    "OneCompartment",
    "ThreeCompartment",
    "TwoCompartment",
    "concentration",
    "disposition",
    "one_compartment_bolus",
    "one_compartment_infusion",
    "one_compartment_oral",
    "three_compartment_bolus",
    "three_compartment_infusion",
    "three_compartment_oral",
    "two_compartment_bolus",
    "two_compartment_infusion",
    "two_compartment_oral",
]

ABSORPTIONS = ("first_order", "iv", "zero_order")
ROUTES = ("bolus", "infusion", "oral")
OPTIONAL_PARAMETERS = ("f", "tlag")
_DISPOSITION_PARAMETERS = {
    1: ("cl", "v"),
    2: ("cl", "v1", "q", "v2"),
    3: ("cl", "v1", "q", "v2", "q3", "v3"),
}
_ABSORPTION_PARAMETERS = {"first_order": ("ka",), "iv": (), "zero_order": ("d1",)}
# Below this argument phi(x) = (1 - e^{-x})/x uses its Taylor series (error < 2e-18).
_PHI_SERIES_BELOW = 1e-3


# --------------------------------------------------------------------------- structure


@dataclass(frozen=True)
class Compartments:
    """A linear mammillary compartment model with an input type.

    Attributes
    ----------
    n : int
        Number of disposition compartments: 1, 2 or 3.
    absorption : str
        ``"first_order"`` (depot with rate ``ka``; NONMEM ADVAN2/4/12 numbering: depot 1,
        central 2), ``"iv"`` (bolus or infusion into the central compartment 1; ADVAN1/3/11)
        or ``"zero_order"`` (constant-rate input into the central compartment over the
        modelled duration ``d1``).

    Examples
    --------
    >>> m = OneCompartment(absorption="first_order")
    >>> m.parameters
    ('cl', 'v', 'ka')
    >>> p = {"cl": torch.tensor(2.0), "v": torch.tensor(20.0), "ka": torch.tensor(1.0)}
    >>> c = m.unit_response(p, torch.tensor([0.0, 1.0, 24.0]))
    >>> c.shape
    torch.Size([3])
    """

    n: int = 1
    absorption: str = "first_order"

    def __post_init__(self):
        if self.n not in (1, 2, 3):
            raise ValueError(f"n must be 1, 2 or 3 compartments, got {self.n!r}")
        if self.absorption not in ABSORPTIONS:
            raise ValueError(f"absorption must be one of {ABSORPTIONS}, got {self.absorption!r}")

    @property
    def parameters(self) -> tuple:
        """Required parameter names: disposition (``cl, v`` / ``cl, v1, q, v2`` /
        ``+ q3, v3``) then absorption (``ka`` or ``d1``)."""
        return _DISPOSITION_PARAMETERS[self.n] + _ABSORPTION_PARAMETERS[self.absorption]

    @property
    def optional_parameters(self) -> tuple:
        """Optional parameter names: bioavailability ``f`` and lag time ``tlag``."""
        return OPTIONAL_PARAMETERS

    @property
    def central_cmt(self) -> int:
        """NONMEM number of the central (observed) compartment: 2 with a depot, else 1."""
        return 2 if self.absorption == "first_order" else 1

    def check_parameters(self, params) -> None:
        """Raise ``ValueError`` naming missing or unknown keys of ``params``."""
        if not isinstance(params, dict):
            raise TypeError(f"params must be a dict of tensors, got {type(params).__name__}")
        missing = [k for k in self.parameters if k not in params]
        valid = self.parameters + OPTIONAL_PARAMETERS
        unknown = [k for k in params if k not in valid]
        if missing or unknown:
            what = []
            if missing:
                what.append(f"missing {missing}")
            if unknown:
                what.append(f"unknown {unknown}")
            raise ValueError(f"{self}: parameters {'; '.join(what)}; required "
                             f"{list(self.parameters)}, optional {list(OPTIONAL_PARAMETERS)}")

    def disposition(self, params) -> tuple:
        """Eigenvalues and bolus coefficients, see :func:`disposition`."""
        self.check_parameters(params)
        return disposition(self.n, params)

    def unit_response(self, params, t, route=None, *, duration=None, ii=None):
        """Concentration per unit dose at time ``t`` since the dose (0 for ``t < 0``).

        Parameters
        ----------
        params : dict[str, Tensor]
            Parameters (:attr:`parameters`, optionally ``f``, ``tlag``), broadcastable with
            ``t``. ``f`` and ``tlag`` apply where :func:`concentration` applies them: to
            ``"oral"`` for first-order absorption, to every route otherwise.
        t : Tensor
            Time since dose.
        route : {"bolus", "infusion", "oral"}, optional
            Default: ``"oral"`` for first-order absorption, ``"infusion"`` (of duration
            ``d1``) for zero-order, ``"bolus"`` for iv.
        duration : Tensor, optional
            Infusion duration (defaults to ``params["d1"]`` for zero-order absorption).
        ii : Tensor, optional
            Dosing interval: the steady-state response (last dose of an infinite train).

        Returns
        -------
        Tensor
            The broadcast shape of ``t`` and the parameters.
        """
        self.check_parameters(params)
        if route is None:
            route = {"first_order": "oral", "zero_order": "infusion", "iv": "bolus"}[self.absorption]
        if route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
        if route == "oral" and self.absorption != "first_order":
            raise ValueError(f"route 'oral' needs absorption='first_order', not {self.absorption!r}")
        if route == "infusion" and duration is None:
            if self.absorption != "zero_order":
                raise ValueError("route 'infusion' needs a duration")
            duration = params["d1"]
        scaled = route == "oral" or self.absorption != "first_order"
        f = params.get("f") if scaled else None
        tlag = params.get("tlag") if scaled else None
        ka = params.get("ka") if route == "oral" else None
        return _unit_response(self.n, params, t, route, ka=ka, duration=duration, ii=ii,
                              f=f, tlag=tlag)

    def concentration(self, params, data) -> torch.Tensor:
        """Central-compartment concentrations at a :class:`~genprog.pk.dataset.Dataset`'s
        observation times, all doses superposed: see :func:`concentration`.

        Returns
        -------
        Tensor [..., S, T]
        """
        return concentration(self, params, data.dose_time, data.dose_amt, data.dose_rate,
                             data.dose_cmt, data.dose_ss, data.dose_ii, data.dose_mask,
                             data.obs_time, dose_epoch=data.dose_epoch, obs_epoch=data.obs_epoch)


def OneCompartment(absorption: str = "first_order") -> Compartments:
    """One-compartment model (parameters ``cl, v``; ``ka`` or ``d1`` per absorption)."""
    return Compartments(1, absorption)


def TwoCompartment(absorption: str = "first_order") -> Compartments:
    """Two-compartment model (parameters ``cl, v1, q, v2``; ``ka`` or ``d1``)."""
    return Compartments(2, absorption)


def ThreeCompartment(absorption: str = "first_order") -> Compartments:
    """Three-compartment model (parameters ``cl, v1, q, v2, q3, v3``; ``ka`` or ``d1``)."""
    return Compartments(3, absorption)


# --------------------------------------------------------------------------- disposition


def disposition(n: int, params) -> tuple:
    """Eigenvalues and coefficients of the unit-bolus response ``sum_i A_i e^{-lambda_i t}``.

    Parameters
    ----------
    n : int
        1, 2 or 3 compartments.
    params : dict[str, Tensor]
        ``cl, v`` (n = 1), ``cl, v1, q, v2`` (n = 2), plus ``q3, v3`` (n = 3); broadcastable.

    Returns
    -------
    rates, coefs : Tensor [..., n]
        ``lambda_i`` (1/time, decreasing) and ``A_i`` (1/volume; ``sum_i A_i = 1/V1``).
    """
    names = _DISPOSITION_PARAMETERS[n]
    values = torch.broadcast_tensors(*_as_tensors([params[k] for k in names]))
    if n == 1:
        cl, v = values
        return (cl / v).unsqueeze(-1), (1.0 / v).unsqueeze(-1)
    if n == 2:
        cl, v1, q, v2 = values
        k10, k12, k21 = cl / v1, q / v1, q / v2
        s = k10 + k12 + k21
        root = torch.sqrt((k10 - k21) ** 2 + k12 * (k12 + 2.0 * (k10 + k21)))
        alpha = 0.5 * (s + root)
        beta = k10 * k21 / alpha
        coefs = torch.stack([(alpha - k21) / (v1 * root), (k21 - beta) / (v1 * root)], -1)
        return torch.stack([alpha, beta], -1), coefs
    cl, v1, q2, v2, q3, v3 = values
    k10, k12, k21, k13, k31 = cl / v1, q2 / v1, q2 / v2, q3 / v1, q3 / v3
    a2 = k10 + k12 + k13 + k21 + k31
    a1 = k10 * k21 + k10 * k31 + k21 * k31 + k13 * k21 + k12 * k31
    a0 = k10 * k21 * k31
    # Largest root, trigonometric form of the depressed cubic y^3 + p y + q.
    minus_p3 = (a2 * a2 / 3.0 - a1) / 3.0                     # -p/3 = r^2 >= 0
    q = -2.0 * a2 ** 3 / 27.0 + a1 * a2 / 3.0 - a0
    r = torch.sqrt(minus_p3)
    cos_arg = (-q / (2.0 * r * minus_p3)).clamp(-1.0, 1.0)
    lam1 = a2 / 3.0 + 2.0 * r * torch.cos(torch.arccos(cos_arg) / 3.0)
    # Deflation: lam2 * lam3 = a0 / lam1, lam2 + lam3 = (a1 - lam2 lam3) / lam1.
    prod23 = a0 / lam1
    sum23 = (a1 - prod23) / lam1
    root23 = torch.sqrt((sum23 * sum23 - 4.0 * prod23).clamp_min(0.0))
    lam2 = 0.5 * (sum23 + root23)
    lam3 = prod23 / lam2
    d12, d13 = lam1 - lam2, lam1 - lam3
    coefs = torch.stack([
        (k21 - lam1) * (k31 - lam1) / (d12 * d13),
        (k21 - lam2) * (k31 - lam2) / (-d12 * root23),
        (k21 - lam3) * (k31 - lam3) / (d13 * root23),
    ], -1) / v1.unsqueeze(-1)
    return torch.stack([lam1, lam2, lam3], -1), coefs


# --------------------------------------------------------------------------- elementary terms


def _phi(x):
    """``(1 - e^{-x}) / x`` for ``x >= 0``, with ``phi(0) = 1`` and exact gradients.

    ``-expm1(-x)/x`` is accurate in value for every ``x > 0``, but its autograd derivative
    cancels catastrophically as ``x -> 0``; below ``1e-3`` the Taylor polynomial to
    ``x^4`` is used (truncation ``x^5/720 < 2e-18``), which is also exact at ``x = 0``.
    """
    small = x < _PHI_SERIES_BELOW
    x_safe = torch.where(small, torch.ones_like(x), x)
    series = ((((x * (1.0 / 120.0) - 1.0 / 24.0) * x + 1.0 / 6.0) * x - 0.5) * x) + 1.0
    return torch.where(small, series, -torch.expm1(-x_safe) / x_safe)


def _exp_divided_difference(p, q):
    """``(e^{-p} - e^{-q}) / (q - p)``, ``e^{-p}`` when ``p == q``; no overflow, no cancellation.

    ``e^{-min(p, q)} phi(|q - p|)`` in general; when ``|q - p| < 1e-3`` the symmetric form
    ``e^{-(p + q)/2} sinh(z)/z`` (``z = (q - p)/2``, series to ``z^4``, truncation < 1e-23),
    which is smooth in ``p`` and ``q``, so gradients and Hessians are exact through the tie.
    (Where the general form is taken, ``|q - p| >= 1e-3``, so ``phi`` is its ``expm1``
    branch: no series is evaluated there.)
    """
    d = q - p
    ad = d.abs()
    small = ad < _PHI_SERIES_BELOW
    z = torch.where(small, d, torch.zeros_like(d)) * 0.5
    z2 = z * z
    near = torch.exp(-0.5 * (p + q)) * (1.0 + z2 * (1.0 / 6.0) * (1.0 + z2 * (1.0 / 20.0)))
    ad_safe = torch.where(small, torch.ones_like(ad), ad)
    far = torch.exp(-torch.minimum(p, q)) * (-torch.expm1(-ad_safe) / ad_safe)
    return torch.where(small, near, far)


def _maybe_any(mask) -> bool:
    """``bool(mask.any())``, or True where that cannot be asked (a traced or vmapped
    tensor): the caller then takes its general path."""
    try:
        return bool(mask.any())
    except RuntimeError:
        return True


def _central_terms(lam, s, duration):
    """Per-exponential response to a unit zero-order input of ``duration`` (0: bolus), s >= 0."""
    positive = duration > 0
    s1 = torch.minimum(s, duration)
    frac = torch.where(positive, s1 / torch.where(positive, duration, torch.ones_like(duration)),
                       torch.ones_like(s1))
    return frac * _phi(lam * s1) * torch.exp(-lam * (s - s1))


def _central_terms_ss(lam, s, duration, tau):
    """Steady-state version of :func:`_central_terms` (interval ``tau``), s >= 0."""
    positive = duration > 0
    dur_safe = torch.where(positive, duration, torch.ones_like(duration))
    with torch.no_grad():
        running = torch.where(duration > s, torch.ceil((duration - s) / tau), torch.zeros_like(s))
    one_minus = lam * tau * _phi(lam * tau)                              # 1 - e^{-lam tau}
    after = _phi(lam * duration) * torch.exp(-lam * (s + running * tau - duration)) / one_minus
    first = s / dur_safe * _phi(lam * s)
    many_k = torch.where(running >= 2, running, torch.full_like(running, 2.0))
    many = many_k * (1.0 - torch.exp(-lam * s) * _phi(lam * many_k * tau) / _phi(lam * tau)) / (
        lam * dur_safe)
    during = torch.where(running >= 2, many, torch.where(running >= 1, first, torch.zeros_like(first)))
    return during + after


def _oral_terms(lam, ka, s):
    """``(e^{-lam s} - e^{-ka s}) / (ka - lam)`` per exponential (times ``ka`` by the caller),
    ``s >= 0``.

    This is ``s E(lam s, ka s)`` evaluated as ``s e^{-min(lam, ka) s} phi(|ka - lam| s)``
    with the minimum and the absolute value taken of the (small) parameter tensors, then
    scaled by ``s``: an analytic function of ``lam``, ``ka`` and ``s`` wherever
    ``ka != lam``, so its autograd derivatives of every order are exact, near-ties
    included, and one branch is evaluated per element. Only at an exact tie
    ``ka == lam`` (where ``|.|`` and ``min`` have no derivative) is the smooth symmetric
    form of :func:`_exp_divided_difference` taken, and only when such a tie exists.
    """
    delta = ka - lam
    out = s * (torch.exp(-torch.minimum(lam, ka) * s) * _phi(delta.abs() * s))
    tie = delta == 0
    if _maybe_any(tie):
        out = torch.where(tie, s * _exp_divided_difference(lam * s, ka * s), out)
    return out


def _oral_terms_ss(lam, ka, s, tau, single=None):
    """Steady-state version of :func:`_oral_terms` (interval ``tau``), s >= 0; ``single``:
    ``_oral_terms(lam, ka, s)`` when the caller has it."""
    if single is None:
        single = _oral_terms(lam, ka, s)
    num = single - (s - tau) * _exp_divided_difference(lam * s + ka * tau, ka * s + lam * tau)
    return num / (lam * tau * _phi(lam * tau) * (ka * tau * _phi(ka * tau)))


def _as_tensors(values):
    tensors = [v for v in values if torch.is_tensor(v)]
    dtype = float_dtype(tensors)
    device = tensors[0].device if tensors else None
    return [torch.as_tensor(v, dtype=dtype, device=device) for v in values]


def float_dtype(tensors):
    """The promoted floating dtype of ``tensors`` (torch's default when none is floating)."""
    dtype = None
    for x in tensors:
        if x.is_floating_point():
            dtype = x.dtype if dtype is None else torch.promote_types(dtype, x.dtype)
    return dtype or torch.get_default_dtype()


# --------------------------------------------------------------------------- unit responses


def _unit_response(n, params, t, route, *, ka=None, duration=None, ii=None, f=None, tlag=None):
    names = _DISPOSITION_PARAMETERS[n]
    extras = {"t": t, "ka": ka, "duration": duration, "ii": ii, "f": f, "tlag": tlag}
    extras = {k: v for k, v in extras.items() if v is not None}
    values = _as_tensors([params[k] for k in names] + list(extras.values()))
    values = torch.broadcast_tensors(*values)
    disp = dict(zip(names, values[:len(names)]))
    x = dict(zip(extras, values[len(names):]))
    lam, coef = disposition(n, disp)
    s = x["t"] - x["tlag"] if "tlag" in x else x["t"]
    if "ii" in x:
        tau = x["ii"]
        s = torch.where(s < 0, s + torch.ceil(-s / tau).detach() * tau, s)
        started = x["t"] >= 0
    else:
        started = s >= 0
    s = s.clamp_min(0.0).unsqueeze(-1)
    if route == "oral":
        k = x["ka"].unsqueeze(-1)
        terms = k * (_oral_terms_ss(lam, k, s, x["ii"].unsqueeze(-1)) if "ii" in x
                     else _oral_terms(lam, k, s))
    else:
        dur = x["duration"].unsqueeze(-1) if route == "infusion" else torch.zeros_like(s)
        terms = (_central_terms_ss(lam, s, dur, x["ii"].unsqueeze(-1)) if "ii" in x
                 else _central_terms(lam, s, dur))
    out = (coef * terms).sum(-1)
    if "f" in x:
        out = out * x["f"]
    return torch.where(started, out, torch.zeros_like(out))


def one_compartment_bolus(t, dose, cl, v):
    """Concentration ``t`` after an IV bolus ``dose`` (0 for ``t < 0``), one compartment.

    All arguments broadcast; the result has their broadcast shape.

    >>> float(one_compartment_bolus(torch.tensor(0.0), 100.0, 1.0, 10.0))
    10.0
    """
    return dose * _unit_response(1, {"cl": cl, "v": v}, t, "bolus")


def one_compartment_infusion(t, dose, duration, cl, v):
    """Concentration ``t`` after the start of an infusion of ``dose`` over ``duration``."""
    return dose * _unit_response(1, {"cl": cl, "v": v}, t, "infusion", duration=duration)


def one_compartment_oral(t, dose, ka, cl, v, tlag=0.0):
    """Concentration ``t`` after an oral ``dose`` (multiply ``dose`` by F yourself),
    first-order absorption ``ka`` and lag ``tlag``; exact at ``ka == cl/v``."""
    return dose * _unit_response(1, {"cl": cl, "v": v}, t, "oral", ka=ka, tlag=tlag)


def two_compartment_bolus(t, dose, cl, v1, q, v2):
    """Concentration ``t`` after an IV bolus ``dose``, two compartments."""
    return dose * _unit_response(2, {"cl": cl, "v1": v1, "q": q, "v2": v2}, t, "bolus")


def two_compartment_infusion(t, dose, duration, cl, v1, q, v2):
    """Concentration ``t`` after the start of an infusion of ``dose`` over ``duration``."""
    return dose * _unit_response(2, {"cl": cl, "v1": v1, "q": q, "v2": v2}, t, "infusion",
                                 duration=duration)


def two_compartment_oral(t, dose, ka, cl, v1, q, v2, tlag=0.0):
    """Concentration ``t`` after an oral ``dose``, first-order absorption, two compartments."""
    return dose * _unit_response(2, {"cl": cl, "v1": v1, "q": q, "v2": v2}, t, "oral", ka=ka, tlag=tlag)


def three_compartment_bolus(t, dose, cl, v1, q, v2, q3, v3):
    """Concentration ``t`` after an IV bolus ``dose``, three compartments."""
    return dose * _unit_response(3, {"cl": cl, "v1": v1, "q": q, "v2": v2, "q3": q3, "v3": v3}, t, "bolus")


def three_compartment_infusion(t, dose, duration, cl, v1, q, v2, q3, v3):
    """Concentration ``t`` after the start of an infusion of ``dose`` over ``duration``."""
    return dose * _unit_response(3, {"cl": cl, "v1": v1, "q": q, "v2": v2, "q3": q3, "v3": v3}, t,
                                 "infusion", duration=duration)


def three_compartment_oral(t, dose, ka, cl, v1, q, v2, q3, v3, tlag=0.0):
    """Concentration ``t`` after an oral ``dose``, first-order absorption, three compartments."""
    return dose * _unit_response(3, {"cl": cl, "v1": v1, "q": q, "v2": v2, "q3": q3, "v3": v3}, t, "oral",
                                 ka=ka, tlag=tlag)


# --------------------------------------------------------------------------- superposition


def concentration(structure, params, dose_time, dose_amt, dose_rate, dose_cmt, dose_ss,
                  dose_ii, dose_mask, obs_time, *, dose_epoch=None, obs_epoch=None):
    """Central-compartment concentration of every subject at its observation times.

    The contributions of all doses of a subject are summed; a dose contributes to an
    observation only if it is real (``dose_mask``), not later than the observation
    (``t_obs >= t_dose (+ tlag)``; a lag is taken to be ``>= 0``), of the same epoch when
    epochs are given, and not wiped out by a later ``SS = 1`` dose. Only the (dose,
    observation) pairs that the data allow to act are evaluated, compacted per subject
    to ``[..., S, K]`` (``K`` the most pairs any subject has, usually far fewer than
    ``D * T``), and added into their observations. Conventions (compartment numbers, F,
    tlag, infusions, steady state) are in the module docstring.

    Parameters
    ----------
    structure : Compartments
    params : dict[str, Tensor]
        Tensors broadcastable to ``[..., S]`` (leading batch dims for chains or draws).
    dose_time, dose_amt, dose_rate, dose_ii : Tensor [S, D]
    dose_cmt, dose_ss : LongTensor [S, D]
    dose_mask : BoolTensor [S, D]
        Padding doses (False) may hold any value, NaN included.
    obs_time : Tensor [S, T]
    dose_epoch : LongTensor [S, D], optional
    obs_epoch : LongTensor [S, T], optional

    Returns
    -------
    Tensor [..., S, T]
        Concentration (amount unit of the doses / volume unit of the parameters), in the
        promoted floating dtype of the parameters and the data, on their device.

    Raises
    ------
    ValueError
        Doses the structure cannot take (unknown compartment, an infusion into the depot,
        a negative rate, a steady-state dose without ``II``), or bad parameter names.
    """
    if not isinstance(structure, Compartments):
        raise TypeError(f"structure must be a Compartments, got {type(structure).__name__}")
    structure.check_parameters(params)
    names = structure.parameters + tuple(k for k in OPTIONAL_PARAMETERS if k in params)
    floats = [dose_time, dose_amt, dose_rate, dose_ii, obs_time]
    converted = _as_tensors([params[k] for k in names] + floats)
    p = dict(zip(names, converted[:len(names)]))
    dose_time, dose_amt, dose_rate, dose_ii, obs_time = converted[len(names):]
    device = obs_time.device
    dose_mask = torch.as_tensor(dose_mask, dtype=torch.bool, device=device)
    dose_cmt = torch.as_tensor(dose_cmt, device=device)
    dose_ss = torch.as_tensor(dose_ss, device=device)
    if dose_time.dim() != 2 or obs_time.dim() != 2:
        raise ValueError(f"dose tensors must be [S, D] and obs_time [S, T], got "
                         f"{tuple(dose_time.shape)} and {tuple(obs_time.shape)}")

    # Padding -> harmless values, so that no NaN reaches a gradient through torch.where.
    zero = torch.zeros_like(dose_time)
    dose_time = torch.where(dose_mask, dose_time, zero)
    amt = torch.where(dose_mask, dose_amt, zero)
    rate = torch.where(dose_mask, dose_rate, zero)
    ii = torch.where(dose_mask, dose_ii, zero)
    ss = torch.where(dose_mask, dose_ss, torch.zeros_like(dose_ss))
    cmt = torch.where(dose_mask, dose_cmt, torch.zeros_like(dose_cmt))
    is_ss = ss > 0
    const = is_ss & (rate > 0) & (amt == 0) & (ii == 0)          # constant infusion at SS

    if structure.absorption == "first_order":
        depot = (cmt == 0) | (cmt == 1)
        bad = ~depot & (cmt != 2)
        if bool(bad.any()):
            raise ValueError(f"{structure}: dose compartment must be 1 (depot) or 2 (central), "
                             f"got {sorted(set(cmt[bad].tolist()))}")
        if bool((depot & (rate != 0)).any()):
            raise ValueError(f"{structure}: doses into the depot (CMT 1) must have RATE 0; "
                             "use absorption='zero_order' for zero-order input")
        central = ~depot
    else:
        if bool(((cmt != 0) & (cmt != 1)).any()):
            raise ValueError(f"{structure}: doses go into the central compartment (CMT 1); "
                             f"got {sorted(set(cmt[(cmt != 0) & (cmt != 1)].tolist()))}")
        depot = torch.zeros_like(dose_mask)
        central = torch.ones_like(dose_mask)
    if bool((rate < 0).any()):
        raise ValueError(f"{structure}: negative RATE (modelled rate/duration) is not supported; "
                         "use absorption='zero_order' with parameter 'd1'")
    if bool((is_ss & ~const & (ii <= 0)).any()):
        raise ValueError(f"{structure}: a steady-state dose (SS > 0) needs II > 0")

    # Per-dose F, lag, effective amount and infusion duration, shape [..., S, D].
    one = torch.ones((), dtype=dose_time.dtype, device=device)
    f = p.get("f", one).unsqueeze(-1)
    tlag = p.get("tlag", 0.0 * one).unsqueeze(-1)
    if structure.absorption == "first_order":
        f = torch.where(depot, f, one)
        tlag = torch.where(depot, tlag, 0.0 * one)
    amt_eff = f * amt
    rate_safe = torch.where(rate > 0, rate, torch.ones_like(rate))
    if structure.absorption == "zero_order":
        duration = p["d1"].unsqueeze(-1) + zero
    else:
        duration = torch.where(rate > 0, amt_eff / rate_safe, torch.zeros_like(amt_eff))
    duration = torch.where(const, zero, duration)

    # Which (dose, observation) pairs can act, from the data alone: a real dose, not after
    # the observation (a lag only delays it further), the same epoch, no SS=1 reset between.
    elapsed = obs_time.unsqueeze(-2) - dose_time.unsqueeze(-1)   # [S, D, T]
    keep = dose_mask.unsqueeze(-1) & (elapsed >= 0)
    if dose_epoch is not None or obs_epoch is not None:
        if dose_epoch is None or obs_epoch is None:
            raise ValueError("give both dose_epoch and obs_epoch, or neither")
        dose_epoch = torch.as_tensor(dose_epoch, device=device)
        obs_epoch = torch.as_tensor(obs_epoch, device=device)
        keep = keep & (dose_epoch.unsqueeze(-1) == obs_epoch.unsqueeze(-2))
    reset = is_ss & ((ss == 1) | (ss == 3))
    if bool(reset.any()):
        # A dose stops contributing at the first later SS=1 dose of its epoch.
        later = reset.unsqueeze(-2) & (dose_time.unsqueeze(-2) > dose_time.unsqueeze(-1))
        if dose_epoch is not None:
            later = later & (dose_epoch.unsqueeze(-2) == dose_epoch.unsqueeze(-1))
        inf = torch.full_like(dose_time, math.inf)
        next_reset = torch.where(later, dose_time.unsqueeze(-2), inf.unsqueeze(-2)).amin(-1)
        keep = keep & (obs_time.unsqueeze(-2) < next_reset.unsqueeze(-1))

    # The pairs that can act are evaluated, compacted per subject to [S, K] (K the most
    # any subject has; the rest of the slots are padding, masked), when that is fewer
    # than all D * T; the contributions are then added into their observations.
    S, D, T = elapsed.shape
    flat = keep.reshape(S, D * T)
    K = max(int(flat.sum(-1).max()), 1) if S else 1
    compact = K < D * T
    if compact:
        order = torch.sort((~flat).to(torch.int8), dim=-1, stable=True).indices[:, :K]
        valid = torch.gather(flat, 1, order)
        d_idx, t_idx = order // T, order % T

        def per_dose(x):                                          # [..., S, D] -> [..., S, K]
            x = x.expand(torch.broadcast_shapes(x.shape, (S, D)))
            return torch.gather(x, -1, d_idx.expand(*x.shape[:-2], S, K))

        elapsed, keep = torch.gather(elapsed.reshape(S, D * T), 1, order), valid
    else:
        def per_dose(x):                                          # [..., S, D] -> [..., S, D, 1]
            return x.unsqueeze(-1)

    lam, coef = disposition(structure.n, p)                       # [..., S, n]
    grid = 1 if compact else 2                                    # pair dims: K or (D, T)
    for _ in range(grid):
        lam, coef = lam.unsqueeze(-2), coef.unsqueeze(-2)         # [..., S, (1,) 1, n]

    # Time since dose (after lag), [..., S, K] or [..., S, D, T].
    s = elapsed - per_dose(tlag)
    tau = per_dose(torch.where(is_ss & ~const, ii, torch.ones_like(ii)))
    any_ss = bool(is_ss.any())
    if any_ss:
        s_ss = torch.where(s < 0, s + torch.ceil(-s / tau).detach() * tau, s)
        is_ss_b = per_dose(is_ss)
        s = torch.where(is_ss_b, s_ss, s)
        started = torch.where(is_ss_b, elapsed >= 0, s >= 0)
    else:
        started = s >= 0
    s = s.clamp_min(0.0).unsqueeze(-1)                            # [..., S, pairs, 1]
    tau_e = tau.unsqueeze(-1)
    dur_e = per_dose(duration).unsqueeze(-1)

    unit = None
    if bool((central & dose_mask).any()):
        infusions = structure.absorption == "zero_order" or bool((central & (rate > 0)).any())
        terms = _central_terms(lam, s, dur_e) if infusions else torch.exp(-lam * s)
        if any_ss and infusions:
            terms = torch.where(is_ss_b.unsqueeze(-1), _central_terms_ss(lam, s, dur_e, tau_e), terms)
        elif any_ss:  # boluses: e^{-lam s} / (1 - e^{-lam tau}), the denominator per dose
            terms = torch.where(is_ss_b.unsqueeze(-1), terms / (lam * tau_e * _phi(lam * tau_e)), terms)
        unit = (coef * terms).sum(-1)
    if bool((depot & dose_mask).any()):
        ka = p["ka"][(...,) + (None,) * (grid + 1)]               # [..., S, (1,) 1, 1]
        terms = _oral_terms(lam, ka, s)
        if any_ss:
            terms = torch.where(is_ss_b.unsqueeze(-1), _oral_terms_ss(lam, ka, s, tau_e, terms), terms)
        oral = (ka * coef * terms).sum(-1)
        unit = oral if unit is None else torch.where(per_dose(depot), oral, unit)
    if unit is None:
        return torch.zeros(torch.broadcast_shapes(lam.shape[:-(grid + 1)], obs_time.shape[:-1]) +
                           obs_time.shape[-1:], dtype=obs_time.dtype, device=device)
    contrib = per_dose(amt_eff) * unit
    if bool(const.any()):
        level = per_dose(rate) * (coef / lam).sum(-1)             # RATE * sum A_i / lambda_i
        contrib = torch.where(per_dose(const), level, contrib)

    contrib = torch.where(started & keep, contrib, torch.zeros_like(contrib))
    if not compact:
        return contrib.sum(-2)
    out = torch.zeros(contrib.shape[:-1] + (T,), dtype=contrib.dtype, device=device)
    return out.scatter_add(-1, t_idx.expand(contrib.shape), contrib)
