"""The dependency direction of docs/DESIGN.md section 3, checked on the source: a module imports only from
rows below its own (or its own package); packages in one row are independent."""
import ast
from pathlib import Path

import torchdiffusion

ROWS = {
    "protocols": 0, "errors": 0, "seeding": 0,
    "core": 1, "nn": 1,
    "sampling": 2, "data": 2, "autoencoders": 2,
    "guidance": 3, "inverse": 3,
    "pipelines": 4, "train": 4, "eval": 4,
    "config": 5,
    "cli": 6,
}
SRC = Path(torchdiffusion.__file__).parent


def _imports(path: Path, package: str):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("torchdiffusion."):
                    yield a.name.split(".")[1], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.startswith("torchdiffusion."):
                yield node.module.split(".")[1], node.lineno
            elif node.level > 0:
                parts = path.relative_to(SRC).parts
                depth = len(parts) - node.level  # package parts left after going up
                base = list(parts[:max(depth, 0)])
                target = (base + (node.module.split(".") if node.module else []))
                if target:
                    yield target[0], node.lineno
                else:  # "from .. import x" at the top package: x are the targets
                    for a in node.names:
                        yield a.name, node.lineno


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


def test_checker_catches_a_violation(tmp_path):
    """The checker itself can fail: a planted upward import is reported."""
    fake = SRC / "core" / "_planted_violation.py"
    fake.write_text("from ..train import trainer\n")
    try:
        found = list(_imports(fake, "core"))
    finally:
        fake.unlink()
    assert ("train", 1) in found and ROWS["train"] > ROWS["core"]
