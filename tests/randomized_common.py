"""Shared by the test_randomized_*.py files: the device, the block size, a seed, two input helpers and a model.
(No fixture resets state between tests: the probe counts that ran travel with the gradients, and
manual_probe_seed restores the seed source when its block ends.)"""
from __future__ import annotations

import logging

import torch

from dpcompile.codegen.kernels import randomized as K

logging.getLogger("absl").setLevel(logging.ERROR)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK = 32 if DEVICE == "cpu" else None  # large tiles: few interpreted programs
SEED = 0x5EED_0123_4567_89AB
# accounting: sample rate, steps, delta, PLD discretization
Q, STEPS, DELTA = 0.01, 1000, 1e-5
VDI = 2e-3


def _exact(a, b):
    a, b = K._as_sites(a, b)
    return torch.bmm(a.double().transpose(1, 2), b.double()).pow(2).sum((1, 2))


def _low_rank(B, T, M, N, rank, gen, dtype=torch.float32):
    """a_i^T b_i of rank <= `rank`: a_i = U_i P_i with P_i (rank x M), small integers so that the product is exact
    (in fp16 too) and the rank really is `rank`."""
    a = (torch.randint(-3, 4, (B, T, rank), generator=gen) @ torch.randint(-3, 4, (B, rank, M), generator=gen)).float()
    b = torch.randn(B, T, N, generator=gen)
    return a.to(DEVICE, dtype), b.to(DEVICE, dtype)


class _Bilinear(torch.nn.Module):
    """loss = sum_i <lin(x_i), w_i>: the output gradient of sample i is w_i, its weight gradient w_i^T x_i."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 4, bias=False)

    def forward(self, x, w):
        return (self.lin(x) * w).sum()
