"""Shuffling that is a pure function of (seed, epoch).

A DataLoader with a seeded generator gives a reproducible *sequence* of epoch orders, but a run
resumed at epoch e would start that sequence again at its first order. Lightning calls
`set_epoch(e)` on samplers that have it (as for DistributedSampler), so the order of epoch e is
the same whether or not the run was interrupted before it.
"""
import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler):
    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n
