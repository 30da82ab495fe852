"""The code a stage runs, found from the source: its module's import closure inside this project.

A stage's cached artifact is only valid for the code that made it, so its fingerprint hashes exactly the
project files the stage executes: its own module, every project module it imports (at the top or lazily
inside a function, found by reading the AST, never by importing), the package ``__init__`` files on the
way, and the data files its spec declares (templates, files copied into the bundle). Editing
``stages/lib/trt_build.py`` then re-runs the stages that reach it, and leaves the teacher alone.
"""
from __future__ import annotations

import ast
import hashlib
import re
from pathlib import Path
from typing import Iterable, Iterator, Optional

#: The project's root folder (holding models/, stages/, pipeline/); tests point it at a copy.
CODE_ROOT = Path(__file__).resolve().parent.parent
#: Top-level packages of this project: imports of anything else (torch, numpy) are not followed.
PACKAGES = ("models", "stages", "pipeline")
#: Modules a stage imports that are already in every fingerprint in another form, so hashing their code would
#: only re-run every stage on any edit: the package version (``pipeline/__init__.py``) and the stage graph
#: (``pipeline/graph.py``: a stage's own declarations are its fingerprint's config keys, inputs and code).
NOT_FOLLOWED = ("pipeline", "pipeline.graph")


_IMPORT_MODULE = re.compile(rb"""import_module\(\s*["']([\w.]+)["']""")  # importlib.import_module("a.b")


def _statements(body: list) -> Iterator[ast.AST]:
    """Every statement, nested ones included (imports are statements; expressions need no visit: faster)."""
    for node in body:
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
                yield from _statements([child])


class CodeIndex:
    """Import closures and file hashes under one root, memoised for one invocation.

    ``parsed`` (optional, persisted by the caller) maps a file's content hash and module name to the imports
    found in it, so an unchanged file is not parsed again on the next call.
    """

    def __init__(self, root: Optional[Path] = None, parsed: Optional[dict[str, list[str]]] = None):
        self.root = Path(root) if root is not None else CODE_ROOT
        self.parsed = parsed if parsed is not None else {}
        self._imports: dict[Path, set[str]] = {}
        self._closure: dict[str, tuple[Path, ...]] = {}
        self._hash: dict[tuple, str] = {}

    # ------------------------------------------------------------------ modules
    def module_file(self, module: str) -> Optional[Path]:
        """The file of a project module (``a/b.py`` or ``a/b/__init__.py``), None outside the project."""
        parts = module.split(".")
        if parts[0] not in PACKAGES:
            return None
        base = self.root.joinpath(*parts)
        for cand in (base / "__init__.py", base.with_suffix(".py")):
            if cand.is_file():
                return cand
        return None

    def _imports_of(self, path: Path, module: str) -> set[str]:
        """Project modules named by any import statement (or ``importlib.import_module("...")``) in ``path``."""
        if path in self._imports:
            return self._imports[path]
        source = path.read_bytes()
        key = f"{hashlib.sha256(source).hexdigest()}:{module}"
        if key not in self.parsed:
            self.parsed[key] = sorted(self._parse(source, path, module))
        self._imports[path] = {m for m in self.parsed[key] if self.module_file(m) is not None}
        return self._imports[path]

    @staticmethod
    def _parse(source: bytes, path: Path, module: str) -> set[str]:
        found: set[str] = set()
        try:
            tree = ast.parse(source, filename=str(path))
        except (SyntaxError, ValueError):
            tree = None  # the stage fails when it imports this; its bytes are still hashed
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found.update(m.decode() for m in _IMPORT_MODULE.findall(source))
        for node in _statements(tree.body) if tree is not None else ():
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                if base:
                    found.add(base)
                found.update(f"{base}.{alias.name}" if base else alias.name for alias in node.names)
        return {m for m in found if m.split(".")[0] in PACKAGES}

    def closure(self, module: str) -> tuple[Path, ...]:
        """Every project file that importing and running ``module`` can execute, sorted."""
        if module not in self._closure:
            seen: dict[str, Path] = {}
            todo = [module]
            while todo:
                mod = todo.pop()
                parts = mod.split(".")
                for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py too
                    name = ".".join(parts[:i])
                    if name in seen or name in NOT_FOLLOWED:
                        continue
                    path = self.module_file(name)
                    if path is None:
                        continue
                    seen[name] = path
                    todo.extend(self._imports_of(path, name))
            self._closure[module] = tuple(sorted(set(seen.values())))
        return self._closure[module]

    # ------------------------------------------------------------------ files
    def data_files(self, declared: Iterable[str]) -> tuple[Path, ...]:
        """Declared data files (project-relative; a folder means every file under it, caches excluded)."""
        out: set[Path] = set()
        for rel in declared:
            p = self.root / rel
            if p.is_dir():
                out.update(f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc")
            elif p.is_file():
                out.add(p)
            else:
                raise FileNotFoundError(f"declared data file {rel} is not in {self.root}")
        return tuple(sorted(out))

    def files(self, module: str, declared: Iterable[str] = ()) -> tuple[Path, ...]:
        """The closure of ``module`` plus its declared data files."""
        return tuple(sorted(set(self.closure(module)) | set(self.data_files(declared))))

    def code_hash(self, module: str, declared: Iterable[str] = ()) -> str:
        """sha256 over (relative path, contents) of every file the stage runs or reads as data."""
        key = (module, tuple(declared))
        if key not in self._hash:
            h = hashlib.sha256()
            for f in self.files(module, declared):
                h.update(f.relative_to(self.root).as_posix().encode() + b"\0")
                h.update(hashlib.sha256(f.read_bytes()).digest())
            self._hash[key] = h.hexdigest()[:16]
        return self._hash[key]

    def relative(self, paths: Iterable[Path]) -> list[str]:
        return [p.relative_to(self.root).as_posix() for p in paths]
