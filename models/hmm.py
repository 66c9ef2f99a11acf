"""Hidden Markov models (:class:`HMM`) with categorical or Gaussian emissions.

A draw of ``y`` is **one sequence**: ``[T]`` symbols in ``{0, ..., M-1}`` (categorical
emissions) or ``[T, d]`` vectors (Gaussian emissions); a data set is ``[N, T]`` or
``[N, T, d]``, ``N`` independent sequences of the same length (``n`` in the story counts
sequences). Hidden states ``x_t`` take ``K`` values:

    x_1 ~ Categorical(initial),  x_t | x_{t-1} ~ Categorical(transition[x_{t-1}]),
    y_t | x_t ~ Categorical(emission_probs[x_t])  or  N(means[x_t], covariances[x_t]).

Exact operations, all in log space and vectorized over sequences (loops run over time
steps only): ``log p(y)`` by the forward algorithm, state marginals ``p(x_t | y)`` by
forward-backward (:meth:`HMM.posterior`), the most likely path (:meth:`HMM.viterbi`) and
maximum likelihood by Baum-Welch (:meth:`HMM.mle`). Missing observations are NaN: a NaN
time step (or, for Gaussian emissions, NaN entries of ``y_t``) is integrated out, so it
contributes a factor 1 (resp. the density of the observed entries) to the likelihood.

The story writes ``y`` as one :class:`pyro.distributions.DiscreteHMM` site (states summed
out by Pyro's forward algorithm): genprog's generic enumeration does sum ``pyro.markov``
loops of per-step sites exactly, but the zoo's single observed site ``"y"`` of shape
``[T, ...]`` cannot be written as such a loop.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch

from genprog.inputs import as_tensor
from genprog.validation import check_int

from .base import ZooModel, deprecated_record, renamed_keywords, sample_rows
from .gaussian import (
    EMInfo,
    check_positive_definite,
    gaussian_log_prob,
    keep_float64,
    set_param,
    warn_unconverged,
)

_EMISSIONS = ("categorical", "gaussian")
_COV_TYPES = ("full", "diag")


def check_probs(name: str, p: torch.Tensor, shape: tuple) -> None:
    """ValueError unless ``p`` has ``shape`` and its last axis is a probability vector."""
    if not torch.is_tensor(p) or tuple(p.shape) != tuple(shape):
        got = list(p.shape) if torch.is_tensor(p) else repr(p)
        raise ValueError(f"{name} must have shape {list(shape)}, got {got}")
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
        raise ValueError(f"{name} must be finite and non-negative")
    err = (p.sum(-1) - 1).abs().max()
    if float(err) > 1e-6:
        raise ValueError(f"{name}: each row must sum to 1 (largest error {float(err):.3g})")


class HMM(ZooModel):
    """Hidden Markov model with ``K`` states and categorical or Gaussian emissions.

    Parameters
    ----------
    initial : Tensor ``[K]``, optional
        ``p(x_1)`` (prior ``Dirichlet(1)`` when None).
    transition : Tensor ``[K, K]``, optional
        ``transition[i, j] = p(x_t = j | x_{t-1} = i)``; rows sum to 1 (prior: a
        ``Dirichlet(1)`` per row).
    emission_probs : Tensor ``[K, M]``, optional
        Categorical emissions: ``p(y_t = m | x_t = k)`` (prior ``Dirichlet(1)`` per row).
    means : Tensor ``[K, d]``, optional
        Gaussian emissions: state means (prior ``Normal(0, 5)``).
    covariances : Tensor ``[K, d, d]`` or ``[K, d]``, optional
        Gaussian emissions: full covariances, or variances when ``covariance_type="diag"``
        (a ``[K, d]`` tensor implies "diag"; prior ``LogNormal(0, 1)`` variances).
    emission : {"categorical", "gaussian"}, optional
        Inferred from the emission parameters given.
    covariance_type : {"full", "diag"}, optional
    k, num_symbols, dim : int, optional
        ``K``, ``M`` and ``d``, read from the parameters when those are given.
    length : int, optional
        ``T``, the sequence length of a draw; needed to sample or to condition.
        ``log_prob``, ``posterior`` and ``viterbi`` take sequences of any length.

    Attributes
    ----------
    info : EMInfo
        Set by :meth:`mle`, the fit record (:class:`~genprog.models.gaussian.EMInfo`):
        ``log_likelihood`` (float, total log-likelihood of the data at the returned
        parameters, nats), ``num_iters`` (int, EM iterations: M-steps of the best restart), ``converged`` (bool,
        whether the change in mean log-likelihood per sequence fell below ``tol``), ``trace``
        (tuple of float, mean log-likelihood per sequence before each M-step and at the end).
    em_info : EMInfo
        Deprecated name of ``info`` (the same record; read-only).

    Examples
    --------
    >>> import torch
    >>> hmm = HMM(initial=torch.tensor([0.5, 0.5]), transition=torch.eye(2),
    ...           emission_probs=torch.tensor([[1.0, 0.0], [0.0, 1.0]]), length=3)
    >>> round(float(hmm.log_prob(y=torch.tensor([0.0, 0.0, 0.0]))), 4)
    -0.6931
    >>> hmm.viterbi(torch.tensor([1.0, float("nan"), 1.0])).tolist()
    [1, 1, 1]
    """

    supports_missing = True
    mle_kind = "EM"
    em_info = deprecated_record("em_info")

    def __init__(self, *, initial=None, transition=None, emission_probs=None, means=None,
                 covariances=None, emission=None, covariance_type=None, k=None,
                 num_symbols=None, dim=None, length=None):
        k = None if k is None else check_int("HMM: k", k)
        num_symbols = None if num_symbols is None else check_int("HMM: num_symbols", num_symbols)
        dim = None if dim is None else check_int("HMM: dim", dim)
        length = None if length is None else check_int("HMM: length", length)
        super().__init__(initial=initial, transition=transition, emission_probs=emission_probs,
                         means=means, covariances=covariances, emission=emission,
                         covariance_type=covariance_type, k=k, num_symbols=num_symbols, dim=dim,
                         length=length)
        keep_float64(self)
        self._check_params()

    # ------------------------------------------------------------------ parameters
    def _check_params(self) -> None:
        p = self.kwargs
        cat = p["emission_probs"] is not None or p["num_symbols"] is not None
        gau = p["means"] is not None or p["covariances"] is not None or p["dim"] is not None
        emission = p["emission"]
        if cat and gau:
            raise ValueError("HMM: both categorical (emission_probs / num_symbols) and Gaussian "
                             "(means / covariances / dim) emission parameters given")
        if emission is None:
            if not (cat or gau):
                raise ValueError("HMM: give categorical (emission_probs / num_symbols) or Gaussian "
                                 "(means / covariances / dim) emission parameters, or emission=")
            emission = "categorical" if cat else "gaussian"
        if emission not in _EMISSIONS:
            raise ValueError(f"HMM: emission must be one of {_EMISSIONS}, got {emission!r}")
        if (emission == "categorical" and gau) or (emission == "gaussian" and cat):
            raise ValueError(f"HMM: emission={emission!r} but parameters of the other kind given")
        set_param(self, "emission", emission)
        K = p["k"]
        for name in ("initial", "transition", "emission_probs", "means", "covariances"):
            v = p[name]
            if v is not None:
                if not torch.is_tensor(v) or v.dim() == 0:
                    raise ValueError(f"HMM: {name} must be an array, got {v!r}")
                if K is not None and v.shape[0] != K:
                    raise ValueError(f"HMM: {name} has {v.shape[0]} states, expected k={K}")
                K = int(v.shape[0])
        if K is None:
            raise ValueError("HMM: give k (the number of states) or parameters that show it")
        set_param(self, "k", K)
        if p["initial"] is not None:
            check_probs("HMM: initial", p["initial"], (K,))
        if p["transition"] is not None:
            check_probs("HMM: transition", p["transition"], (K, K))
        if emission == "categorical":
            M = p["num_symbols"]
            if p["emission_probs"] is not None:
                B = p["emission_probs"]
                if B.dim() != 2 or (M is not None and B.shape[1] != M):
                    raise ValueError(f"HMM: emission_probs must be [k, num_symbols], got "
                                     f"{list(B.shape)}")
                M = int(B.shape[1])
                check_probs("HMM: emission_probs", B, (K, M))
            if M is None:
                raise ValueError("HMM: categorical emissions need emission_probs or num_symbols")
            set_param(self, "num_symbols", M)
            return
        d, means, cov = p["dim"], p["means"], p["covariances"]
        ctype = p["covariance_type"]
        if ctype is not None and ctype not in _COV_TYPES:
            raise ValueError(f"HMM: covariance_type must be one of {_COV_TYPES}, got {ctype!r}")
        if means is not None:
            if means.dim() != 2 or (d is not None and means.shape[1] != d):
                raise ValueError(f"HMM: means must be [k, dim], got {list(means.shape)}")
            if not bool(torch.isfinite(means).all()):
                raise ValueError("HMM: means have non-finite entries")
            d = int(means.shape[1])
        if cov is not None:
            implied = "full" if cov.dim() == 3 else "diag" if cov.dim() == 2 else None
            if implied is None or (ctype is not None and ctype != implied):
                raise ValueError(f"HMM: covariances must be [k, dim, dim] (full) or [k, dim] "
                                 f"(diag), got {list(cov.shape)} with covariance_type={ctype!r}")
            ctype = implied
            if d is not None and cov.shape[1] != d:
                raise ValueError(f"HMM: covariances have dim {cov.shape[1]}, means {d}")
            d = int(cov.shape[1])
            if ctype == "full":
                check_positive_definite("HMM: covariances", cov)
            elif not bool(torch.isfinite(cov).all()) or bool((cov <= 0).any()):
                raise ValueError("HMM: diagonal covariances (variances) must be finite and > 0")
        if d is None:
            raise ValueError("HMM: Gaussian emissions need means, covariances or dim")
        set_param(self, "dim", d)
        set_param(self, "covariance_type", ctype or "diag")

    def missing_parameters(self) -> list[str]:
        """Parameters of this emission kind without a value (they have priors)."""
        names = ["initial", "transition"] + (
            ["emission_probs"] if self.kwargs["emission"] == "categorical"
            else ["means", "covariances"])
        return [n for n in names if self.kwargs[n] is None]

    @property
    def event_shape(self) -> tuple:
        T = self.kwargs["length"]
        if T is None:
            raise ValueError("HMM: built without length=T; give it to sample or condition "
                             "(log_prob, posterior and viterbi take any length)")
        return (T,) if self.kwargs["emission"] == "categorical" else (T, self.kwargs["dim"])

    @staticmethod
    def story(n=None, initial=None, transition=None, emission_probs=None, means=None,
              covariances=None, emission="categorical", covariance_type="diag", k=None,
              num_symbols=None, dim=None, length=None):
        """``y`` ``[T]`` / ``[T, d]`` from a :class:`~pyro.distributions.DiscreteHMM`
        (``[n, T, ...]`` i.i.d. sequences inside ``pyro.plate("data", n)``)."""
        if length is None:
            raise ValueError("HMM: sampling needs the sequence length (length=T)")
        K, T = int(k), int(length)
        if initial is None:
            initial = pyro.sample("initial", dist.Dirichlet(torch.ones(K)))
        if transition is None:
            transition = pyro.sample("transition", dist.Dirichlet(torch.ones(K, K)).to_event(1))
        if emission == "categorical":
            if emission_probs is None:
                emission_probs = pyro.sample(
                    "emission_probs", dist.Dirichlet(torch.ones(K, int(num_symbols))).to_event(1))
            obs = dist.Categorical(probs=emission_probs.unsqueeze(-3))
        else:
            d = int(dim)
            if means is None:
                means = pyro.sample("means", dist.Normal(0.0, 5.0).expand([K, d]).to_event(2))
            if covariances is None:
                covariances = pyro.sample("covariances",
                                          dist.LogNormal(0.0, 1.0).expand([K, d]).to_event(2))
            if covariance_type == "full":
                obs = dist.MultivariateNormal(means.unsqueeze(-3),
                                              covariance_matrix=covariances.unsqueeze(-4))
            else:
                obs = dist.Normal(means.unsqueeze(-3), covariances.sqrt().unsqueeze(-3)).to_event(1)
        seq = dist.DiscreteHMM(torch.zeros(K), _time_logits(initial, transition, T), obs,
                               duration=T)
        sample_rows(n, seq)

    # ------------------------------------------------------------------ data
    def _as_data(self, y, what: str):
        """``y`` as ``[N, T]`` / ``[N, T, d]`` (any ``T >= 1``) and whether it was one sequence."""
        return _sequences(self, y, what)

    def log_emission(self, y: torch.Tensor) -> torch.Tensor:
        """``log p(y_t | x_t = k)`` ``[N, T, K]`` for sequences ``y`` ``[N, T(, d)]``;
        missing (NaN) observations give 0 (Gaussian: the density of the observed entries)."""
        p = self.kwargs
        if p["emission"] == "categorical":
            miss = torch.isnan(y)
            idx = torch.where(miss, torch.zeros_like(y), y).long()
            logB = torch.log(p["emission_probs"]).T  # [M, K]
            out = logB[idx]
            return torch.where(miss.unsqueeze(-1), torch.zeros_like(out), out)
        means, cov = p["means"], p["covariances"]
        if p["covariance_type"] == "diag":
            obs = ~torch.isnan(y).unsqueeze(-2)  # [N, T, 1, d]
            lp = dist.Normal(means, cov.sqrt()).log_prob(
                torch.nan_to_num(y, nan=0.0).unsqueeze(-2))
            return torch.where(obs, lp, torch.zeros_like(lp)).sum(-1)
        yk = y.unsqueeze(-2).expand(*y.shape[:-1], means.shape[0], y.shape[-1])
        out = gaussian_log_prob(yk, means, cov)
        all_missing = torch.isnan(y).all(-1, keepdim=True)
        return torch.where(all_missing, torch.zeros_like(out), out)

    # ------------------------------------------------------------------ recursions
    def _forward(self, logB):
        """Log forward messages ``alpha`` ``[N, T, K]`` and ``log p(y)`` ``[N]``."""
        log_init = torch.log(self.kwargs["initial"])
        log_A = torch.log(self.kwargs["transition"])
        alpha = [log_init + logB[:, 0]]
        for t in range(1, logB.shape[1]):
            alpha.append(torch.logsumexp(alpha[-1].unsqueeze(-1) + log_A, -2) + logB[:, t])
        alpha = torch.stack(alpha, 1)
        return alpha, torch.logsumexp(alpha[:, -1], -1)

    def _backward(self, logB):
        """Log backward messages ``beta`` ``[N, T, K]`` (``beta_T = 0``)."""
        log_A = torch.log(self.kwargs["transition"])
        beta = [torch.zeros_like(logB[:, -1])]
        for t in range(logB.shape[1] - 2, -1, -1):
            beta.append(torch.logsumexp(log_A + (logB[:, t + 1] + beta[-1]).unsqueeze(-2), -1))
        return torch.stack(beta[::-1], 1)

    def _log_prob_rows(self, y):
        return self._forward(self.log_emission(y))[1]

    def posterior(self, y) -> torch.Tensor:
        """State marginals ``p(x_t = k | y)`` by forward-backward.

        Parameters
        ----------
        y : array ``[T(, d)]`` or ``[N, T(, d)]`` (NaN = missing)

        Returns
        -------
        Tensor ``[T, K]`` or ``[N, T, K]``; rows sum to 1.
        """
        self._require_parameters("posterior")
        y, single = self._as_data(y, "posterior")
        with self.context():
            logB = self.log_emission(y)
            alpha, logZ = self._forward(logB)
            gamma = torch.exp(alpha + self._backward(logB) - logZ[:, None, None])
        return gamma[0] if single else gamma

    def viterbi(self, y, return_log_prob: bool = False):
        """The most likely state path ``argmax_x p(x | y)`` (max-product in log space).

        Parameters
        ----------
        y : array ``[T(, d)]`` or ``[N, T(, d)]`` (NaN = missing)
        return_log_prob : bool
            Also return ``log p(x_path, y)`` per sequence.

        Returns
        -------
        LongTensor ``[T]`` or ``[N, T]`` (and Tensor ``[]`` / ``[N]``).
        """
        self._require_parameters("viterbi")
        y, single = self._as_data(y, "viterbi")
        with self.context():
            logB = self.log_emission(y)
            log_A = torch.log(self.kwargs["transition"])
            delta = torch.log(self.kwargs["initial"]) + logB[:, 0]
            back = []
            for t in range(1, logB.shape[1]):
                delta, arg = (delta.unsqueeze(-1) + log_A).max(-2)
                delta = delta + logB[:, t]
                back.append(arg)
            best, state = delta.max(-1)
            path = [state]
            for arg in reversed(back):
                state = arg.gather(-1, state.unsqueeze(-1)).squeeze(-1)
                path.append(state)
            path = torch.stack(path[::-1], 1)
        if single:
            return (path[0], best[0]) if return_log_prob else path[0]
        return (path, best) if return_log_prob else path

    def sample_states(self, n: int = 1, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint draws of hidden paths and sequences: ``(x [n, T] long, y [n, T(, d)])``."""
        self._require_parameters("sample_states")
        n = check_int("sample_states: n", n)
        T = self.event_shape[0]
        p = self.kwargs
        gen = torch.Generator(device=p["initial"].device)
        gen.manual_seed(int(torch.randint(0, 2**62, (1,))) if seed is None else seed)
        x = [torch.multinomial(p["initial"].expand(n, -1), 1, generator=gen).squeeze(-1)]
        for _ in range(1, T):
            x.append(torch.multinomial(p["transition"][x[-1]], 1, generator=gen).squeeze(-1))
        x = torch.stack(x, 1)
        if p["emission"] == "categorical":
            probs = p["emission_probs"][x].reshape(n * T, -1)
            y = torch.multinomial(probs, 1, generator=gen).reshape(n, T).to(p["emission_probs"].dtype)
        else:
            means, cov = p["means"][x], p["covariances"][x]
            eps = torch.randn(means.shape, generator=gen, dtype=means.dtype, device=means.device)
            if p["covariance_type"] == "diag":
                y = means + cov.sqrt() * eps
            else:
                y = means + (torch.linalg.cholesky(cov) @ eps.unsqueeze(-1)).squeeze(-1)
        return x, y

    # ------------------------------------------------------------------ Baum-Welch
    @classmethod
    @renamed_keywords(max_iter="max_iters")
    def mle(cls, data, k: int, *, emission: str | None = None, num_symbols: int | None = None,
            covariance_type: str = "full", max_iters: int = 200, tol: float = 1e-8,
            n_init: int = 1, seed: int = 0, init: HMM | None = None,
            min_covar: float = 1e-6) -> HMM:
        """Maximum likelihood by Baum-Welch (EM on the complete-data likelihood).

        Parameters
        ----------
        data : array ``[N, T]`` (symbols) or ``[N, T, d]`` (vectors); NaN = missing. A
            single sequence ``[T]`` is read as categorical, ``[T, d]`` as Gaussian only if
            ``emission="gaussian"``.
        k : int
            Number of hidden states.
        emission : {"categorical", "gaussian"}, optional
            Default: categorical for integer-valued 2-D data, else Gaussian.
        num_symbols : int, optional
            ``M`` (default: largest symbol + 1).
        covariance_type : {"full", "diag"}
        max_iters, tol : int, float
            (``max_iter`` is the deprecated name of ``max_iters``.)
            Stop when the mean log-likelihood per sequence changes by less than ``tol``.
        n_init : int
            Random restarts (seeds ``seed, seed+1, ...``); the best log-likelihood wins.
        init : HMM, optional
            Start from these parameters instead (``n_init`` is then ignored).
        min_covar : float
            Added to covariance diagonals (Gaussian emissions).

        Returns
        -------
        HMM
            With the fit record :class:`~genprog.models.gaussian.EMInfo` as ``info``
            (``num_iters``: M-steps; ``trace``: mean log-likelihood per sequence before each
            M-step and at the end; a ``ConvergenceWarning`` is raised if EM stops unconverged). Partially missing
            Gaussian vectors are supported with ``covariance_type="diag"`` only.
        """
        k = check_int("HMM.mle: k", k)
        y, emission, M, d = _mle_data(data, emission, num_symbols)
        if covariance_type not in _COV_TYPES:
            raise ValueError(f"HMM.mle: covariance_type must be one of {_COV_TYPES}, "
                             f"got {covariance_type!r}")
        if emission == "gaussian" and covariance_type == "full":
            nan = torch.isnan(y)
            if bool((nan.any(-1) & ~nan.all(-1)).any()):
                raise ValueError("HMM.mle: partially missing vectors need covariance_type='diag' "
                                 "(or NaN whole time steps)")
        n_init = check_int("HMM.mle: n_init", n_init)
        starts = [init] if init is not None else [
            _random_start(cls, y, k, emission, M, d, covariance_type, seed + i)
            for i in range(n_init)]
        best = None
        for start in starts:
            model, info = _baum_welch(start.to(device=y.device, dtype=y.dtype), y, max_iters, tol,
                                      min_covar)
            if best is None or info.log_likelihood > best[1].log_likelihood:
                best = (model, info)
        model, info = best
        warn_unconverged("HMM.mle", info)
        model = model._with_params(length=int(y.shape[1])).to(device=y.device, dtype=y.dtype)
        model.info = info
        return model


