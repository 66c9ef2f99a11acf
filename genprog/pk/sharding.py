"""Splitting a population data set by subject for ``torch.distributed`` ranks.

Subjects are independent given the population parameters, so a population fit shards by
subject: rank ``r`` of ``world`` holds one contiguous block of subjects (in the data set's
subject order), the blocks differ in size by at most one subject, and no subject is ever
split across ranks. A shard keeps the full data set's padded widths (doses ``D``,
observations ``T``), its observation types and category codes, so the shards of one data
set concatenate back to it exactly (:func:`concat_shards`).
"""

from __future__ import annotations

import dataclasses
import itertools

import torch

from ..validation import check_int
from .dataset import Dataset

__all__ = ["concat_shards", "shard_bounds", "shard_dataset"]


def shard_bounds(n_subjects: int, rank: int, world: int) -> tuple[int, int]:
    """Subject positions ``[start, stop)`` of rank ``rank``'s block.

    The first ``n_subjects % world`` ranks get one subject more than the others.

    >>> [shard_bounds(10, r, 3) for r in range(3)]
    [(0, 4), (4, 7), (7, 10)]
    """
    check_int("world", world, minimum=1)
    check_int("rank", rank, minimum=0)
    check_int("n_subjects", n_subjects, minimum=0)
    if rank >= world:
        raise ValueError(f"shard: rank must be below world={world}, got {rank}")
    if n_subjects < world:
        raise ValueError(f"shard: {n_subjects} subject(s) cannot be split over {world} ranks "
                         "(every rank needs at least one subject); use fewer processes")
    q, r = divmod(n_subjects, world)
    start = rank * q + min(rank, r)
    return start, start + q + (1 if rank < r else 0)


def shard_dataset(data: Dataset, rank: int, world: int) -> Dataset:
    """Rank ``rank``'s block of subjects of ``data`` (see :func:`shard_bounds`).

    Parameters
    ----------
    data : Dataset
        The whole data set.
    rank, world : int
        This process's rank and the number of processes.

    Returns
    -------
    Dataset
        The block's subjects, every tensor with the whole data set's widths;
        ``summary["shard"]`` records ``rank``, ``world``, ``start``, ``stop`` (subject
        positions in ``data``) and ``n_subjects`` (of the whole data set).

    Examples
    --------
    >>> from genprog import pk
    >>> data = pk.read_nonmem(pk.dataset_path("theo_sd"))
    >>> [len(shard_dataset(data, r, 5).ids) for r in range(5)]
    [3, 3, 2, 2, 2]
    """
    if not isinstance(data, Dataset):
        raise TypeError(f"shard_dataset: expected a pk.Dataset, got {type(data).__name__}")
    if "shard" in data.summary:
        raise ValueError("shard_dataset: data is already a shard (summary['shard'] = "
                         f"{data.summary['shard']}); shard the whole data set")
    start, stop = shard_bounds(data.n_subjects, rank, world)
    shard = data.subset(list(range(start, stop)))
    info = {"rank": rank, "world": world, "start": start, "stop": stop, "n_subjects": data.n_subjects}
    return dataclasses.replace(shard, summary={**data.summary, "shard": info})


def concat_shards(shards) -> Dataset:
    """The whole data set from its shards in rank order (the inverse of
    :func:`shard_dataset`): tensors concatenated along the subject dim.

    Raises
    ------
    ValueError
        Shards that are not the ``0..world-1`` blocks of one data set.
    """
    shards = list(shards)
    if not shards:
        raise ValueError("concat_shards: no shards")
    infos = [s.summary.get("shard") for s in shards]
    if any(i is None for i in infos):
        raise ValueError("concat_shards: every shard must come from shard_dataset (summary['shard'])")
    world = infos[0]["world"]
    expected = [(r, world) for r in range(world)]
    if [(i["rank"], i["world"]) for i in infos] != expected or any(
            a["stop"] != b["start"] for a, b in itertools.pairwise(infos)):
        raise ValueError(f"concat_shards: shards {[(i['rank'], i['world']) for i in infos]} are not "
                         f"the blocks 0..{world - 1} of one data set, in order")
    first = shards[0]
    widths = {(tuple(s.dose_time.shape[1:]), tuple(s.obs_time.shape[1:])) for s in shards}
    if len(widths) > 1:
        raise ValueError(f"concat_shards: shards have different padded widths {sorted(widths)}")
    keep = ("ids", "dvid_names", "categories", "summary")

    def cat(values):
        if torch.is_tensor(values[0]):
            return torch.cat(values, 0)
        return {k: cat([v[k] for v in values]) for k in values[0]}

    summary = {k: v for k, v in first.summary.items() if k != "shard"}
    return dataclasses.replace(
        first, ids=[i for s in shards for i in s.ids], summary=summary,
        **{f.name: cat([getattr(s, f.name) for s in shards])
           for f in dataclasses.fields(first) if f.name not in keep})
