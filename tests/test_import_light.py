"""The library stays light and one-way: ``coap_compile`` never imports the demo side (``coap_lab``) nor
matplotlib (the optional ``demo`` extra), ``coap_lab`` reaches the library only through its non-private names,
and ``coap_lab``'s own modules import each other without cycles (checked on the source, with ``ast``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE, LAB = "coap_compile", "coap_lab"

_FRESH_IMPORT = """
import sys, torch
import coap_compile
model = torch.nn.Linear(8, 8)
opt = coap_compile.optimize(model, base_optim=torch.optim.AdamW, rank=2, lr=1e-2)
model(torch.randn(4, 8)).square().sum().backward()
opt.step()
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("matplotlib", "coap_lab"))
assert not bad, bad[:5]
print("ok")
"""


def test_import_coap_compile_imports_neither_matplotlib_nor_coap_lab():
    """In a fresh interpreter (this one has both loaded): ``import coap_compile``, an optimizer and an eager
    step load no ``matplotlib`` and no ``coap_lab`` module."""
    run = subprocess.run(
        [sys.executable, "-c", _FRESH_IMPORT], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """``(absolute module, imported names, line)`` of every import statement (module level or lazy), and
    of ``importlib.import_module("…")`` / ``__import__("…")`` calls with a literal name."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.append((target, [a.name for a in node.names], node.lineno))
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id == "__import__")
            )
        ):
            found.append((node.args[0].value, [], node.lineno))
    return found


def test_core_source_never_imports_coap_lab():
    hits = [
        f"{path.relative_to(ROOT)}:{line}: {target}"
        for module, path in _modules(CORE).items()
        for target, _, line in _imports(module, path)
        if target.split(".")[0] == LAB
    ]
    assert _modules(CORE) and not hits, hits


def test_coap_lab_uses_only_non_private_names_of_the_core():
    hits = [
        f"{path.relative_to(ROOT)}:{line}: {target} {names}"
        for module, path in _modules(LAB).items()
        for target, names, line in _imports(module, path)
        if target.split(".")[0] == CORE and any(part.startswith("_") for part in target.split(".") + names)
    ]
    assert not hits, hits


def test_coap_lab_has_no_import_cycles():
    """Tarjan's strongly connected components over ``coap_lab``'s import graph (lazy imports included)."""
    mods = _modules(LAB)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        for target, names, _ in _imports(module, path):
            for dep in [f"{target}.{n}" if f"{target}.{n}" in mods else target for n in names] or [target]:
                if dep in mods and dep != module:
                    edges[module].add(dep)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in mods:
        if v not in index:
            visit(v)
    assert len(mods) > 20 and not cycles, cycles
