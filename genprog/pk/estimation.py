"""Population maximum likelihood with the random effects integrated out (Laplace / FOCEi-like).

For population parameters ``phi`` (typical values, omegas, covariate coefficients,
residual error; no priors), the marginal likelihood of subject ``i`` is

.. math:: p(y_i \\mid \\phi) = \\int p(y_i \\mid \\eta_i, \\phi)\\, N(\\eta_i; 0, \\Omega)\\, d\\eta_i
          \\approx e^{h_i(\\hat\\eta_i)} (2\\pi)^{P/2} \\det(-H_i)^{-1/2},

with ``h_i(eta) = log p(y_i | eta, phi) + log N(eta; 0, Omega)``, ``eta_hat_i`` its maximiser
(the empirical Bayes estimate, EBE) and ``H_i`` its curvature there: by default
(``approximation="focei"``) the expected information with the eta-epsilon interaction
kept, which is NONMEM's FOCE-I (and nlmixr2's focei) — our OFVs match theirs —, or
(``"laplace"``) the exact Hessian, NONMEM's LAPLACIAN INTERACTION. All subjects are handled at once: the inner problems are
independent, so one batched damped-Newton iteration updates every ``eta_i`` together
(``[S, P]``), and per-subject Hessians ``[S, P, P]`` come from P backward passes.

The outer problem maximises ``sum_i log p(y_i | phi)`` over unconstrained ``phi`` with
L-BFGS; each evaluation re-solves the inner problems (warm-started) and differentiates the
Laplace objective exactly, including the dependence of ``eta_hat`` on ``phi`` (implicit
function theorem, through one differentiable Newton step at the optimum).
Standard errors come from a finite-difference Hessian of the objective.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import biject_to

from ..errors import ConvergenceWarning


@dataclass
class ParameterLayout:
    """Packing of the population parameters into one unconstrained vector; ``fixed``
    sites (natural scale) are not in the vector and ``unpack`` adds them as constants."""

    names: list
    shapes: dict
    transforms: dict
    fixed: dict = field(default_factory=dict)

    def unpack(self, phi: torch.Tensor) -> dict:
        out = {k: torch.as_tensor(v, dtype=phi.dtype, device=phi.device) for k, v in self.fixed.items()}
        start = 0
        for n in self.names:
            t = self.transforms[n]
            ushape = t.inverse_shape(torch.Size(self.shapes[n]))
            k = int(torch.Size(ushape).numel())
            out[n] = t(phi[start:start + k].reshape(ushape))
            start += k
        return out

    def pack(self, values: dict) -> torch.Tensor:
        return torch.cat([self.transforms[n].inv(torch.as_tensor(values[n])).reshape(-1)
                          for n in self.names])


def _layout(pop, data, priors, fixed=None) -> ParameterLayout:
    names, shapes, transforms = [], {}, {}
    fixed = dict(fixed or {})
    for name, prior in priors.items():
        if name in fixed:
            continue
        names.append(name)
        shapes[name] = tuple(prior.event_shape) if prior.event_dim else tuple(prior.batch_shape)
        transforms[name] = biject_to(prior.support)
    return ParameterLayout(names, shapes, transforms, fixed)


def _start_values(pop, data, priors) -> dict:
    """Prior medians (typical values at the data-based guesses; omega 0.3, IOV omega 0.2;
    sigma at 0.3 x the prior scale; covariate coefficients at their prior centre, threshold
    effects at 0)."""
    from .population import RelativeChange

    start = {}
    for name, prior in priors.items():
        if name == "omega":
            start[name] = torch.full(prior.event_shape, 0.3)
        elif name == "omega_iov":
            start[name] = torch.full(prior.event_shape, 0.2)
        elif isinstance(prior, RelativeChange):
            start[name] = torch.zeros(prior.batch_shape)
        elif name == "omega_corr":
            start[name] = torch.eye(prior.event_shape[-1])
        elif isinstance(prior, dist.LogNormal):
            start[name] = prior.loc.exp()
        elif isinstance(prior, dist.HalfNormal):
            start[name] = 0.3 * prior.scale
        else:
            base = prior.base_dist if hasattr(prior, "base_dist") else prior
            start[name] = base.mean if torch.is_tensor(base.mean) else torch.tensor(float(base.mean))
    return start


APPROXIMATIONS = ("laplace", "focei")


class LaplaceObjective:
    """Population log likelihood by per-subject Laplace approximation: with
    ``approximation="laplace"`` the exact Hessian of ``h_i`` in eta (NONMEM's LAPLACIAN
    INTERACTION), with ``"focei"`` its expected-information approximation (NONMEM FOCE-I,
    nlmixr2 FOCEi; see :meth:`information`), which is positive definite even where the
    data say little about a random effect."""

    def __init__(self, pop, data, priors, fixed=None, approximation="focei"):
        if approximation not in APPROXIMATIONS:
            raise ValueError(f"approximation must be one of {APPROXIMATIONS}, got {approximation!r}")
        self.approximation = approximation
        self.pop = pop
        self.data = data
        self.priors = priors
        self.layout = _layout(pop, data, priors, fixed)
        self.P_iiv = len(pop.random_effects)
        self.P = pop.n_random(data)  # IIV etas, then IOV kappas (occasion-major)
        self.mask = pop.observation_mask(data)
        self.observed = self.mask & ~data.obs_blq
        self.blq = self.mask & data.obs_blq
        self.n_obs = int(self.observed.sum())

    def split(self, values):
        pop = self.pop
        typical = {p: values[p] for p in pop.parameters if p in values}
        if pop.ka_above_k:
            typical["ka_minus_k"] = values["ka_minus_k"]
        betas = {e.site: values[e.site] for e in pop.covariate_effects if e.estimated}
        sigma = {s: values[s] for s in pop.sigma_sites()}
        return typical, betas, sigma

    def scale_tril(self, values):
        """Cholesky factor ``[P, P]`` of the random effects' covariance: the IIV omega
        block, then ``omega_iov`` repeated for each occasion (block diagonal)."""
        from .population import omega_scale_tril

        blocks = []
        if self.P_iiv:
            blocks.append(omega_scale_tril(values["omega"], values.get("omega_corr")))
        if self.P > self.P_iiv:
            K = (self.P - self.P_iiv) // len(self.pop.iov)
            blocks.append(torch.diag_embed(values["omega_iov"].repeat(K)))
        return blocks[0] if len(blocks) == 1 else torch.block_diag(*blocks)

    def conditional(self, values, eta):
        """``log p(y_i | eta_i, phi)`` ``[S]`` and predictions ``[S, T]``."""
        ll, pred, _, _, _ = self._pieces(values, eta)
        return ll, pred

    def _pieces(self, values, eta):
        """``log p(y_i | eta_i, phi)`` ``[S]``, predictions, the residual mean on the error
        scale (``pred``, or ``log pred`` for exponential error), its SD and the BLQ z-score
        ``(LLOQ - mean) / sd``, each ``[S, T]``."""
        typical, betas, sigma = self.split(values)
        ind = self.pop.individual_parameters(typical, betas, eta, self.data)
        pred = self.pop.predict(ind, self.data, per_occasion=self.pop.has_kappas(eta))
        sd = self.pop.residual_sd(pred, sigma).clamp_min(1e-9)
        dv = torch.where(self.observed, self.data.obs_dv, torch.ones_like(pred))
        if self.pop.error == "exponential":
            mean = torch.log(pred.clamp_min(1e-30))
            lp = dist.LogNormal(mean, sd).log_prob(dv.clamp_min(1e-30))
            z = (torch.log(torch.nan_to_num(self.data.obs_lloq, nan=1.0).clamp_min(1e-30)) - mean) / sd
        else:
            mean = pred
            lp = dist.Normal(pred, sd).log_prob(dv)
            z = (torch.nan_to_num(self.data.obs_lloq, nan=0.0) - pred) / sd
        ll = torch.where(self.observed, lp, torch.zeros_like(lp)).sum(-1)
        if bool(self.blq.any()):
            ll = ll + torch.where(self.blq, torch.special.log_ndtr(z), torch.zeros_like(z)).sum(-1)
        return ll, pred, mean, sd, z

    def joint(self, values, eta):
        """``h_i(eta) = log p(y_i | eta, phi) + log N(eta; 0, Omega)`` ``[S]``."""
        ll, _ = self.conditional(values, eta)
        if self.P:
            ll = ll + self._prior(values, eta)
        return ll

    def grad_hess(self, values, eta, create_graph=False):
        """Per-subject gradient ``[S, P]`` and Hessian ``[S, P, P]`` of ``h`` in eta."""
        with torch.enable_grad():
            eta = eta if eta.requires_grad else eta.detach().requires_grad_(True)
            h = self.joint(values, eta)
            g, = torch.autograd.grad(h.sum(), eta, create_graph=True)
            rows = [torch.autograd.grad(g[:, j].sum(), eta, create_graph=create_graph, retain_graph=True)[0]
                    for j in range(self.P)]
        H = torch.stack(rows, -2)
        return h, g, 0.5 * (H + H.transpose(-1, -2))

    def _finite(self, h, g, N):
        """Subjects whose density is not finite at a point get h = -inf and a harmless
        gradient/curvature (``N``, the negative Hessian or its approximation), so a Newton
        step there is simply rejected."""
        bad = ~torch.isfinite(h) | ~torch.isfinite(g).all(-1) | ~torch.isfinite(N).flatten(-2).all(-1)
        eye = torch.eye(self.P, dtype=N.dtype, device=N.device).expand_as(N)
        return (torch.where(bad, torch.full_like(h, float("-inf")), h),
                torch.where(bad[:, None], torch.zeros_like(g), g),
                torch.where(bad[:, None, None], eye, N))

    def information(self, values, eta, create_graph=False, hessian=False):
        """FOCE-I curvature: ``h`` ``[S]``, its gradient ``[S, P]`` and, in place of the
        negative Hessian, ``A = Omega^-1 + sum_t [J_m J_m^T / sd^2 + 2 J_s J_s^T / sd^2]``
        ``[S, P, P]`` (the expected information of the observations about eta, with the
        eta-dependence of the residual SD kept: the interaction), plus the Gauss-Newton
        term ``lambda (lambda + z) J_z J_z^T`` of each BLQ observation (``lambda`` the
        inverse Mills ratio). Always positive definite. Jacobians ``J`` of the mean and SD
        ``[S, T]`` in eta come from P backward passes through a linear dummy
        (``d/du (d/deta sum(m u))``). With ``hessian`` the exact Hessian ``[S, P, P]`` is
        returned too (fourth item)."""
        S, T = self.observed.shape
        with torch.enable_grad():
            eta = eta if eta.requires_grad else eta.detach().requires_grad_(True)
            ll, _, mean, sd, z = self._pieces(values, eta)
            h = ll + self._prior(values, eta)
            g, = torch.autograd.grad(h.sum(), eta, create_graph=True)
            u = torch.zeros(2, S, T, dtype=eta.dtype, device=eta.device, requires_grad=True)
            gu, = torch.autograd.grad((mean * u[0]).sum() + (sd * u[1]).sum(), eta, create_graph=True)
            cols = []
            for j in range(self.P):
                d, = torch.autograd.grad(gu[:, j].sum(), u, create_graph=create_graph,
                                         retain_graph=True, allow_unused=True)
                cols.append(torch.zeros_like(u) if d is None else d)
            if hessian:
                rows = [torch.autograd.grad(g[:, j].sum(), eta, create_graph=create_graph, retain_graph=True)[0]
                        for j in range(self.P)]
                H = torch.stack(rows, -2)
        J = torch.stack(cols, -1)  # [2, S, T, P]
        Jm, Js = J[0], J[1]
        if not create_graph:
            mean, sd, z = mean.detach(), sd.detach(), z.detach()
        obs = self.observed.to(sd.dtype) / sd ** 2
        A = torch.einsum("stp,st,stq->spq", Jm, obs, Jm) + torch.einsum("stp,st,stq->spq", Js, 2 * obs, Js)
        if bool(self.blq.any()):
            Jz = -(Jm + z[..., None] * Js) / sd[..., None]
            lam = torch.exp(-0.5 * z ** 2 - 0.5 * math.log(2 * math.pi) - torch.special.log_ndtr(z))
            w = torch.where(self.blq, lam * (lam + z), torch.zeros_like(z))
            A = A + torch.einsum("stp,st,stq->spq", Jz, w, Jz)
        L = self.scale_tril(values)
        A = A + torch.cholesky_inverse(L)
        A = 0.5 * (A + A.transpose(-1, -2))
        if hessian:
            return h, g, A, 0.5 * (H + H.transpose(-1, -2))
        return h, g, A

    def _prior(self, values, eta):
        L = self.scale_tril(values)
        return dist.MultivariateNormal(torch.zeros(self.P, dtype=eta.dtype, device=eta.device),
                                       scale_tril=L).log_prob(eta)

    def _curvature(self, values, eta, create_graph=False, newton=False):
        """``h``, gradient and negative curvature ``[S, P, P]``: ``-Hessian`` (Laplace) or
        the FOCE-I information (``approximation="focei"``). With ``newton`` (for the EBE
        iterations) FOCE-I gives ``-Hessian`` where it is positive definite, else the
        information: Newton's quadratic convergence near the mode, a safe step elsewhere."""
        if self.approximation == "focei":
            if not newton:
                return self.information(values, eta, create_graph)
            h, g, A, H = self.information(values, eta, create_graph, hessian=True)
            ok = torch.linalg.cholesky_ex(-H.detach())[1] == 0
            return h, g, torch.where(ok[:, None, None], -H, A)
        h, g, H = self.grad_hess(values, eta, create_graph)
        return h, g, -H

    def ebe(self, values, eta0, iters=50, tol=1e-7):
        """Empirical Bayes estimates by batched damped Newton, ``[S, P]`` (Gauss-Newton with
        the FOCE-I information for ``approximation="focei"``)."""
        eta = eta0.detach().clone()
        values = {k: v.detach() for k, v in values.items()}
        lam = torch.full((eta.shape[0],), 1e-3, dtype=eta.dtype)
        h, g, N = self._finite(*self._curvature(values, eta, newton=True))
        for _ in range(iters):
            eye = torch.eye(self.P, dtype=eta.dtype)
            A = N + lam[:, None, None] * eye
            # indefinite curvature (far from the mode): shift the spectrum so the smallest
            # eigenvalue is 1, i.e. a gradient step of unit scale in eta (etas are O(omega))
            low = torch.linalg.eigvalsh(A)[:, :1, None]
            A = A + torch.where(low <= 0, 1.0 - low, torch.zeros_like(low)) * eye
            step = torch.linalg.solve(A, g.detach()[..., None]).squeeze(-1)
            cand = eta + step
            h_new, g_new, N_new = self._finite(*self._curvature(values, cand, newton=True))
            better = h_new.detach() >= h.detach() - 1e-12
            eta = torch.where(better[:, None], cand, eta)
            h = torch.where(better, h_new.detach(), h.detach())
            g = torch.where(better[:, None], g_new.detach(), g.detach())
            N = torch.where(better[:, None, None], N_new.detach(), N.detach())
            lam = torch.where(better, lam * 0.3, lam * 10).clamp(1e-8, 1e8)
            if float(g.abs().max()) < tol:
                break
        return eta.detach()

    def log_likelihood(self, phi, eta0):
        """Laplace population log likelihood at unconstrained ``phi`` (differentiable in
        phi with eta_hat fixed) and the EBEs."""
        values = self.layout.unpack(phi)
        if not self.P:
            ll, _ = self.conditional(values, None)
            return ll.sum(), eta0
        eta_hat = self.ebe(values, eta0)
        # One Newton step from the (detached) optimum has the optimum's value and, by the
        # implicit function theorem, its exact derivative d eta_hat / d phi, so the
        # log-determinant term is differentiated through eta_hat(phi) as well.
        _, g0, H0 = self.grad_hess(values, eta_hat, create_graph=True)
        if self.approximation == "focei":
            # where the exact curvature is not negative definite (a nearly flat direction)
            # the FOCE-I information stands in for it
            _, _, A0 = self.information(values, eta_hat, create_graph=True)
            ok = torch.linalg.cholesky_ex(-H0.detach())[1] == 0
            H0 = torch.where(ok[:, None, None], H0, -A0)
        eta_t = eta_hat + torch.linalg.solve(-H0, g0[..., None]).squeeze(-1)
        h, _, N = self._curvature(values, eta_t, create_graph=True)
        sign, logdet = torch.linalg.slogdet(N)
        logdet = torch.where(sign > 0, logdet, torch.full_like(logdet, float("inf")))
        per_subject = h + 0.5 * self.P * math.log(2 * math.pi) - 0.5 * logdet
        return per_subject.sum(), eta_hat


