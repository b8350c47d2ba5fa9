"""The package's layering, read from its source (AST), so a new module is checked when it is added.

(a) The decoder blocks are called in a loop in model.py only: the architecture has one definition. Elsewhere
    a loop over `<x>.blocks` may read or wrap a block (the native step packs its weights, FSDP shards it),
    never run one (`block(x)`, `block.forward(x)`).
(b) No module uses another gptgen module's private names: no `from .x import _name`, no `x._name` where x is
    a gptgen module or a name imported from one. Dunder names and a module's own privates are fine.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import gptgen

PACKAGE = Path(gptgen.__file__).parent
MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names."""
    if not node.level:
        return node.module or ""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[:len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(node) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _iterates_blocks(expr) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr == "blocks" for n in ast.walk(expr))


def _runs(body_nodes, names: set[str]) -> bool:
    """Whether the loop body calls one of `names` or its forward()."""
    for root in body_nodes:
        for n in ast.walk(root):
            if not isinstance(n, ast.Call):
                continue
            f = n.func
            if isinstance(f, ast.Name) and f.id in names:
                return True
            if isinstance(f, ast.Attribute) and f.attr in ("forward", "__call__") \
                    and isinstance(f.value, ast.Name) and f.value.id in names:
                return True
    return False


def block_loops(path: Path) -> list[str]:
    """'file:line' of every loop over `.blocks` that runs a block."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.For, ast.AsyncFor)) and _iterates_blocks(node.iter):
            if _runs(node.body, _targets(node.target)):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
        elif isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            for gen in node.generators:
                if _iterates_blocks(gen.iter):
                    body = [node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]
                    if _runs(body + gen.ifs, _targets(gen.target)):
                        found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    return found


def private_uses(path: Path) -> list[str]:
    """'file:line name' of every use of another gptgen module's private name."""
    tree = ast.parse(path.read_text(), str(path))
    me = _module_name(path)
    imported: dict[str, str] = {}  # local name -> the gptgen module (or module.name) it stands for
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _absolute(me, path, node)
            if not source.startswith("gptgen"):
                continue
            for alias in node.names:
                if _private(alias.name) and source != me:
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} from {source} import {alias.name}")
                imported[alias.asname or alias.name] = f"{source}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("gptgen"):
                    imported[alias.asname or alias.name.split(".")[0]] = alias.asname and alias.name or "gptgen"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name):
            source = imported.get(node.value.id)
            if source is not None and source != me:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.value.id}.{node.attr}")
    return found


def test_the_package_has_modules_to_check():
    names = {p.name for p in MODULES}
    assert {"model.py", "runner.py", "engine.py", "batcher.py"} <= names


def test_blocks_are_run_in_a_loop_in_model_py_only():
    found = [f for p in MODULES if p.name != "model.py" or p.parent != PACKAGE for f in block_loops(p)]
    assert found == []
    assert block_loops(PACKAGE / "model.py"), "model.py's own loop over its blocks is not seen: the check is blind"


def test_no_module_uses_another_modules_private_names():
    found = [f for p in MODULES for f in private_uses(p)]
    assert found == []


def test_the_checks_see_what_they_look_for(tmp_path, monkeypatch):
    """The checkers flag the patterns they exist for (a checker that cannot fail proves nothing)."""
    pkg = tmp_path / "gptgen"
    (pkg / "generation").mkdir(parents=True)
    bad = pkg / "generation" / "bad.py"
    bad.write_text("from .engine import _head, public\nfrom .. import model\nfrom ..model import GPT\n"
                   "def f(m, x):\n"
                   "    for block in m.blocks:\n        x = block(x)\n"
                   "    ys = [b.forward(x) for b in m.blocks]\n"
                   "    ok = [b.ln_1.weight for b in m.blocks]\n"
                   "    return model._private_helper, GPT._attention_mask, model.__name__\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    assert block_loops(bad) == ["generation/bad.py:5", "generation/bad.py:7"]
    assert private_uses(bad) == ["generation/bad.py:1 from gptgen.generation.engine import _head",
                                 "generation/bad.py:9 model._private_helper",
                                 "generation/bad.py:9 GPT._attention_mask"]
