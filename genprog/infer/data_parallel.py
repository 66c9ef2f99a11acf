"""Data-parallel variational inference over processes with ``torch.distributed``.

Each process (rank) holds one shard of the data: the same model conditioned on its own
rows of a data plate. The ELBO of the whole data set is the sum of the shards'
likelihood terms plus one prior/entropy term; each rank evaluates its shard's likelihood
scaled by ``total_size / local_size`` (an unbiased estimate of the whole likelihood), and
the ranks average gradients and losses with ``all_reduce`` before every optimizer step,
so every rank takes identical steps and the same stopping decision. Guide parameters are
broadcast from rank 0 after creation so all ranks start equal.

Works with any backend (``gloo`` on CPU, ``nccl`` on GPUs); start the processes with
``torchrun`` (see ``docs/scaling.md``).

Limits: latent sites inside the data plate (local latents, e.g. per-row cluster
assignments) would need per-rank guide parameters and are rejected with a clear error.
"""

from __future__ import annotations

import torch
from pyro.poutine.messenger import Messenger


class ScaleDataPlate(Messenger):
    """Multiply the log density of observed sites inside plate ``plate`` by ``scale``."""

    def __init__(self, plate: str, scale: float):
        super().__init__()
        self.plate = plate
        self.scale = scale

    def _pyro_sample(self, msg):
        if msg["is_observed"] and any(f.name == self.plate for f in msg["cond_indep_stack"]):
            msg["scale"] = self.scale * msg["scale"]


def _dist():
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()):
        raise ValueError(
            "fit('vi', distributed=True) needs an initialized torch.distributed process group "
            "(torch.distributed.init_process_group(...), e.g. under torchrun)"
        )
    return tdist


def data_plate_and_scale(model, total_size: int | None, data_plate: str | None):
    """The plate holding the observed rows of this rank's shard, and the likelihood scale
    ``total_size / local_size``.

    Raises
    ------
    ValueError
        No or ambiguous data plate, latent sites inside it, or a ``total_size`` smaller
        than the shard.
    """
    structure = model.structure
    observed = structure.observed
    if data_plate is None:
        common = None
        for s in observed:
            names = {p[0] for p in s.plates}
            common = names if common is None else common & names
        if not common or len(common) != 1:
            raise ValueError(
                "fit('vi', distributed=True): cannot tell which plate holds the data rows "
                f"(plates shared by all observed sites: {sorted(common or [])}); pass data_plate="
            )
        data_plate = next(iter(common))
    if data_plate not in structure.plates:
        raise ValueError(f"fit('vi', distributed=True): unknown plate {data_plate!r}; plates: "
                         f"{sorted(structure.plates)}")
    local_latents = [s.name for s in structure.latent_continuous + structure.latent_discrete
                     if any(p[0] == data_plate for p in s.plates)]
    if local_latents:
        raise ValueError(
            f"fit('vi', distributed=True): latent site(s) {local_latents} live inside the data "
            f"plate {data_plate!r}; data-parallel VI supports global latents only"
        )
    local_size = structure.plates[data_plate][1]
    tdist = _dist()
    sizes = torch.tensor([float(local_size)], dtype=torch.float64)
    tdist.all_reduce(sizes)
    world_total = int(sizes.item())
    if total_size is None:
        total_size = world_total
    if total_size < local_size:
        raise ValueError(f"fit('vi', distributed=True): total_size={total_size} is smaller than "
                         f"this rank's shard ({local_size} rows)")
    # the ranks' losses are averaged, so each estimates the whole data set's likelihood
    return data_plate, total_size / local_size


def broadcast_parameters(params) -> None:
    """Give every rank rank 0's initial guide parameters."""
    tdist = _dist()
    with torch.no_grad():
        for p in params:
            tdist.broadcast(p.data, src=0)


def average_gradients_and_loss(params, loss: torch.Tensor) -> torch.Tensor:
    """All-reduce (mean) the gradients of ``params`` and the loss across ranks."""
    tdist = _dist()
    world = tdist.get_world_size()
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        tdist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n
    total = loss.detach().clone().reshape(1)
    tdist.all_reduce(total)
    return total[0] / world
