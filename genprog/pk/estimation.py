"""Population maximum likelihood with the random effects integrated out (Laplace / FOCEi-like).

For population parameters ``phi`` (typical values, omegas, covariate coefficients,
residual error; no priors), the marginal likelihood of subject ``i`` is

.. math:: p(y_i \\mid \\phi) = \\int p(y_i \\mid \\eta_i, \\phi)\\, N(\\eta_i; 0, \\Omega)\\, d\\eta_i
          \\approx e^{h_i(\\hat\\eta_i)} (2\\pi)^{P/2} \\det(-H_i)^{-1/2},

with ``h_i(eta) = log p(y_i | eta, phi) + log N(eta; 0, Omega)``, ``eta_hat_i`` its maximiser
(the empirical Bayes estimate, EBE) and ``H_i`` its curvature there: by default
(``approximation="focei"``) the expected information with the eta-epsilon interaction
kept, which is NONMEM's FOCE-I (and nlmixr2's focei) — our OFVs match theirs —, or
(``"laplace"``) the exact Hessian, NONMEM's LAPLACIAN INTERACTION. All subjects are handled
at once: the inner problems are independent, so one batched iteration updates every
``eta_i`` together (``[S, P]``; ``[2, S, P]`` with two starts).

The inner problems are solved by batched safeguarded Fisher scoring (the FOCE-I information,
positive definite, as the curvature; Levenberg damping and a backtracking line search on
``h_i``), with the Jacobians by central differences in one forward pass. Each outer
evaluation solves them from two starts at once, the previous EBEs (warm) and eta = 0 (fresh),
and keeps for each subject the better mode, so that no subject stays in a mode that a start
at the population would not reach unless its data prefer it; for a one-compartment oral
model a subject in the flip-flop mode (``ka_i < k_i``) is also solved from the mirror image
of its mode, and subjects that remain there are reported.

The outer problem maximises ``sum_i log p(y_i | phi)`` over unconstrained ``phi`` with
L-BFGS; each evaluation re-solves the inner problems and differentiates the
Laplace objective exactly, including the dependence of ``eta_hat`` on ``phi`` (implicit
function theorem, through one differentiable Newton step at the optimum; the FOCE-I
curvature there by central differences with a first-order graph). Standard errors come
from a finite-difference Hessian of the objective (forward differences of its gradient).
Non-convergence, omegas at a boundary and flip-flop subjects are reported as
:class:`~genprog.errors.ConvergenceWarning` and in ``PopulationFit.info``.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import biject_to

from ..dtypes import default_dtype
from ..errors import ConvergenceWarning
from ..optim import maximize
from ..threads import threads_for, using_threads
from .likelihood import observation_log_likelihood
from .random_effects import random_effects_scale_tril
from .summary import population_summary


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


def parameter_layout(pop, data, priors, fixed=None) -> ParameterLayout:
    """The unconstrained layout of the population parameters: every prior site not in
    ``fixed``, in prior order, mapped to the real line by ``biject_to(support)``."""
    names, shapes, transforms = [], {}, {}
    fixed = dict(fixed or {})
    for name, prior in priors.items():
        if name in fixed:
            continue
        names.append(name)
        shapes[name] = tuple(prior.event_shape) if prior.event_dim else tuple(prior.batch_shape)
        transforms[name] = biject_to(prior.support)
    return ParameterLayout(names, shapes, transforms, fixed)


def start_values(pop, data, priors) -> dict:
    """Prior medians (typical values at the data-based guesses; omega 0.3, IOV omega 0.2;
    sigma at 0.3 x the prior scale; covariate coefficients at their prior centre, threshold
    effects at 0)."""
    start = {}
    for name, prior in priors.items():
        if name == "omega":
            start[name] = torch.full(prior.event_shape, 0.3)
        elif name == "omega_iov":
            start[name] = torch.full(prior.event_shape, 0.2)
        elif getattr(prior, "median_is_zero", False):  # a relative change (threshold effect)
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


def _take_subjects(x, dim, idx):
    """The subjects ``idx`` (all when None) of a tensor with a subject dim ``dim``."""
    return x if idx is None else x.index_select(dim, idx)


def _put_subjects(x, new, dim, idx):
    """``x`` with the subjects ``idx`` (all when None) replaced by ``new``."""
    return new if idx is None else x.index_copy(dim, idx, new)


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
        self.layout = parameter_layout(pop, data, priors, fixed)
        self.P_iiv = len(pop.random_effects)
        self.P = pop.n_random(data)  # IIV etas, then IOV kappas (occasion-major)
        self.mask = pop.observation_mask(data)
        self.observed = self.mask & ~data.obs_blq
        self.blq = self.mask & data.obs_blq
        self.n_obs = int(self.observed.sum())
        self.has_blq = bool(self.blq.any())
        self.inner_seconds = 0.0  # time spent in EBE solves (accumulated by ebe)
        self.inner_solves = 0

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
        K = (self.P - self.P_iiv) // len(self.pop.iov) if self.P > self.P_iiv else 0
        return random_effects_scale_tril(values.get("omega") if self.P_iiv else None,
                                         values.get("omega_corr"), values.get("omega_iov"), K)

    def conditional(self, values, eta):
        """``log p(y_i | eta_i, phi)`` ``[..., S]`` and predictions ``[..., S, T]`` for etas
        ``[..., S, P]`` (leading dims: several candidate etas per subject at once)."""
        ll, pred, _, _, _ = self._pieces(values, eta)
        return ll, pred

    def _pieces(self, values, eta, subjects=None):
        """``log p(y_i | eta_i, phi)`` ``[..., S]``, predictions, the residual mean on the
        error scale (``pred``, or ``log pred`` for exponential error), its SD and the BLQ
        z-score ``(LLOQ - mean) / sd``, each ``[..., S, T]``. With ``subjects`` (a
        LongTensor ``[n]``) only those subjects are predicted: ``[..., n]`` and ``[..., n,
        T]`` (``eta`` stays ``[..., S, P]``: covariate effects are relative to the whole
        data set)."""
        typical, betas, sigma = self.split(values)
        ind = self.pop.individual_parameters(typical, betas, eta, self.data)
        data, observed, blq = self.data, self.observed, self.blq
        if subjects is not None:
            lead = eta.shape[:-1]
            ind = {k: v.expand(lead)[..., subjects] for k, v in ind.items()}
            data, observed, blq = data.subset(subjects), observed[subjects], blq[subjects]
        pred = self.pop.predict(ind, data, per_occasion=self.pop.has_kappas(eta))
        ll, mean, sd, z = observation_log_likelihood(self.pop.error, pred, sigma, data.obs_dv, observed,
                                                     blq if self.has_blq else None, data.obs_lloq)
        return ll, pred, mean, sd, z

    def joint(self, values, eta, subjects=None):
        """``h_i(eta) = log p(y_i | eta, phi) + log N(eta; 0, Omega)`` ``[..., S]`` (``[...,
        n]`` for ``subjects``, see :meth:`_pieces`)."""
        ll = self._pieces(values, eta, subjects)[0]
        if self.P:
            ll = ll + self._prior(values, eta if subjects is None else eta[..., subjects, :])
        return ll

    def grad_hess(self, values, eta, create_graph=False):
        """Per-subject gradient ``[..., S, P]`` and Hessian ``[..., S, P, P]`` of ``h`` in
        eta (P backward passes; subjects are independent)."""
        with torch.enable_grad():
            eta = eta if eta.requires_grad else eta.detach().requires_grad_(True)
            h = self.joint(values, eta)
            g, = torch.autograd.grad(h.sum(), eta, create_graph=True)
            rows = [torch.autograd.grad(g[..., j].sum(), eta, create_graph=create_graph, retain_graph=True)[0]
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
                torch.where(bad[..., None], torch.zeros_like(g), g),
                torch.where(bad[..., None, None], eye, N))

    def information(self, values, eta, create_graph=False, hessian=False):
        """FOCE-I curvature: ``h`` ``[..., S]``, its gradient ``[..., S, P]`` and, in place
        of the negative Hessian, ``A = Omega^-1 + sum_t [J_m J_m^T / sd^2 + 2 J_s J_s^T /
        sd^2]`` ``[..., S, P, P]`` (the expected information of the observations about
        eta, with the eta-dependence of the residual SD kept: the interaction), plus the
        Gauss-Newton term ``lambda (lambda + z) J_z J_z^T`` of each BLQ observation
        (``lambda`` the inverse Mills ratio). Always positive definite. Jacobians ``J`` of
        the mean and SD ``[..., S, T]`` in eta come from P backward passes through a
        linear dummy (``d/du (d/deta sum(m u))``). With ``hessian`` the exact Hessian
        ``[..., S, P, P]`` is returned too (fourth item)."""
        with torch.enable_grad():
            eta = eta if eta.requires_grad else eta.detach().requires_grad_(True)
            ll, _, mean, sd, z = self._pieces(values, eta)
            h = ll + self._prior(values, eta)
            g, = torch.autograd.grad(h.sum(), eta, create_graph=True)
            u = torch.zeros(2, *mean.shape, dtype=eta.dtype, device=eta.device, requires_grad=True)
            gu, = torch.autograd.grad((mean * u[0]).sum() + (sd * u[1]).sum(), eta, create_graph=True)
            cols = []
            for j in range(self.P):
                d, = torch.autograd.grad(gu[..., j].sum(), u, create_graph=create_graph,
                                         retain_graph=True, allow_unused=True)
                cols.append(torch.zeros_like(u) if d is None else d)
            if hessian:
                rows = [torch.autograd.grad(g[..., j].sum(), eta, create_graph=create_graph, retain_graph=True)[0]
                        for j in range(self.P)]
                H = torch.stack(rows, -2)
        J = torch.stack(cols, -1)  # [2, ..., S, T, P]
        Jm, Js = J[0], J[1]
        if not create_graph:
            mean, sd, z = mean.detach(), sd.detach(), z.detach()
        obs = self.observed.to(sd.dtype) / sd ** 2
        A = torch.einsum("...tp,...t,...tq->...pq", Jm, obs, Jm) + torch.einsum("...tp,...t,...tq->...pq", Js, 2 * obs, Js)
        if self.has_blq:
            Jz = -(Jm + z[..., None] * Js) / sd[..., None]
            lam = torch.exp(-0.5 * z ** 2 - 0.5 * math.log(2 * math.pi) - torch.special.log_ndtr(z))
            w = torch.where(self.blq, lam * (lam + z), torch.zeros_like(z))
            A = A + torch.einsum("...tp,...t,...tq->...pq", Jz, w, Jz)
        L = self.scale_tril(values)
        A = A + torch.cholesky_inverse(L)
        A = 0.5 * (A + A.transpose(-1, -2))
        if hessian:
            return h, g, A, 0.5 * (H + H.transpose(-1, -2))
        return h, g, A

    def _prior(self, values, eta):
        """``log N(eta; 0, Omega)`` ``[..., S]`` (triangular solve; no distribution object)."""
        L = self.scale_tril(values)
        z = torch.linalg.solve_triangular(L, eta.unsqueeze(-1), upper=False).squeeze(-1)
        half_logdet = torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        return -0.5 * (z ** 2).sum(-1) - half_logdet - 0.5 * self.P * math.log(2 * math.pi)

    def _curvature(self, values, eta, create_graph=False):
        """``h``, gradient and negative curvature ``[..., S, P, P]``: ``-Hessian`` (Laplace)
        or the FOCE-I information (``approximation="focei"``)."""
        if self.approximation == "focei":
            return self.information(values, eta, create_graph)
        h, g, H = self.grad_hess(values, eta, create_graph)
        return h, g, -H

    # ------------------------------------------------------------------ the inner problem
    FD_STEP = 1e-4
    """Step in eta (log scale) of the central differences of the inner iterations."""

    def scoring(self, values, eta, subjects=None, graph=False):
        """``h`` ``[..., S]``, its gradient ``[..., S, P]`` and the FOCE-I information
        ``[..., S, P, P]`` (as :meth:`information`) by central differences in eta: one
        forward pass at the ``2P + 1`` points ``eta``, ``eta +- FD_STEP e_j`` (truncation
        error ``~1e-8`` relative), without autograd unless ``graph`` (then the results are
        differentiable in ``values`` and ``eta``: first-order graphs only, which is what
        makes the objective's gradient cheap)."""
        P, eps = self.P, self.FD_STEP
        offsets = torch.zeros(2 * P + 1, P, dtype=eta.dtype, device=eta.device)
        offsets[1:P + 1] = eps * torch.eye(P, dtype=eta.dtype, device=eta.device)
        offsets[P + 1:] = -eps * torch.eye(P, dtype=eta.dtype, device=eta.device)
        points = eta + offsets.reshape((2 * P + 1,) + (1,) * (eta.dim() - 1) + (P,))
        with torch.set_grad_enabled(graph and torch.is_grad_enabled()):
            ll, _, mean, sd, z = self._pieces(values, points, subjects)
            h = ll + self._prior(values, points if subjects is None else points[..., subjects, :])

        def diff(x):  # [2P+1, ..., n] -> [..., n, P]
            return ((x[1:P + 1] - x[P + 1:]) / (2 * eps)).movedim(0, -1)

        g = diff(h[..., None]).squeeze(-2)
        Jm, Js = diff(mean), diff(sd)
        mean, sd, z = mean[0], sd[0], z[0]
        observed = self.observed if subjects is None else self.observed[subjects]
        obs = observed.to(sd.dtype) / sd ** 2
        A = torch.einsum("...tp,...t,...tq->...pq", Jm, obs, Jm) + torch.einsum("...tp,...t,...tq->...pq", Js, 2 * obs, Js)
        if self.has_blq:
            blq = self.blq if subjects is None else self.blq[subjects]
            Jz = -(Jm + z[..., None] * Js) / sd[..., None]
            lam = torch.exp(-0.5 * z ** 2 - 0.5 * math.log(2 * math.pi) - torch.special.log_ndtr(z))
            w = torch.where(blq, lam * (lam + z), torch.zeros_like(z))
            A = A + torch.einsum("...tp,...t,...tq->...pq", Jz, w, Jz)
        A = A + torch.cholesky_inverse(self.scale_tril(values))
        return h[0], g, 0.5 * (A + A.transpose(-1, -2))

    def newton_modes(self, values, eta0, iters=60, tol=1e-6):
        """Batched safeguarded Newton (Fisher scoring) ascent of ``h`` from starts ``eta0
        [..., S, P]``.

        Each iteration solves ``(A + lambda I) d = g`` with ``A`` the FOCE-I information
        (positive definite, so ``d`` is an ascent direction wherever the exact curvature
        is indefinite; :meth:`scoring`), its spectrum floored at ``1e-8`` times its
        largest eigenvalue, and takes the full step where it satisfies the Armijo
        condition on ``h``; elsewhere a backtracking line search over the step lengths
        ``1/2, ..., 1/64`` is evaluated in one batched forward pass. A subject none of them
        improves keeps its point and its damping ``lambda`` grows ten fold (Levenberg),
        while a full step shrinks it. A subject is done when its largest gradient entry
        is below ``tol`` or its step below ``1e-10``.

        Returns
        -------
        eta : Tensor [..., S, P]
            The modes reached.
        h : Tensor [..., S]
            ``h`` there (``-inf`` where the density is not finite).
        iterations : int
        """
        eta = eta0.detach().clone()
        dtype, device = eta.dtype, eta.device
        S = eta.shape[-2]
        h, g, N = self._finite(*self.scoring(values, eta))
        lam = torch.full(h.shape, 1e-6, dtype=dtype, device=device)
        eye = torch.eye(self.P, dtype=dtype, device=device)
        alphas = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625], dtype=dtype, device=device)
        done = g.abs().amax(-1) < tol
        compact = not self.pop.iov  # occasion coding is per data set: no subsets with IOV
        it = 0
        for it in range(1, iters + 1):
            if bool(done.all()):
                break
            # the subjects with a start still moving; only they are predicted
            moving = ~done.reshape(-1, S).all(0)
            idx = moving.nonzero().squeeze(-1) if compact and not bool(moving.all()) else None

            part = functools.partial(_take_subjects, idx=idx)
            put = functools.partial(_put_subjects, idx=idx)
            h_a, g_a, N_a, lam_a, done_a = part(h, -1), part(g, -2), part(N, -3), part(lam, -1), part(done, -1)
            evals = torch.linalg.eigvalsh(N_a)
            shift = (1e-8 * evals[..., -1:].abs() - evals[..., :1]).clamp_min(0.0) + lam_a[..., None]
            step = torch.linalg.solve(N_a + shift[..., None] * eye, g_a[..., None]).squeeze(-1)
            step = torch.where(done_a[..., None], torch.zeros_like(step), step)
            slope = (g_a * step).sum(-1)  # > 0: an ascent direction
            h_new, g_new, N_new = self._finite(*self.scoring(values, put(eta, step, -2) + eta if idx is None
                                                             else eta.index_add(-2, idx, step), idx))
            full_ok = (h_new >= h_a + 1e-4 * slope - 1e-12 * h_a.abs().clamp_min(1.0)) & torch.isfinite(h_new)
            alpha = torch.where(full_ok, torch.ones_like(h_a), torch.zeros_like(h_a))
            retry = ~full_ok & ~done_a
            if bool(retry.any()):
                shape = (-1,) + (1,) * step.dim()
                trial = eta + (alphas.reshape(shape) * put(torch.zeros_like(eta), step, -2))
                with torch.no_grad():
                    h_trial = self.joint(values, trial, idx)  # [A, ..., n]
                ok = (h_trial >= h_a + 1e-4 * alphas.reshape(shape[:-1]) * slope) & torch.isfinite(h_trial)
                first = ok.to(torch.int64).argmax(0)
                alpha = torch.where(retry & ok.any(0), alphas[first], alpha)
                partial = retry & (alpha > 0)
                if bool(partial.any()):
                    back = eta + put(torch.zeros_like(eta), alpha[..., None] * step, -2)
                    h_p, g_p, N_p = self._finite(*self.scoring(values, back, idx))
                    h_new = torch.where(partial, h_p, h_new)
                    g_new = torch.where(partial[..., None], g_p, g_new)
                    N_new = torch.where(partial[..., None, None], N_p, N_new)
            accepted = (alpha > 0) & ~done_a
            eta_a = part(eta, -2)
            eta = put(eta, torch.where(accepted[..., None], eta_a + alpha[..., None] * step, eta_a), -2)
            h = put(h, torch.where(accepted, h_new, h_a), -1)
            g = put(g, torch.where(accepted[..., None], g_new, g_a), -2)
            N = put(N, torch.where(accepted[..., None, None], N_new, N_a), -3)
            lam_a = torch.where(~accepted, lam_a * 10, torch.where(alpha == 1.0, lam_a * 0.3, lam_a)).clamp(1e-10, 1e8)
            lam = put(lam, lam_a, -1)
            tiny = (alpha[..., None] * step).abs().amax(-1) < 1e-10
            done_a = done_a | (part(g, -2).abs().amax(-1) < tol) | (accepted & tiny) | (lam_a >= 1e8)
            if h_a.dim() == 2 and h_a.shape[0] > 1:
                # several starts per subject: a start whose h, plus ten times the gain its
                # last Newton step predicted, is still below another start's h cannot become
                # the subject's best mode (ebe keeps the best): stop it
                h_now = part(h, -1)
                reach = h_now + 10 * slope.clamp_min(0) + 1e-9 * h_now.abs().clamp_min(1.0)
                done_a = done_a | (reach < h_now.max(0, keepdim=True).values)
            done = put(done, done_a, -1)
        return eta.detach(), h.detach(), it

    def one_compartment_oral(self) -> bool:
        """Whether the structure is a one-compartment model with first-order absorption
        and a free ``ka`` (so the flip-flop mode ``ka <-> k`` exists)."""
        s = self.pop.structure
        return (getattr(s, "n", None) == 1 and getattr(s, "absorption", None) == "first_order"
                and not self.pop.ka_above_k and "ka" in self.pop.parameters and "v" in self.pop.parameters)

    def flip_flop(self, values, eta):
        """Subjects ``[..., S]`` (bool) whose individual ``ka_i < k_i = cl_i / v_i`` while the
        typical subject has ``ka > k``: their etas sit in the reflected (flip-flop) mode
        of a one-compartment oral model. All False for other structures."""
        if not self.one_compartment_oral() or eta is None:
            return torch.zeros(eta.shape[:-1] if eta is not None else (self.data.n_subjects,), dtype=torch.bool)
        typical, betas, _ = self.split(values)
        ind = self.pop.individual_parameters(typical, betas, eta[..., :self.P_iiv], self.data)
        typ = self.pop.individual_parameters(typical, betas, None, self.data)
        population_ok = typ["ka"] > typ["cl"] / typ["v"]
        return (ind["ka"] < ind["cl"] / ind["v"]) & population_ok

    def reflected(self, values, eta):
        """Etas ``[..., S, P]`` with every flip-flop subject moved to the mirror image of its
        mode: ``ka_i' = k_i``, ``v_i' = v_i k_i / ka_i`` (``cl_i`` kept), which predicts the
        same concentrations; None when ``ka`` and ``v`` do not both have random effects."""
        effects = self.pop.random_effects
        if not self.one_compartment_oral() or "ka" not in effects or "v" not in effects:
            return None
        typical, betas, _ = self.split(values)
        ind = self.pop.individual_parameters(typical, betas, eta[..., :self.P_iiv], self.data)
        shift = torch.log(ind["cl"] / ind["v"] / ind["ka"])  # log(k_i / ka_i)
        shift = torch.where(self.flip_flop(values, eta), shift, torch.zeros_like(shift))
        out = eta.clone()
        out[..., effects.index("ka")] += shift
        out[..., effects.index("v")] += shift
        return out

    def ebe(self, values, eta0=None, iters=60, tol=1e-6, fresh=True):
        """Empirical Bayes estimates ``[S, P]``: for each subject the best mode of ``h_i``
        among the one a fresh start at eta = 0 reaches and the one the warm start ``eta0``
        ``[S, P]`` reaches (kept only where at least as good), and, for a one-compartment
        oral model, the mirror image of a flip-flop mode (see :meth:`reflected`). All
        starts are solved together, one batched Newton program (:meth:`newton_modes`);
        ``fresh=False`` solves from ``eta0`` alone."""
        values = {k: v.detach() for k, v in values.items()}
        S = self.data.n_subjects
        dtype = self.data.obs_dv.dtype
        device = self.data.obs_dv.device
        zero = torch.zeros(S, self.P, dtype=dtype, device=device)
        t0 = time.perf_counter()
        if eta0 is None or not bool(eta0.detach().abs().gt(0).any()):
            eta, h, _ = self.newton_modes(values, zero, iters, tol)
        elif not fresh:
            eta, h, _ = self.newton_modes(values, eta0.detach(), iters, tol)
        else:
            modes, hs, _ = self.newton_modes(values, torch.stack([zero, eta0.detach()]), iters, tol)
            warm_better = hs[1] >= hs[0] - 1e-9 * hs[0].abs().clamp_min(1.0)
            eta = torch.where(warm_better[:, None], modes[1], modes[0])
            h = torch.where(warm_better, hs[1], hs[0])
        mirror = self.reflected(values, eta)
        if mirror is not None and bool(self.flip_flop(values, eta).any()):
            eta_m, h_m, _ = self.newton_modes(values, mirror, iters, tol)
            better = h_m > h + 1e-9 * h.abs().clamp_min(1.0)
            eta = torch.where(better[:, None], eta_m, eta)
        self.inner_seconds += time.perf_counter() - t0
        self.inner_solves += 1
        return eta

    def log_likelihood(self, phi, eta0, fresh=True):
        """Laplace population log likelihood at unconstrained ``phi`` (differentiable in
        phi, through the EBEs as well) and the EBEs ``[S, P]``; ``fresh=False`` solves the
        inner problems from the warm start ``eta0`` only (finite differences about an
        optimum, where the modes move continuously)."""
        values = self.layout.unpack(phi)
        if not self.P:
            ll, _ = self.conditional(values, None)
            return ll.sum(), eta0
        eta_hat = self.ebe(values, eta0, fresh=fresh)
        # One Newton step from the (detached) optimum has the optimum's value and, by the
        # implicit function theorem, its exact derivative d eta_hat / d phi, so the
        # log-determinant term is differentiated through eta_hat(phi) as well. Only the
        # gradient g0 (~0 in value) carries phi's graph; the curvature that scales it is a
        # value (its derivative multiplies g0).
        with torch.enable_grad():
            e = eta_hat.detach().requires_grad_(True)
            g0, = torch.autograd.grad(self.joint(values, e).sum(), e, create_graph=True)
            rows = [torch.autograd.grad(g0[:, j].sum(), e, retain_graph=True)[0] for j in range(self.P)]
        N0 = -torch.stack(rows, -2)
        N0 = 0.5 * (N0 + N0.transpose(-1, -2))
        if self.approximation == "focei":
            # where the exact curvature is not negative definite (a nearly flat direction)
            # the FOCE-I information stands in for it
            ok = torch.linalg.cholesky_ex(N0)[1] == 0
            if not bool(ok.all()):
                A0 = self.information(values, eta_hat)[2].detach()
                N0 = torch.where(ok[:, None, None], N0, A0)
        eta_t = eta_hat + torch.linalg.solve(N0, g0[..., None]).squeeze(-1)
        if self.approximation == "focei":
            h, _, N = self.scoring(values, eta_t, graph=True)
        else:
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
        return population_summary(self)

    def individual_parameters(self):
        """Individual parameters at the EBEs, one row per subject (DataFrame)."""
        import pandas as pd

        return pd.DataFrame({k: v.detach().cpu().numpy() for k, v in self.individual.items()},
                            index=pd.Index(self.data.ids, name="ID"))

    # the population-fit protocol (genprog.pk.population_fit.PopulationResult)
    def fitted_data(self):
        """The data set of the fit."""
        return self.data

    def population_point(self):
        """``(population, data, values, eta)`` in float64: the estimates by site (natural
        scale) and the EBEs ``[S, P]``."""
        data = self.data.to(dtype=torch.float64)
        values = {k: torch.as_tensor(v).detach().double() for k, v in self.estimates.items()}
        return self.population, data, values, self.eta.detach().double()

    def replicate_parameters(self, n: int, gen: torch.Generator):
        """``(population, data, values, eta, batched=False)``: every replicate of a point
        fit uses the estimates and the EBEs ``[S, P]``."""
        return (*self.population_point(), False)

    def eta_and_omega(self):
        """``(population, eta [S, P], omega [P] or None)``: the EBEs and the omega estimate."""
        return self.population, self.eta, self.estimates.get("omega")


