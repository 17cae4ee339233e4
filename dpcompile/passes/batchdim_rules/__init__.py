"""The batch-dim rules of passes/batchdim.py, one module per op family. Each rule is a function
`fn(analysis, node) -> state` registered with `@batchdim_rule(*ops)` (batchdim_states.py); importing this package
registers them all (batchdim.py does, at module level). A new op's rule goes in the module of its family:

  views.py       view / reshape (index arithmetic over symbolic sizes), permute, transpose, (un)squeeze, expand,
                 as_strided, repeat, flip, complex views
  reductions.py  sum / mean / amax / norms ..., the count of targets != ignore_index, ops along one dim (softmax,
                 cumsum, sort, topk, gather, scatter), layer_norm
  matmul.py      mm / addmm, bmm / baddbmm, scaled-dot-product attention
  conv.py        convolution and its backward, pooling
  indexing.py    slice / select / split / chunk / unbind, cat / stack, index_select, index, index_put, *_scatter
  embedding.py   embedding, its backward, embedding bags
  pointwise.py   identities, batch-free factories, complex, copy, pad, tril / triu, repeat_interleave

Rules import only batchdim_states.py and symbolic.py, never batchdim.py (no import cycle).
"""
from . import conv, embedding, indexing, matmul, pointwise, reductions, views  # noqa: F401  (registers the rules)
