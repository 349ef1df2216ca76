"""The package's one-way layering, checked on the source (AST only: nothing of qguard is imported).

Every `import` counts, wherever it sits: module level, inside a function (lazy), under `TYPE_CHECKING`.
A lazy or type-only import still couples two modules; hiding a cycle behind one is how cycles grow.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "qguard"

# The layers, lowest first (docs/architecture.md). An import may point to its own layer or a lower one.
# The longest matching prefix gives a module its layer; "qguard" alone is the package's __init__.
LAYERS: dict[str, int] = {
    "qguard.errors": 0, "qguard.taxonomy": 0,
    "qguard.policy": 1, "qguard.debounce": 1, "qguard.messages": 1, "qguard.tokenizer": 1,
    "qguard.policy_file": 1, "qguard.moderations": 1, "qguard.leak": 1,  # a policy file's schema; OpenAI's moderation shape
    "qguard.incremental": 1, "qguard.weights": 1, "qguard.starter": 1,
    "qguard.model": 2,  # tensors in, tensors out
    "qguard.families": 3, "qguard.families.gen": 3, "qguard.families.stream": 3,  # format knowledge
    "qguard.engine": 4,
    "qguard.families.registry": 5,  # the only place that branches on a family
    "qguard.runtime": 6, "qguard.backends": 6,
    "qguard.data": 7, "qguard.eval": 7, "qguard.train": 7, "qguard.annotate": 7, "qguard.annotate_ray": 7, "qguard.reward": 7,
    "qguard.serve": 7, "qguard.testing": 7, "qguard.audit": 7, "qguard.metrics": 7, "qguard.generate": 7,
    "qguard.integrations": 7,  # other systems' plugin points (LiteLLM), beside serve
    "qguard.client": 7,  # a qguard server from Python (HTTP and /v1/stream), beside serve
    "qguard.cli": 8, "qguard": 8, "qguard.__main__": 8,
}
# Old import paths kept for users, tests and benchmarks: nothing inside qguard imports them.
SHIMS = {"qguard.guard", "qguard.stream", "qguard.calibration", "qguard.checkpoint"}
SHIM_RANK = 99
FAMILY_NAMES = {"gen", "stream"}
FAMILY_MODELS = {"StreamGuardModel", "GenGuardModel"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


@cache
def tree(name: str) -> ast.Module:
    return ast.parse(modules()[name].read_text("utf-8"), str(modules()[name]))


def _owner(name: str) -> str:
    """The module that defines `name` (a module, or a package/module that `name` is an attribute of)."""
    mods = modules()
    while name not in mods and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in mods else ""


def imports(name: str) -> list[tuple[str, int]]:
    """(imported qguard module, line) for every import in module `name`, anywhere in its file.

    `from a import b` is `a.b` when that module exists, otherwise `a`; relative imports are resolved.
    """
    is_pkg = modules()[name].name == "__init__.py"
    out = []
    for node in ast.walk(tree(name)):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_pkg else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            if base == "qguard" or base.startswith("qguard."):
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules() else base for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name == "qguard" or a.name.startswith("qguard.")]
        for t in targets:
            t = _owner(t)
            if t and t != name:
                out.append((t, node.lineno))
    return out


@cache
def graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: first line}"""
    g: dict[str, dict[str, int]] = defaultdict(dict)
    for name in modules():
        for dst, line in imports(name):
            g[name].setdefault(dst, line)
    return g


def rank(name: str) -> int | None:
    if name in SHIMS:
        return SHIM_RANK
    best = None
    for prefix in LAYERS:
        hit = name == prefix or (prefix != "qguard" and name.startswith(prefix + "."))
        if hit and (best is None or len(prefix) > len(best)):
            best = prefix
    return None if best is None else LAYERS[best]


