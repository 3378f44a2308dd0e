"""The layout of the code: layers, portability, and where errnos are chosen.

These read the checkout (and import the installed package): every module is in
the one import-linter contract, the contract holds from the repository root,
the library imports on a system without ``fcntl`` or FUSE, only ``system.py``
touches ``/proc`` or ``fcntl``, no library module chooses an errno, and every
error class has the errno the FUSE front end answers for it.
"""

from __future__ import annotations

import ast
import errno
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import cdpfs.errors
from cdpfs.mount.errnos import ERRNO, errno_of

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"cdpfs": ROOT / "cdpfs", "cdpfs.mount": ROOT / "mount", "cdpfs.tools": ROOT / "tools"}


def _modules(package: str, directory: Path) -> set[str]:
    """Dotted names of the modules in ``directory`` (a package), not through links."""
    out = set()
    for path in directory.rglob("*.py"):
        rel = path.relative_to(directory)
        if any((directory / part).is_symlink() for part in rel.parts[:1]):
            continue
        parts = rel.with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            out.add(".".join((package, *parts)))
    return out


def _all_modules() -> set[str]:
    found: set[str] = set()
    for package, directory in PACKAGES.items():
        found |= _modules(package, directory)
    packages = {".".join((package, *p.relative_to(directory).parent.parts)).rstrip(".")
                for package, directory in PACKAGES.items()
                for p in directory.rglob("__init__.py")
                if not any((directory / part).is_symlink()
                           for part in p.relative_to(directory).parts[:1])}
    return found - packages  # packages hold only their docstring



def _library_files() -> list[Path]:
    """The library's own source files (cdpfs/, not the linked front ends)."""
    lib = PACKAGES["cdpfs"]
    return [p for p in lib.rglob("*.py") if not (lib / p.relative_to(lib).parts[0]).is_symlink()]


def test_every_module_is_in_the_layers_contract() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    assert len(contracts) == 1 and contracts[0]["type"] == "layers"
    named = {m.strip() for layer in contracts[0]["layers"] for m in layer.split("|")}
    assert named == _all_modules(), (
        f"not in the contract: {sorted(_all_modules() - named)}; "
        f"named but missing: {sorted(named - _all_modules())}")


def test_the_contract_holds_from_the_repository_root() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    if not lint.exists():
        pytest.skip("import-linter is not installed")
    proc = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "1 kept, 0 broken" in proc.stdout, proc.stdout + proc.stderr


def test_no_two_packages_import_each_other() -> None:
    """The layers contract orders modules; this orders the packages of cdpfs and its
    top-level modules too (``cdpfs.ha`` and ``cdpfs.volume`` used to import each
    other: the volume now takes the fence's check as a callback)."""
    grimp = pytest.importorskip("grimp")  # import-linter's graph builder
    graph = grimp.build_graph("cdpfs")

    def unit(module: str) -> str:
        return ".".join(module.split(".")[:2])

    edges = {(unit(m), unit(i)) for m in graph.modules
             for i in graph.find_modules_directly_imported_by(m) if unit(m) != unit(i)}
    assert not sorted({tuple(sorted(e)) for e in edges if e[::-1] in edges})


def test_the_library_imports_without_fcntl_or_fuse(tmp_path: Path) -> None:
    """As on Windows: no fcntl, no pyfuse3. Every library module still imports."""
    names = sorted(m for m in _all_modules() if not m.startswith(("cdpfs.mount", "cdpfs.tools")))
    script = tmp_path / "imports.py"
    script.write_text(
        "import importlib, sys\n"
        "class Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('fcntl', 'pyfuse3', 'termios'):\n"
        "            raise ImportError(f'no {name} on this system')\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "for m in ('fcntl', 'pyfuse3', 'termios'):\n"
        "    sys.modules.pop(m, None)\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "assert 'fcntl' not in sys.modules and 'pyfuse3' not in sys.modules\n"
        f"print('imported {len(names)}')\n")

    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"imported {len(names)}" in proc.stdout


def test_only_the_system_module_touches_the_operating_system() -> None:
    offenders = []
    for path in _library_files():
        if path.name == "system.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) \
                    else [node.module or ""]
                if any(m.split(".")[0] in ("fcntl", "msvcrt") for m in mods):
                    offenders.append(f"{path.name}:{node.lineno} imports {mods}")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                    node.value.startswith("/proc"):
                offenders.append(f"{path.name}:{node.lineno} reads {node.value}")
            if isinstance(node, ast.JoinedStr) and any(
                    isinstance(v, ast.Constant) and str(v.value).startswith("/proc")
                    for v in node.values):
                offenders.append(f"{path.name}:{node.lineno} reads /proc")
    assert not offenders, offenders