# ---------------------------------------------------------------------- helpers
def _time_logits(initial, transition, T):
    """Time-varying transition logits ``[..., T, K, K]`` whose first step ignores the
    (dummy) previous state and draws ``x_1 ~ initial``: Pyro's DiscreteHMM starts from a
    state before the first observation."""
    K = transition.shape[-1]
    batch = torch.broadcast_shapes(initial.shape[:-1], transition.shape[:-2])
    first = torch.log(initial)[..., None, None, :].expand(*batch, 1, K, K)
    rest = torch.log(transition)[..., None, :, :].expand(*batch, T - 1, K, K)
    return torch.cat([first, rest], -3)


def _sequences(model, y, what):
    """Validate sequences for ``model``: ``[N, T]`` / ``[N, T, d]`` and a single-row flag."""
    t = as_tensor(y, model.device, model.dtype, name=f"{what}: y")
    if not torch.is_tensor(t):
        t = torch.as_tensor(t, device=model.device, dtype=model.dtype or torch.get_default_dtype())
    if not t.is_floating_point():
        t = t.to(model.dtype or torch.get_default_dtype())
    cat = model.kwargs["emission"] == "categorical"
    base = 1 if cat else 2
    if t.dim() not in (base, base + 1) or (not cat and t.shape[-1] != model.kwargs["dim"]) \
            or t.shape[-1 if cat else -2] < 1:
        want = "[T] or [N, T]" if cat else f"[T, {model.kwargs['dim']}] or [N, T, {model.kwargs['dim']}]"
        raise ValueError(f"{what}: y must be {want}; got {list(t.shape)}")
    single = t.dim() == base
    if single:
        t = t.unsqueeze(0)
    if torch.isinf(t).any():
        raise ValueError(f"{what}: y has infinite entries")
    if cat:
        ok = t[~torch.isnan(t)]
        M = model.kwargs["num_symbols"]
        if not bool(((ok == ok.round()) & (ok >= 0) & (ok < M)).all()):
            raise ValueError(f"{what}: categorical y must hold symbols in 0..{M - 1} (or NaN)")
    return t, single


