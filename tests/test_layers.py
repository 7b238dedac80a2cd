"""The package's shape, read from its source with ``ast`` (no project code runs):
no import cycle, no module taking another module's underscore name, and each
layer importing only from the layers below it.  Imports made only for type
checking (under ``if TYPE_CHECKING:``) are left out."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "src" / "netchan"

#: bottom to top; a module may import from its own layer and the ones below
LAYERS = {
    "errors": 0,
    "identity": 0,
    "logs": 0,
    "version": 0,
    "carriers": 1,
    "session": 2,
    "node": 3,
    "channels": 4,
    "tunnels": 4,
    "coordinator": 4,
    "tools": 4,
    "ops": 5,
    "cli": 6,
    "__main__": 7,
    "": 7,  # netchan/__init__.py: the public API gathers every layer
}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except what sits under ``if TYPE_CHECKING:``."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def _scan(root: Path):
    """(modules, edges, private): edges[m] = modules m imports at run time;
    private = (importer, module, name) for each underscore name taken."""
    modules: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        modules[_module_name(path, root)] = path
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private: list[tuple[str, str, str]] = []
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        package = mod if is_pkg else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        aliases: dict[str, str] = {}  # local name -> module it is bound to
        nodes = list(_runtime_nodes(tree))
        for node in nodes:
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("netchan"):
                        edges[mod].add(a.name)
                        aliases[(a.asname or a.name).split(".")[0]] = a.name if a.asname else "netchan"
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                elif node.module and node.module.startswith("netchan"):
                    target = node.module
                else:
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub in modules:  # ``from . import wire``: the module itself
                        edges[mod].add(sub)
                        aliases[a.asname or a.name] = sub
                        continue
                    edges[mod].add(target)
                    if a.name.startswith("_") and target != mod:
                        private.append((mod, target, a.name))
        for node in nodes:  # once every alias is known
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                target = aliases.get(node.value.id)
                if target and node.attr.startswith("_") and not node.attr.startswith("__"):
                    private.append((mod, target, node.attr))
    for mod in edges:  # importing a submodule runs its packages' __init__ first
        edges[mod] = {t for t in edges[mod] if t in modules and t != mod}
    return modules, edges, private


def _layer(mod: str) -> int:
    parts = mod.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else ""]


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(mod: str, stack: list[str]) -> None:
        state[mod] = 1
        stack.append(mod)
        for dep in sorted(edges[mod]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[mod] = 2

    for mod in sorted(edges):
        if mod not in state:
            visit(mod, [])
    return cycles


def _upward(edges: dict[str, set[str]]) -> list[str]:
    """Imports of a higher layer, or of another package of the same layer."""
    return [
        f"{mod} (layer {_layer(mod)}) imports {dep} (layer {_layer(dep)})"
        for mod, deps in sorted(edges.items()) for dep in sorted(deps)
        if _layer(dep) > _layer(mod)
        or (_layer(dep) == _layer(mod) > 0 and dep.split(".")[:2] != mod.split(".")[:2])
    ]


def test_the_package_has_no_import_cycle():
    cycles = _cycles(_scan(ROOT)[1])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_module_takes_another_modules_private_names():
    private = _scan(ROOT)[2]
    assert not private, "\n".join(f"{m} takes {t}.{n}" for m, t, n in private)


def test_each_layer_imports_only_from_below():
    upward = _upward(_scan(ROOT)[1])
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("package", sorted(k for k, v in LAYERS.items() if k and k != "__main__"))
def test_each_layer_says_what_it_does_and_what_it_may_import(package):
    path = ROOT / package / "__init__.py"
    if not path.exists():
        path = ROOT / f"{package}.py"
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc, f"{path} has no docstring"
    if path.name == "__init__.py":
        assert "import" in doc.lower(), f"{path}'s docstring does not say what the layer may import"


def test_the_scan_finds_a_cycle_a_private_name_and_an_upward_import(tmp_path):
    root = tmp_path / "netchan"
    files = {
        "__init__.py": "from .node import thing\n",
        "errors.py": "",
        "session/__init__.py": "",
        "session/core.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..node import peer\n",
        "node/__init__.py": "",
        "node/peer.py": "from . import hub\nfrom ..session.core import _hidden\n",
        "node/hub.py": "def f():\n    from .peer import x\n    from ..channels import c\n",
        "channels/__init__.py": "from ..session import core\ncore._secret\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    modules, edges, private = _scan(root)
    assert edges["netchan.session.core"] == set()  # type-checking only
    assert _cycles(edges) == [["netchan.node.hub", "netchan.node.peer", "netchan.node.hub"]]
    assert sorted(private) == [("netchan.channels", "netchan.session.core", "_secret"),
                               ("netchan.node.peer", "netchan.session.core", "_hidden")]
    assert _upward(edges) == ["netchan.node.hub (layer 3) imports netchan.channels (layer 4)"]


#: the protocol cores: bytes (or frames) and a clock in, frames and events out
CORES = [
    "netchan.session.core",
    "netchan.session.control",
    "netchan.session.router",
    "netchan.session.scheduler",
    "netchan.channels.core",
    "netchan.channels.handle",
    "netchan.channels.frames",
    "netchan.channels.codec",
]


def _imports_asyncio(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "asyncio" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "asyncio":
            return True
    return False


@pytest.mark.parametrize("core", CORES)
def test_protocol_cores_do_no_io(core):
    """A core imports no asyncio, and neither does anything it imports."""
    modules, edges, _ = _scan(ROOT)
    seen, todo = set(), [core]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        todo.extend(edges[mod])
        parts = mod.split(".")
        todo.extend(".".join(parts[:i]) for i in range(2, len(parts)))  # the packages it runs
    users = sorted(m for m in seen if _imports_asyncio(modules[m]))
    assert not users, f"{core} runs asyncio through {users}"
