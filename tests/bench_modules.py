"""bench/ scripts imported as modules by the tests (bench/ is not a package: each file runs as a script)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent.parent / "bench"


def bench_module(filename: str) -> ModuleType:
    """bench/<filename> loaded once as the module `bench_<stem>` (registered in sys.modules, where dataclasses
    look their module up). bench/ goes on sys.path too, as when a script runs, for the modules it imports."""
    name = f"bench_{Path(filename).stem}"
    if name in sys.modules:
        return sys.modules[name]
    if str(BENCH) not in sys.path:
        sys.path.append(str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