def _mle_data(data, emission, num_symbols):
    y = as_tensor(data, None, _data_dtype(data), name="HMM.mle: data")
    if not torch.is_tensor(y):
        raise TypeError(f"HMM.mle: data must be an array, got {type(data).__name__}")
    if not y.is_floating_point():
        emission = emission or "categorical"
        y = y.to(torch.float64)
    if emission is None:
        ok = y[~torch.isnan(y)]
        emission = "categorical" if y.dim() == 2 and bool((ok == ok.round()).all()) else "gaussian"
    if emission not in _EMISSIONS:
        raise ValueError(f"HMM.mle: emission must be one of {_EMISSIONS}, got {emission!r}")
    base = 2 if emission == "categorical" else 3
    if y.dim() == base - 1:
        y = y.unsqueeze(0)
    if y.dim() != base:
        raise ValueError(f"HMM.mle: {emission} data must be {'[N, T]' if base == 2 else '[N, T, d]'}"
                         f", got shape {list(y.shape)}")
    if torch.isinf(y).any():
        raise ValueError("HMM.mle: data has infinite entries")
    if bool(torch.isnan(y).all()):
        raise ValueError("HMM.mle: every observation is missing")
    M = d = None
    if emission == "categorical":
        ok = y[~torch.isnan(y)]
        if not bool(((ok == ok.round()) & (ok >= 0)).all()):
            raise ValueError("HMM.mle: categorical data must hold non-negative integer symbols")
        M = int(ok.max()) + 1 if num_symbols is None else check_int("HMM.mle: num_symbols",
                                                                     num_symbols)
        if int(ok.max()) >= M:
            raise ValueError(f"HMM.mle: data has symbol {int(ok.max())} >= num_symbols={M}")
    else:
        d = int(y.shape[-1])
    return y, emission, M, d


