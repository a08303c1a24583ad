"""Write a module into a directory and import it under a fresh, unique name."""

from __future__ import annotations

import importlib.util
import itertools
import sys
import textwrap
import types
from pathlib import Path

_counter = itertools.count()


def load_module(directory: Path, source: str, stem: str = "mod") -> types.ModuleType:
    name = f"kt_fixture_{stem}_{next(_counter)}"
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
