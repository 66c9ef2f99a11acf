"""Generative adversarial network (Goodfellow et al. 2014): an implicit model.

The story, one row: ``z ~ N(0, I_k)`` (latent site ``"z"``) and ``y = generator(z)``, a
deterministic push-forward written as ``pyro.sample("y", Delta(generator(z), event_dim=1))``
so genprog's generic ancestral ``sample`` draws from the model unchanged. ``y`` lies on
the image of the generator, a ``k``-dimensional set in ``R^d``: it has no density, so
``log_prob`` and ``log_marginal`` raise (``has_density = False``; the capability table says
"unavailable"), and a GAN is judged by its samples — :func:`two_sample_test` (kernel MMD
with a permutation p-value) against held-out data.

Training (:meth:`GAN.mle`, ``mle_kind = "adversarial"``): the non-saturating GAN
objective, alternating Adam steps on the discriminator (logistic loss, real vs generated)
and on the generator (``-log D(G(z))``), for a fixed number of steps with both loss
traces recorded — there is no likelihood whose plateau would signal convergence.

Shapes: ``d`` (``dim``) coordinates of ``y``, ``k`` (``latent_dim``); data ``[N, d]``.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from genprog.validation import check_int

from .base import ZooModel, data_plate
from .two_sample import MMDTest, mmd_test


def mlp(n_in: int, hidden, n_out: int, activation=nn.LeakyReLU) -> nn.Sequential:
    """``n_in -> hidden... -> n_out`` with ``activation`` between linear layers."""
    layers, prev = [], n_in
    for width in hidden:
        layers += [nn.Linear(prev, int(width)), activation()]
        prev = int(width)
    layers.append(nn.Linear(prev, n_out))
    return nn.Sequential(*layers)


class GAN(ZooModel):
    """A GAN over ``y [d]``: ``y = generator(z)``, ``z ~ N(0, I_k)``.

    Parameters
    ----------
    generator : torch.nn.Module
        ``z [..., k] -> y [..., d]``.
    discriminator : torch.nn.Module, optional
        ``y [..., d] -> logit [..., 1]`` (used in training only).
    latent_dim : int
        ``k``.

    Examples
    --------
    >>> import torch
    >>> gan = GAN(generator=torch.nn.Linear(2, 3), latent_dim=2)
    >>> gan.sample(5, seed=0)["y"].shape
    torch.Size([5, 3])
    >>> GAN.capabilities()["log_prob"]
    'unavailable'
    """

    has_density = False
    mle_kind = "adversarial"

    def __init__(self, *, generator, discriminator=None, latent_dim: int):
        latent_dim = check_int("GAN: latent_dim", latent_dim)
        if not isinstance(generator, nn.Module):
            raise TypeError(f"GAN: generator must be a torch.nn.Module, got {type(generator).__name__}")
        if discriminator is not None and not isinstance(discriminator, nn.Module):
            raise TypeError("GAN: discriminator must be a torch.nn.Module, got "
                            f"{type(discriminator).__name__}")
        p = next(generator.parameters(), None)
        ref = {"device": p.device, "dtype": p.dtype} if p is not None else {}
        with torch.no_grad():
            out = generator(torch.zeros(1, latent_dim, **ref))
        if not torch.is_tensor(out) or out.dim() != 2 or out.shape[0] != 1:
            raise ValueError(f"GAN: generator(z [1, {latent_dim}]) must give [1, d]; got "
                             f"{list(out.shape) if torch.is_tensor(out) else type(out).__name__}")
        dim = int(out.shape[1])
        if discriminator is not None:
            with torch.no_grad():
                logit = discriminator(out)
            if not torch.is_tensor(logit) or tuple(logit.shape) != (1, 1):
                raise ValueError(f"GAN: discriminator(y [1, {dim}]) must give [1, 1]")
        super().__init__(generator=generator, discriminator=discriminator,
                         latent_dim=latent_dim, dim=dim)

    @staticmethod
    def story(n=None, generator=None, discriminator=None, latent_dim=1, dim=None):
        """``z ~ N(0, I_k)``, ``y = generator(z)`` (a ``Delta`` site: no density)."""
        p = next(generator.parameters(), None)
        ref = {"device": p.device, "dtype": p.dtype} if p is not None else {}
        prior = dist.Normal(torch.zeros(latent_dim, **ref), torch.ones(latent_dim, **ref)).to_event(1)
        with data_plate(n):
            z = pyro.sample("z", prior)
            return pyro.sample("y", dist.Delta(generator(z), event_dim=1))

    @property
    def event_shape(self) -> tuple:
        return (int(self.kwargs["dim"]),)

    @property
    def generator(self) -> nn.Module:
        return self.kwargs["generator"]

    @property
    def discriminator(self) -> nn.Module | None:
        return self.kwargs["discriminator"]

    def to(self, device=None, dtype=None) -> GAN:
        """Also moves the networks."""
        for net in (self.generator, self.discriminator):
            if net is not None:
                net.to(device=device, dtype=dtype)
        return super().to(device, dtype)

    def _exact_log_marginal(self):
        raise ValueError("GAN is an implicit model: y = generator(z) has no density, so "
                         "log p(y) (log_prob, log_marginal) is not defined; judge samples with "
                         "genprog.models.gan.two_sample_test")

    def push(self, z) -> torch.Tensor:
        """``generator(z)``: ``z [..., k] -> y [..., d]`` (no gradient)."""
        p = next(self.generator.parameters(), None)
        z = torch.as_tensor(z)
        if p is not None:
            z = z.to(device=p.device, dtype=p.dtype)
        if z.shape[-1] != int(self.kwargs["latent_dim"]):
            raise ValueError(f"GAN.push: z must end in latent_dim={self.kwargs['latent_dim']}, "
                             f"got shape {list(z.shape)}")
        with torch.no_grad():
            return self.generator(z)

    def two_sample_test(self, held_out, num_samples: int | None = None, *, seed: int = 0,
                        **options) -> TwoSampleTest:
        """Sample quality: :func:`two_sample_test` of ``num_samples`` draws of the model
        (default: as many as ``held_out`` rows) against ``held_out [M, d]``."""
        held_out = torch.as_tensor(held_out)
        n = num_samples or int(held_out.shape[0])
        draws = self.sample(n, seed=seed)["y"]
        return two_sample_test(draws, held_out.to(draws), seed=seed, **options)

    # ------------------------------------------------------------------ training
    @classmethod
    def mle(cls, y, *, latent_dim: int = 2, hidden=(64, 64), generator=None, discriminator=None,
            steps: int = 2000, batch_size: int = 128, learning_rate: float = 1e-3,
            betas=(0.5, 0.999), discriminator_steps: int = 1, seed: int = 0,
            progress: bool | None = None) -> GAN:
        """Adversarial training on ``y [N, d]`` with the non-saturating loss.

        Each step: ``discriminator_steps`` Adam updates of the discriminator on
        ``softplus(-D(x)) + softplus(D(G(z)))`` (logistic loss, a real minibatch against a
        generated one), then one Adam update of the generator on ``softplus(-D(G(z)))``
        (``-log sigmoid D(G(z))``). Runs exactly ``steps`` steps (there is no likelihood to
        watch for convergence; inspect the loss traces and :func:`two_sample_test`). The
        data are standardised for training and the generator's output mapped back.
        Torch's RNG is forked and seeded with ``seed``.

        Returns
        -------
        GAN
            With ``info``: ``generator_loss`` and ``discriminator_loss`` traces (one float
            per step), ``num_steps``.
        """
        t = torch.as_tensor(y)
        if not t.is_floating_point():
            t = t.to(torch.get_default_dtype())
        if t.dim() != 2 or t.shape[0] < 2:
            raise ValueError(f"GAN.mle: y must be [N, d] with N >= 2, got shape {list(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError("GAN.mle: y has NaN or infinite entries")
        latent_dim = check_int("GAN.mle: latent_dim", latent_dim)
        steps = check_int("GAN.mle: steps", steps)
        batch_size = check_int("GAN.mle: batch_size", batch_size)
        discriminator_steps = check_int("GAN.mle: discriminator_steps", discriminator_steps)
        N, d = t.shape
        loc, scale = t.mean(0), t.std(0).clamp_min(1e-8)
        x = (t - loc) / scale
        devices = [t.device] if t.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            net_g = generator if generator is not None else mlp(latent_dim, hidden, d)
            net_d = discriminator if discriminator is not None else mlp(d, hidden, 1)
            net_g.to(device=t.device, dtype=t.dtype)
            net_d.to(device=t.device, dtype=t.dtype)
            opt_g = torch.optim.Adam(net_g.parameters(), lr=learning_rate, betas=tuple(betas))
            opt_d = torch.optim.Adam(net_d.parameters(), lr=learning_rate, betas=tuple(betas))
            g = torch.Generator(device=t.device).manual_seed(seed)
            B = min(batch_size, N)
            sp = nn.functional.softplus
            loss_g_trace, loss_d_trace = [], []
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc="gan", leave=False,
                       disable=None if progress is None else not progress)
            try:
                for _ in range(steps):
                    for _ in range(discriminator_steps):
                        real = x[torch.randint(0, N, (B,), generator=g, device=t.device)]
                        z = torch.randn(B, latent_dim, generator=g, device=t.device, dtype=t.dtype)
                        with torch.no_grad():
                            fake = net_g(z)
                        opt_d.zero_grad()
                        loss_d = sp(-net_d(real)).mean() + sp(net_d(fake)).mean()
                        loss_d.backward()
                        opt_d.step()
                    z = torch.randn(B, latent_dim, generator=g, device=t.device, dtype=t.dtype)
                    opt_g.zero_grad()
                    loss_g = sp(-net_d(net_g(z))).mean()
                    loss_g.backward()
                    opt_g.step()
                    if not (torch.isfinite(loss_g) and torch.isfinite(loss_d)):
                        raise RuntimeError("GAN.mle: a loss became non-finite; lower learning_rate")
                    loss_g_trace.append(float(loss_g.detach()))
                    loss_d_trace.append(float(loss_d.detach()))
                    bar.update(1)
            finally:
                bar.close()
        gen = _Destandardize(net_g, loc, scale)
        disc = _Standardize(net_d, loc, scale)
        out = cls(generator=gen, discriminator=disc, latent_dim=latent_dim)
        out.info = {"generator_loss": loss_g_trace, "discriminator_loss": loss_d_trace,
                    "num_steps": steps}
        return out


class _Destandardize(nn.Module):
    """``net(z) * scale + loc``: a generator trained on standardised data, on the data scale."""

    def __init__(self, net: nn.Module, loc: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.net = net
        self.register_buffer("loc", loc.detach().clone())
        self.register_buffer("scale", scale.detach().clone())

    def forward(self, z):
        return self.net(z) * self.scale + self.loc


class _Standardize(nn.Module):
    """``net((y - loc) / scale)``: a discriminator trained on standardised data."""

    def __init__(self, net: nn.Module, loc: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.net = net
        self.register_buffer("loc", loc.detach().clone())
        self.register_buffer("scale", scale.detach().clone())

    def forward(self, y):
        return self.net((y - self.loc) / self.scale)


# ---------------------------------------------------------------------- sample quality
#: The kernel MMD two-sample test that judges a GAN's samples (shared with the samplers'
#: checks; see :mod:`genprog.models.two_sample`).
two_sample_test = mmd_test
TwoSampleTest = MMDTest


def ring_of_gaussians(n: int, modes: int = 8, radius: float = 2.0, sd: float = 0.05,
                      seed: int = 0) -> torch.Tensor:
    """``n`` draws ``[n, 2]`` from an equal mixture of ``modes`` isotropic Gaussians
    (standard deviation ``sd``) centred on a circle of ``radius`` — the standard GAN
    mode-coverage toy."""
    g = torch.Generator().manual_seed(int(seed))
    k = torch.randint(0, modes, (n,), generator=g)
    angle = 2 * math.pi * k.to(torch.get_default_dtype()) / modes
    centres = radius * torch.stack([torch.cos(angle), torch.sin(angle)], -1)
    return centres + sd * torch.randn(n, 2, generator=g)