def strongly_connected(g: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; the components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []
    for root in sorted(modules()):
        if root in index:
            continue
        work = [(root, iter(sorted(g.get(root, {}))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(g.get(w, {})))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


# ------------------------------------------------------------------------------------------------ tests

def test_the_graph_sees_every_kind_of_import():
    # the checks below are only as good as `imports`: prove it on a known lazy, relative and from-import
    g = graph()
    assert "qguard.cli" in g["qguard.__main__"]
    assert any(m.startswith("qguard.") for m in g["qguard.cli"])
    assert all(rank(m) is not None for m in ("qguard", "qguard.model.qwen3", "qguard.cli.serve"))
    assert rank("qguardx") is None and rank("qguard.nosuch") is None


def test_no_import_cycles():
    g = graph()
    cycles = strongly_connected(g)
    report = [" <-> ".join(c) + "\n" + "\n".join(
        f"    {a} -> {b} ({modules()[a].relative_to(ROOT)}:{g[a][b]})" for a in c for b in sorted(g[a]) if b in c)
        for c in cycles]
    assert not cycles, "import cycles:\n" + "\n".join(report)


def test_every_module_has_a_layer():
    missing = sorted(m for m in modules() if rank(m) is None)
    assert not missing, f"modules missing from LAYERS in {Path(__file__).name}: {missing}"


def test_layers_point_down():
    bad = []
    for src, dsts in graph().items():
        r = rank(src)
        for dst, line in dsts.items():
            if dst in SHIMS:
                bad.append(f"{modules()[src].relative_to(ROOT)}:{line}: {src} imports the shim {dst}")
            elif r is not None and r != SHIM_RANK and (rank(dst) or 0) > r:
                bad.append(f"{modules()[src].relative_to(ROOT)}:{line}: {src} (L{r}) imports {dst} (L{rank(dst)})")
    assert not bad, "imports pointing up a layer:\n" + "\n".join(sorted(bad))


def test_model_layer_imports_nothing_above_it():
    bad = [f"{modules()[src].relative_to(ROOT)}:{line}: {src} imports {dst}"
           for src, dsts in graph().items() if src == "qguard.model" or src.startswith("qguard.model.")
           for dst, line in dsts.items() if not (dst == "qguard.errors" or dst.startswith("qguard.model"))]
    assert not bad, "the model layer imports only qguard.errors and qguard.model.*:\n" + "\n".join(sorted(bad))


def test_the_families_package_imports_nothing():
    # importing qguard.families.gen runs families/__init__.py first: it must stay free and cheap
    name = "qguard.families"
    if name in modules():
        assert not [n for n in ast.walk(tree(name)) if isinstance(n, ast.Import | ast.ImportFrom)
                    and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _is_kind(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id == "Kind") or (
        isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "Kind")


def _is_family_field(node: ast.AST) -> bool:
    """An operand that reads `x.kind`, `x.name` or a bare `kind` (what holds a family's name), even
    wrapped: `getattr(guard.kind, "value", guard.kind)`."""
    return any((isinstance(n, ast.Attribute) and n.attr in ("kind", "name")) or (
        isinstance(n, ast.Name) and n.id == "kind") for n in ast.walk(node))


def _family_constants(node: ast.AST) -> bool:
    elts = node.elts if isinstance(node, ast.Tuple | ast.List | ast.Set) else [node]
    return any(isinstance(e, ast.Constant) and e.value in FAMILY_NAMES for e in elts)


def family_branches(label: str, module: ast.Module, *, in_families: bool = False) -> list[str]:
    out = []
    for node in ast.walk(module):
        if isinstance(node, ast.Compare):
            ops = [node.left, *node.comparators]
            if any(_is_kind(o) for o in ops) or (
                    any(_is_family_field(o) for o in ops) and any(_family_constants(o) for o in ops)):
                out.append(f"{label}:{node.lineno}: {ast.unparse(node)}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance"
              and len(node.args) == 2 and _names(node.args[1]) & FAMILY_MODELS and not in_families):
            out.append(f"{label}:{node.lineno}: {ast.unparse(node)}")
    return out


def test_family_branching_only_in_the_registry():
    bad = [b for m, p in modules().items() if m != "qguard.families.registry" and m not in SHIMS
           for b in family_branches(str(p.relative_to(ROOT)), tree(m), in_families=m.startswith("qguard.families."))]
    assert bad == [], "branching on Kind or a family name outside families/registry.py:\n" + "\n".join(bad)


def test_the_branch_detector_finds_branches():
    # a detector that finds nothing proves nothing: each shape it must flag, and two it must not
    src = ("if k is Kind.GEN: pass\nif cal.kind == 'gen': pass\nif kind not in ('stream', 'gen'): pass\n"
           "if isinstance(m, StreamGuardModel | GenGuardModel): pass\nif cfg.mode == 'guard': pass\n"
           "if guard.live: pass\nif getattr(g.kind, 'value', g.kind) == 'stream': pass\n")
    found = family_branches("toy.py", ast.parse(src))
    assert [f.split(": ", 1)[1] for f in found] == [
        "k is Kind.GEN", "cal.kind == 'gen'", "kind not in ('stream', 'gen')",
        "isinstance(m, StreamGuardModel | GenGuardModel)", "getattr(g.kind, 'value', g.kind) == 'stream'"]
    assert len(family_branches("toy.py", ast.parse(src), in_families=True)) == 4  # a family may know its models


SESSION_LAYER = ("qguard/runtime/stream.py", "qguard/families/stream.py")


def test_no_private_cross_calls_in_the_session_layer():
    bad, absent = [], []
    for rel in SESSION_LAYER:
        path = ROOT / rel
        if not path.is_file():
            absent.append(rel)
            continue
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                bad.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    assert not absent, f"the session layer's modules do not exist yet: {absent}"
    assert bad == [], "private members reached from outside their object:\n" + "\n".join(bad)
