"""The dependency direction of docs/DESIGN.md section 3, checked on the source: a module imports only from
rows below its own (or its own package); packages in one row are independent; and inside a package the
modules import each other without a circle (module-level and function-level imports alike), so a command
module never imports cli/main.py, which imports every command."""
import ast
from pathlib import Path

import pytest
from fixtures_images import write_files

import torchdiffusion

ROWS = {
    "protocols": 0, "errors": 0, "seeding": 0,
    "core": 1, "nn": 1,
    "sampling": 2, "data": 2,
    "guidance": 3, "inverse": 3, "autoencoders": 3,
    "pipelines": 4, "train": 4, "eval": 4, "conditioners": 4,
    "config": 5,
    "cli": 6,
    "interop": 6,  # a top-level module naming config.interop's functions (torchdiffusion.interop.load_diffusers)
}
SRC = Path(torchdiffusion.__file__).parent

# Circles that are known and waiting for a change on another line of work; each must still be a circle (see
# test_known_cycles_are_still_cycles), so an entry goes as soon as its circle does.
KNOWN_CYCLES: set = set()  # import circles allowed for now (none)


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _targets(path: Path, root: Path):
    """(dotted module below the top package, line) of every torchdiffusion import of `path`, at any depth of the
    file (function-level imports included); `from . import x` yields the package and package.x."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("torchdiffusion."):
                    yield a.name.split(".", 1)[1], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.startswith("torchdiffusion."):
                base = node.module.split(".")[1:]
            elif node.level > 0:
                parts = path.relative_to(root).parts
                depth = len(parts) - node.level  # package parts left after going up
                base = list(parts[:max(depth, 0)]) + (node.module.split(".") if node.module else [])
            else:
                continue
            if base:
                yield ".".join(base), node.lineno
            for a in node.names:  # `from .pkg import module` imports pkg.module
                yield ".".join(base + [a.name]), node.lineno


def _imports(path: Path, package: str, root: Path = SRC):
    """(top-level package, line) of every torchdiffusion import of `path`."""
    for target, line in _targets(path, root):
        yield target.split(".")[0], line


def _graph(root: Path) -> dict[str, set[str]]:
    """Edges module -> module inside each package (between real modules of `root` only)."""
    files = {_module_name(p, root): p for p in root.rglob("*.py") if len(p.relative_to(root).parts) > 1}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        pkg = mod.split(".")[0]
        for target, _ in _targets(path, root):
            if target in files and target != mod and target.split(".")[0] == pkg and target != pkg:
                graph[mod].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle a -> b -> ... -> a per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for comp in comps:  # walk one circle through the component, from its first module
        members, start = set(comp), min(comp)
        path, seen, v = [start], {start}, start
        while True:
            nxt = sorted(w for w in graph[v] if w in members)
            back = [w for w in nxt if w == start]
            if back and len(path) > 1:
                break
            fresh = [w for w in nxt if w not in seen] or back
            v = fresh[0]
            if v == start:
                break
            path.append(v)
            seen.add(v)
        out.append(path + [start])
    return out


def test_every_package_has_a_row():
    pkgs = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    mods = {p.stem for p in SRC.glob("*.py") if p.stem != "__init__"}
    assert pkgs | mods <= set(ROWS), f"packages without a layering row: {sorted((pkgs | mods) - set(ROWS))}"


def test_imports_follow_the_dependency_direction():
    bad = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        if len(rel.parts) == 1:
            continue  # top-level modules (protocols, errors, __init__)
        own = rel.parts[0]
        for target, line in _imports(path, own):
            if target == own or target not in ROWS:
                continue
            if ROWS[target] >= ROWS[own]:
                bad.append(f"{rel}:{line} imports {target} (row {ROWS[target]}) from {own} (row {ROWS[own]})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles_inside_a_package():
    found = [c for c in _cycles(_graph(SRC)) if frozenset(c) not in KNOWN_CYCLES]
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_known_cycles_are_still_cycles():
    real = {frozenset(c) for c in _cycles(_graph(SRC))}
    stale = [sorted(k) for k in KNOWN_CYCLES if k not in real]
    assert not stale, f"no longer circles, remove them from KNOWN_CYCLES: {stale}"


def _plant(root: Path, files: dict[str, str]) -> Path:
    return write_files(root, {rel: text.encode() for rel, text in files.items()})


def test_checker_catches_a_violation(tmp_path):
    """The checker itself can fail: a planted upward import is reported (in a copy of the layout, never in the
    installed package)."""
    root = _plant(tmp_path / "torchdiffusion",
                  {"core/__init__.py": "", "core/planted.py": "from ..train import trainer\n"})
    found = list(_imports(root / "core" / "planted.py", "core", root))
    assert ("train", 1) in found and ROWS["train"] > ROWS["core"]


@pytest.mark.parametrize("second", [
    "from .main import helper\n",  # module level
    "def command():\n    from .main import helper\n    return helper\n",  # function level
    "def command():\n    from torchdiffusion.cli import main\n    return main\n",  # absolute, `from pkg import module`
])
def test_cycle_checker_catches_a_planted_circle(tmp_path, second):
    root = _plant(tmp_path / "torchdiffusion", {
        "cli/__init__.py": "", "cli/main.py": "from .sample_cmd import sample\n", "cli/sample_cmd.py": second,
        "cli/common.py": "import os\n", "cli/other.py": "from .common import os\n",
    })
    assert _cycles(_graph(root)) == [["cli.main", "cli.sample_cmd", "cli.main"]]


def test_cycle_checker_walks_a_longer_circle(tmp_path):
    root = _plant(tmp_path / "torchdiffusion", {
        "pipelines/__init__.py": "", "pipelines/a.py": "from .b import x\n", "pipelines/b.py": "from . import c\n",
        "pipelines/c.py": "def f():\n    from .a import y\n",
    })
    assert _cycles(_graph(root)) == [["pipelines.a", "pipelines.b", "pipelines.c", "pipelines.a"]]


def test_commands_import_neither_each_other_nor_main():
    """cli/main.py loads the commands by name (importlib), so the circle check cannot see a command importing
    main or another command: this rule is checked directly."""
    bad = []
    for path in (SRC / "cli").glob("*_cmd.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                names = [a.name for a in node.names]
                targets = ([mod.split(".")[-1]] if mod else names) if node.level == 1 else \
                    ([mod.split(".")[2]] if mod.startswith("torchdiffusion.cli.") else [])
                bad += [f"{path.name}:{node.lineno} imports cli.{t}" for t in targets
                        if t == "main" or t.endswith("_cmd")]
    assert not bad, "\n".join(bad)
