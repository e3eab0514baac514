"""The identity of the code that builds a stage, for its artifact key.

A stage's code is its task module and every project module that module imports, directly or
through others (found in the compiled `import` instructions, so lazy imports inside functions
count). Each module contributes its bytecode compiled without docstrings: editing a comment, a
docstring or the formatting keeps every key; a change to what the code does gives the stage (and
through the content of its artifact, every later stage) a new key. This is Prefect's `TASK_SOURCE`
idea, widened from one function to what that function calls.

Why bytecode and not `ast.parse`: turning a parse into Python `ast` objects uses a recursion counter
that CPython shares between threads (cpython gh-106905). Prefect runs stages in threads, and Python
3.11's traceback printer calls `ast.parse` too, so a stage digesting its code while another thread
logged an exception failed a CI run with "SystemError: AST constructor recursion depth mismatch".
`compile()` to bytecode never builds those objects.

Compiling with `optimize=2` drops docstrings, and also `assert` statements: product code raises
errors instead of asserting (ruff rule S101), so no behaviour hides there.

`kgmel_core.config` is left out: a stage's config values are hashed into its key already, and a
changed default changes those values. `tasks.common` is the orchestration frame every stage shares
(skip logic, logging), which never changes what a stage writes.
"""

from __future__ import annotations

import dis
import functools
import hashlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import CodeType

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


@functools.cache
def _module_code(module: str) -> CodeType:
    path = _source_path(module)
    if path is None:
        raise ImportError(f"cannot find the source of module {module!r}")
    return compile(path.read_text(), str(path), "exec", dont_inherit=True, optimize=2)


def _code_objects(code: CodeType) -> Iterator[CodeType]:
    """A module's code and every function, class body and comprehension nested in it."""
    yield code
    for const in code.co_consts:
        if isinstance(const, CodeType):
            yield from _code_objects(const)


def _imported_names(code: CodeType) -> set[str]:
    """Absolute module names the import instructions name (`from a import b` may name module a.b).

    CPython compiles every import to `LOAD_CONST level; LOAD_CONST fromlist; IMPORT_NAME module`.
    Relative imports (level > 0) are not followed: the project imports absolutely.
    """
    found: set[str] = set()
    for block in _code_objects(code):
        constants: list[object] = [None, None]
        for instruction in dis.get_instructions(block):
            if instruction.opname == "LOAD_CONST":
                constants = [constants[-1], instruction.argval]
            elif instruction.opname == "IMPORT_NAME":
                level, fromlist = constants
                if level == 0:
                    found.add(instruction.argval)
                    if isinstance(fromlist, tuple):
                        found.update(f"{instruction.argval}.{name}" for name in fromlist if name != "*")
    return found


def _imports(code: CodeType) -> set[str]:
    """Project modules that running `code` imports, packages included."""
    modules = set()
    for name in _imported_names(code):
        parts = name.split(".")
        # `import a.b.c` also runs a/__init__ and a/b/__init__
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if _is_project(prefix) and _source_path(prefix) is not None:
                modules.add(prefix)
    return modules


def _canonical(value: object) -> object:
    """A value with what the code does and nothing else: no line numbers, no file name, and sets
    in sorted order (their iteration order follows the per-process string hash seed)."""
    if isinstance(value, CodeType):
        return (
            "code", value.co_name, value.co_argcount, value.co_posonlyargcount, value.co_kwonlyargcount,
            value.co_flags, value.co_code.hex(), value.co_names, value.co_varnames, value.co_freevars,
            value.co_cellvars, value.co_exceptiontable.hex(), tuple(_canonical(c) for c in value.co_consts),
        )
    if isinstance(value, tuple):
        return tuple(_canonical(v) for v in value)
    if isinstance(value, frozenset):
        return ("frozenset", tuple(sorted(repr(_canonical(v)) for v in value)))
    return (type(value).__name__, repr(value))


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
        todo.extend(_imports(_module_code(name)) - seen)
    return tuple(sorted(seen))


@functools.cache
def code_digest(module: str) -> str:
    """A short digest of what the code of `module` and its project imports does (docstrings aside)."""
    digest = hashlib.sha256()
    for name in module_closure(module):
        digest.update(f"{name}\0{_canonical(_module_code(name))!r}\n".encode())
    return digest.hexdigest()[:16]