@dataclass
class PopulationFit:
    """A population maximum-likelihood fit.

    Attributes
    ----------
    population : PopulationModel
    data : Dataset
    estimates : dict[str, Tensor]
        Population parameters on their natural scale.
    phi : Tensor [K]
        The unconstrained maximiser.
    covariance : Tensor [K, K] or None
        Asymptotic covariance of ``phi`` (inverse observed information); None when the
        Hessian is not positive definite (reported in ``info``).
    eta : Tensor [S, P]
        Empirical Bayes estimates of the random effects.
    individual : dict[str, Tensor [S]]
        Individual PK parameters at the EBEs.
    minus2ll : float
        -2 log likelihood (Laplace).
    ofv : float
        NONMEM objective function value: ``minus2ll - N log(2 pi)``.
    n_obs, n_params : int
    converged : bool
    info : dict
    fixed : dict
        Sites held at given values (natural scale) rather than estimated.
    approximation : str
        ``"laplace"`` or ``"focei"`` (see :class:`LaplaceObjective`).
    """

    population: object
    data: object
    estimates: dict
    phi: torch.Tensor
    covariance: object
    eta: torch.Tensor
    individual: dict
    minus2ll: float
    ofv: float
    n_obs: int
    n_params: int
    converged: bool
    method: str = "mle"
    info: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)
    approximation: str = "focei"

    def objective(self) -> LaplaceObjective:
        """The Laplace objective of this fit (its layout unpacks ``phi``)."""
        return LaplaceObjective(self.population, self.data, self.population.priors_for(self.data),
                                self.fixed, self.approximation)

    @property
    def aic(self) -> float:
        return self.minus2ll + 2 * self.n_params

    @property
    def bic(self) -> float:
        return self.minus2ll + self.n_params * math.log(self.n_obs)

    def predictions(self):
        """Population (``PRED``, eta = 0) and individual (``IPRED``, at the EBEs)
        predictions ``[S, T]``."""
        obj = self.objective()
        values = obj.layout.unpack(self.phi)
        with torch.no_grad():
            _, pred = obj.conditional(values, torch.zeros_like(self.eta) if obj.P else None)
            _, ipred = obj.conditional(values, self.eta if obj.P else None)
        return pred, ipred

    def summary(self):
        """Parameter table in pharmacometric terms (see :func:`genprog.pk.summary.population_summary`)."""
        from .summary import population_summary

        return population_summary(self)

    def individual_parameters(self):
        """Individual parameters at the EBEs, one row per subject (DataFrame)."""
        import pandas as pd

        return pd.DataFrame({k: v.detach().cpu().numpy() for k, v in self.individual.items()},
                            index=pd.Index(self.data.ids, name="ID"))


