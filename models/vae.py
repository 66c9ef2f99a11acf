"""Variational autoencoder (Kingma & Welling 2014; Rezende et al. 2014).

The story, one row: ``z ~ N(0, I_k)``, ``y | z ~ decoder(z)`` — a diagonal Gaussian
(``decoder(z)`` gives the mean, with a fixed ``scale`` or a learned one returned as
``(loc, scale)``) or independent Bernoullis (``decoder(z)`` gives the logits). The latent
site ``"z"`` is one ``[k]`` vector per row inside ``pyro.plate("data", n)`` and the decoder
is registered with ``pyro.module`` under a per-instance name, so genprog's generic
machinery (``condition(y=row).log_marginal("ais")``, ``fit("nuts")`` over ``z``, NaN
entries of a Gaussian ``y`` imputed as ``"y_missing"``) applies unchanged.

The encoder is an amortized Gaussian ``q(z | y) = N(loc(y), diag(scale(y)^2))``
(``encoder(y) -> (loc, scale)``), the guide of the ELBO.

What is exact and what is estimated:

* ``sample``: exact (ancestral).
* ``log_prob``: *not* exact. :meth:`VAE._log_prob_estimate` gives ``sum_rows log p(y)`` as a
  :class:`genprog.Estimate` with a standard error: ``method="iwae"`` (importance sampling
  with the encoder as proposal, the importance-weighted bound of Burda et al. 2016; its
  expectation is below ``log p`` by ``O(1/S)``) or ``method="ais"`` (annealed importance
  sampling from the prior to the posterior over ``z``, batched over rows — every row
  runs its own particles and its own step size, written here rather than running
  :func:`genprog.infer.evidence.annealed_importance_sampling` once per row).
* ``posterior_estimate(y)``: the encoder's ``q(z | y)``.
* ``impute`` / ``inpaint``: ``p(y_missing | y_observed)`` for rows with NaN entries by
  self-normalized importance sampling over ``z`` (posterior mean, or completions).
* ``mle``: the ELBO, ``pyro.infer.Trace_ELBO`` with the encoder as the guide, minimised by
  Adam on minibatches (SVI), stopping on a plateau.

Shapes: ``d`` (``dim``) coordinates of ``y``, ``k`` (``latent_dim``) latent coordinates;
data ``[N, d]``.
"""

from __future__ import annotations

import math
import time
import uuid
import warnings

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from genprog.errors import EstimatorWarning
from genprog.estimate import Estimate
from genprog.infer.hamiltonian import kinetic_energy, leapfrog, sample_momentum
from genprog.monte_carlo import log_mean_exp
from genprog.optim import minimize
from genprog.validation import check_int

from .base import ZooModel, data_plate, renamed_keywords, training_record
from .gaussian import set_param

LIKELIHOODS = ("gaussian", "bernoulli")
ESTIMATE_METHODS = ("iwae", "ais")
#: AIS step-size adaptation (as in genprog.infer.evidence): target acceptance and gain.
_TARGET_ACCEPT, _ADAPT_GAIN = 0.65, 1.0


# ---------------------------------------------------------------------- networks
def _mlp(n_in: int, hidden, n_out: int) -> nn.Sequential:
    layers, prev = [], n_in
    for width in hidden:
        layers += [nn.Linear(prev, int(width)), nn.Softplus()]
        prev = int(width)
    layers.append(nn.Linear(prev, n_out))
    return nn.Sequential(*layers)


class GaussianEncoder(nn.Module):
    """MLP ``y [..., d] -> (loc [..., k], scale [..., k])`` with
    ``scale = softplus(.) + min_scale``."""

    def __init__(self, dim: int, latent_dim: int, hidden=(64,), min_scale: float = 1e-3):
        super().__init__()
        self.net = _mlp(dim, hidden, 2 * latent_dim)
        self.latent_dim, self.min_scale = latent_dim, min_scale

    def forward(self, y):
        h = self.net(y)
        loc, raw = h[..., :self.latent_dim], h[..., self.latent_dim:]
        return loc, nn.functional.softplus(raw) + self.min_scale


class MLPDecoder(nn.Module):
    """MLP ``z [..., k] -> out [..., d]``: Bernoulli logits, or a Gaussian mean; with
    ``learn_scale`` it returns ``(loc, scale)`` with one learned scale per coordinate
    (``softplus(.) + min_scale``)."""

    def __init__(self, latent_dim: int, dim: int, hidden=(64,), learn_scale: bool = False,
                 min_scale: float = 1e-2):
        super().__init__()
        self.net = _mlp(latent_dim, hidden, dim)
        self.min_scale = min_scale
        self.raw_scale = nn.Parameter(torch.zeros(dim)) if learn_scale else None

    def forward(self, z):
        out = self.net(z)
        if self.raw_scale is None:
            return out
        scale = nn.functional.softplus(self.raw_scale) + self.min_scale
        return out, scale.expand_as(out)


