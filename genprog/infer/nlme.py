"""Maximum likelihood for any mixed-effects model, random effects integrated out by Laplace.

For a conditioned Pyro program whose random effects are latent sites inside a plate of
groups (:class:`~genprog.infer.saem.MixedEffectsDensity`: ``log p(y, b | theta) = sum_g
L_g(theta, b_g)``), the marginal likelihood is approximated group by group at the
conditional mode (the empirical Bayes estimate, EBE) ``b_g* = argmax_b L_g(theta, b)``:

.. math:: \\log p(y \\mid \\theta) \\approx \\sum_g L_g(\\theta, b_g^*)
          + \\tfrac{D}{2} \\log 2\\pi - \\tfrac12 \\log\\det(-\\nabla^2_b L_g(\\theta, b_g^*)),

NONMEM's ``LAPLACIAN`` method (exact for a linear Gaussian mixed model). Every group's
inner problem is solved at once (batched Newton over groups with eigenvalue-floored
curvature and a per-group backtracking line search, from the previous solution *and* from
``b = 0``, keeping the better mode of each group), and the outer gradient is exact: one
Newton step from the detached modes carries ``d b* / d theta`` by the implicit function
theorem. The population parameters (every other continuous latent; priors ignored) are
estimated on the unconstrained scale of their supports by L-BFGS
(:func:`genprog.optim.maximize`); standard errors come from the finite-difference Hessian
of the exact gradient.

With ``approximation="focei"`` the log-determinant takes FOCE-I's curvature instead of the
exact Hessian: the expected information of the Gaussian observations about ``b`` with the
eta-epsilon interaction (:func:`focei_information`), as NONMEM and nlmixr2 compute it.

Entry point: ``Model.fit("mle", random=[...], approximation=...)`` (:func:`fit_nlme`);
``PopulationModel``'s own FOCE-I (:mod:`genprog.pk.estimation`) computes the same objective.
"""

from __future__ import annotations

import math
import time
import warnings

import torch

from ..density import site_log_prob
from ..errors import ConvergenceWarning
from ..optim import maximize
from ..rng import make_generator
from ..sites import is_model_site
from ..validation import check_choice, check_int, check_seed
from .record import InferenceRecord
from .saem import MixedEffectsDensity


def _grad_hess(md: MixedEffectsDensity, theta: torch.Tensor, b: torch.Tensor, create_graph=False):
    """``(L [G], dL/db [G, D], d2L/db2 [G, D, D])`` at ``b [G, D]`` (groups independent, so
    one backward pass per coordinate gives every group's Hessian row)."""
    with torch.enable_grad():
        bb = b if b.requires_grad else b.detach().requires_grad_(True)
        L = md.log_density(theta, bb[None])[0]
        g, = torch.autograd.grad(L.sum(), bb, create_graph=True)
        rows = [torch.autograd.grad(g[:, d].sum(), bb, create_graph=create_graph, retain_graph=True)[0]
                for d in range(b.shape[-1])]
    H = torch.stack(rows, -2)
    H = 0.5 * (H + H.transpose(-1, -2))
    if not create_graph:
        L, g, H = L.detach(), g.detach(), H.detach()
    return L, g, H


def _newton_direction(g: torch.Tensor, H: torch.Tensor, floor: float = 1e-8) -> torch.Tensor:
    """Ascent direction ``(-H)^+ g`` with ``-H``'s eigenvalues floored (safe where the
    curvature is indefinite), per group ``[G, D]``."""
    lam, Q = torch.linalg.eigh(-H)
    scale = lam.abs().amax(-1, keepdim=True).clamp_min(1.0)
    lam = torch.maximum(lam.abs(), floor * scale)
    return (Q @ ((Q.transpose(-1, -2) @ g[..., None]) / lam[..., None])).squeeze(-1)


