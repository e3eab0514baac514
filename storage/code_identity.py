"""The identity of the code that builds a stage, for its artifact key.

A stage's code is its task module and every project module that module imports, directly or
through others (found by reading `import` statements, so lazy imports inside functions count).
Each module contributes its syntax tree with docstrings removed: editing a comment, a docstring or
the formatting keeps every key; a change to what the code does gives the stage (and through the
content of its artifact, every later stage) a new key. This is Prefect's `TASK_SOURCE` idea,
widened from one function to what that function calls.

`kgmel_core.config` is left out: a stage's config values are hashed into its key already, and a
changed default changes those values. `tasks.common` is the orchestration frame every stage shares
(skip logic, logging), which never changes what a stage writes.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import threading
from pathlib import Path

PROJECT_PACKAGES = ("kgmel_core", "tasks")
NOT_STAGE_CODE = frozenset({"kgmel_core.config", "tasks.common"})


def _source_path(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _is_project(module: str) -> bool:
    return module.split(".")[0] in PROJECT_PACKAGES and module not in NOT_STAGE_CODE


def _imports(tree: ast.AST) -> set[str]:
    """Project modules named by the import statements of a tree (`from a import b` may name module a.b)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    modules = set()
    for name in found:
        parts = name.split(".")
        # `import a.b.c` also runs a/__init__ and a/b/__init__
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if _is_project(prefix) and _source_path(prefix) is not None:
                modules.add(prefix)
    return modules


def _without_docstrings(tree: ast.Module) -> ast.Module:
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            value = first.value if isinstance(first, ast.Expr) else None
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


# Prefect runs tasks in threads, and each stage digests its code. CPython's AST construction keeps a
# recursion counter that concurrent parses can corrupt ("SystemError: AST constructor recursion depth
# mismatch", cpython gh-106905: a stage of a CI run failed on it), so parsing is one thread at a time.
_AST_LOCK = threading.RLock()


@functools.cache
def _module_tree(module: str) -> ast.Module:
    path = _source_path(module)
    if path is None:
        raise ImportError(f"cannot find the source of module {module!r}")
    with _AST_LOCK:
        return ast.parse(path.read_text(), filename=str(path))


@functools.cache
def module_closure(module: str) -> tuple[str, ...]:
    """`module` and every project module it imports, transitively, sorted."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(_imports(_module_tree(name)) - seen)
    return tuple(sorted(seen))


@functools.cache
def code_digest(module: str) -> str:
    """A short digest of what the code of `module` and its project imports does (docstrings aside)."""
    digest = hashlib.sha256()
    for name in module_closure(module):
        with _AST_LOCK:
            tree = _without_docstrings(ast.parse(ast.unparse(_module_tree(name))))
        digest.update(f"{name}\0{ast.dump(tree, include_attributes=False)}\n".encode())
    return digest.hexdigest()[:16]
