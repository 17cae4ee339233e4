"""The registries the pass is built on: op roles, strategies, site kinds. What they derive, and that the pass reads
them instead of keeping its own lists (issue 20)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import dpcompile
from dpcompile import strategy_registry as SR
from dpcompile.codegen.registry import inlined_ops, ops_with_role, role_of
from dpcompile.passes import sites

PASSES = Path(dpcompile.__file__).resolve().parent / "passes"
BUILTIN_KINDS = ("bmm", "conv", "embedding", "linear", "rows", "whole")


def test_no_kind_strings_outside_the_site_registry():
    """Only passes/sites/ names site kinds; the rest of the pass looks them up."""
    pattern = re.compile(r"\"(%s)\"|\.kind ==|\.kind !=|\.kind in " % "|".join(BUILTIN_KINDS))
    offenders = [f"{f.name}:{i}: {line.strip()}" for f in sorted(PASSES.glob("*.py"))
                 for i, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders


def test_site_kinds_are_registered_and_derived():
    assert {k.name for k in sites.kinds()} >= set(BUILTIN_KINDS)
    assert set(sites.fused_kinds()) >= {"linear", "rows", "embedding"}
    assert not {"bmm", "conv", "whole"} & set(sites.fused_kinds())
    assert sites.site_kind("linear").strategies and not sites.site_kind("rows").strategies
    assert sites.site_kind("whole").keeps_node
    with pytest.raises(KeyError, match="unknown site kind"):
        sites.site_kind("nope")
    with pytest.raises(ValueError, match="needs norm and clipped_sum"):
        sites.SiteKind("half", classify=None, per_sample=None, fused_inputs=lambda *a: ())


@pytest.mark.parametrize("op,kind", [(torch.ops.aten.mm.default, "linear"), (torch.ops.aten.sum.dim_IntList, "rows"),
                                     (torch.ops.aten.embedding_dense_backward.default, "embedding"),
                                     (torch.ops.aten.bmm.default, "bmm")])
def test_each_kind_matches_its_ops(op, kind):
    graph = torch.fx.Graph()
    node = graph.call_function(op, ())
    assert sites.match(node).name == kind


def test_strategy_names_come_from_the_registry():
    from dpcompile.options import EXACT_LINEAR_STRATEGIES, LINEAR_STRATEGIES

    assert LINEAR_STRATEGIES == ("auto", "direct", "ghost", "single_pass", "stored", "two_pass", "randomized")
    assert EXACT_LINEAR_STRATEGIES == ("direct", "ghost", "single_pass", "stored", "two_pass")
    for name in SR.inexact_names():
        assert SR.get_strategy(name).accounting in SR.ACCOUNTINGS
    # the internal forms the rewrite runs are records too, but not options
    for name in ("single_pass_chunked", "randomized_vendor_sum", "randomized_stored"):
        assert not SR.get_strategy(name).option
    assert SR.get_strategy("single_pass").op_strategy(chunked=True, stored_products=False) == "single_pass_chunked"
    assert SR.get_strategy("randomized").op_strategy(chunked=False, stored_products=False) == "randomized_vendor_sum"
    assert SR.get_strategy("randomized").op_strategy(chunked=False, stored_products=True) == "randomized_stored"
    assert SR.get_strategy("randomized").op_strategy(chunked=True, stored_products=False) == "randomized"
    assert SR.get_strategy("direct").op_strategy(chunked=True, stored_products=False) == "direct"
    with pytest.raises(ValueError, match="already registered"):
        SR.register_strategy(SR.get_strategy("direct"))


def test_op_roles():
    d = torch.ops.dpcompile
    assert d.linear_clipped_sum.default in ops_with_role("clipped_sum")
    assert d.linear_single_pass_chunked.default in ops_with_role("clipped_sum")
    assert d.linear_single_pass_chunked.default not in inlined_ops()  # a custom_op: not inlined
    assert d.rows_norm.default in ops_with_role("norm") and d.rows_norm.default in inlined_ops()
    assert role_of("rows_colsum") == "prepare" and role_of("nope") is None
    with pytest.raises(ValueError, match="role"):
        ops_with_role("sum")


# -- import layering (issue 20): options -> passes -> codegen; privacy only through the contract modules ------------
PACKAGE = Path(dpcompile.__file__).resolve().parent
#: modules the graph side may import from dpcompile: anything but privacy/ (and the package root, which imports all)
GRAPH_SIDE = ("passes", "codegen", "randomized_contract.py", "clip_provenance.py")
CONTRACTS = ("dpcompile.randomized_contract", "dpcompile.clip_provenance")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


#: every module of the package, by name
MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path):
    """(line, module imported, inside a function, guarded) for every import statement of `path`, relative ones
    resolved: `from . import x` and `from .pkg import x` count as importing pkg.x where that is a module of the
    package, else pkg. guarded: inside the body of a `try` that catches ImportError (an optional dependency)."""
    import ast

    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out = []

    def catches_import_error(node) -> bool:
        names = []
        for h in node.handlers:
            types = h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]
            names += [t.id if isinstance(t, ast.Name) else getattr(t, "attr", None) for t in types]
        return bool({"ImportError", "ModuleNotFoundError"} & set(names))

    def visit(nodes, local, guarded):
        for child in nodes:
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((child.lineno, a.name, inner, guarded) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = ".".join(package[:len(package) - child.level + 1] if child.level else [])
                mod = ".".join(p for p in (base, child.module) if p)
                for a in child.names:
                    sub = f"{mod}.{a.name}"
                    out.append((child.lineno, sub if sub in MODULES else mod, inner, guarded))
            if isinstance(child, ast.Try) and catches_import_error(child):
                visit(child.body, inner, True)
                visit(child.handlers + child.orelse + child.finalbody, inner, guarded)
            else:
                visit(ast.iter_child_nodes(child), inner, guarded)

    visit([ast.parse(path.read_text())], False, False)
    return out


def _import_graph(function_local: bool = True) -> dict:
    """module -> {imported module of the package: {(line, function-local)}}: every import of a module of the
    package, at module level and (function_local) inside functions; imports guarded for an optional dependency
    left out. The implicit import of a module's parent packages is not an edge (the package root imports all)."""
    graph = {m: {} for m in MODULES}
    for name, path in MODULES.items():
        for line, mod, local, guarded in _imports(path):
            if mod in MODULES and mod != name and not guarded and (function_local or not local):
                graph[name].setdefault(mod, set()).add((line, local))
    return graph


