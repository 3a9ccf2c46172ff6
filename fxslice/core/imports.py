"""User code named on a command line or in a recipe: `module.path:Name` or `file.py:Name`."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

from fxslice.core.errors import InvalidOption

__all__ = ["import_object"]


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
