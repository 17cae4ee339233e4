"""Batch-dim rules op by op: each model routes per-sample data through one op before and after a Linear, and
the clipped gradients must match the float64 oracle (a wrong rule gives wrong per-sample gradients)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import models
from dp_check import assert_matches

IDX = torch.tensor([2, 0, 1, 2])

OPS = {
    "stack": lambda h: torch.stack([h, h * 2], dim=1).sum(1),
    "cat_features": lambda h: torch.cat([h, h.tanh()], dim=-1)[..., :3] + torch.cat([h, h], dim=-1)[..., 3:],
    "sort": lambda h: torch.sort(h, dim=-1).values,
    "topk": lambda h: torch.topk(h, 2, dim=-1).values.sum(-1, keepdim=True) + h,
    "gather": lambda h: torch.gather(h, -1, torch.tensor([[2, 0, 1]]).expand(*h.shape[:-1], 3)),
    "cumsum_time": lambda h: h.cumsum(1),
    "softmax": lambda h: h.softmax(-1),
    "index_select": lambda h: h.index_select(-1, torch.tensor([2, 1, 0])),
    "advanced_index": lambda h: h[:, :, IDX[:3]],
    "narrow_chunk": lambda h: torch.cat(h.chunk(3, dim=-1)[::-1], dim=-1) + h.narrow(1, 0, 1),
    "unbind": lambda h: sum(h.unbind(1)).unsqueeze(1) + h,
    "transpose_matmul": lambda h: (h.transpose(1, 2) @ h).sum(-1).unsqueeze(1) + h,  # (B, 3, T) @ (B, T, 3)
    "repeat_interleave": lambda h: h.repeat_interleave(2, dim=-1)[..., ::2],
    "tril_time": lambda h: torch.tril(h @ h.transpose(1, 2)) @ h,  # (B, T, T) mask within a sample
    "pad_time": lambda h: nn.functional.pad(h, (0, 0, 1, 0))[:, :-1] + h,
    "flatten_unflatten": lambda h: h.flatten(1).unflatten(1, h.shape[1:]),
    "baddbmm": lambda h: torch.baddbmm(h, h @ h.transpose(1, 2), h, beta=0.5),  # (B, T, T) @ (B, T, 3) + h
    "max_pool_time": lambda h: nn.functional.max_pool1d(h.transpose(1, 2), 2, 1, padding=1)[..., 1:].transpose(1, 2),
    "inplace_slice": lambda h: _assign_first(h.clone(), h[:, -1] * 2),
    "group_norm_fn": lambda h: nn.functional.group_norm(h.transpose(1, 2), 1).transpose(1, 2),
}


def _assign_first(h, v):
    h[:, 0] = v
    return h


class OpModel(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.inp, self.out = nn.Linear(2, 3), nn.Linear(3, 2)

    def forward(self, x):  # x: (B, T, 2)
        return self.out(self.fn(self.inp(x)))


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("B", [1, 3, 4])
def test_op_rule(name, B):
    case = models.Case(f"op_{name}", models._build(0, lambda: OpModel(OPS[name])),
                       models._regression_batch((4, 2), (4, 2)), lambda m, x, y: models.mse_sum(m(x), y))
    # B = 4 = T: a rule that looked at sizes instead of dataflow would confuse batch and time here
    assert_matches(case, case.batch(B, seed=B), max_grad_norm=0.05, clipping="per_param", loss_reduction="mean")