def _data_dtype(data):
    """Keep a floating tensor's dtype; NumPy and integer data become float64."""
    if torch.is_tensor(data) and data.is_floating_point():
        return data.dtype
    return torch.float64


def _random_start(cls, y, K, emission, M, d, covariance_type, seed):
    gen = torch.Generator().manual_seed(seed)
    dt = y.dtype
    initial = torch.full((K,), 1.0 / K, dtype=dt, device=y.device)
    transition = 0.5 * torch.eye(K, dtype=dt, device=y.device) + 0.5 / K
    if emission == "categorical":
        return cls(initial=initial, transition=transition, emission_probs=_dirichlet(gen, K, M, dt))
    flat = y.reshape(-1, d)
    rows = flat[~torch.isnan(flat).any(-1)]
    if rows.shape[0] < K:
        raise ValueError(f"HMM.mle: need at least k={K} fully observed vectors to start EM")
    means = rows[torch.randperm(rows.shape[0], generator=gen)[:K].to(rows.device)]
    var = rows.var(0) + 1e-6
    cov = torch.diag(var).expand(K, d, d).clone() if covariance_type == "full" \
        else var.expand(K, d).clone()
    return cls(initial=initial, transition=transition, means=means, covariances=cov)


def _dirichlet(gen, K, M, dt):
    g = -torch.log(torch.rand(K, M, generator=gen, dtype=dt))  # Gamma(1) draws
    g = g + 2.0  # keep away from the simplex edges
    return g / g.sum(-1, keepdim=True)