def conditional_modes(md: MixedEffectsDensity, theta: torch.Tensor, b0: torch.Tensor,
                      max_iters: int = 50, tol: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """EBEs ``b* [G, D]`` and ``L_g(theta, b*) [G]`` by batched damped Newton from ``b0``."""
    b = b0.detach().clone()
    eps = torch.finfo(b.dtype).eps
    tol = max(tol, 100 * eps)
    L, g, H = _grad_hess(md, theta, b)
    L = torch.where(torch.isfinite(L), L, torch.full_like(L, -math.inf))
    for _ in range(max_iters):
        step = _newton_direction(torch.nan_to_num(g), torch.nan_to_num(H))
        # converged: a vanishing gradient, or a Newton decrement (the gain a Newton step
        # promises) below rounding of L (noisy objectives, e.g. an ODE solution, stop here)
        decrement = 0.5 * (torch.nan_to_num(g) * step).sum(-1)
        done = (g.abs().amax(-1) <= tol * (1 + L.abs())) | (decrement <= 10 * eps * (1 + L.abs()))
        if bool(done.all()):
            break
        t = torch.ones_like(L)
        improved = done.clone()
        new_b = b
        for _ in range(30):  # backtracking, per group still moving
            trial = b + t[:, None] * step
            with torch.no_grad():
                Lt = md.log_density(theta, trial[None])[0]
            ok = torch.isfinite(Lt) & (Lt >= L - 1e-10 * (1 + L.abs())) & ~improved
            new_b = torch.where(ok[:, None], trial, new_b)
            improved = improved | ok
            if bool(improved.all()):
                break
            t = torch.where(improved, t, 0.5 * t)
        if bool((improved == done).all()):  # no group could move
            break
        b, L_before = new_b, L
        L, g, H = _grad_hess(md, theta, b)
        if bool(((L - L_before).abs() <= 10 * eps * (1 + L.abs())).all()):
            break
    return b, L


def robust_modes(md, theta, warm):
    """Modes from the warm start and from ``b = 0``, the better one per group."""
    b_warm, L_warm = conditional_modes(md, theta, warm)
    b_zero, L_zero = conditional_modes(md, theta, torch.zeros_like(warm))
    take_zero = (L_zero > L_warm + 1e-9 * L_warm.abs()) | ~torch.isfinite(L_warm)
    return torch.where(take_zero[:, None], b_zero, b_warm), take_zero


def laplace_log_likelihood(md: MixedEffectsDensity, theta: torch.Tensor, b_hat: torch.Tensor) -> torch.Tensor:
    """The Laplace approximation of ``log p(y | theta)`` (a 0-d tensor), differentiable in
    ``theta`` through the modes ``b_hat [G, D]`` (detached maximisers at ``theta``)."""
    D = b_hat.shape[-1]
    _, g0, H0 = _grad_hess(md, theta, b_hat.detach(), create_graph=True)
    b_t = b_hat.detach() + torch.linalg.solve(-H0, g0[..., None]).squeeze(-1)
    L, _, H = _grad_hess(md, theta, b_t, create_graph=True)
    sign, logdet = torch.linalg.slogdet(-H)
    logdet = torch.where(sign > 0, logdet, torch.full_like(logdet, math.inf))
    return (L + 0.5 * D * math.log(2 * math.pi) - 0.5 * logdet).sum()


def _innermost(node):
    """The innermost distribution of an observed site and its masks with the batch shape
    each applies to: ``(fn, [(mask, batch_shape), ...])``."""
    fn, levels = node["fn"], [(node.get("mask"), node["fn"].batch_shape)]
    while hasattr(fn, "base_dist"):
        levels.append((getattr(fn, "_mask", None), fn.batch_shape))
        fn = fn.base_dist
    return fn, levels


def _keep_mask(fn, levels) -> torch.Tensor:
    """Which elements of the innermost distribution's value count (masks applied)."""
    keep = torch.ones(fn.batch_shape + fn.event_shape, dtype=torch.bool)
    for m, batch_shape in levels:
        if m is None or m is True:
            continue
        if m is False:
            keep = torch.zeros_like(keep)
            continue
        m = m.cpu().expand(batch_shape)
        keep = keep & m.reshape(*m.shape, *([1] * (keep.dim() - m.dim())))
    return keep


def _in_group_plate(md, node) -> bool:
    return any(f.vectorized and f.name == md.group for f in node["cond_indep_stack"])


def _by_group(md, x: torch.Tensor, node) -> torch.Tensor:
    """``x`` shaped as a site's innermost value ``[..., *batch, *event]`` -> ``[G, rest]``."""
    axis = x.dim() - len(node["fn"].event_shape) + md.group_dim
    x = x.movedim(axis, 0)
    return x.reshape(x.shape[0], -1)


def _gaussian_loc_scale(fn):
    """``(loc, scale)`` of a Normal (or LogNormal: Normal on the log scale), else None."""
    if isinstance(fn, torch.distributions.Normal):
        return fn.loc, fn.scale
    if isinstance(fn, torch.distributions.LogNormal):
        return fn.loc, fn.scale
    return None


def focei_information(md: MixedEffectsDensity, theta: torch.Tensor, b: torch.Tensor,
                      create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L [G], A [G, D, D])``: the complete-data log density per group and FOCE-I's
    curvature in place of its negative Hessian,

    ``A_g = -d2/db2 (terms other than Gaussian observations) + sum_t m_t [J_mu J_mu^T +
    2 J_sd J_sd^T] / sd^2``,

    the expected information of the Gaussian (Normal, or LogNormal on the log scale)
    observations about ``b`` with the dependence of their SD on ``b`` kept (NONMEM's
    FOCE with interaction). Observations of other families keep their exact Hessian."""
    with torch.enable_grad():
        bb = b if b.requires_grad else b.detach().requires_grad_(True)
        lp, tr = md.log_density(theta, bb[None], return_trace=True)
        L = lp[0]
        gaussian, L_gauss = [], torch.zeros_like(L)
        k = md.max_plate_nesting
        for node in tr.nodes.values():
            if not (is_model_site(node) and node["is_observed"] and _in_group_plate(md, node)):
                continue
            fn, levels = _innermost(node)
            pair = _gaussian_loc_scale(fn)
            if pair is None:
                continue
            shape = fn.batch_shape + fn.event_shape
            loc, scale = (t.expand(shape) for t in pair)
            keep = _keep_mask(fn, levels).to(loc.device)
            gaussian.append((node, loc, scale, keep))
            term = site_log_prob(node)
            while term.dim() < k + 1:
                term = term.unsqueeze(0)
            L_gauss = L_gauss + md.per_group(term.expand(1, *term.shape[1:]), term.dim() + md.group_dim)[0]
        rest = L - L_gauss
        g_rest, = torch.autograd.grad(rest.sum(), bb, create_graph=True)
        rows = [torch.autograd.grad(g_rest[:, d].sum(), bb, create_graph=create_graph, retain_graph=True,
                                    allow_unused=True)[0] for d in range(b.shape[-1])]
        A = -torch.stack([torch.zeros_like(bb) if r is None else r for r in rows], -2)
        for node, loc, scale, keep in gaussian:
            u = torch.zeros(2, *loc.shape, dtype=loc.dtype, device=loc.device, requires_grad=True)
            gu, = torch.autograd.grad((loc * u[0]).sum() + (scale * u[1]).sum(), bb,
                                      create_graph=True, allow_unused=True)
            if gu is None:
                continue
            cols = [torch.autograd.grad(gu[:, d].sum(), u, create_graph=create_graph, retain_graph=True,
                                        allow_unused=True)[0] for d in range(b.shape[-1])]
            cols = [torch.zeros_like(u) if c is None else c for c in cols]
            Jm = torch.stack([_by_group(md, c[0], node) for c in cols], -1)    # [G, R, D]
            Js = torch.stack([_by_group(md, c[1], node) for c in cols], -1)
            w = _by_group(md, keep.to(loc.dtype) / scale.detach() ** 2 if not create_graph
                          else keep.to(loc.dtype) / scale ** 2, node)        # [G, R]
            A = A + torch.einsum("grd,gr,gre->gde", Jm, w, Jm) + torch.einsum("grd,gr,gre->gde", Js, 2 * w, Js)
    A = 0.5 * (A + A.transpose(-1, -2))
    if not create_graph:
        L, A = L.detach(), A.detach()
    return L, A


def focei_log_likelihood(md: MixedEffectsDensity, theta: torch.Tensor, b_hat: torch.Tensor) -> torch.Tensor:
    """FOCE-I's approximation of ``log p(y | theta)``: :func:`laplace_log_likelihood` with
    the curvature of :func:`focei_information` (a 0-d tensor, differentiable in ``theta``)."""
    D = b_hat.shape[-1]
    _, g0, H0 = _grad_hess(md, theta, b_hat.detach(), create_graph=True)
    nd = torch.linalg.cholesky_ex(-H0.detach())[1] == 0
    if not bool(nd.all()):  # a nearly flat direction: the information stands in for -H
        _, A0 = focei_information(md, theta, b_hat.detach(), create_graph=True)
        H0 = torch.where(nd[:, None, None], H0, -A0)
    b_t = b_hat.detach() + torch.linalg.solve(-H0, g0[..., None]).squeeze(-1)
    L, A = focei_information(md, theta, b_t, create_graph=True)
    sign, logdet = torch.linalg.slogdet(A)
    logdet = torch.where(sign > 0, logdet, torch.full_like(logdet, math.inf))
    return (L + 0.5 * D * math.log(2 * math.pi) - 0.5 * logdet).sum()


def _observation_count(md: MixedEffectsDensity, theta, b) -> int:
    """Observed elements inside the group plate that count in the likelihood (masked-out
    padding excluded)."""
    _, tr = md.log_density(theta, b[None], return_trace=True)
    n = 0
    for node in tr.nodes.values():
        if is_model_site(node) and node["is_observed"] and _in_group_plate(md, node):
            n += int(_keep_mask(*_innermost(node)).sum())
    return n


def _covariance(objective, theta: torch.Tensor, h: float = 1e-4):
    """Inverse of the finite-difference Hessian of ``-objective`` at ``theta [K]``; None
    when it is not positive definite."""
    K = theta.numel()

    def grad_at(x):
        with torch.enable_grad():
            xx = x.detach().clone().requires_grad_(True)
            g, = torch.autograd.grad(objective(xx), xx)
        return g.detach()

    cols = []
    for k in range(K):
        e = torch.zeros_like(theta)
        e[k] = h
        cols.append((grad_at(theta + e) - grad_at(theta - e)) / (2 * h))
    H = -torch.stack(cols, 1)
    H = 0.5 * (H + H.T)
    chol, bad = torch.linalg.cholesky_ex(H)
    return (torch.cholesky_inverse(chol), H) if int(bad) == 0 else (None, H)


def _natural_stderr(md: MixedEffectsDensity, theta, covariance) -> dict:
    """Delta-method standard errors of the natural-scale values, by site."""
    if covariance is None:
        return {n: torch.full(md.shapes[n], math.nan) for n in md.names}
    J = torch.autograd.functional.jacobian(
        lambda t: torch.cat([v.reshape(-1) for v in md.unpack(t).values()]), theta)
    var = ((J @ covariance) * J).sum(-1)
    out, start = {}, 0
    for n in md.names:
        k = int(torch.Size(md.shapes[n]).numel())
        out[n] = var[start:start + k].clamp_min(0).sqrt().reshape(md.shapes[n])
        start += k
    return out


APPROXIMATIONS = {"laplace": laplace_log_likelihood, "focei": focei_log_likelihood}


def fit_nlme(model, *, random, group: str | None = None, approximation: str = "laplace",
             max_iters: int = 500, seed: int = 0, init: dict | None = None,
             standard_errors: bool = True) -> InferenceRecord:
    """Population maximum likelihood with the random effects ``random`` integrated out per
    group by the Laplace approximation (``Model.fit("mle", random=[...])``).

    Parameters
    ----------
    model : genprog.Model
        A conditioned model whose random effects are latent sites inside a plate of groups.
    random : list of str
        The random-effect sites; every other continuous latent is a population parameter.
    group : str, optional
        The plate of groups (default: the plate the random sites share).
    approximation : {"laplace", "focei"}
        The curvature in the log-determinant: the exact Hessian (Laplace, NONMEM's
        ``LAPLACIAN``) or FOCE-I's expected information of Gaussian observations with the
        eta-epsilon interaction (:func:`focei_information`).
    max_iters : int
        Maximum outer L-BFGS iterations.
    seed : int
        Seed of the prior draws that give the default start.
    init : dict, optional
        Starting population values (natural scale); default each site's prior median.
    standard_errors : bool
        Compute the covariance of the estimates (a finite-difference Hessian: 2K extra
        gradient evaluations).

    Returns
    -------
    InferenceRecord
        ``method="mle"``; ``unconstrained [1, 1, D]`` holds the estimates and the EBEs, so
        ``Model.fit`` gives a point ``Fit``. ``info``: ``estimates`` and ``stderr`` (natural
        scale, by site), ``log_likelihood``, ``minus2ll``, ``ofv`` (``-2LL - N log 2 pi``, the
        NONMEM convention, ``N`` the number of observations), ``num_observations``,
        ``covariance`` (unconstrained, or None), ``converged``, ``num_iters``, ``ebe`` ``[G, D]``,
        ``ebe_reset_groups`` (groups whose mode from ``b = 0`` beat the warm start at the
        end), ``wall_time_s``.

    Examples
    --------
    >>> import torch, pyro, pyro.distributions as dist, genprog as gp
    >>> def lmm(y=None):
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    ...     tau = pyro.sample("tau", dist.HalfNormal(5.0))
    ...     sigma = pyro.sample("sigma", dist.HalfNormal(5.0))
    ...     with pyro.plate("g", 6, dim=-2):
    ...         b = pyro.sample("b", dist.Normal(mu, tau))
    ...         with pyro.plate("obs", 4, dim=-1):
    ...             pyro.sample("y", dist.Normal(b, sigma), obs=y)
    >>> y = torch.arange(24.0).reshape(6, 4) / 4
    >>> fit = gp.Model(lmm).condition(y=y).fit("mle", random=["b"])
    >>> round(float(fit.info["estimates"]["mu"]), 3)
    2.875
    """
    seed = check_seed("fit('mle'): seed", seed)
    check_choice("fit('mle'): approximation", approximation, sorted(APPROXIMATIONS))
    log_likelihood = APPROXIMATIONS[approximation]
    max_iters = check_int("fit('mle'): max_iters", max_iters)
    start = time.perf_counter()
    density = model.density()
    md = MixedEffectsDensity(density, random, group)
    gen = make_generator(seed, getattr(model, "device", None))
    z0 = density.sample_prior(101, gen).median(0).values
    values, _ = density.constrain(z0[None])
    start_values = {n: values[n][0] for n in md.names}
    unknown = set(init or {}) - set(md.names)
    if unknown:
        raise ValueError(f"fit('mle'): init for unknown population site(s) {sorted(unknown)}; "
                         f"population sites: {md.names}")
    for n, v in (init or {}).items():
        start_values[n] = torch.as_tensor(v, dtype=z0.dtype, device=z0.device).expand(md.shapes[n])
    theta0 = md.pack(start_values).to(z0.dtype)
    state = {"b": torch.zeros(md.n_groups, md.dim, dtype=z0.dtype, device=z0.device), "reset": None}

    def objective(theta):
        with torch.no_grad():
            b_hat, reset = robust_modes(md, theta.detach(), state["b"])
        if torch.isfinite(b_hat).all():
            state["b"], state["reset"] = b_hat, reset
        return log_likelihood(md, theta, b_hat)

    res = maximize(lambda t: objective(t[0])[None], theta0, max_iters)
    if not res.converged:
        warnings.warn(f"fit('mle'): the outer optimisation stopped unconverged after {res.num_iters} "
                      f"iterations (max |gradient| {res.grad_norm:.3g}); raise max_iters or give init",
                      ConvergenceWarning, stacklevel=3)
    theta = res.z
    with torch.no_grad():
        b_hat, reset = robust_modes(md, theta, state["b"])
    state["b"] = b_hat
    ll = float(log_likelihood(md, theta, b_hat).detach())
    if not math.isfinite(ll):
        raise RuntimeError(f"fit('mle'): the Laplace log-likelihood at the estimate is {ll}; "
                           "the fit failed (check the model, data and init)")
    covariance, information = (_covariance(objective, theta) if standard_errors else (None, None))
    estimates = {k: v.detach() for k, v in md.unpack(theta).items()}
    n_obs = _observation_count(md, theta, b_hat)
    random_sites = md.to_sites(b_hat[None])
    slices = md.slices()
    parts = [(theta[slices[s.name]] if s.name in slices else random_sites[s.name]).reshape(-1)
             for s in density.sites]
    info = {"estimates": estimates, "stderr": _natural_stderr(md, theta, covariance),
            "log_likelihood": ll, "minus2ll": -2 * ll,
            "ofv": -2 * ll - n_obs * math.log(2 * math.pi), "num_observations": n_obs,
            "covariance": covariance, "information": information, "converged": res.converged,
            "num_iters": res.num_iters, "ebe": b_hat, "group": md.group,
            "ebe_reset_groups": reset.nonzero().flatten().tolist(), "approximation": approximation,
            "wall_time_s": time.perf_counter() - start}
    return InferenceRecord("mle", torch.cat(parts)[None, None].detach(), info=info, seed=seed)