# What reaches into the LMDB environment past the store's own modules: the Store's
# handles (``store.db``, ``store.env``), a table handle given to LMDB (``db=``), and
# a cursor or a table opened by hand.
_HANDLES = {"db", "env"}
_HANDLE_CALLS = {"cursor", "open_db"}


def _outside_the_store() -> list[Path]:
    """The source files of the library, the front ends and the tools, but the store's."""
    store = PACKAGES["cdpfs"] / "store"
    files = [p for p in _library_files() if store not in p.parents]
    return files + sorted(PACKAGES["cdpfs.mount"].rglob("*.py")) + \
        sorted(PACKAGES["cdpfs.tools"].rglob("*.py"))


def test_only_the_store_touches_its_tables() -> None:
    """cdpfs/store owns the on-disk format: every other module reads and writes the
    tables through its accessors (journal, versions, blocks, bookmarks, replicas,
    entries, the view, the Store's meta), never through a table handle."""
    offenders = []
    for path in _outside_the_store():
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Attribute) and node.attr in _HANDLES:
                offenders.append(f"{where} .{node.attr}")
            elif isinstance(node, ast.keyword) and node.arg == "db":
                offenders.append(f"{where} db=")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in _HANDLE_CALLS:
                offenders.append(f"{where} .{node.func.attr}()")
    assert not offenders, f"tables are cdpfs/store's: {offenders}"


def test_the_front_ends_and_tools_work_through_the_library() -> None:
    """A command's work on a store is a function of the library (which keeps the rules,
    such as that a clone is never replicated): tools/ and mount/ never open a Store
    or a transaction themselves."""
    offenders = []
    for package in ("cdpfs.mount", "cdpfs.tools"):
        for path in sorted(PACKAGES[package].rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
                if isinstance(node, ast.ImportFrom) and any(a.name == "Store"
                                                            for a in node.names):
                    offenders.append(f"{where} imports Store")
                elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                        node.func.attr in ("txn", "begin"):
                    offenders.append(f"{where} .{node.func.attr}()")
    assert not offenders, offenders


def test_the_library_chooses_no_errno() -> None:
    offenders = []
    for path in _library_files():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name == "errno" for a in node.names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if isinstance(node, ast.ImportFrom) and node.module == "errno":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"errno is chosen in mount/, not here: {offenders}"


def _error_classes() -> list[type[cdpfs.errors.CdpfsError]]:
    return [c for c in vars(cdpfs.errors).values()
            if isinstance(c, type) and issubclass(c, cdpfs.errors.CdpfsError)]


def test_every_refusal_has_its_own_errno() -> None:
    """A typed refusal never falls back to the generic I/O error; corruption is EIO."""
    for cls in _error_classes():
        if issubclass(cls, cdpfs.errors.FsError) and cls is not cdpfs.errors.FsError:
            assert errno_of(cls()) != errno.EIO, f"{cls.__name__} has no errno of its own"
    corrupt = cdpfs.errors.Corrupt(b"\0" * 32)
    assert errno_of(corrupt) == errno.EIO and errno_of(cdpfs.errors.CdpfsError()) == errno.EIO
    from cdpfs.history.moments import BadMoment

    assert errno_of(BadMoment("x")) == errno.ENOENT
    assert errno_of(cdpfs.errors.Reserved()) == errno.EPERM
    assert errno_of(cdpfs.errors.NoSpace()) == errno.ENOSPC
    assert all(issubclass(cls, BaseException) for cls in ERRNO)


def test_every_error_prints_one_line() -> None:
    for cls in _error_classes():
        exc = cls(b"\0" * 32) if cls is cdpfs.errors.Corrupt else cls()
        text = str(exc)
        assert text and "\n" not in text, (cls.__name__, text)


def test_the_checkout_imports_the_same_names_as_the_installed_package() -> None:
    """cdpfs/mount and cdpfs/tools lead to the front ends, so an editable install,
    ruff and lint-imports in a checkout see cdpfs.mount and cdpfs.tools."""
    for name in ("mount", "tools"):
        link = ROOT / "cdpfs" / name
        assert link.is_symlink() and link.resolve() == (ROOT / name).resolve()
    if shutil.which("git") and (ROOT / ".git").exists():
        tracked = subprocess.run(["git", "ls-files", "-s", "cdpfs/mount", "cdpfs/tools"],
                                 cwd=ROOT, capture_output=True, text=True).stdout
        assert tracked.count("120000") == 2, tracked  # committed as links
