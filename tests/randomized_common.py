"""Shared by the test_randomized_*.py files: the device, the block size, a seed, the autouse fixture that keeps
randomized-norm records from leaking between tests, and two input helpers."""
from __future__ import annotations

import logging

import pytest
import torch

from dpcompile.codegen import randomized_ops as RO
from dpcompile.codegen.kernels import randomized as K
from dpcompile.privacy import randomized_accounting as RA

logging.getLogger("absl").setLevel(logging.ERROR)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK = 32 if DEVICE == "cpu" else None  # large tiles: few interpreted programs
SEED = 0x5EED_0123_4567_89AB
# accounting: sample rate, steps, delta, PLD discretization
Q, STEPS, DELTA = 0.01, 1000, 1e-5
VDI = 2e-3


@pytest.fixture(autouse=True)
def _clean_state():
    """Randomized-norm runs are recorded process-wide for the accountant: never leak them into other tests."""
    RA.take_randomized_use()
    RO.manual_probe_seed(None)
    yield
    RA.take_randomized_use()
    RO.manual_probe_seed(None)


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
