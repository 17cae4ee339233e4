"""Site kind `tied_embedding` (dpcompile/passes/sites/tied_embedding.py, ops in codegen/tied_embedding_ops.py): a
table that is both an embedding (rows gathered by ids) and the LM head (a matmul), clipped per sample without a
(B, V, d) tensor: ||G_i + E_i||^2 = ||G_i||^2 + ||E_i||^2 + 2 <G_i, E_i>, the clipped sum an index_add plus one
GEMM. The planner takes it where materializing costs more or does not fit the scratch budget; the oracle tests
use a tiny budget (single_pass_budget_mb) so that the tiny models, where materializing is cheaper, take it."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpcompile
import dpcompile.backend as backend
import models
from dp_check import SITE_SWEEP, LossModule, _prefixed, assert_matches_batches
from dpcompile.codegen import tied_embedding_ops as T_ops
from dpcompile.passes.plan import DEVICE
from dpcompile.passes.sites import tied_embedding

VOCAB, D, T = 48, 12, 6
TINY_BUDGET = {"single_pass_budget_mb": 1e-6}  # no (B, V, d) tensor fits: materialize is not a candidate
TIED_STRATEGIES = set(tied_embedding.STRATEGIES)
# the Triton kernels run on the GPU where there is one, else on CPU under TRITON_INTERPRET=1 (tests/conftest.py)
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class _TiedLM(nn.Module):
    """Token + position embeddings, one hidden layer, head tied to the token table. head: "plain" (Linear sharing
    the weight), "scaled" (F.linear with -0.5 W: a neg and a scalar on the head's chain), "last" (logits of the
    last position only: Th != Te), "indexed" (rows gathered by W[idx]: the embedding site is an index_put),
    "matmul" (x @ W.t()), "twice" (a second lookup of the table, of other ids and scaled: two embedding sites)."""

    def __init__(self, head: str = "plain", padding_idx=0):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D, padding_idx=padding_idx)
        self.pos = nn.Embedding(T, D)
        self.mid = nn.Linear(D, D)
        self.kind = head
        self.head = nn.Linear(D, VOCAB, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        rows = self.tok.weight[idx] if self.kind == "indexed" else self.tok(idx)  # indexed: an index_put site
        if self.kind == "twice":  # an encoder's and a decoder's lookups of one shared table, say
            rows = rows - 0.25 * self.tok(idx.flip(1))
        x = torch.tanh(self.mid(rows * 1.5 + self.pos(pos)))
        if self.kind == "scaled":
            return F.linear(x, -0.5 * self.tok.weight)
        if self.kind == "matmul":
            return x @ self.tok.weight.t()
        if self.kind == "last":
            return self.head(x[:, -1:])
        return self.head(x)


def _case(head="plain", padding_idx=0) -> models.Case:
    if head == "last":
        loss = lambda m, idx, tgt: models.ce_sum(m(idx), tgt[:, -1:])  # noqa: E731
    else:
        loss = lambda m, idx, tgt: models.ce_sum(m(idx), tgt)  # noqa: E731
    return models.Case(f"tied_{head}_pad{padding_idx}", models._build(0, lambda: _TiedLM(head, padding_idx)),
                       models._token_batch(VOCAB, T), loss)


CASE = _case()


def _plan(case, B, **options):
    wrapper = LossModule(copy.deepcopy(case.model), case.loss_fn, True)
    return {r["parameter"].removeprefix("m."): r for r in
            dpcompile.explain(wrapper, case.batch(B, seed=1), **_prefixed(options)).rows}


# -- the ops against brute force -----------------------------------------------------------------------------


def _brute(idx, g, h, dy, ke, kh, pad):
    """(B, V, d) per-sample gradients ke G_i + kh E_i, formed (float64)."""
    B, V = dy.shape[0], dy.shape[-1]
    gm = g.double() * (idx != pad).unsqueeze(-1).double() if pad >= 0 else g.double()
    G = torch.zeros(B, V, g.shape[-1], dtype=torch.float64)
    for i in range(B):
        G[i].index_add_(0, idx[i], gm[i])
    E = torch.bmm(dy.double().transpose(1, 2), h.double())
    return ke * G + kh * E


@pytest.mark.parametrize("head_norm", ["ghost", "direct"])
@pytest.mark.parametrize("pad", [-1, 0])
@pytest.mark.parametrize("B,Te,Th", [(0, 4, 4), (1, 5, 5), (3, 6, 6), (4, 7, 3)])
def test_ops_match_brute_force_with_repeated_ids(head_norm, pad, B, Te, Th):
    gen = torch.Generator().manual_seed(B * 10 + Te)
    V, d = 9, 5
    idx = torch.randint(0, 4, (B, Te), generator=gen)  # 4 of 9 rows: many repeats, row 0 (padding) among them
    g, h, dy = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((B, Te, d), (B, Th, d), (B, Th, V)))
    ke, kh = 1.5, -0.5
    want = _brute(idx, g, h, dy, ke, kh, pad)
    got = torch.ops.dpcompile.tied_embedding_norm(idx, g, h, dy, ke, kh, pad, head_norm)
    torch.testing.assert_close(got, want.pow(2).sum((1, 2)), rtol=1e-10, atol=1e-10)
    ref = T_ops.tied_embedding_norm_reference(idx, g, h, dy, ke, kh, pad, head_norm)
    torch.testing.assert_close(ref, got, rtol=1e-12, atol=1e-12)
    coef = torch.rand(B, generator=gen, dtype=torch.float64)
    s = torch.ops.dpcompile.tied_embedding_clipped_sum(idx, g, h, dy, coef, ke, kh, pad)
    torch.testing.assert_close(s, torch.einsum("b,bvd->vd", coef, want), rtol=1e-10, atol=1e-10)
    # each term of the identity on its own
    if B:
        emb = T_ops.embedding_gram_sq_norm(idx, g, pad)
        G = _brute(idx, g, h, dy, 1.0, 0.0, pad)
        E = _brute(idx, g, h, dy, 0.0, 1.0, pad)
        torch.testing.assert_close(emb, G.pow(2).sum((1, 2)))
        torch.testing.assert_close(T_ops.head_ghost_sq_norm(h, dy), E.pow(2).sum((1, 2)))
        torch.testing.assert_close(T_ops.cross_term(idx, g, h, dy, pad), (G * E).sum((1, 2)))


def test_ops_in_float32():
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 5, (3, 6), generator=gen)
    g, h, dy = (torch.randn(*s, generator=gen) for s in ((3, 6, 4), (3, 6, 4), (3, 6, 8)))
    got = torch.ops.dpcompile.tied_embedding_norm(idx, g, h, dy, 1.0, 1.0, -1, "ghost")
    assert got.dtype == torch.float32
    want = _brute(idx, g, h, dy, 1.0, 1.0, -1).pow(2).sum((1, 2))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("B,Te,Th,V,d,pad", [(0, 4, 4, 5, 3, 0), (2, 5, 5, 9, 4, 0), (3, 37, 21, 50, 20, -1),
                                              (2, 40, 17, 30, 33, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_norm_terms_match_reference(B, Te, Th, V, d, pad, dtype):
    """kernels/tied_embedding.py (under TRITON_INTERPRET=1 on CPU): several tiles of Te and Th, edges, ids
    repeated, padding, against the float64 references."""
    from dpcompile.codegen.kernels.tied_embedding import norm_terms

    gen = torch.Generator().manual_seed(B * 100 + Te)
    idx = torch.randint(0, 6, (B, Te), generator=gen)
    g, h, dy = (torch.randn(*s, generator=gen).to(dtype) for s in ((B, Te, d), (B, Th, d), (B, Th, V)))
    emb, cross = norm_terms(*(x.to(KERNEL_DEVICE) for x in (idx, g, h, dy)), pad, block=16)
    emb, cross = emb.cpu(), cross.cpu()
    assert emb.dtype == cross.dtype == torch.float32 and emb.shape == cross.shape == (B,)
    want_emb = T_ops.embedding_gram_sq_norm(idx, g.double(), pad)
    want_cross = T_ops.cross_term(idx, g.double(), h.double(), dy.double(), pad)
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    scale = 1 + (want_emb.abs().max().item() if B else 0)
    torch.testing.assert_close(emb.double(), want_emb, rtol=tol, atol=tol * scale)
    scale = 1 + (want_cross.abs().max().item() if B else 0)
    torch.testing.assert_close(cross.double(), want_cross, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("head_norm", ["ghost", "direct"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_branches_of_the_ops(monkeypatch, dtype, head_norm):
    """The ops' CUDA branches (the Triton kernels of the norm, the clipped sum's GEMM in the data dtype), on the
    GPU where there is one, else on CPU with the kernels under TRITON_INTERPRET=1 (tests/conftest.py), against
    brute force."""
    monkeypatch.setattr(T_ops, "_use_triton", lambda *tensors: True)
    gen = torch.Generator().manual_seed(7)
    B, Te, Th, V, d = 3, 6, 5, 10, 4
    idx = torch.randint(0, 4, (B, Te), generator=gen)
    g, h, dy = (torch.randn(*s, generator=gen).to(dtype) for s in ((B, Te, d), (B, Th, d), (B, Th, V)))
    coef = torch.rand(B, generator=gen)
    want = _brute(idx, g, h, dy, 2.0, -1.0, 0)
    idx, g, h, dy, coef = (x.to(KERNEL_DEVICE) for x in (idx, g, h, dy, coef))
    got = torch.ops.dpcompile.tied_embedding_norm(idx, g, h, dy, 2.0, -1.0, 0, head_norm).cpu()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want.pow(2).sum((1, 2)), rtol=2e-3, atol=2e-3)
    s = torch.ops.dpcompile.tied_embedding_clipped_sum(idx, g, h, dy, coef, 2.0, -1.0, 0).cpu()
    assert s.dtype == dtype
    torch.testing.assert_close(s.double(), torch.einsum("b,bvd->vd", coef.cpu().double(), want), rtol=1e-2,
                               atol=1e-2)


# -- the planner ---------------------------------------------------------------------------------------------


def test_planner_takes_tied_where_materializing_does_not_fit():
    row = _plan(CASE, 4, **TINY_BUDGET)["tok.weight"]
    assert row["strategy"] in TIED_STRATEGIES and row["pattern"].startswith("tied_embedding("), row
    assert set(row["cost_expr"]) == TIED_STRATEGIES | {"materialize"}


def test_planner_materializes_a_tiny_table_where_that_is_cheaper():
    # V d = 576 elements: a few more kernel launches cost more than the (B, V, d) traffic
    row = _plan(CASE, 4)["tok.weight"]
    assert row["strategy"] == "materialize" and " + " in row["pattern"], row
    us = row["cost_us_per_sample"]
    assert us["materialize"] < min(us[k] for k in TIED_STRATEGIES)


@pytest.mark.parametrize("seq,itemsize", [(128, 2), (1024, 2), (1024, 4)])
def test_costs_at_gpt2_shapes(seq, itemsize):
    """gpt2-small's table (V 50257, d 768) at B = 8: tied is cheaper at T = 128; at T = 1024 the (B, V, d)
    gradients (0.6-1.2 GB) exceed the default 256 MB scratch budget, so materialize is no candidate."""
    costs = {k: float(v) for k, v in tied_embedding.costs(8, seq, seq, 50257, 768, itemsize, DEVICE).items()}
    if seq == 128:
        assert min(costs[k] for k in TIED_STRATEGIES) < costs["materialize"]
    assert 8 * 50257 * 768 * itemsize > 256 * 2**20


def test_no_batch_by_vocab_by_width_tensor(monkeypatch):
    """The rewritten joint graph (the ops' bodies inlined, as under Inductor) holds no tensor of B x V x d
    elements; materializing (the default budget at these sizes) does, which shows the check sees one."""
    B = 5

    def largest(**options):
        graphs = []

        def capture(graph, ctx):
            ctx.inline_ops = True
            run(graph, ctx)
            graphs.append(graph)

        run = backend.run_dp_pass
        monkeypatch.setattr(backend, "run_dp_pass", capture)
        model = LossModule(copy.deepcopy(CASE.model).double(), CASE.loss_fn, False)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="flashdp_eager", fullgraph=True, dynamic=False,
                                 options=_prefixed(dict(max_grad_norm=1.0, loss_reduction="sum", **options)))
        compiled(*CASE.batch(B)).backward()
        monkeypatch.setattr(backend, "run_dp_pass", run)
        (graph,) = graphs
        vals = [n.meta.get("val") for n in graph.nodes]
        return max(v.numel() for v in vals if isinstance(v, torch.Tensor))

    assert largest(**TINY_BUDGET) < B * VOCAB * D
    assert largest() >= B * VOCAB * D


# -- against the float64 oracle ------------------------------------------------------------------------------


@pytest.mark.parametrize("combo", SITE_SWEEP, ids=lambda k: "-".join(map(str, k)))
def test_tied_matches_oracle(combo):
    clipping, C, reduction = combo
    assert_matches_batches(CASE, max_grad_norm=C, clipping=clipping, loss_reduction=reduction, **TINY_BUDGET)


VARIANTS = [(_case("scaled", None), SITE_SWEEP[0]), (_case("last"), SITE_SWEEP[2]),
            (_case("plain", None), SITE_SWEEP[1]),
            (_case("indexed", None), SITE_SWEEP[3]), (_case("matmul"), SITE_SWEEP[0]),
            (_case("twice"), SITE_SWEEP[1]), (_case("twice", None), SITE_SWEEP[2])]


@pytest.mark.parametrize("case,combo", VARIANTS, ids=lambda x: getattr(x, "name", None))
def test_tied_variants_match_oracle(case, combo):
    assert _plan(case, 3, **TINY_BUDGET)["tok.weight"]["strategy"] in TIED_STRATEGIES
    clipping, C, reduction = combo
    assert_matches_batches(case, (0, 2, T), max_grad_norm=C, clipping=clipping, loss_reduction=reduction,
                           **TINY_BUDGET)  # B == T among them


def test_one_graph_for_every_batch_size_and_length():
    """dpcompile.compile: B and T symbolic in one graph (the kernels' sizes are never specialized)."""
    from dp_check import CountingBackend, _assert_close, oracle_grads

    opts = dict(max_grad_norm=1e-3, clipping="flat", loss_reduction="mean", **TINY_BUDGET)
    model = copy.deepcopy(CASE.model).double()
    counter = CountingBackend()
    compiled = dpcompile.compile(LossModule(model, CASE.loss_fn, True), backend=counter, **_prefixed(opts))
    torch._dynamo.reset()
    graphs = []
    for B, length in [(3, 4), (5, 6), (2, 5), (4, 3)]:
        case = models.Case(CASE.name, CASE.model, models._token_batch(VOCAB, length), CASE.loss_fn)
        batch = case.batch(B, seed=B)
        for p in model.parameters():
            p.grad = None
        compiled(*batch).backward()
        got = {n: p.grad for n, p in model.named_parameters()}
        _assert_close(case, got, oracle_grads(case, batch, **opts), 1e-9, 1e-7, dict(opts, B=B, T=length))
        graphs.append(counter.graphs)
    assert graphs[1] == graphs[2] == graphs[3], graphs  # the graph of symbolic B and T serves the last three


def _hf_llama_tied() -> models.Case:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=16, max_position_embeddings=T, tie_word_embeddings=True,
                      attn_implementation="eager")
    return models.Case("hf_llama_tied", models._build(0, lambda: LlamaForCausalLM(cfg)),
                       models._token_batch(VOCAB, T), models._hf_loss)


@pytest.mark.parametrize("make,name", [(lambda: models.hf_gpt2(vocab=VOCAB, n_embd=D, n_layer=1, T=T),
                                        "transformer.wte.weight"), (_hf_llama_tied, "model.embed_tokens.weight")],
                         ids=["gpt2", "llama"])
def test_hf_tied_matches_oracle(make, name):
    pytest.importorskip("transformers")
    case = make()
    plan = _plan(case, 3, **TINY_BUDGET)
    assert plan[name]["strategy"] in TIED_STRATEGIES, plan[name]
    assert_matches_batches(case, (2, 5), max_grad_norm=1e-3, clipping="per_layer", loss_reduction="mean",
                           **TINY_BUDGET)


@pytest.mark.inductor
def test_inductor_matches_oracle():
    """Under Inductor the ops' bodies are inlined (passes/rewrite.py: inline_triton_ops) and compiled."""
    from dp_check import assert_matches

    assert_matches(CASE, CASE.batch(3, seed=11), backend="flashdp", dtype=torch.float32, atol=2e-5, rtol=2e-4,
                   max_grad_norm=0.5, clipping="per_layer", loss_reduction="mean", **TINY_BUDGET)


def test_padded_gpt2_through_causal_lm_loss_matches_unpadded_oracle():
    """dpcompile.hf.CausalLMLoss on right-padded batches (attention mask, ignored labels): the tied table's
    clipped sum equals the clipped sum of each sample run alone without padding (float64 loop oracle)."""
    pytest.importorskip("transformers")
    from dpcompile.hf import CausalLMLoss
    from dpcompile.testing.oracle import reference_clipped_grads

    case = models.hf_gpt2(vocab=VOCAB, n_embd=D, n_layer=1, T=T, seed=1)
    model = CausalLMLoss(case.model)
    lengths = [6, 4, 2, 5]
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(1, VOCAB, (len(lengths), T), generator=g).masked_fill(mask == 0, 0)
    C = 0.05
    assert _plan_of(model, ids, mask, C)["transformer.wte.weight"]["strategy"] in TIED_STRATEGIES
    torch._dynamo.reset()
    dp = dpcompile.compile(model, backend="flashdp_eager", max_grad_norm=C, clipping="per_layer", **TINY_BUDGET)
    dp(ids, mask).backward()

    def alone(m, ids, mask):
        return m(ids[:, mask[0].bool()])

    want = reference_clipped_grads(model, alone, (ids, mask), max_grad_norm=C, clipping="per_layer")
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), want[n], rtol=1e-4, atol=1e-6, msg=n)
    torch._dynamo.reset()


def _plan_of(model, ids, mask, C):
    rows = dpcompile.explain(model, (ids, mask), max_grad_norm=C, clipping="per_layer", **TINY_BUDGET).rows
    return {r["parameter"].removeprefix("model.").removeprefix("m."): r for r in rows}
