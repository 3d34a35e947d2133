"""What computes a stage, as one digest in its cache key: the project code it runs and the
versions of the libraries that do its arithmetic.

The modules are derived, not listed: from the stage task's module and its worker's, every module
of the project they import is followed, at any depth and wherever the import stands (lazy imports
inside functions count). So editing a helper a worker reaches through two other modules reruns the
stage instead of reusing what the old code wrote, and so does upgrading a library named for the
stage (a new tokenizers can split text differently; a new torch can round differently).

Sources are read and parsed, never imported: the flow process names a worker's modules without
loading torch.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
from pathlib import Path


def _source(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a name under a package that does not exist, or a plain attribute
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_statements(tree: ast.AST):
    """Every import statement, at any depth, except those only a type checker runs."""
    pending = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif _is_type_checking(node):
            pending.extend(node.orelse)
        else:
            pending.extend(ast.iter_child_nodes(node))


# what each source file imports, by file and its modification time and size: a flow process computes the
# versions of every stage of every run it starts, and parsing the same hundred files each time took
# seconds per run; an edited file is parsed again
_IMPORTS: dict[tuple[str, Path, int, int], frozenset[str]] = {}


def _imported_names(name: str, source: Path) -> frozenset[str]:
    """Every module name an import statement of `source` may refer to (absolute)."""
    stat = source.stat()
    key = (name, source, stat.st_mtime_ns, stat.st_size)
    if key not in _IMPORTS:
        _IMPORTS[key] = frozenset(_parsed_imports(name, source))
    return _IMPORTS[key]


def _parsed_imports(name: str, source: Path) -> set[str]:
    package = name if source.name == "__init__.py" else name.rpartition(".")[0]
    names: set[str] = set()
    for node in _import_statements(ast.parse(source.read_bytes(), filename=str(source))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
            continue
        base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
        names.add(base)
        # `from tasks.components import modeling` imports a module, `from x.y import f` a name:
        # only a package has submodules (and asking a plain module for one would import it)
        base_source = _source(base) if base.partition(".")[0] == name.partition(".")[0] else None
        if base_source is not None and base_source.name == "__init__.py":
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def _with_parents(name: str) -> list[str]:
    # importing a.b.c runs a/__init__.py and a/b/__init__.py first
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def project_modules(*entries: str) -> list[str]:
    """The entry modules and every module of their top-level packages that they import, directly
    or through each other, sorted by name."""
    roots = {entry.partition(".")[0] for entry in entries}
    found: dict[str, Path] = {}
    pending = [parent for entry in entries for parent in _with_parents(entry)]
    while pending:
        name = pending.pop()
        if name in found or name.partition(".")[0] not in roots:
            continue
        source = _source(name)
        if source is None:
            if name in entries:
                raise ModuleNotFoundError(f"no Python source for module {name}")
            continue
        found[name] = source
        for imported in _imported_names(name, source):
            pending.extend(_with_parents(imported))
    return sorted(found)


def library_version(distribution: str) -> str:
    """The installed version of a distribution, or 'absent'."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def code_version(stage_module: str, workers: tuple[str, ...] = (), libraries: tuple[str, ...] = ()) -> str:
    """The digest of what computes a stage.

    stage_module: the stage task's module (`__name__`), which builds what the worker receives; its
    own source counts, not what it imports (how the flow tracks and reports does not change an
    output). workers: the modules of the worker processes, followed through every project module
    they import. libraries: distributions (PyPI names) whose installed versions count.
    """
    digest = hashlib.sha256()
    stage_source = _source(stage_module)
    if stage_source is None:
        raise ModuleNotFoundError(f"no Python source for module {stage_module}")
    digest.update(stage_source.read_bytes())
    for name in project_modules(*workers) if workers else []:
        source = _source(name)
        assert source is not None
        digest.update(f"\n{name}\n".encode() + source.read_bytes())
    for distribution in sorted(libraries):
        digest.update(f"\n{distribution}=={library_version(distribution)}".encode())
    return digest.hexdigest()[:12]