def fit_mle(pop, data, *, max_iters: int = 200, max_rounds: int = 5, seed: int = 0,
            init: dict | None = None,
            standard_errors: bool = True, dtype=torch.float64,
            fixed: dict | None = None, approximation: str = "focei",
            threads: int | None = None) -> PopulationFit:
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
    threads : int, optional
        torch intra-op threads for this fit (restored afterwards); default: chosen for the
        size of the problem by :func:`genprog.threads.threads_for` (one thread for the
        usual population sizes, never more than ``OMP_NUM_THREADS`` or the CPU affinity).

    Returns
    -------
    PopulationFit
        ``converged`` is False, with a :class:`~genprog.errors.ConvergenceWarning`, when
        the outer optimisation stopped short of a stationary point. Warnings (and
        ``info``) also report subjects whose EBE sits in the flip-flop mode of a
        one-compartment oral model (``info["flip_flop_subjects"]``, their IDs), and
        parameters at a boundary (``info["boundary"]``: an omega or residual SD near
        zero, an omega above 5), as NONMEM's messages do. ``info["timing"]`` holds the
        wall time of each phase (``inner_s``: inner EBE solves, ``outer_s``: the outer
        iterations, inner solves included, ``standard_errors_s``) and the process CPU time
        of the fit (``cpu_s``; with one thread, the wall time the fit would take alone on
        an idle core).
    """
    start_time, start_cpu = time.perf_counter(), time.process_time()
    if approximation not in APPROXIMATIONS:
        raise ValueError(f"fit_mle: approximation must be one of {APPROXIMATIONS}, got {approximation!r}")
    pop.check_data(data)
    S, T = data.obs_dv.shape
    n_threads = threads_for(S * T * max(int(data.dose_time.shape[-1]), 1) * max(pop.n_random(data), 1),
                            threads)
    with using_threads(n_threads):
        fit = _fit_mle(pop, data.to(dtype=dtype), max_iters=max_iters, max_rounds=max_rounds,
                       seed=seed, init=init, standard_errors=standard_errors, dtype=dtype,
                       fixed=fixed, approximation=approximation)
    fit.info["threads"] = n_threads
    fit.info["wall_time_s"] = time.perf_counter() - start_time
    fit.info["timing"]["cpu_s"] = time.process_time() - start_cpu
    return fit


def check_fixed_and_init(priors, fixed, init, dtype):
    """``fixed`` as tensors in ``dtype``, after checking that ``fixed`` and ``init`` name
    prior sites and that the fixed values lie in their supports (ValueError naming the site)."""
    fixed = {k: torch.as_tensor(v, dtype=dtype) for k, v in (fixed or {}).items()}
    unknown = set(fixed) - set(priors)
    if unknown:
        raise ValueError(f"fit_mle: fixed has unknown site(s) {sorted(unknown)}; sites: {sorted(priors)}")
    for k, v in fixed.items():
        if not bool(priors[k].support.check(v).all()):
            raise ValueError(f"fit_mle: fixed value of {k!r} ({v.tolist()}) is outside its support")
    unknown = set(init or {}) - set(priors)
    if unknown:
        raise ValueError(f"fit_mle: init for unknown site(s) {sorted(unknown)}; sites: {sorted(priors)}")
    return fixed


OMEGA_NEAR_ZERO = 1e-3
OMEGA_HUGE = 5.0


def boundary_messages(pop, values: dict) -> list:
    """NONMEM-style notes on estimates at a boundary of their space: an omega (IIV or
    IOV) below ``OMEGA_NEAR_ZERO`` (the variability is not supported by the data: fix it to
    0 or drop the random effect) or above ``OMEGA_HUGE`` (unbounded: the parameter is not
    identified), and a residual SD near zero."""
    notes = []
    for site, names in (("omega", pop.random_effects), ("omega_iov", pop.iov)):
        if site not in values:
            continue
        for name, w in zip(names, values[site].detach().reshape(-1).tolist()):
            if w < OMEGA_NEAR_ZERO:
                notes.append(f"{site} of {name} is near its zero boundary ({w:.2g}): the data do "
                             f"not support variability in {name}; fix it to 0 or drop the random effect")
            elif w > OMEGA_HUGE:
                notes.append(f"{site} of {name} is huge ({w:.3g}): {name} is not identified by the "
                             "data (an unbounded variance)")
    for s in pop.sigma_sites():
        if s in values and float(values[s]) < 1e-6:
            notes.append(f"residual error {s} is near its zero boundary ({float(values[s]):.2g})")
    return notes


def _fit_mle(pop, data, *, max_iters, max_rounds, seed, init, standard_errors, dtype, fixed,
             approximation) -> PopulationFit:
    """:func:`fit_mle` on data already in ``dtype``, under the chosen thread count."""
    start_time = time.perf_counter()
    # out-of-range trial points give NaN densities (rejected), not validation errors
    with default_dtype(dtype), pyro.validation_enabled(False):
        priors = pop.priors_for(data)
        fixed = check_fixed_and_init(priors, fixed, init, dtype)
        obj = LaplaceObjective(pop, data, priors, fixed, approximation)
        phi0 = start_point(obj.layout, pop, data, priors, fixed, init, dtype)
        outer = maximize_likelihood(obj, phi0, torch.zeros(data.n_subjects, obj.P, dtype=dtype),
                                    max_iters=max_iters, max_rounds=max_rounds)
        phi, ll, eta_hat = outer.phi, outer.log_likelihood, outer.eta
        outer_s = time.perf_counter() - start_time
        converged, messages = outer_messages(outer)
        values = {k: v.detach() for k, v in obj.layout.unpack(phi).items()}
        boundary = boundary_messages(pop, values)
        messages += boundary
        flipped = obj.flip_flop(values, eta_hat) if obj.P else torch.zeros(data.n_subjects, dtype=torch.bool)
        flip_ids = [data.ids[i] for i in flipped.nonzero().flatten().tolist()]
        messages += flip_flop_messages(flip_ids)
        for m in messages:
            warnings.warn(f"fit(method='mle'): {m}", ConvergenceWarning, stacklevel=4)
        covariance, se_note = None, None
        se_start = time.perf_counter()
        if standard_errors:
            covariance, se_note = covariance_of_estimates(obj, phi, eta_hat)
            if se_note:
                warnings.warn(f"fit(method='mle'): {se_note}", ConvergenceWarning, stacklevel=4)
        se_s = time.perf_counter() - se_start
        typical, betas, _ = obj.split(values)
        # subject level (IOV kappas at 0)
        individual = pop.individual_parameters(typical, betas, eta_hat[:, :obj.P_iiv] if obj.P else None, data)
        individual = {k: v.detach().expand(data.n_subjects) for k, v in individual.items()}
        if pop.ka_above_k:
            v = values["v"] if "v" in values else values["v1"]
            values["ka"] = (values["ka_minus_k"] + values["cl"] / v).detach()
        minus2ll = -2 * float(ll)
        n_params = int(phi.numel())
    return PopulationFit(
        population=pop, data=data, estimates=values, phi=phi, covariance=covariance,
        eta=eta_hat.detach() if obj.P else torch.zeros(data.n_subjects, 0, dtype=dtype),
        individual=individual, minus2ll=minus2ll, ofv=minus2ll - obj.n_obs * math.log(2 * math.pi),
        n_obs=obj.n_obs, n_params=n_params, converged=converged,
        info={"evaluations": len(outer.trace), "rounds": outer.rounds, "objective_trace": outer.trace,
              "grad_norm": outer.grad_norm, "seed": seed, "standard_errors": se_note or "ok",
              "flip_flop_subjects": flip_ids, "boundary": boundary, "messages": messages,
              "timing": {"inner_s": obj.inner_seconds, "inner_solves": obj.inner_solves,
                         "outer_s": outer_s, "standard_errors_s": se_s},
              "wall_time_s": time.perf_counter() - start_time, "layout": obj.layout.names},
        fixed=fixed, approximation=approximation,
    )


STATIONARY_TOL = 1e-3
"""The outer convergence test: the largest gradient entry of the log likelihood in the
unconstrained parameters at most ``STATIONARY_TOL * (1 + |log L|)``."""


@dataclass
class OuterResult:
    """Where the outer optimisation of a population likelihood ended.

    ``phi [K]`` the unconstrained estimate, ``log_likelihood`` (a 0-dim tensor) and
    ``grad [K]`` there, ``eta [S, P]`` the EBEs there, ``converged``, ``trace`` (the
    objective ``-log L`` at every evaluation, ``1e30`` at rejected points), ``rounds``
    (L-BFGS rounds)."""

    phi: torch.Tensor
    log_likelihood: torch.Tensor
    grad: torch.Tensor
    eta: torch.Tensor
    converged: bool
    trace: list
    rounds: int

    @property
    def grad_norm(self) -> float:
        return float(self.grad.abs().max()) if self.grad.numel() else 0.0


class WarmStartedLikelihood:
    """``obj.log_likelihood`` as a function of ``phi`` alone, for
    :func:`genprog.optim.maximize`: each evaluation's inner problems start from the EBEs of
    the last finite evaluation (from the best point's EBEs when evaluated there again) as
    well as fresh from ``eta = 0``.

    ``obj`` is a :class:`LaplaceObjective` or anything with its ``log_likelihood(phi,
    eta0) -> (log L, EBEs)`` (the sharded objective of :mod:`genprog.pk.distributed`)."""

    def __init__(self, obj, eta0: torch.Tensor):
        self.obj = obj
        self.eta = eta0
        self.best = (-math.inf, None, eta0)
        self.trace = []
        self.last = None

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        phi = z[0]
        best_ll, best_phi, best_eta = self.best
        start = best_eta if best_phi is not None and torch.equal(phi.detach(), best_phi) else self.eta
        ll, eta_hat = self.obj.log_likelihood(phi, start)
        finite = bool(torch.isfinite(ll))
        if finite:
            self.eta = eta_hat
            if float(ll.detach()) > best_ll:
                self.best = (float(ll.detach()), phi.detach().clone(), eta_hat)
        self.trace.append(-float(ll.detach()) if finite else 1e30)
        self.last = (ll.detach(), eta_hat)
        return ll.reshape(1)


def maximize_likelihood(obj, phi0: torch.Tensor, eta0: torch.Tensor, *, max_iters: int,
                        max_rounds: int) -> OuterResult:
    """The outer loop of population maximum likelihood: :func:`genprog.optim.maximize` (L-BFGS
    in up to ``max_rounds`` fresh rounds of ``max_iters`` iterations, each from the best point
    seen; a line search that fails on a rejected trial point ends a round) on the
    warm-started likelihood of ``obj`` from ``phi0 [K]`` and EBEs ``eta0 [S, P]``."""
    likelihood = WarmStartedLikelihood(obj, eta0)
    res = maximize(likelihood, phi0, max_iters=max_iters * max_rounds, grad_tol=STATIONARY_TOL,
                   round_iters=max_iters, max_rounds=max_rounds, fresh_rounds=True,
                   round_tolerances=(1e-6, 1e-10))
    ll, eta = likelihood.last
    return OuterResult(phi=res.z, log_likelihood=ll, grad=res.grad, eta=eta,
                       converged=res.converged and bool(torch.isfinite(ll)), trace=likelihood.trace,
                       rounds=res.num_rounds)


def start_point(layout, pop, data, priors, fixed, init, dtype) -> torch.Tensor:
    """The unconstrained start ``phi [K]``: the default start values overridden by ``init``,
    without the fixed sites."""
    start = {**start_values(pop, data, priors), **(init or {})}
    start = {k: v for k, v in start.items() if k not in fixed}
    return layout.pack({k: torch.as_tensor(v, dtype=dtype) for k, v in start.items()}).detach()


def outer_messages(outer: OuterResult) -> tuple:
    """``(converged, messages)``: the note on an unconverged outer optimisation."""
    if outer.converged:
        return True, []
    return False, [
        (f"L-BFGS stopped unconverged after {len(outer.trace)} evaluations in {outer.rounds} round(s) "
        f"(-2LL {-2 * float(outer.log_likelihood):.4f}, max |gradient| {outer.grad_norm:.3g}); raise "
        "max_iters or try other starting values (init=...)")]


def flip_flop_messages(flip_ids: list) -> list:
    """The note on subjects whose EBE sits in the flip-flop mode (IDs ``flip_ids``)."""
    if not flip_ids:
        return []
    return [(f"{len(flip_ids)} subject(s) have their EBE in the flip-flop mode (ka_i < k_i = CL_i/V_i "
            f"while the typical ka > k), which their data favour over the mirror-image mode: "
            f"IDs {flip_ids[:20]}{' ...' if len(flip_ids) > 20 else ''}; check their absorption "
            "data, or use ka_above_k=True")]


def covariance_of_estimates(obj, phi, eta_hat, h=1e-4):
    """Inverse of the finite-difference Hessian of -log L at phi: forward differences of
    the exact gradient (``K + 1`` gradients, relative error ``~h``; the inner problems
    warm-started at the EBEs), symmetrised."""
    k = phi.numel()

    def grad_at(x):
        x = x.clone().requires_grad_(True)
        with torch.enable_grad():
            ll, _ = obj.log_likelihood(x, eta_hat, fresh=False)
            g, = torch.autograd.grad(-ll, x)
        return g

    rows = []
    g0 = grad_at(phi)
    for j in range(k):
        e = torch.zeros_like(phi)
        e[j] = h * max(1.0, abs(float(phi[j])))
        rows.append((grad_at(phi + e) - g0) / e[j])
    H = torch.stack(rows)
    H = 0.5 * (H + H.T)
    chol, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0 or not torch.isfinite(H).all():
        return None, ("the Hessian of -2LL is not positive definite at the estimate: standard "
                      "errors are unavailable (a parameter may be unidentifiable)")
    return torch.cholesky_inverse(chol), None
