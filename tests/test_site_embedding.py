"""Site kind `embedding` (dpcompile/passes/sites/embedding.py): embedding_dense_backward with per-sample token ids
(a padding row) or positional ids shared by every sample, fused; a table tied to the LM head is a linear site plus
an embedding site of one parameter (materialized)."""
from __future__ import annotations

import torch
from torch import nn

import models
from dp_check import assert_site_combo, site_kinds, site_sweep

VOCAB, D, T = 7, 4, 3


class _TinyLM(nn.Module):
    def __init__(self, tied: bool):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D, padding_idx=0)
        self.pos = nn.Embedding(T, D)
        self.head = nn.Linear(D, VOCAB, bias=False)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(torch.tanh(self.tok(idx) + self.pos(pos)))


def _case(tied: bool) -> models.Case:
    return models.Case(f"tiny_lm{'_tied' if tied else ''}", models._build(0, lambda: _TinyLM(tied)),
                       models._token_batch(VOCAB, T), lambda m, idx, tgt: models.ce_sum(m(idx), tgt))


CASE, TIED = _case(False), _case(True)


def test_token_and_position_tables_land_on_embedding():
    kinds = site_kinds(CASE, 4)
    assert kinds["tok.weight"] == ("embedding",) and kinds["pos.weight"] == ("embedding",), kinds
    assert kinds["head.weight"] == ("linear",), kinds


def test_tied_table_is_linear_plus_embedding():
    assert sorted(site_kinds(TIED, 4)["tok.weight"]) == ["embedding", "linear"]


@site_sweep(CASE, TIED)
def test_embedding_matches_oracle(case, combo):
    assert_site_combo(case, combo)
