"""User code named on a command line or in a recipe: `module.path:Name` or `file.py:Name`.

Naming code runs it (a module's top level runs on import), so whoever reads a recipe file must opt in first:
`names_code` tells which names are code, `rebase` resolves a recipe's `file.py` from the recipe's own folder.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

from fxslice.core.errors import InvalidOption

__all__ = ["import_object", "names_code", "rebase"]


def names_code(spec: object) -> bool:
    """Whether `spec` names user code (`module:Name` or `file.py:Name`) rather than a built-in."""
    return isinstance(spec, str) and ":" in spec


def rebase(spec: str, folder: Path) -> str:
    """`file.py:Name` with a relative file resolved from `folder` (a recipe's own folder); other names unchanged."""
    source, _, attr = spec.partition(":")
    if source.endswith(".py") and not Path(source).is_absolute():
        return f"{folder / source}:{attr}"
    return spec


def import_object(spec: str, what: str) -> Any:
    """The object `Name` of `module.path:Name` or `file.py:Name`; `what` names it in errors ("pass", "stage")."""
    source, _, attr = spec.partition(":")
    if not source or not attr:
        raise InvalidOption(f"a {what} is named module.path:Name or file.py:Name, got '{spec}'")
    if source.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location(Path(source).stem, source)
        if module_spec is None or module_spec.loader is None or not Path(source).is_file():
            raise InvalidOption(f"{what} file not found: {source}")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as exc:
            raise InvalidOption(f"cannot import the {what} module '{source}': {exc}") from exc
    obj = getattr(module, attr, None)
    if obj is None:
        raise InvalidOption(f"'{source}' has no attribute '{attr}'")
    return obj