def _cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def _describe(graph: dict, component: list) -> str:
    edges = [f"{MODULES[m].relative_to(PACKAGE.parent)}:{line} -> {t}{' (function-local)' if local else ''}"
             for m in component for t, uses in sorted(graph[m].items()) if t in component for line, local in sorted(uses)]
    return " <-> ".join(component) + "\n    " + "\n    ".join(edges)


def test_no_import_cycle_even_through_function_local_imports():
    """One acyclic layer order (issue 20): no cycle among the package's modules, function-local imports counted
    (a function-local import must not hide one); only an import guarded for an optional third-party dependency
    (try / except ImportError) is left out. The modules of a cycle and the imports that close it are printed;
    move what both sides need into a module of its own."""
    graph = _import_graph()
    assert sum(len(v) for v in graph.values()) > 100  # the walker sees the package
    # it counts function-local imports (ops.py imports the Triton kernels in the function that launches them)
    assert any(local for _, local in graph["dpcompile.codegen.ops"]["dpcompile.codegen.kernels.linear"])
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(_describe(graph, c) for c in cycles)


def _graph_side_files():
    for entry in GRAPH_SIDE:
        p = PACKAGE / entry
        yield from (sorted(p.rglob("*.py")) if p.is_dir() else [p])


def test_graph_side_never_imports_privacy():
    """passes/ and codegen/ (and the contract modules) reach privacy/ only through the contract modules, which import
    nothing of privacy/ either; function-local imports included (none may hide a cycle)."""
    offenders = [f"{f.relative_to(PACKAGE)}:{line}: {mod}" for f in _graph_side_files()
                 for line, mod, *_ in _imports(f)
                 if mod == "dpcompile.privacy" or mod.startswith("dpcompile.privacy.") or mod == "dpcompile"]
    assert not offenders, offenders
    assert any(m.startswith("dpcompile.randomized_contract")
               for _, m, *_ in _imports(PACKAGE / "codegen" / "randomized_ops.py"))


def test_contract_modules_import_no_layer():
    """randomized_contract.py is imported by both sides: it imports nothing of the package."""
    assert not [m for _, m, *_ in _imports(PACKAGE / "randomized_contract.py") if m.startswith("dpcompile")]


def test_privacy_imports_the_randomized_contract_at_the_top():
    """No function-local import of the randomized contract or accounting in privacy/ (they would hide a cycle)."""
    offenders = [f"{f.name}:{line}: {mod}" for f in sorted((PACKAGE / "privacy").glob("*.py"))
                 for line, mod, local, _ in _imports(f) if local and
                 (mod.startswith("dpcompile.randomized_contract") or
                  mod.startswith("dpcompile.privacy.randomized_accounting"))]
    assert not offenders, offenders
    assert any(m.startswith("dpcompile.randomized_contract") and not local
               for _, m, local, _ in _imports(PACKAGE / "privacy" / "accounting.py"))


def test_the_contract_sums_up_the_probe_counts_that_ran():
    """The contract holds no record of runs (they travel with the gradients, clip_provenance.randomized_runs): only
    the probe-count rule and the summary the accountant makes of the counts it is told."""
    from dpcompile import randomized_contract as RC
    from dpcompile.privacy import randomized_accounting as RA

    assert RA.probes_summary is RC.probes_summary and RA.accounting_probes is RC.accounting_probes
    assert not [n for n in vars(RC) if "use" in n.lower() or "record" in n.lower()]
    assert RC.probes_summary(()) is None
    assert RC.probes_summary({RC.accounting_probes(12, "hutchpp"), RC.accounting_probes(8)}) == (4, True)
    assert RC.probes_summary([5, 8]) == (5, False)
    with pytest.raises(ValueError, match="hutchpp needs probes >= 3"):
        RC.accounting_probes(2, "hutchpp")


def test_cli_refuses_non_exact_strategies_from_the_registry():
    """`dpcompile train` calibrates sigma for exact norms: it refuses every strategy the registry marks not exact,
    by the record, not by name."""
    from dpcompile import cli

    with pytest.raises(cli.UsageError, match="--strategy randomized estimates per-sample norms.*randomized.md"):
        cli._strategy_option("randomized")
    estimate = SR.Strategy("user_estimate", exact=False, accounting="randomized", norm=lambda *a: None,
                           clipped_sum=lambda *a: None)
    SR.register_strategy(estimate)
    try:
        with pytest.raises(cli.UsageError, match="--strategy user_estimate estimates per-sample norms"):
            cli._strategy_option("user_estimate")
    finally:
        SR.unregister_strategy("user_estimate")
    assert cli._strategy_option("ghost") == {"strategy": "ghost"}


if __name__ == "__main__":  # python tests/test_registries.py: the import cycles, without and with function-local imports
    for with_local in (False, True):
        found = _cycles(_import_graph(with_local))
        print(f"{'module-level and function-local' if with_local else 'module-level'} imports: {len(found)} cycle(s)")
        for c in found:
            print("  " + _describe(_import_graph(with_local), c))
