"""One small hierarchy for every error a user can cause.

Each error says what went wrong, where, and what to do; the CLI prints the message
without a traceback and exits with the class's own code.
"""

from __future__ import annotations

from torch import fx

__all__ = [
    "FxsliceError",
    "CaptureError",
    "UnsupportedStructure",
    "InvalidOption",
    "BadInput",
    "CorruptModel",
    "PassCheckFailed",
    "SaveFailed",
    "Interrupted",
    "node_location",
]


class FxsliceError(Exception):
    """Base class; `exit_code` is what the CLI exits with."""

    exit_code = 1


class CaptureError(FxsliceError):
    """torch.export could not turn the model into a graph, or the model could not be loaded."""

    exit_code = 3


class UnsupportedStructure(FxsliceError):
    """The graph holds something that would break computational invariance."""

    exit_code = 4


class InvalidOption(FxsliceError):
    """An option or argument is out of range or inconsistent."""

    exit_code = 2


class BadInput(FxsliceError):
    """Input data (text, tokens, files) cannot be used."""

    exit_code = 5


class CorruptModel(FxsliceError):
    """A saved model is incomplete or disagrees with its own record."""

    exit_code = 6


class PassCheckFailed(FxsliceError):
    """A pass left the program in a state that fails the manager's checks."""

    exit_code = 7


class SaveFailed(FxsliceError):
    """The output could not be written (disk full, permissions, another writer); nothing was left behind."""

    exit_code = 8


class Interrupted(BaseException):
    """SIGTERM, raised where Python can unwind (like KeyboardInterrupt for SIGINT), so that cleanup runs."""

    exit_code = 143


def node_location(node: fx.Node) -> str:
    """Describe where `node` comes from: op, module path and the model's source line."""
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()))[0] if stack else "<top level>"
    target = getattr(node.target, "__name__", str(node.target))
    where = f"node '{node.name}' ({node.op} {target}) in module '{path or '<root>'}'"
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    if len(trace) >= 2:
        where += f"\n  source: {trace[-2].strip()}\n          {trace[-1].strip()}"
    return where
