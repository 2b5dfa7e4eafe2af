"""The package's layering, checked on its source: every import of fastquant/ and kernels/
(module level and inside functions) against the rules DESIGN states, and no import cycle.

Rules (fastquant/__init__.py's docstring says the same):

1. layers, from the top: ``cli`` -> the API (``fastquant``, ``api``, ``config``, ``serialize``)
   -> ``models``, ``data``, ``evaluate`` -> the methods (``calib``, ``recon``, ``deploy``) ->
   ``adapters`` -> ``nn`` -> ``backends`` -> ``ops`` -> ``quant`` -> the foundation
   (``errors``, ``settings``, ``record``, ``validate``, ``files``, ``_compat``); a module imports only
   its own layer and the ones below;
2. ``calib``, ``recon`` and ``deploy`` never import each other;
3. ``kernels/`` (``fastquant.kernels``) imports nothing of fastquant but itself, and only
   ``backends`` imports it or the compiled extensions ``fastquant._C``, ``fastquant._C_cpu``;
4. no cycle among modules.

The checker is plain code over ``ast`` (an equivalent of import-linter's ``layers``,
``independence`` and ``forbidden`` contracts); ``python tests/test_layering.py`` prints its
findings. Implicit imports of parent packages (importing ``a.b.c`` runs ``a/__init__``) are
not edges, as in import-linter.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LAYERS = [
    ("cli", ["fastquant.cli"]),
    ("api", ["fastquant", "fastquant.api", "fastquant.config", "fastquant.serialize"]),
    ("zoo", ["fastquant.models", "fastquant.data", "fastquant.evaluate"]),
    ("methods", ["fastquant.calib", "fastquant.recon", "fastquant.deploy"]),
    ("adapters", ["fastquant.adapters"]),
    ("nn", ["fastquant.nn"]),
    ("backends", ["fastquant.backends"]),
    ("ops", ["fastquant.ops"]),
    ("quant", ["fastquant.quant"]),
    ("foundation", ["fastquant.errors", "fastquant.settings", "fastquant.record", "fastquant.validate",
                    "fastquant.files", "fastquant._compat"]),
]
INDEPENDENT = ["fastquant.calib", "fastquant.recon", "fastquant.deploy"]
KERNELS = "fastquant.kernels"
BACKEND_ONLY = [KERNELS, "fastquant._C", "fastquant._C_cpu"]


def source_modules(repo: Path = REPO) -> dict[str, tuple[Path, bool]]:
    """{module name: (file, is a package __init__)} for fastquant/ and kernels/ (installed as
    fastquant.kernels)."""
    out = {}
    for root, prefix in ((repo / "fastquant", "fastquant"), (repo / "kernels", KERNELS)):
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = (path, is_pkg)
    return out


def imports_of(name: str, source: str, is_pkg: bool, known: set[str]) -> set[str]:
    """The fastquant modules ``source`` (module ``name``) imports, anywhere in its code."""
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()

    def add(target: str, names=()):
        if not (target == "fastquant" or target.startswith("fastquant.")):
            return
        subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in known or f"{target}.{n}" in BACKEND_ONLY]
        found.update(subs or [target])

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            add(target, [a.name for a in node.names])
    return found


def graph(modules: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """{module: the modules it imports}, from {module: (source, is_pkg)}."""
    known = set(modules)
    return {name: imports_of(name, src, is_pkg, known) for name, (src, is_pkg) in modules.items()}


def _owner(module: str, groups: list[str]) -> str | None:
    """The longest entry of ``groups`` that is ``module`` or a package above it."""
    hits = [g for g in groups if module == g or module.startswith(g + ".")]
    return max(hits, key=len) if hits else None


def layer_of(module: str) -> int | None:
    best = None
    for i, (_, members) in enumerate(LAYERS):
        owner = _owner(module, members)
        if owner is not None and (best is None or len(owner) > len(best[1])):
            best = (i, owner)
    return None if best is None else best[0]


def violations(edges: dict[str, set[str]]) -> list[str]:
    """Every import against rules 1-3, as 'importer -> imported: why'."""
    out = []
    for src, targets in sorted(edges.items()):
        for dst in sorted(targets):
            in_kernels = _owner(src, [KERNELS]) is not None
            if in_kernels:
                if _owner(dst, [KERNELS]) is None:
                    out.append(f"{src} -> {dst}: kernels/ imports nothing of fastquant")
                continue
            if _owner(dst, BACKEND_ONLY) is not None:
                if _owner(src, ["fastquant.backends"]) is None:
                    out.append(f"{src} -> {dst}: only fastquant.backends imports the kernels and extensions")
                continue
            ls, ld = layer_of(src), layer_of(dst)
            if ls is None or ld is None:
                out.append(f"{src} -> {dst}: module outside every layer (add it to tests/test_layering.py)")
                continue
            if ld < ls:
                out.append(f"{src} -> {dst}: layer '{LAYERS[ls][0]}' imports the higher layer '{LAYERS[ld][0]}'")
            a, b = _owner(src, INDEPENDENT), _owner(dst, INDEPENDENT)
            if a is not None and b is not None and a != b:
                out.append(f"{src} -> {dst}: {a} and {b} never import each other")
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: strongly connected components of more than one module (Tarjan),
    and modules importing themselves."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def package_graph() -> dict[str, set[str]]:
    return graph({name: (path.read_text(), is_pkg) for name, (path, is_pkg) in source_modules().items()})


# -- the tests ----------------------------------------------------------------------------------------
def test_the_package_keeps_its_layers():
    edges = package_graph()
    assert len(edges) > 50 and "fastquant.recon.methods.pfcr" in edges
    found = violations(edges)
    assert not found, "\n".join(found)


def test_no_import_cycle():
    found = cycles(package_graph())
    assert not found, found


def test_the_checker_catches_forbidden_imports():
    """The same checker on the package plus modules that break each rule: it names them."""
    modules = {name: (path.read_text(), is_pkg) for name, (path, is_pkg) in source_modules().items()}
    modules["fastquant.quant.bad_up"] = ("from ..recon import ReconConfig\n", False)  # quant -> recon: upward
    modules["fastquant.calib.bad_side"] = ("def f():\n    from fastquant.deploy import convert\n", False)  # lazy
    modules["fastquant.nn.bad_kernels"] = ("import fastquant.kernels.attention\n", False)
    modules["fastquant.kernels.bad"] = ("from fastquant.ops import REGISTRY\n", False)
    modules["fastquant.adapters.bad_zoo"] = ("from ..models import load_model\n", False)
    found = violations(graph(modules))
    for name, why in (("fastquant.quant.bad_up -> fastquant.recon", "higher layer 'methods'"),
                      ("fastquant.calib.bad_side -> fastquant.deploy", "never import each other"),
                      ("fastquant.nn.bad_kernels -> fastquant.kernels.attention", "only fastquant.backends"),
                      ("fastquant.kernels.bad -> fastquant.ops", "kernels/ imports nothing"),
                      ("fastquant.adapters.bad_zoo -> fastquant.models", "higher layer 'zoo'")):
        assert any(f.startswith(name) and why in f for f in found), (name, found)
    assert len(found) == 5, found
    modules["fastquant.ops.bad_cycle"] = ("from . import bad_cycle2\n", False)
    modules["fastquant.ops.bad_cycle2"] = ("from . import bad_cycle\n", False)
    assert ["fastquant.ops.bad_cycle", "fastquant.ops.bad_cycle2"] in cycles(graph(modules))


def test_relative_and_lazy_imports_are_resolved():
    known = {"fastquant.recon", "fastquant.recon.engine", "fastquant.recon.registry", "fastquant.quant",
             "fastquant.settings"}
    src = "from .registry import x\nfrom .. import settings\ndef f():\n    from ..quant import y\n"
    assert imports_of("fastquant.recon.engine", src, False, known) == {
        "fastquant.recon.registry", "fastquant.settings", "fastquant.quant"}
    assert imports_of("fastquant.recon", "from . import engine\n", True, known) == {"fastquant.recon.engine"}


if __name__ == "__main__":
    e = package_graph()
    problems = violations(e) + [f"cycle: {c}" for c in cycles(e)]
    print("\n".join(problems) or f"{len(e)} modules: layers kept, no cycle")
    sys.exit(1 if problems else 0)