def fit_mle(pop, data, *, max_iters: int = 200, max_rounds: int = 5, seed: int = 0,
            init: dict | None = None,
            standard_errors: bool = True, dtype=torch.float64,
            fixed: dict | None = None, approximation: str = "focei") -> PopulationFit:
    """Population maximum likelihood with the etas integrated out by per-subject Laplace.

    Parameters
    ----------
    pop : PopulationModel
    data : Dataset
    max_iters : int
        Outer L-BFGS iterations per round.
    max_rounds : int
        L-BFGS restarts allowed when a round stops short of convergence.
    seed : int
        Unused by the deterministic algorithm; recorded.
    init : dict, optional
        Starting values on the natural scale (site -> value).
    standard_errors : bool
        Compute the covariance of the estimates (finite-difference Hessian).
    dtype : torch.dtype
        Computation dtype (float64 by default for stable Hessians).
    fixed : dict, optional
        Sites held at the given values (natural scale), e.g. ``{"f": 1.0}`` to estimate
        only the variability of a relative bioavailability.
    approximation : {"focei", "laplace"}
        The per-subject curvature: the expected information (FOCE-I, the default, as
        NONMEM and nlmixr2 — their OFVs are reproduced; more robust where a random effect is poorly
        determined by a subject's data, e.g. ka without early samples). See
        :class:`LaplaceObjective`.

    Returns
    -------
    PopulationFit
    """
    start_time = time.perf_counter()
    if approximation not in APPROXIMATIONS:
        raise ValueError(f"fit_mle: approximation must be one of {APPROXIMATIONS}, got {approximation!r}")
    pop.check_data(data)
    data = data.to(dtype=dtype)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    # out-of-range trial points give NaN densities (rejected), not validation errors
    validation = pyro.validation_enabled(False)
    validation.__enter__()
    try:
        priors = pop.priors_for(data)
        fixed = {k: torch.as_tensor(v, dtype=dtype) for k, v in (fixed or {}).items()}
        unknown = set(fixed) - set(priors)
        if unknown:
            raise ValueError(f"fit_mle: fixed has unknown site(s) {sorted(unknown)}; sites: {sorted(priors)}")
        for k, v in fixed.items():
            if not bool(priors[k].support.check(v).all()):
                raise ValueError(f"fit_mle: fixed value of {k!r} ({v.tolist()}) is outside its support")
        obj = LaplaceObjective(pop, data, priors, fixed, approximation)
        start = {**_start_values(pop, data, priors), **(init or {})}
        start = {k: v for k, v in start.items() if k not in fixed}
        unknown = set(init or {}) - set(priors)
        if unknown:
            raise ValueError(f"fit_mle: init for unknown site(s) {sorted(unknown)}; sites: {sorted(priors)}")
        phi = obj.layout.pack({k: torch.as_tensor(v, dtype=dtype) for k, v in start.items()}).detach()
        eta = torch.zeros(data.n_subjects, obj.P, dtype=dtype)
        state = {"eta": eta, "best": (float("inf"), phi.clone(), eta)}
        phi = phi.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([phi], lr=1.0, max_iter=max_iters, history_size=20,
                                tolerance_grad=1e-6, tolerance_change=1e-10,
                                line_search_fn="strong_wolfe")
        trace = []

        def closure():
            opt.zero_grad()
            ll, eta_hat = obj.log_likelihood(phi, state["eta"])
            loss = -ll
            if not torch.isfinite(loss):
                loss = loss.detach().new_tensor(1e30).requires_grad_(True) + 0 * phi.sum()
            else:
                state["eta"] = eta_hat
                if float(loss.detach()) < state["best"][0]:
                    state["best"] = (float(loss.detach()), phi.detach().clone(), eta_hat)
            loss.backward()
            trace.append(float(loss.detach()))
            return loss

        # L-BFGS rounds: a line search that fails on a rejected (non-finite) trial point
        # ends a round; a fresh round (new curvature history) usually gets past it.
        for _ in range(max_rounds):
            try:
                opt.step(closure)
            except (IndexError, RuntimeError):  # torch's line search on a degenerate bracket
                pass
            with torch.no_grad():  # continue from the best point seen
                _, best_phi, state["eta"] = state["best"]
                phi.copy_(best_phi)
            with torch.enable_grad():
                ll, eta_hat = obj.log_likelihood(phi, state["eta"])
                grad, = torch.autograd.grad(ll, phi)
            grad_norm = float(grad.abs().max())
            if grad_norm < 1e-3 * (1 + abs(float(ll.detach()))) or len(trace) >= max_iters * max_rounds:
                break
            opt = torch.optim.LBFGS([phi], lr=1.0, max_iter=max_iters, history_size=20,
                                    tolerance_grad=1e-6, tolerance_change=1e-10,
                                    line_search_fn="strong_wolfe")
        ll = ll.detach()
        converged = bool(torch.isfinite(ll)) and grad_norm < 1e-3 * (1 + abs(float(ll)))
        if not converged:
            warnings.warn(
                f"fit(method='mle'): L-BFGS stopped unconverged after {len(trace)} evaluations "
                f"(-2LL {-2 * float(ll):.4f}, max |gradient| {grad_norm:.3g}); raise max_iters or "
                "try other starting values (init=...)",
                ConvergenceWarning, stacklevel=3)
        phi = phi.detach()
        covariance, se_note = None, None
        if standard_errors:
            covariance, se_note = _covariance(obj, phi, eta_hat)
            if se_note:
                warnings.warn(f"fit(method='mle'): {se_note}", ConvergenceWarning, stacklevel=3)
        values = {k: v.detach() for k, v in obj.layout.unpack(phi).items()}
        typical, betas, _ = obj.split(values)
        # subject level (IOV kappas at 0)
        individual = pop.individual_parameters(typical, betas, eta_hat[:, :obj.P_iiv] if obj.P else None, data)
        individual = {k: v.detach().expand(data.n_subjects) for k, v in individual.items()}
        if pop.ka_above_k:
            v = values["v"] if "v" in values else values["v1"]
            values["ka"] = (values["ka_minus_k"] + values["cl"] / v).detach()
        minus2ll = -2 * float(ll)
        n_params = int(phi.numel())
    finally:
        validation.__exit__(None, None, None)
        torch.set_default_dtype(old)
    return PopulationFit(
        population=pop, data=data, estimates=values, phi=phi, covariance=covariance,
        eta=eta_hat.detach() if obj.P else torch.zeros(data.n_subjects, 0, dtype=dtype),
        individual=individual, minus2ll=minus2ll, ofv=minus2ll - obj.n_obs * math.log(2 * math.pi),
        n_obs=obj.n_obs, n_params=n_params, converged=converged,
        info={"evaluations": len(trace), "objective_trace": trace, "grad_norm": grad_norm,
              "seed": seed, "standard_errors": se_note or "ok",
              "wall_time_s": time.perf_counter() - start_time, "layout": obj.layout.names},
        fixed=fixed, approximation=approximation,
    )


def _covariance(obj, phi, eta_hat, h=1e-4):
    """Inverse of the finite-difference Hessian (of gradients) of -log L at phi."""
    k = phi.numel()

    def grad_at(x):
        x = x.clone().requires_grad_(True)
        with torch.enable_grad():
            ll, _ = obj.log_likelihood(x, eta_hat)
            g, = torch.autograd.grad(-ll, x)
        return g

    rows = []
    for j in range(k):
        e = torch.zeros_like(phi)
        e[j] = h * max(1.0, abs(float(phi[j])))
        rows.append((grad_at(phi + e) - grad_at(phi - e)) / (2 * e[j]))
    H = torch.stack(rows)
    H = 0.5 * (H + H.T)
    chol, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0 or not torch.isfinite(H).all():
        return None, ("the Hessian of -2LL is not positive definite at the estimate: standard "
                      "errors are unavailable (a parameter may be unidentifiable)")
    return torch.cholesky_inverse(chol), None
