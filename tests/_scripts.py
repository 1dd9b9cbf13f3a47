"""The repository's scripts imported as modules in tests (``scripts/`` is not a package)."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` executed as a fresh module named ``name``."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def script_importing_scripts(name: str) -> Iterator[ModuleType]:
    """``load_script(name)`` with ``scripts/`` on ``sys.path`` while the block runs, for a script that imports
    another (bench_peers and bench_host import bench_moe, as they do when run as scripts)."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield load_script(name)
    finally:
        sys.path.remove(str(SCRIPTS))
