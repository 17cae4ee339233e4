"""What the pass is told (PassContext: options, trainable parameters and their groups, batch inputs, thresholds)
and what decides a compiled graph (the cache key: PassContext.key() and the hash of the graph-deciding sources)."""
from __future__ import annotations

import ast
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..options import DPOptions


@dataclass
class ParamInfo:
    name: str
    group: str


@dataclass
class PassContext:
    """What the backend knows about the graph inputs, indexed by Dynamo input position."""

    options: DPOptions
    params: dict  # input index -> ParamInfo (trainable parameters only)
    batch_inputs: dict  # input index -> sample dim; the main batch input first
    thresholds: dict  # group name -> C_g ({} for run-time thresholds)
    decompositions: dict
    input_sources: dict = field(default_factory=dict)  # Dynamo source name of each batch input -> sample dim
    # the other tensor arguments of the call (input index -> source name): which of them carry samples, and how,
    # the pass decides by data flow (passes/sample_inputs.py), and then lists them in input_sources
    sample_candidates: dict = field(default_factory=dict)
    inline_ops: bool = False  # Inductor: inline the triton_op bodies after the coverage check
    report: list = field(default_factory=list)  # filled by the pass: one row per trainable parameter
    # filled by the pass: input index of each parameter whose per-sample norm this graph estimates with probes
    # (randomized norms, docs/randomized.md) -> its site id; and whether the pass ran on samples (B >= 1)
    randomized: dict = field(default_factory=dict)
    classified: bool = False
    #: seconds each stage of the last pass took (passes/driver.py), for the log and compile-time profiles
    stage_seconds: dict = field(default_factory=dict)
    exact_norms: bool = False  # randomized_ops.exact_norms() was on when the graph was built (tests only)
    # max_grad_norm="adaptive": the Dynamo input index of the (G,) float64 thresholds tensor the backend appends to
    # the graph's inputs, and the group of each of its entries. The pass reads C_g from it, and the graph's
    # "gradient" for that input is, per group, sum_i (1[||g_i|| <= C_g] - 1/2) (the quantile estimate's count)
    threshold_input: Optional[int] = None
    threshold_groups: tuple = ()
    # randomized norms: the Dynamo input index of the int64 (1,) probe seed the backend appends (a fresh secret one
    # every call, drawn by the call's wrapper): an input, not an op in the graph, so that a CUDA graph's replay
    # copies the call's own seed in rather than replaying the one it captured
    seed_input: Optional[int] = None

    @property
    def runtime_thresholds(self) -> bool:
        return self.threshold_input is not None

    def randomized_groups(self) -> dict:
        """Clipping group -> C_g of every group that holds a randomized site of this graph."""
        return {self.params[i].group: self.thresholds[self.params[i].group] for i in self.randomized}

    def key(self) -> str:
        parts = [self.options.cache_key(), repr(sorted((k, v.name, v.group) for k, v in self.params.items())),
                 repr(sorted(self.batch_inputs.items())), repr(sorted(self.sample_candidates.items())),
                 repr(sorted(self.thresholds.items())), repr(self.inline_ops),
                 repr(self.exact_norms), repr((self.threshold_input, self.threshold_groups)), repr(self.seed_input)]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()


#: The sources that decide what the DP pass makes of a Dynamo graph, and so what a cached compiled graph holds:
#: part of the cache key (DPJointPass.uuid), next to PassContext.key(). Only these, so that editing the CLI, the
#: optimizer or the docs does not throw away every compiled graph (and one that does change a graph is never
#: served stale):
#:   passes/      the pass itself (discovery, planning, rewriting, the coverage check)
#:   codegen/     the custom ops and Triton kernels the rewritten graph calls (Inductor inlines their bodies)
#:   options.py   how options are parsed and defaulted (PassContext.key() has the parsed values, not this code)
#:   strategy_registry.py, registry.py   the Strategy record (how a planned strategy maps to the ops the rewrite
#:                runs) and the registries' lookup (which site kind takes an op)
#:   clipping.py  clip_factors, traced into the graph by rewrite.py and codegen/ops.py
#:   backend.py   only dp_decomposition_table(): the decompositions run before the pass sees the joint graph. The
#:                rest of backend.py builds the PassContext, whose every field is in PassContext.key().
#: Not included: privacy/ (the optimizer, noise and accounting run outside the graph), randomized_contract.py (the
#: probe-count rule; graphs with randomized sites are never cached), clip_provenance.py (run
#: time only), errors.py (a refusal is not cached), cli.py,
#: compile.py (it passes options, which are in the key), data.py, hf*.py, train_*.py, memarc/, explain.py.
GRAPH_SOURCES = ("passes", "codegen", "options.py", "clipping.py", "strategy_registry.py", "registry.py")
GRAPH_FUNCTIONS = {"backend.py": ("dp_decomposition_table",)}


def _source_hash(root: Path) -> str:
    """sha256 of the graph-deciding sources of the package at `root` (the dpcompile directory): GRAPH_SOURCES whole,
    and of GRAPH_FUNCTIONS' files only the named functions (the whole file if one is not found)."""
    h = hashlib.sha256()

    def add(rel: str, data: bytes) -> None:
        h.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())

    for name in GRAPH_SOURCES:
        path = root / name
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.is_file() else []
        for f in files:
            add(f.relative_to(root).as_posix(), f.read_bytes())
    for name, functions in sorted(GRAPH_FUNCTIONS.items()):
        path = root / name
        if not path.is_file():
            continue
        text = path.read_text()
        tree = ast.parse(text)
        defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        if not all(f in defs for f in functions):
            add(name, text.encode())
            continue
        for f in functions:
            add(f"{name}:{f}", ast.get_source_segment(text, defs[f]).encode())
    return h.hexdigest()


_SOURCE_HASH = None


def source_hash() -> str:
    """_source_hash of this package, computed once per process."""
    global _SOURCE_HASH
    if _SOURCE_HASH is None:
        _SOURCE_HASH = _source_hash(Path(__file__).resolve().parent.parent)
    return _SOURCE_HASH
