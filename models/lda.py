"""Latent Dirichlet allocation over bag-of-words counts: :class:`LDA` (Blei, Ng & Jordan 2003).

``theta_d ~ Dirichlet(alpha)`` (topic proportions of document ``d``, ``[K]``),
``y_d | theta_d ~ Multinomial(N_d, theta_d @ topics)`` (word counts ``[V]``; summing the
token-level topic assignments out gives exactly this). ``topics [K, V]`` are the word
distributions of the ``K`` topics.

Documents are count vectors ``y [D, V]`` (a token list ``[w_1, ..., w_N]`` becomes one with
``numpy.bincount(tokens, minlength=V)``). ``log p`` is that of the counts *given the
document's length* ``N_d = y_d.sum()`` (the multinomial coefficient included, as in
:class:`torch.distributions.Multinomial`); the length model (Blei's ``Poisson(xi)``) is
independent of the topics and left out. The story draws documents of length
``doc_length``.

``log p(y_d)`` integrates ``theta_d`` over the simplex and has no closed form for
``K > 1``: it is estimated by importance sampling (:meth:`LDA._log_prob_estimate`,
an :class:`~genprog.Estimate` with a delta-method error bar). The posterior over ``theta``
is approximated by mean-field VI (:meth:`LDA.posterior_estimate`), and :meth:`LDA.mle` is
variational EM.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch

from genprog.errors import ConvergenceWarning
from genprog.estimate import Estimate
from genprog.inputs import as_tensor
from genprog.rng import seeded
from genprog.validation import check_int

from .base import ZooModel, data_plate, deprecated_record, renamed_keywords
from .gaussian import keep_float64, set_param

_TINY = 1e-100


def multinomial_log_coefficient(y: torch.Tensor) -> torch.Tensor:
    """``log (N! / prod_w y_w!)`` of count rows ``y [..., V]``: ``[...]``."""
    return torch.lgamma(y.sum(-1) + 1) - torch.lgamma(y + 1).sum(-1)


class LDA(ZooModel):
    """Latent Dirichlet allocation; ``y`` is one document's word counts ``[V]``.

    Parameters
    ----------
    topics : Tensor ``[K, V]``, optional
        Word distributions, rows non-negative summing to 1 (prior: rows
        ``Dirichlet(topic_concentration)`` when None).
    alpha : float or Tensor ``[K]``, optional
        Dirichlet concentration of the topic proportions (a float: symmetric); prior
        ``Gamma(1, 1)`` per topic when None.
    k, vocab_size : int, optional
        ``K`` and ``V``; needed only when ``topics`` is not given.
    doc_length : int
        Words per sampled document.
    topic_concentration : float
        The topics' Dirichlet prior concentration (used when ``topics`` is None).

    Attributes
    ----------
    info : LDAInfo
        Set by :meth:`mle`, the fit record (:class:`LDAInfo`): ``elbo`` (float, evidence
        lower bound on ``sum_d log p(y_d | N_d)`` at the returned parameters, nats),
        ``num_iters`` (int), ``converged`` (bool), ``trace`` (tuple of float, ELBO per word
        after each iteration), ``doc_topic`` (Tensor ``[D, K]``, variational Dirichlet
        parameters of the training documents).
    em_info : LDAInfo
        Deprecated name of ``info`` (the same record; read-only).

    Examples
    --------
    >>> import torch
    >>> lda = LDA(topics=torch.tensor([[0.9, 0.1], [0.1, 0.9]]), alpha=1.0, doc_length=5)
    >>> lda.sample(3, seed=0)["y"].sum(-1).tolist()
    [5.0, 5.0, 5.0]
    """

    mle_kind = "variational EM"
    em_info = deprecated_record("em_info")

    def __init__(self, *, topics=None, alpha=None, k=None, vocab_size=None, doc_length: int = 100,
                 topic_concentration: float = 0.1):
        k = None if k is None else check_int("LDA: k", k)
        vocab_size = None if vocab_size is None else check_int("LDA: vocab_size", vocab_size)
        doc_length = None if doc_length is None else check_int("LDA: doc_length", doc_length)
        if not float(topic_concentration) > 0:
            raise ValueError(f"LDA: topic_concentration must be > 0, got {topic_concentration}")
        super().__init__(topics=topics, alpha=alpha, k=k, vocab_size=vocab_size,
                         doc_length=doc_length, topic_concentration=float(topic_concentration))
        keep_float64(self)
        topics, alpha = self.kwargs["topics"], self.kwargs["alpha"]
        ks = {k} if k else set()
        vs = {vocab_size} if vocab_size else set()
        if topics is not None:
            if not torch.is_tensor(topics) or topics.dim() != 2:
                raise ValueError("LDA: topics must be a matrix [K, V]")
            if not bool(torch.isfinite(topics).all()) or bool((topics < 0).any()):
                raise ValueError("LDA: topics must be finite and non-negative")
            sums = topics.sum(-1)
            if float((sums - 1).abs().max()) > 1e-5:
                raise ValueError(f"LDA: each row of topics must sum to 1, got sums {sums.tolist()}")
            ks.add(int(topics.shape[0]))
            vs.add(int(topics.shape[1]))
        if alpha is not None:
            a = torch.as_tensor(alpha)
            if a.dim() > 1 or not bool(torch.isfinite(a).all()) or bool((a <= 0).any()):
                raise ValueError("LDA: alpha must be a positive float or a positive vector [K]")
            if a.dim() == 1:
                ks.add(int(a.shape[0]))
        if len(ks) > 1 or len(vs) > 1:
            raise ValueError(f"LDA: topics, alpha, k and vocab_size disagree: K in {sorted(ks)}, "
                             f"V in {sorted(vs)}")
        if not ks or not vs:
            raise ValueError("LDA: give topics, or k and vocab_size for the priors")
        set_param(self, "k", ks.pop())
        set_param(self, "vocab_size", vs.pop())

    @staticmethod
    def story(n=None, topics=None, alpha=None, k=None, vocab_size=None, doc_length=100,
              topic_concentration=0.1):
        """``theta ~ Dirichlet(alpha)``, ``y ~ Multinomial(doc_length, theta @ topics)``."""
        K, V = int(k), int(vocab_size)
        if topics is None:
            topics = pyro.sample("topics", dist.Dirichlet(torch.full((K, V), float(topic_concentration)))
                                 .to_event(1))
        if alpha is None:
            alpha = pyro.sample("alpha", dist.Gamma(1.0, 1.0).expand([K]).to_event(1))
        alpha = torch.as_tensor(alpha)
        if alpha.dim() == 0:
            alpha = alpha.expand(K)
        with data_plate(n):
            theta = pyro.sample("theta", dist.Dirichlet(alpha))
            probs = (theta.unsqueeze(-1) * topics).sum(-2)
            pyro.sample("y", dist.Multinomial(int(doc_length), probs=probs))

    @property
    def event_shape(self) -> tuple:
        return (int(self.kwargs["vocab_size"]),)

    def _alpha(self) -> torch.Tensor:
        a = torch.as_tensor(self.kwargs["alpha"], dtype=self.kwargs["topics"].dtype,
                            device=self.kwargs["topics"].device)
        return a.expand(int(self.kwargs["k"])) if a.dim() == 0 else a

    def _counts(self, y, what):
        x, single = self._as_data(y, what)
        if bool((x < 0).any()) or not torch.equal(x, x.round()):
            raise ValueError(f"LDA.{what}: y must be non-negative integer word counts")
        return x, single

    # ------------------------------------------------------------------ variational posterior
    @renamed_keywords(max_iter="max_iters")
    def posterior_estimate(self, y, *, max_iters: int = 200, tol: float = 1e-6):
        """Mean-field approximation ``q(theta_d) = Dirichlet(gamma_d)`` of ``p(theta_d | y_d)``
        (Blei et al. 2003, the E-step of variational EM; approximate, no error bar).

        Parameters
        ----------
        y : Tensor ``[V]`` or ``[D, V]`` of counts
        max_iters, tol : int, float
            Fixed-point iterations of the E-step, and the change in ``gamma`` at which they
            stop (``max_iter`` is the deprecated name of ``max_iters``).

        Returns
        -------
        pyro.distributions.Dirichlet
            Batch shape ``[]`` or ``[D]``, event ``[K]``.
        """
        self._require_parameters("posterior_estimate")
        x, single = self._counts(y, "posterior_estimate")
        with self.context():
            gamma, _ = _e_step(x, self.kwargs["topics"], self._alpha(), max_iters, tol)
        return dist.Dirichlet(gamma[0] if single else gamma)

    def _log_prob_estimate(self, y, *, num_samples: int = 1000, proposal: str = "variational",
                           seed: int = 0, batch_size: int = 250) -> Estimate:
        """Importance-sampling estimate of ``sum_d log p(y_d | N_d)``, in nats.

        For each document, ``theta^(s) ~ q`` and ``w_s = p(y_d | theta^(s)) p(theta^(s)) /
        q(theta^(s))``; ``log p(y_d) ≈ log mean_s w_s`` with the delta-method stderr
        ``sd(w) / (sqrt(S) mean(w))``; documents are independent, so values add and
        variances add.

        Parameters
        ----------
        y : Tensor ``[D, V]`` (or ``[V]``) of counts
        num_samples : int
            ``S`` draws per document.
        proposal : {"variational", "prior"}
            ``"prior"``: ``q = Dirichlet(alpha)`` (fine for short documents);
            ``"variational"``: the defensive mixture ``0.9 Dirichlet(gamma_d / 2) + 0.1
            Dirichlet(alpha)`` around the mean-field posterior ``Dirichlet(gamma_d)`` (halving the
            concentration keeps its mean and widens it; the prior component bounds the
            weights by ``10 p(y_d | theta)``).
        seed : int
        batch_size : int
            Draws processed at once (memory ``batch_size * D * V``).

        Returns
        -------
        Estimate
            ``method="is"``; ``details``: ``pointwise`` (Tensor ``[D]``), ``pointwise_stderr``
            (``[D]``), ``min_ess`` (smallest effective sample size over documents),
            ``proposal``.
        """
        self._require_parameters("_log_prob_estimate")
        if proposal not in ("variational", "prior"):
            raise ValueError(f"LDA._log_prob_estimate: unknown proposal {proposal!r}; choose "
                             "'variational' or 'prior'")
        num_samples = check_int("LDA._log_prob_estimate: num_samples", num_samples, 2)
        batch_size = check_int("LDA._log_prob_estimate: batch_size", batch_size)
        start = time.perf_counter()
        x, _ = self._counts(y, "_log_prob_estimate")
        topics, alpha = self.kwargs["topics"], self._alpha()
        D = x.shape[0]
        with self.context(), seeded(seed), torch.no_grad():
            prior = dist.Dirichlet(alpha)
            if proposal == "variational":
                gamma, _ = _e_step(x, topics, alpha, 200, 1e-6)
                wide = dist.Dirichlet(0.5 * gamma)
            coef = multinomial_log_coefficient(x)
            logw = []
            for s0 in range(0, num_samples, batch_size):
                S = min(batch_size, num_samples - s0)
                if proposal == "prior":
                    theta = prior.sample((S, D))
                    lw = torch.zeros(S, D, dtype=x.dtype, device=x.device)
                else:
                    use_prior = torch.rand(S, D, device=x.device) < 0.1
                    theta = torch.where(use_prior.unsqueeze(-1), prior.sample((S, D)),
                                        wide.sample((S,)))
                    theta = theta.clamp_min(torch.finfo(x.dtype).tiny)
                    theta = theta / theta.sum(-1, keepdim=True)
                    log_q = torch.logaddexp(math.log(0.9) + wide.log_prob(theta),
                                            math.log(0.1) + prior.log_prob(theta))
                    lw = prior.log_prob(theta) - log_q
                probs = (theta @ topics).clamp_min(_TINY)  # [S, D, V]
                lw = lw + (x * torch.log(probs)).sum(-1) + coef
                logw.append(lw)
            logw = torch.cat(logw, 0)  # [S, D]
            m = logw.max(0).values
            w = torch.exp(logw - m)
            mean = w.mean(0)
            values = m + torch.log(mean)
            se = w.std(0) / (math.sqrt(num_samples) * mean)
            ess = w.sum(0) ** 2 / (w ** 2).sum(0)
        return Estimate(float(values.sum()), float(se.pow(2).sum().sqrt()), "is",
                        num_samples=num_samples, num_evaluations=num_samples * D,
                        wall_time_s=time.perf_counter() - start,
                        details={"pointwise": values, "pointwise_stderr": se,
                                 "min_ess": float(ess.min()), "proposal": proposal})

    # ------------------------------------------------------------------ variational EM
    @classmethod
    @renamed_keywords(max_iter="max_iters")
    def mle(cls, data, k: int, *, alpha=None, max_iters: int = 200, tol: float = 1e-6,
            n_init: int = 1, seed: int = 0, doc_length: int | None = None) -> LDA:
        """Variational EM (Blei et al. 2003): mean-field E-steps for every document at once
        (``q(theta_d) = Dirichlet(gamma_d)``, token assignments summed in closed form per
        word type), then ``topics`` in closed form and — when ``alpha`` is None — ``alpha``
        by Minka's fixed point for the Dirichlet.

        Parameters
        ----------
        data : array ``[D, V]`` of word counts
        k : int
            Number of topics.
        alpha : float or array ``[K]``, optional
            Fixed concentration; None learns an asymmetric one (initialised at ``1 / K``).
        max_iters : int
            ``max_iter`` is its deprecated name.
        tol : float
            Stop when the ELBO per word changes by less than ``tol`` nats.
        n_init : int
            Restarts from random topics; the highest ELBO wins.
        seed : int
        doc_length : int, optional
            ``doc_length`` of the returned model (default: the mean document length).

        Returns
        -------
        LDA
            With a :class:`LDAInfo` as attribute ``info``; a ``ConvergenceWarning`` when the
            best restart stopped unconverged.
        """
        keep = torch.is_tensor(data) and data.is_floating_point()
        x = as_tensor(data, data.device if keep else None,
                      data.dtype if keep else torch.float64, name="LDA.mle: data")
        if not torch.is_tensor(x):
            raise TypeError(f"LDA.mle: data must be a count matrix [D, V], got {type(data).__name__}")
        if not x.is_floating_point():
            x = x.to(torch.float64)
        if x.dim() != 2 or x.shape[0] < 2:
            raise ValueError(f"LDA.mle: data must be [D, V] with D >= 2, got {list(x.shape)}")
        if not bool(torch.isfinite(x).all()) or bool((x < 0).any()) or not torch.equal(x, x.round()):
            raise ValueError("LDA.mle: data must be non-negative integer word counts")
        K = check_int("LDA.mle: k", k)
        n_init = check_int("LDA.mle: n_init", n_init)
        V = x.shape[1]
        learn_alpha = alpha is None
        a0 = (torch.full((K,), 1.0 / K, dtype=x.dtype, device=x.device) if learn_alpha else
              torch.as_tensor(alpha, dtype=x.dtype, device=x.device).expand(K).clone())
        if bool((a0 <= 0).any()):
            raise ValueError("LDA.mle: alpha must be positive")
        g = torch.Generator(device=x.device).manual_seed(seed)
        best = None
        for _ in range(n_init):
            # random topics near the corpus word frequencies
            freq = (x.sum(0) + 1) / (x.sum() + V)
            noise = -torch.log(torch.rand(K, V, generator=g, device=x.device, dtype=x.dtype))
            topics = freq * noise
            topics = topics / topics.sum(-1, keepdim=True)
            res = _variational_em(x, topics, a0.clone(), learn_alpha, max_iters, tol)
            if best is None or res[2].elbo > best[2].elbo:
                best = res
        topics, a, info = best
        if not info.converged:
            warnings.warn(f"LDA.mle: variational EM stopped unconverged after {info.num_iters} "
                          "iterations; raise max_iters or tol", ConvergenceWarning, stacklevel=2)
        if doc_length is None:
            doc_length = max(1, round(float(x.sum(-1).mean())))
        model = cls(topics=topics, alpha=a, doc_length=doc_length).to(device=x.device, dtype=x.dtype)
        model.info = info
        return model


@dataclass(frozen=True)
class LDAInfo:
    """Record of a variational EM fit.

    Attributes
    ----------
    elbo : float
        Evidence lower bound on ``sum_d log p(y_d | N_d)`` at the returned parameters, nats.
    num_iters : int
    converged : bool
    trace : tuple[float, ...]
        ELBO per word after each iteration (non-decreasing, up to E-step tolerance).
    doc_topic : Tensor ``[D, K]``
        Variational Dirichlet parameters ``gamma`` of the training documents.
    """

    elbo: float
    num_iters: int
    converged: bool
    trace: tuple
    doc_topic: torch.Tensor


def _e_step(x, topics, alpha, max_iters, tol):
    """Mean-field E-step for every document: ``gamma [D, K]`` and the ELBO ``[D]``.

    With ``phi_dwk ∝ exp(E[log theta_dk]) topics_kw`` in closed form, ``gamma_d = alpha +
    sum_w y_dw phi_dw``, iterated to a fixed point (vectorized over documents)."""
    D = x.shape[0]
    gamma = alpha + x.sum(-1, keepdim=True) / alpha.shape[0]
    for _ in range(max_iters):
        e = torch.exp(torch.digamma(gamma) - torch.digamma(gamma.sum(-1, keepdim=True)))
        norm = (e @ topics).clamp_min(_TINY)
        new = alpha + e * ((x / norm) @ topics.T)
        done = float((new - gamma).abs().mean()) < tol
        gamma = new
        if done:
            break
    return gamma, _elbo_docs(x, topics, alpha, gamma) if D else None


def _elbo_docs(x, topics, alpha, gamma):
    """ELBO per document, with ``phi`` optimal for ``gamma`` (so the token terms collapse to
    ``sum_w y_dw log sum_k exp(E[log theta_dk]) topics_kw``)."""
    elog = torch.digamma(gamma) - torch.digamma(gamma.sum(-1, keepdim=True))
    tokens = (x * torch.log((torch.exp(elog) @ topics).clamp_min(_TINY))).sum(-1)
    p_theta = (torch.lgamma(alpha.sum()) - torch.lgamma(alpha).sum()
               + ((alpha - 1) * elog).sum(-1))
    q_theta = (torch.lgamma(gamma.sum(-1)) - torch.lgamma(gamma).sum(-1)
               + ((gamma - 1) * elog).sum(-1))
    return tokens + p_theta - q_theta + multinomial_log_coefficient(x)


def _inverse_digamma(y, iters: int = 6):
    """``psi^{-1}(y)`` by Newton's method from Minka's initialisation."""
    x = torch.where(y >= -2.22, torch.exp(y) + 0.5, -1 / (y + 0.5772156649015329))
    for _ in range(iters):
        x = x - (torch.digamma(x) - y) / torch.polygamma(1, x)
    return x


def _variational_em(x, topics, alpha, learn_alpha, max_iters, tol):
    words = float(x.sum())
    trace, converged, gamma = [], False, None
    for it in range(1, max_iters + 1):
        gamma, _ = _e_step(x, topics, alpha, 100, 1e-5)
        e = torch.exp(torch.digamma(gamma) - torch.digamma(gamma.sum(-1, keepdim=True)))
        norm = (e @ topics).clamp_min(_TINY)
        stats = topics * (e.T @ (x / norm))  # expected topic-word counts [K, V]
        topics = (stats + _TINY) / (stats + _TINY).sum(-1, keepdim=True)
        if learn_alpha:
            elog = torch.digamma(gamma) - torch.digamma(gamma.sum(-1, keepdim=True))
            mean_elog = elog.mean(0)
            for _ in range(20):  # Minka's fixed point for the Dirichlet MLE
                alpha = _inverse_digamma(torch.digamma(alpha.sum()) + mean_elog)
        trace.append(float(_elbo_docs(x, topics, alpha, gamma).sum()) / words)
        if it > 1 and abs(trace[-1] - trace[-2]) < tol:
            converged = True
            break
    gamma, elbo = _e_step(x, topics, alpha, 200, 1e-6)
    return topics, alpha, LDAInfo(float(elbo.sum()), it, converged, tuple(trace), gamma)
