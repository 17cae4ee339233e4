"""The joint-graph pass (docs/sites.md, docs/extending.md). This module only re-exports; the stages are named in
driver.py:

    read_graph → batch_dims → discover → plan → randomized_norms → rewrite → verify → inline

  context.py    PassContext / ParamInfo (what the backend tells the pass) and the compiled-graph cache key
  graph_io.py   the joint graph's inputs and outputs (primals, gradient outputs, tangent seeds, symbolic sizes)
  batchdim.py   which dim of every value carries samples, by dataflow (rules by op family: batchdim_rules/)
  discover.py   each parameter's gradient down to its sites; patterns.py: Site and classify_leaf
  chain.py      the ops from a site up to its gradient (Step) and their replay, per sample or on the sum
  sites/        the site-kind registry, one module per kind (linear, rows, embedding, bmm, conv, whole)
  strategies.py the built-in strategies (records of dpcompile/strategy_registry.py); plan.py: the planner
  rewrite.py    norms → clip factors → clipped sums, traced and inserted; probes.py: randomized norms' seed
  one_sample.py the batch-of-one path
  verify.py     coverage: every trainable parameter privatized, or an error
"""
from __future__ import annotations

from . import strategies  # noqa: F401  (registers the built-in strategies)
from .sites import bmm, conv, embedding, linear, rows, whole  # noqa: F401  (registers the built-in site kinds)
from .sites import tied_embedding  # noqa: F401  (registers the combined kind of tied tables)
from . import one_sample
from .context import GRAPH_FUNCTIONS, GRAPH_SOURCES, ParamInfo, PassContext, _source_hash, source_hash
from .driver import DPJointPass, run_dp_pass
from .graph_io import grad_output_positions, primal_placeholders

__all__ = ["DPJointPass", "ParamInfo", "PassContext", "run_dp_pass", "source_hash", "GRAPH_SOURCES",
           "GRAPH_FUNCTIONS", "primal_placeholders", "grad_output_positions", "one_sample"]
