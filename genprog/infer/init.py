"""Starting points for optimisers and samplers, in unconstrained space."""

from __future__ import annotations

import torch

from ..density import JointDensity


def prior_median(density: JointDensity, generator: torch.Generator, num_draws: int = 101) -> torch.Tensor:
    """Coordinate-wise median of ``num_draws`` prior draws, unconstrained ``[D]``.

    The prior median lies in the bulk of every site's prior, which keeps chains of
    hierarchical models away from the tails (where Pyro's default random init strands
    them in separate modes).
    """
    z = density.sample_prior(num_draws, generator)
    return z.median(0).values


def initial_points(density: JointDensity, chains: int, strategy, generator: torch.Generator,
                   jitter: float = 0.5) -> torch.Tensor:
    """``[chains, D]`` starting points.

    Parameters
    ----------
    strategy : {"median", "prior"} or dict
        ``"median"``: prior median plus ``Uniform(-jitter, jitter)`` in unconstrained
        space; ``"prior"``: independent prior draws; a dict of site -> constrained value
        (sites not given start at the prior median), jittered the same way.
    """
    d = density.dim
    if strategy == "prior":
        return density.sample_prior(chains, generator)
    z0 = prior_median(density, generator)
    if isinstance(strategy, dict):
        unknown = set(strategy) - {s.name for s in density.sites}
        if unknown:
            raise ValueError(f"init: unknown latent site(s) {sorted(unknown)}")
        values, _ = density.constrain(z0[None])
        for k, v in strategy.items():
            values[k] = torch.as_tensor(v, dtype=z0.dtype, device=z0.device).expand_as(values[k][0])[None]
        z0 = density.unconstrain(values)[0]
    elif strategy != "median":
        raise ValueError(f"init: unknown strategy {strategy!r}; use 'median', 'prior' or a dict")
    u = torch.rand(chains, d, generator=generator, device=z0.device, dtype=z0.dtype)
    return z0 + jitter * (2 * u - 1)
