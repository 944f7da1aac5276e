"""Which samples each rank reads in which order: seeded, sharded, resumable mid-epoch, optionally grouped by length."""
import math

import torch
from torch.utils.data import Dataset, Sampler

PAD = -1   # a sampler slot holding no sample (see ShardSampler)


class ShardSampler(Sampler):
    """This rank's share of an epoch, which can start part-way in (resume).

    The epoch's order is a permutation seeded by seed + epoch (reshuffled each epoch, the same on
    every rank), or 0..n-1 without shuffle. Rank r takes every world-th index from position r, so
    the k-th batches of all ranks together hold exactly the k-th global batch of world × batch_size
    a single process would take. When n does not divide by the world size the order is padded with
    PAD slots (no sample), not with repeated samples as DistributedSampler does: every rank gets as
    many batches (no rank waits alone in a collective) and no sample counts twice.

    With size_hints (one length per sample) batches of alike length are grouped on the global
    order, before it is dealt out, so DDP still sees exactly the single-process batches.
    """

    def __init__(self, size: int, world: int, rank: int, seed: int, shuffle=True, batch_size=1, size_hints=None):
        self.size, self.world, self.rank, self.seed, self.shuffle = size, world, rank, seed, shuffle
        self.global_batch, self.size_hints = batch_size * world, size_hints
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def share(self) -> list:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
            if self.size_hints is not None:
                order = group_by_length(order, self.size_hints, self.global_batch, g)
        else:
            order = list(range(self.size))
        order += [PAD] * (math.ceil(self.size / self.world) * self.world - self.size)
        return order[self.rank::self.world]

    def __iter__(self):
        return iter(self.share()[self.skip:])

    def __len__(self):
        return max(0, math.ceil(self.size / self.world) - self.skip)


class Padded(Dataset):
    """The dataset, plus {"padding": True} for a PAD slot (collate drops it without counting it)."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"padding": True} if i == PAD else self.data[i]


def group_by_length(order, size_hints, batch, generator, window_batches=64):
    """Sort each window of `window_batches` batches by length, cut it into batches, shuffle the batches.

    Padding a batch to its longest sample wastes compute when short and long samples mix; sorted
    windows keep each batch alike while the batch order stays random. Off by default: on
    templated data (like the demo's) alike length means alike question, and batches of one
    question type learn worse.
    """
    window = batch * window_batches
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: size_hints[i], reverse=True)
        batches += [chunk[i:i + batch] for i in range(0, len(chunk), batch)]
    # The last (possibly short) batch stays last so every other batch is full.
    head, tail = (batches[:-1], batches[-1:]) if batches and len(batches[-1]) < batch else (batches, [])
    shuffled = [head[i] for i in torch.randperm(len(head), generator=generator).tolist()] + tail
    return [i for b in shuffled for i in b]