def _baum_welch(model: HMM, y, max_iters, tol, min_covar):
    N, T = y.shape[:2]
    p = dict(model.params)
    trace, prev, converged, it = [], None, False, 0
    for it in range(max_iters + 1):  # it = M-steps done so far
        logB = model.log_emission(y)
        alpha, logZ = model._forward(logB)
        ll = float(logZ.sum())
        trace.append(ll / N)
        if not math.isfinite(ll):
            raise ValueError("HMM.mle: the log-likelihood became non-finite during EM")
        if prev is not None and abs(ll / N - prev) < tol:
            converged = True
            break
        if it == max_iters:
            break
        prev = ll / N
        beta = model._backward(logB)
        gamma = torch.exp(alpha + beta - logZ[:, None, None])  # [N, T, K]
        log_A = torch.log(p["transition"])
        if T > 1:
            log_xi = (alpha[:, :-1, :, None] + log_A + (logB[:, 1:] + beta[:, 1:])[:, :, None, :]
                      - logZ[:, None, None, None])
            xi = torch.exp(log_xi).sum((0, 1))
            transition = xi / xi.sum(-1, keepdim=True).clamp_min(torch.finfo(y.dtype).tiny)
            # states never left keep their row
            transition = torch.where(xi.sum(-1, keepdim=True) > 0, transition, p["transition"])
        else:
            transition = p["transition"]
        p["initial"] = gamma[:, 0].mean(0)
        p["transition"] = transition
        if p["emission"] == "categorical":
            M = p["num_symbols"]
            obs = ~torch.isnan(y)
            idx = torch.where(obs, y, torch.zeros_like(y)).long()
            onehot = torch.nn.functional.one_hot(idx, M).to(y.dtype) * obs.unsqueeze(-1)
            counts = torch.einsum("ntk,ntm->km", gamma, onehot)
            tot = counts.sum(-1, keepdim=True)
            p["emission_probs"] = torch.where(tot > 0, counts / tot.clamp_min(1e-300),
                                              p["emission_probs"])
        else:
            obs = ~torch.isnan(y)  # [N, T, d]
            y0 = torch.where(obs, y, torch.zeros_like(y))
            if p["covariance_type"] == "diag":
                w = gamma.unsqueeze(-1) * obs.unsqueeze(-2)  # [N, T, K, d]
                sw = w.sum((0, 1)).clamp_min(1e-300)
                means = (w * y0.unsqueeze(-2)).sum((0, 1)) / sw
                var = (w * (y0.unsqueeze(-2) - means) ** 2).sum((0, 1)) / sw
                p["means"], p["covariances"] = means, var + min_covar
            else:
                w = gamma * obs.all(-1, keepdim=True)  # whole-step missing only
                sw = w.sum((0, 1)).clamp_min(1e-300)  # [K]
                means = torch.einsum("ntk,ntd->kd", w, y0) / sw[:, None]
                r = y0.unsqueeze(-2) - means  # [N, T, K, d]
                cov = torch.einsum("ntk,ntki,ntkj->kij", w, r, r) / sw[:, None, None]
                cov = 0.5 * (cov + cov.transpose(-1, -2))
                eye = torch.eye(cov.shape[-1], dtype=y.dtype, device=y.device)
                p["means"], p["covariances"] = means, cov + min_covar * eye
        model = type(model)(**p).to(device=y.device, dtype=y.dtype)
    info = EMInfo(log_likelihood=trace[-1] * N, num_iters=it, converged=converged,
                  trace=tuple(trace))
    return model, info
