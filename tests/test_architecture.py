"""The package's import structure: no cycle, layers pointing one way, no import inside a function,
no probing of rules for undeclared hooks (see docs/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "backpack"

# top to bottom; a module may import its own layer and the layers below it
LAYERS = [
    ("api", ("backpack", "backpack._context", "backpack.context", "backpack.distributed")),
    ("extensions", ("backpack.extensions",)),
    ("engine", ("backpack.engine",)),
    ("rules", ("backpack.derivatives", "backpack.custom_module")),
    ("base", ("backpack.registry", "backpack._state", "backpack._torch_private",
              "backpack.utils", "backpack.hessianfree")),
]  # fmt: skip


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in ROOT.rglob("*.py")}


def _layer(module: str) -> int:
    """Index of the layer of ``module``: the longest matching prefix decides."""
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{module} belongs to no layer"
    return rank


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """``(imported backpack module, line, at module level)`` for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
            names = [n for n in names if n in MODULES] or [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for n in names:
            if n in MODULES:
                out.append((n, node.lineno, id(node) in top))
    return out


GRAPH = {m: {t for t, _, _ in _imports(p)} for m, p in MODULES.items()}


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(GRAPH[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t) :] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t, [*stack, t])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])


def test_layers_point_down():
    wrong = [
        f"{m} ({LAYERS[_layer(m)][0]}) imports {t} ({LAYERS[_layer(t)][0]})"
        for m, targets in GRAPH.items()
        for t in targets
        if _layer(t) < _layer(m)
    ]
    assert not wrong, "\n".join(wrong)


def test_no_function_level_imports():
    inner = [f"{m}:{line} imports {t}" for m, p in MODULES.items()
             for t, line, top in _imports(p) if not top]  # fmt: skip
    assert not inner, "\n".join(inner)


def test_leaves_import_nothing_of_backpack():
    for leaf in ("backpack._state", "backpack._torch_private", "backpack.registry"):
        assert not GRAPH[leaf], f"{leaf} imports {GRAPH[leaf]}"


def test_no_probing_of_rules():
    """Every hook the engine or an extension asks of a rule is declared on ``Rule``."""
    probe = re.compile(r"(getattr|hasattr)\(\s*(call\.)?rule\b")
    found = [f"{p.relative_to(ROOT.parent)}:{i}" for p in ROOT.rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if probe.search(line)]  # fmt: skip
    assert not found, "\n".join(found)


def test_every_cache_key_is_documented():
    """Each literal key of ``io.cache`` is listed, with producer and consumers, on ``IO``."""
    from backpack.derivatives.base import IO

    direct = re.compile(
        r"""cache(?:\[|\.get\()\(?["']([A-Za-z_]+)["']|["']([A-Za-z_]+)["'] (?:not )?in \w*\.?io\.cache"""
    )
    named = re.compile(r"""key = \(["']([A-Za-z_]+)["']""")  # a key used on the next lines
    found = set()
    for p in ROOT.rglob("*.py"):
        lines = p.read_text().splitlines()
        for i, line in enumerate(lines):
            found |= {next(g for g in m.groups() if g) for m in direct.finditer(line)}
            m = named.search(line)
            if m and any("cache" in later for later in lines[i + 1 : i + 3]):
                found.add(m.group(1))
    assert {"batch_grad", "kron_A", "stats"} <= found, "the patterns are stale"
    missing = sorted(k for k in found if f'"{k}"' not in IO.__doc__)
    assert not missing, f"io.cache keys without documentation on IO: {missing}"