class LinearDecoder(nn.Module):
    """``z [..., k] -> W z + mu [..., d]``: with ``likelihood="gaussian"`` and a fixed
    ``scale=sigma`` the VAE is probabilistic PCA."""

    def __init__(self, W: torch.Tensor, mu: torch.Tensor):
        super().__init__()
        self.W = nn.Parameter(torch.as_tensor(W).clone())
        self.mu = nn.Parameter(torch.as_tensor(mu).clone())

    def forward(self, z):
        return z @ self.W.T + self.mu


class LinearEncoder(nn.Module):
    """``y [..., d] -> (A (y - b), scale)``: a Gaussian encoder with a mean linear in ``y``
    and a fixed diagonal ``scale [k]`` — the form of PPCA's exact posterior."""

    def __init__(self, A: torch.Tensor, b: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.A = nn.Parameter(torch.as_tensor(A).clone())
        self.b = nn.Parameter(torch.as_tensor(b).clone())
        self.log_scale = nn.Parameter(torch.as_tensor(scale).clone().log())

    @classmethod
    def ppca_posterior(cls, W, mu, sigma) -> LinearEncoder:
        """The mean and the marginal standard deviations of PPCA's posterior
        ``z | y ~ N(M^-1 W^T (y - mu), sigma^2 M^-1)``, ``M = W^T W + sigma^2 I``: exact
        when ``W`` has orthogonal columns (``M`` diagonal), a diagonal approximation
        otherwise."""
        W, mu = torch.as_tensor(W), torch.as_tensor(mu)
        sigma = torch.as_tensor(sigma, dtype=W.dtype)
        k = W.shape[1]
        M = W.T @ W + sigma ** 2 * torch.eye(k, dtype=W.dtype)
        Minv = torch.linalg.inv(M)
        return cls(Minv @ W.T, mu, (sigma ** 2 * torch.diagonal(Minv)).sqrt())

    def forward(self, y):
        loc = (y - self.b) @ self.A.T
        return loc, self.log_scale.exp().expand_as(loc)


# ---------------------------------------------------------------------- helpers
def _observation(out, likelihood: str, scale):
    """The distribution of ``y`` given a decoder output (event dim 1)."""
    if likelihood == "bernoulli":
        return dist.Bernoulli(logits=out).to_event(1)
    if isinstance(out, tuple):
        loc, scale = out
    else:
        loc = out
    return dist.Normal(loc, scale).to_event(1)


def _elementwise_log_lik(out, y, likelihood: str, scale):
    """``log p(y_j | z)`` per coordinate, ``[..., d]``."""
    if likelihood == "bernoulli":
        return -nn.functional.binary_cross_entropy_with_logits(
            out, y.expand_as(out), reduction="none")
    if isinstance(out, tuple):
        loc, scale = out
    else:
        loc = out
    return dist.Normal(loc, scale).log_prob(y)


def _check_method_options(method: str, options: dict, valid) -> None:
    unknown = set(options) - set(valid)
    if unknown:
        raise TypeError(f"VAE._log_prob_estimate(method={method!r}) got unknown option(s) "
                        f"{sorted(unknown)}; valid: {sorted(valid)}")


# ---------------------------------------------------------------------- the model
class VAE(ZooModel):
    """A variational autoencoder over ``y [d]``.

    Parameters
    ----------
    decoder : torch.nn.Module
        ``z [..., k] -> [..., d]`` (Bernoulli logits or Gaussian mean), or
        ``-> (loc, scale)`` for a Gaussian with a learned scale.
    encoder : torch.nn.Module, optional
        ``y [..., d] -> (loc [..., k], scale [..., k])``; needed for IWAE estimates,
        ``posterior_estimate``, ``impute``/``inpaint`` and training.
    latent_dim : int
        ``k``.
    likelihood : {"gaussian", "bernoulli"}
    scale : float or Tensor ``[d]``, optional
        Fixed Gaussian observation scale, when the decoder returns only the mean.
    name : str, optional
        Prefix of the networks' names in Pyro's param store (default: unique per instance).

    Attributes
    ----------
    info : dict
        The training record, set by :meth:`mle`: ``loss_trace`` (list of float, the
        negative ELBO per row of the minibatch at every Adam step), ``num_steps`` (int,
        steps taken), ``converged`` (bool, whether the plateau rule fired before
        ``max_iters``).

    Examples
    --------
    >>> import torch
    >>> W, mu = torch.tensor([[2.0], [0.0]]), torch.zeros(2)
    >>> vae = VAE(decoder=LinearDecoder(W, mu), encoder=LinearEncoder.ppca_posterior(W, mu, 1.0),
    ...           latent_dim=1, scale=1.0)
    >>> vae.sample(4, seed=0)["y"].shape
    torch.Size([4, 2])
    >>> est = vae._log_prob_estimate(torch.tensor([[1.0, 0.5]]), num_samples=10)
    >>> round(est.value, 4), round(est.stderr, 6)  # PPCA: N(y; 0, diag(5, 1)), exact
    (-2.8676, 0.0)
    """

    mle_kind = "ELBO (SVI)"

    def __init__(self, *, decoder, encoder=None, latent_dim: int, likelihood: str = "gaussian",
                 scale=None, name: str | None = None):
        latent_dim = check_int("VAE: latent_dim", latent_dim)
        if not isinstance(decoder, nn.Module):
            raise TypeError(f"VAE: decoder must be a torch.nn.Module, got {type(decoder).__name__}")
        if encoder is not None and not isinstance(encoder, nn.Module):
            raise TypeError(f"VAE: encoder must be a torch.nn.Module, got {type(encoder).__name__}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"VAE: likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if name is None:
            name = f"VAE_{uuid.uuid4().hex[:12]}"
        if not isinstance(name, str) or "$$$" in name:
            raise ValueError(f"VAE: name must be a string without '$$$', got {name!r}")
        p = next(decoder.parameters(), None)
        ref = {"device": p.device, "dtype": p.dtype} if p is not None else {}
        with torch.no_grad():
            out = decoder(torch.zeros(1, latent_dim, **ref))
        if isinstance(out, tuple):
            if likelihood != "gaussian" or len(out) != 2:
                raise ValueError("VAE: a decoder returning a tuple must return (loc, scale) "
                                 "for likelihood='gaussian'")
            if scale is not None:
                raise ValueError("VAE: the decoder returns its own scale; do not also give scale=")
            loc = out[0]
        else:
            loc = out
            if likelihood == "gaussian" and scale is None:
                raise ValueError("VAE: a Gaussian decoder returning only the mean needs scale= "
                                 "(or return (loc, scale) from the decoder)")
        if not torch.is_tensor(loc) or loc.dim() != 2 or loc.shape[0] != 1:
            raise ValueError(f"VAE: decoder(z [1, {latent_dim}]) must give [1, d]; got "
                             f"{list(loc.shape) if torch.is_tensor(loc) else type(loc).__name__}")
        dim = int(loc.shape[1])
        if likelihood == "bernoulli" and scale is not None:
            raise ValueError("VAE: scale= applies to likelihood='gaussian' only")
        if scale is not None:
            scale = torch.as_tensor(scale, dtype=loc.dtype, device=loc.device)
            if scale.numel() not in (1, dim) or not bool((scale > 0).all()):
                raise ValueError(f"VAE: scale must be positive, one number or [d={dim}]; got {scale!r}")
            scale = scale.reshape(()) if scale.numel() == 1 else scale.reshape(dim)
        if encoder is not None:
            with torch.no_grad():
                enc = encoder(torch.zeros(1, dim, **ref))
            if (not isinstance(enc, tuple) or len(enc) != 2
                    or any(tuple(t.shape) != (1, latent_dim) for t in enc)):
                raise ValueError(f"VAE: encoder(y [1, {dim}]) must return (loc, scale), each "
                                 f"[1, {latent_dim}]")
        super().__init__(decoder=decoder, encoder=encoder, latent_dim=latent_dim,
                         likelihood=likelihood, scale=scale, name=name, dim=dim)
        if scale is not None:
            set_param(self, "scale", self.kwargs["scale"])

    @staticmethod
    def story(n=None, decoder=None, encoder=None, latent_dim=1, likelihood="gaussian", scale=None,
              name="vae", dim=None):
        """``z ~ N(0, I_k)``, ``y | z ~ decoder(z)`` (sites ``"z"`` ``[k]`` and ``"y"``
        ``[d]``, per row inside ``pyro.plate("data", n)``)."""
        decoder = pyro.module(f"{name}.decoder", decoder)
        p = next(decoder.parameters(), None)
        ref = {"device": p.device, "dtype": p.dtype} if p is not None else {}
        prior = dist.Normal(torch.zeros(latent_dim, **ref), torch.ones(latent_dim, **ref)).to_event(1)
        with data_plate(n):
            z = pyro.sample("z", prior)
            return pyro.sample("y", _observation(decoder(z), likelihood, scale))

    # ------------------------------------------------------------------ accessors
    @property
    def event_shape(self) -> tuple:
        return (int(self.kwargs["dim"]),)

    @property
    def decoder(self) -> nn.Module:
        return self.kwargs["decoder"]

    @property
    def encoder(self) -> nn.Module | None:
        return self.kwargs["encoder"]

    @property
    def latent_dim(self) -> int:
        return int(self.kwargs["latent_dim"])

    @property
    def likelihood(self) -> str:
        return self.kwargs["likelihood"]

    def to(self, device=None, dtype=None) -> VAE:
        """Also moves the networks."""
        for net in (self.decoder, self.encoder):
            if net is not None:
                net.to(device=device, dtype=dtype)
        return super().to(device, dtype)

    def _ref(self) -> dict:
        p = next(self.decoder.parameters(), None)
        return {"device": p.device, "dtype": p.dtype} if p is not None else {}

    def _rows(self, y, what: str, allow_nan: bool = False) -> tuple[torch.Tensor, bool]:
        """``y`` as ``[N, d]`` on the networks' device and dtype, and whether it was one row."""
        t = torch.as_tensor(y)
        d = self.event_shape[0]
        if t.dim() == 1 and t.shape[0] == d:
            single, t = True, t.unsqueeze(0)
        elif t.dim() == 2 and t.shape[1] == d:
            single = False
        else:
            raise ValueError(f"VAE.{what}: y must have shape [{d}] or [N, {d}]; got {list(t.shape)}")
        t = t.to(**self._ref()) if self._ref() else t.float()
        nan = torch.isnan(t)
        if nan.any() and not allow_nan:
            raise ValueError(f"VAE.{what}: y has NaN entries (use impute/inpaint for rows with "
                             "missing entries)")
        if torch.isinf(t).any():
            raise ValueError(f"VAE.{what}: y has infinite entries")
        if self.likelihood == "bernoulli" and not bool((nan | (t == 0) | (t == 1)).all()):
            raise ValueError(f"VAE.{what}: y must hold 0/1 values for likelihood='bernoulli'")
        return t, single

    def _require_encoder(self, what: str) -> nn.Module:
        if self.encoder is None:
            raise ValueError(f"VAE.{what} needs an encoder (build the VAE with encoder=, or "
                             "train it with VAE.mle)")
        return self.encoder

    def _log_lik(self, y: torch.Tensor, z: torch.Tensor, mask=None) -> torch.Tensor:
        """``log p(y | z)`` summed over coordinates (those where ``mask`` is True):
        ``y [N, d]``, ``z [..., N, k]`` -> ``[..., N]``."""
        ll = _elementwise_log_lik(self.decoder(z), y, self.likelihood, self.kwargs["scale"])
        if mask is not None:
            ll = ll * mask
        return ll.sum(-1)

    def _prior(self) -> dist.Distribution:
        ref = self._ref()
        k = self.latent_dim
        return dist.Normal(torch.zeros(k, **ref), torch.ones(k, **ref)).to_event(1)

    def decoder_mean(self, z) -> torch.Tensor:
        """``E[y | z]`` ``[..., d]`` for ``z [..., k]`` (Bernoulli probabilities or the Gaussian
        mean)."""
        out = self.decoder(torch.as_tensor(z).to(**self._ref()))
        if isinstance(out, tuple):
            out = out[0]
        return torch.sigmoid(out) if self.likelihood == "bernoulli" else out

    # ------------------------------------------------------------------ posterior
    def posterior_estimate(self, y) -> dist.Distribution:
        """The encoder's approximation ``q(z | y)`` of the posterior over ``z``.

        Parameters
        ----------
        y : Tensor ``[d]`` or ``[N, d]``

        Returns
        -------
        pyro.distributions.Independent
            ``Normal(loc, scale).to_event(1)``, batch shape ``[]`` or ``[N]``, event ``[k]``
            (``.mean`` and ``.stddev`` are the encoder's outputs).
        """
        enc = self._require_encoder("posterior_estimate")
        t, single = self._rows(y, "posterior_estimate")
        with torch.no_grad():
            loc, scale = enc(t)
        if single:
            loc, scale = loc[0], scale[0]
        return dist.Normal(loc, scale).to_event(1)

    # ------------------------------------------------------------------ log p estimates
    def _log_prob_estimate(self, y, *, method: str = "iwae", seed: int = 0, **options) -> Estimate:
        """An estimate of ``sum_rows log p(y)`` (nats) with its standard error.

        Parameters
        ----------
        y : Tensor ``[d]`` or ``[N, d]``
        method : {"iwae", "ais"}
            ``"iwae"``: ``log mean_s w_s`` per row with ``z_s ~ q(z | y)`` (the encoder) and
            ``w = p(z) p(y | z) / q(z | y)``; options ``num_samples`` (``S``, default 1000)
            and ``batch_size`` (draws at once, default 250). Unbiased for ``p(y)``; for
            ``log p(y)`` it is the importance-weighted lower bound (biased low by about
            ``stderr^2 / 2``).
            ``"ais"``: annealed importance sampling from the prior ``N(0, I)`` to the
            posterior ``p(z | y)`` with HMC transitions, every row its own particles and
            step size; options ``num_particles`` (64), ``num_temps`` (200),
            ``num_leapfrog`` (5).
        seed : int

        Returns
        -------
        Estimate
            ``method`` as given; ``stderr`` the delta-method standard error over the
            per-row weights, rows added in quadrature. ``details``: ``pointwise`` ``[N]``,
            ``pointwise_stderr`` ``[N]``, ``min_ess``; for IWAE also ``elbo`` (mean
            log-weight summed over rows, the ELBO of the encoder).
        """
        if method not in ESTIMATE_METHODS:
            raise ValueError(f"VAE._log_prob_estimate: unknown method {method!r}; choose from "
                             f"{ESTIMATE_METHODS}")
        t, _ = self._rows(y, "_log_prob_estimate")
        start = time.perf_counter()
        g = torch.Generator(device=t.device).manual_seed(int(seed))
        if method == "iwae":
            _check_method_options(method, options, ("num_samples", "batch_size"))
            num_samples = check_int("VAE iwae: num_samples", options.get("num_samples", 1000))
            batch_size = check_int("VAE iwae: batch_size", options.get("batch_size", 250))
            logw = self._iwae_log_weights(t, num_samples, batch_size, g)
            evals = num_samples * t.shape[0]
            extra = {"elbo": float(logw.to(torch.float64).mean(0).sum())}
        else:
            _check_method_options(method, options, ("num_particles", "num_temps", "num_leapfrog"))
            P = check_int("VAE ais: num_particles", options.get("num_particles", 64))
            T = check_int("VAE ais: num_temps", options.get("num_temps", 200), 2)
            L = check_int("VAE ais: num_leapfrog", options.get("num_leapfrog", 5))
            logw, acc, steps = self._ais_log_weights(t, P, T, L, g)
            num_samples = P
            evals = P * t.shape[0] * (1 + (T - 1) * (L + 1))
            extra = {"acceptance_rate": acc, "step_size": steps, "num_temps": T,
                     "num_leapfrog": L}
        if not bool(torch.isfinite(logw).any(0).all()):
            raise RuntimeError(f"VAE._log_prob_estimate({method!r}): a row has no finite weight")
        values, se, ess = log_mean_exp(logw.transpose(0, 1))  # over the S draws of each row
        if bool((ess < 0.01 * num_samples).any()):
            warnings.warn(f"VAE._log_prob_estimate({method!r}): the effective sample size of "
                          f"some row is {float(ess.min()):.1f} of {num_samples}; the estimate "
                          "and its stderr are unreliable", EstimatorWarning, stacklevel=2)
        return Estimate(float(values.sum()), float(se.pow(2).sum().sqrt()), method,
                        num_samples=num_samples, num_evaluations=evals,
                        wall_time_s=time.perf_counter() - start,
                        details={"pointwise": values, "pointwise_stderr": se,
                                 "min_ess": float(ess.min()), **extra})

    def _iwae_log_weights(self, y, num_samples, batch_size, generator) -> torch.Tensor:
        """``log p(z) + log p(y | z) - log q(z | y)`` for ``z ~ q(z | y)``: ``[S, N]``."""
        enc = self._require_encoder("_log_prob_estimate(method='iwae')")
        prior = self._prior()
        out = []
        with torch.no_grad():
            loc, scale = enc(y)
            q = dist.Normal(loc, scale).to_event(1)
            for s0 in range(0, num_samples, batch_size):
                S = min(batch_size, num_samples - s0)
                eps = torch.randn((S, *loc.shape), generator=generator, device=loc.device,
                                  dtype=loc.dtype)
                z = loc + scale * eps
                out.append(prior.log_prob(z) + self._log_lik(y, z) - q.log_prob(z))
        return torch.cat(out, 0)

    def _ais_log_weights(self, y, P, T, L, generator):
        """Batched AIS over rows: particles ``[P, N, k]`` from the prior, tempered targets
        ``log p(z) + beta_t log p(y_n | z)`` with a sigmoid schedule (Grosse et al. 2015),
        one HMC transition (``L`` leapfrog steps, step size adapted per row towards 65%
        acceptance) per temperature. Returns log-weights ``[P, N]``, the mean acceptance
        rate and the final step sizes ``[N]``."""
        N, k = y.shape[0], self.latent_dim
        ref = self._ref() or {"device": y.device, "dtype": y.dtype}
        t = torch.linspace(0.0, 1.0, T + 1, dtype=torch.float64)
        s = torch.sigmoid(4.0 * (2.0 * t - 1.0))
        betas = ((s - s[0]) / (s[-1] - s[0])).to(**ref)
        yy = y.repeat(P, 1)  # row p * N + n is data row n
        B = P * N
        z = torch.randn(B, k, generator=generator, **ref)
        inv_mass = torch.ones(k, **ref)
        log_step = torch.full((N,), math.log(0.5), **ref)

        def log_lik(x):
            return self._log_lik(yy, x)

        beta_now = {}
        cache = {}

        def potential_and_grad(x):
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                ll = log_lik(x)
                u = 0.5 * (x * x).sum(-1) - beta_now["b"] * ll
                (grad,) = torch.autograd.grad(u.sum(), x)
            cache["ll"] = ll.detach()
            return u.detach(), grad.detach()

        with torch.no_grad():
            ll = log_lik(z)
        log_w = torch.zeros(B, **ref)
        acc_sum = 0.0
        for i in range(1, T + 1):
            log_w = log_w + (betas[i] - betas[i - 1]) * ll
            if i == T:
                break
            beta_now["b"] = betas[i]
            step = torch.exp(log_step).repeat(P)
            u0, grad = potential_and_grad(z)
            r = sample_momentum(z, inv_mass, generator)
            h0 = u0 + kinetic_energy(r, inv_mass)
            zn, rn, un = z, r, u0
            for _ in range(L):
                zn, rn, un, grad = leapfrog(potential_and_grad, zn, rn, grad, step, inv_mass)
            h1 = un + kinetic_energy(rn, inv_mass)
            log_acc = torch.nan_to_num(h0 - h1, nan=-math.inf).clamp(max=0.0)
            accept = torch.log(torch.rand(B, generator=generator, **ref)) < log_acc
            z = torch.where(accept.unsqueeze(-1), zn, z)
            ll = torch.where(accept, cache["ll"], ll)
            prob = torch.exp(log_acc).reshape(P, N).mean(0)
            log_step = (log_step + _ADAPT_GAIN * (prob - _TARGET_ACCEPT)).clamp(
                math.log(1e-5), math.log(10.0))
            acc_sum += float(prob.mean())
        return log_w.reshape(P, N), acc_sum / max(T - 1, 1), torch.exp(log_step).tolist()

    # ------------------------------------------------------------------ missing entries
    def _missing_weights(self, y, obs, num_samples, generator, refine: int = 3, rounds: int = 2):
        """Self-normalized importance sampling of ``p(z | y_observed)`` per row.

        The first proposal is the defensive mixture ``0.7 N(loc, (2 scale)^2) + 0.3 N(0, I)``
        around the encoder's ``q(z | y_filled)``, where the missing entries of ``y_filled``
        are refilled ``refine`` times with the decoder's mean at the encoder's mean. Each of
        ``rounds - 1`` further rounds moment-matches the Gaussian component to the weighted
        draws of the previous round (sd widened by 1.5; adaptive importance sampling); only
        the last round's draws and weights are returned: ``z [S, N, k]``, normalized
        weights ``[S, N]`` and the ESS ``[N]``.
        """
        enc = self._require_encoder("impute/inpaint")
        prior = self._prior()
        S = num_samples
        with torch.no_grad():
            fill = torch.where(obs, y, torch.full_like(y, 0.5 if self.likelihood == "bernoulli" else 0.0))
            fill = torch.nan_to_num(fill)
            for _ in range(refine):
                loc, _ = enc(fill)
                fill = torch.where(obs, fill, self.decoder_mean(loc))
            loc, scale = enc(fill)
            scale = 2.0 * scale
            mask = obs.to(fill.dtype)
            for r in range(rounds):
                wide = dist.Normal(loc, scale).to_event(1)
                eps = torch.randn((S, *loc.shape), generator=generator, device=loc.device,
                                  dtype=loc.dtype)
                from_prior = torch.rand((S, loc.shape[0]), generator=generator,
                                        device=loc.device) < 0.3
                z = torch.where(from_prior.unsqueeze(-1), eps, loc + scale * eps)
                log_q = torch.logaddexp(math.log(0.7) + wide.log_prob(z),
                                        math.log(0.3) + prior.log_prob(z))
                logw = prior.log_prob(z) + self._log_lik(fill, z, mask) - log_q
                w = torch.softmax(logw, 0)
                if r < rounds - 1:
                    loc = (w.unsqueeze(-1) * z).sum(0)
                    var = (w.unsqueeze(-1) * (z - loc) ** 2).sum(0)
                    scale = 1.5 * var.sqrt().clamp_min(1e-2)
            ess = 1.0 / (w ** 2).sum(0)
        if bool((ess < 0.01 * S).any()):
            warnings.warn(f"VAE.impute/inpaint: importance-sampling ESS {float(ess.min()):.1f} of "
                          f"{S} for some row; raise num_samples", EstimatorWarning, stacklevel=3)
        return z, w, ess

    def impute(self, y, *, num_samples: int = 2000, seed: int = 0) -> torch.Tensor:
        """``y`` with each NaN entry replaced by its posterior mean
        ``E[y_j | y_observed] = E_{z | y_observed}[E[y_j | z]]`` (Rao-Blackwellized
        self-normalized importance sampling over ``z``; see :meth:`inpaint`).

        Parameters
        ----------
        y : Tensor ``[d]`` or ``[N, d]`` with NaN = missing

        Returns
        -------
        Tensor, the shape of ``y``
        """
        t, single = self._rows(y, "impute", allow_nan=True)
        obs = ~torch.isnan(t)
        g = torch.Generator(device=t.device).manual_seed(int(seed))
        z, w, _ = self._missing_weights(t, obs, check_int("VAE.impute: num_samples", num_samples, 2), g)
        with torch.no_grad():
            mean = (w.unsqueeze(-1) * self.decoder_mean(z)).sum(0)
        out = torch.where(obs, t, mean)
        return out[0] if single else out

    def inpaint(self, y, n: int = 10, *, num_samples: int = 2000, seed: int = 0) -> torch.Tensor:
        """Completions of rows with missing (NaN) entries, drawn from
        ``p(y_missing | y_observed)``: ``z`` by sampling-importance-resampling from
        ``num_samples`` weighted proposals (weights ``p(z) p(y_observed | z) / q(z)``), then
        ``y_missing ~ p(y | z)``; observed entries are kept.

        Parameters
        ----------
        y : Tensor ``[d]`` or ``[N, d]`` with NaN = missing
        n : int
            Completions per row.

        Returns
        -------
        Tensor ``[n, d]`` (one row given) or ``[n, N, d]``
        """
        n = check_int("VAE.inpaint: n", n)
        t, single = self._rows(y, "inpaint", allow_nan=True)
        obs = ~torch.isnan(t)
        g = torch.Generator(device=t.device).manual_seed(int(seed))
        z, w, _ = self._missing_weights(t, obs, check_int("VAE.inpaint: num_samples", num_samples, 2), g)
        N = t.shape[0]
        with torch.no_grad():
            idx = torch.multinomial(w.T, n, replacement=True, generator=g)  # [N, n]
            zs = z[idx.T, torch.arange(N, device=t.device)]  # [n, N, k]
            out = self.decoder(zs)
            if self.likelihood == "bernoulli":
                draws = torch.bernoulli(torch.sigmoid(out), generator=g)
            else:
                loc, scale = out if isinstance(out, tuple) else (out, self.kwargs["scale"])
                noise = torch.randn(loc.shape, generator=g, device=loc.device, dtype=loc.dtype)
                draws = loc + scale * noise
        full = torch.where(obs, torch.nan_to_num(t), draws)
        return full[:, 0] if single else full

    # ------------------------------------------------------------------ training
    @classmethod
    @renamed_keywords(max_steps="max_iters")
    def mle(cls, y, *, latent_dim: int = 8, hidden=(64,), likelihood: str = "gaussian",
            scale=None, encoder=None, decoder=None, max_iters: int = 5000, batch_size: int = 128,
            learning_rate: float = 3e-3, num_particles: int = 1, window: int = 100, seed: int = 0,
            progress: bool | None = None) -> VAE:
        """Train a VAE on ``y [N, d]`` by maximising the ELBO.

        The loss is Pyro's ``Trace_ELBO`` (``num_particles`` draws) of the story with the
        encoder as the guide, on minibatches of ``batch_size`` rows, minimised by Adam over
        both networks (stochastic variational inference). Every ``window`` steps the mean
        loss of the window is compared with the previous one; when the change is within
        noise the learning rate is cut by 5x, and after two cuts training stops. Reaching
        ``max_iters`` (deprecated name: ``max_steps``) first raises a
        :class:`~genprog.errors.ConvergenceWarning`.
        Training runs in a private Pyro param-store scope and with torch's RNG forked and
        seeded with ``seed``, so it neither reads nor leaves global state.

        Parameters
        ----------
        y : array ``[N, d]`` (0/1 for ``likelihood="bernoulli"``)
        latent_dim, hidden
            ``k`` and the hidden widths of the default MLP encoder and decoder.
        likelihood : {"gaussian", "bernoulli"}
        scale : float, optional
            Fixed Gaussian scale; None learns one scale per coordinate.
        encoder, decoder : torch.nn.Module, optional
            Networks to train instead of the default MLPs.

        Returns
        -------
        VAE
            With ``info``: ``loss_trace`` (negative ELBO per row, per step), ``num_steps``,
            ``converged`` (see :class:`VAE`).
        """
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"VAE.mle: likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        t = torch.as_tensor(y)
        if not t.is_floating_point():
            t = t.to(torch.get_default_dtype())
        if t.dim() != 2 or t.shape[0] < 2:
            raise ValueError(f"VAE.mle: y must be [N, d] with N >= 2, got shape {list(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError("VAE.mle: y has NaN or infinite entries")
        if likelihood == "bernoulli" and not bool(((t == 0) | (t == 1)).all()):
            raise ValueError("VAE.mle: y must hold 0/1 values for likelihood='bernoulli'")
        latent_dim = check_int("VAE.mle: latent_dim", latent_dim)
        max_iters = check_int("VAE.mle: max_iters", max_iters)
        batch_size = check_int("VAE.mle: batch_size", batch_size)
        window = check_int("VAE.mle: window", window)
        N, d = t.shape
        devices = [t.device] if t.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), pyro.get_param_store().scope():
            torch.manual_seed(seed)
            if decoder is None:
                decoder = MLPDecoder(latent_dim, d, hidden,
                                     learn_scale=likelihood == "gaussian" and scale is None)
            if encoder is None:
                encoder = GaussianEncoder(d, latent_dim, hidden)
            decoder.to(device=t.device, dtype=t.dtype)
            encoder.to(device=t.device, dtype=t.dtype)
            vae = cls(decoder=decoder, encoder=encoder, latent_dim=latent_dim,
                      likelihood=likelihood, scale=scale)
            params = vae.params

            def model(batch):
                return pyro.condition(cls.story, data={"y": batch})(n=batch.shape[0], **params)

            def guide(batch):
                net = pyro.module(f"{params['name']}.encoder", encoder)
                with pyro.plate("data", batch.shape[0]):
                    loc, sc = net(batch)
                    pyro.sample("z", dist.Normal(loc, sc).to_event(1))

            elbo = pyro.infer.Trace_ELBO(num_particles=num_particles)
            opt = torch.optim.Adam(list(decoder.parameters()) + list(encoder.parameters()),
                                   lr=learning_rate)
            g = torch.Generator(device=t.device).manual_seed(seed)

            def loss_fn(step):
                idx = torch.randint(0, N, (min(batch_size, N),), generator=g, device=t.device)
                batch = t[idx]
                return elbo.differentiable_loss(model, guide, batch) / batch.shape[0]

            result = minimize(loss_fn, opt, max_iters=max_iters, window=window, what="VAE.mle",
                              progress=progress)
        vae.info = training_record(result)
        return vae


def _progress(total: int, desc: str, progress: bool | None):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False,
                disable=None if progress is None else not progress)


def independent_bernoulli_log_prob(train: torch.Tensor, test: torch.Tensor,
                                   pseudocount: float = 1.0) -> torch.Tensor:
    """The independent-pixel baseline: per-coordinate Bernoulli probabilities fitted on
    ``train [N, d]`` (with ``pseudocount`` added to both outcomes), ``log p`` of each row of
    ``test [M, d]``, ``[M]``."""
    p = (train.sum(0) + pseudocount) / (train.shape[0] + 2 * pseudocount)
    return (test * torch.log(p) + (1 - test) * torch.log1p(-p)).sum(-1)
