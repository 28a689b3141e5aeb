"""The package's layout rules (architecture: one home per concept; rooms import downward only).

A *room* is a first-level subpackage or module of bespoke_ext. Every import, at module level or inside a
function, counts: a lazy import is still a dependency.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bespoke_ext"
MAX_LINES = 450


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield path, parts


def _room(parts):
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path, parts):
    """(target module parts, imported names) of every import in the file."""
    tree = ast.parse(path.read_text())
    package = parts if path.name == "__init__.py" else parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
            else:
                target = (node.module or "").split(".")
            if target[0] != "bespoke_ext":
                continue
            names = [a.name for a in node.names]
            # `from . import ops` imports a module: the target is the submodule
            if not node.module and all((PACKAGE.parent.joinpath(*target, n)).with_suffix(".py").exists()
                                       or PACKAGE.parent.joinpath(*target, n).is_dir() for n in names):
                for n in names:
                    yield target + [n], []
            else:
                yield target, names
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("bespoke_ext"):
                    yield a.name.split("."), []


def _room_graph():
    graph = {}
    for path, parts in _modules():
        src = _room(parts)
        for target, _ in _imports(path, parts):
            dst = _room(target)
            if dst not in (src, "__init__", "_C"):
                graph.setdefault(src, set()).add(dst)
    return graph


def test_no_import_cycle_between_rooms():
    graph = _room_graph()
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail(f"import cycle between rooms: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for room in sorted(graph):
        if room not in state:
            visit(room, [room])


def test_no_underscore_name_imported_from_another_room():
    offenders = []
    for path, parts in _modules():
        for target, names in _imports(path, parts):
            if _room(target) == _room(parts):
                continue
            hidden = [n for n in names if n.startswith("_") and n != "_C"] + [p for p in target[1:] if p.startswith("_") and p != "_C"]
            if hidden:
                offenders.append(f"{path.relative_to(PACKAGE.parent)}: {'.'.join(target)} {hidden}")
    assert not offenders, "private names imported across rooms:\n" + "\n".join(offenders)


def test_nothing_imports_the_command_line():
    users = [str(path.relative_to(PACKAGE.parent)) for path, parts in _modules() if _room(parts) != "cli"
             for target, _ in _imports(path, parts) if _room(target) == "cli"]
    assert not users, f"the CLI is the top room; imported by {users}"


def test_source_files_stay_small():
    long = {str(p.relative_to(PACKAGE.parent)): n for p, _ in _modules()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"
