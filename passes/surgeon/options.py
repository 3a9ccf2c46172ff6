"""The Surgeon's options that more than one object takes, each checked here once: the method's name and the
target's range, which depends on what is removed."""

from __future__ import annotations

from fxslice import InvalidOption

__all__ = ["METHODS", "MASKED_STRUCTURES", "STRUCTURES", "check_target", "curvature_of"]

#: a pruning method's name (CLI, recipe files, Python) -> the curvature its passes estimate
METHODS = {"surgeon": "kfac", "kobd": "kobd", "lobd": "activations", "magnitude": "identity"}

#: the paper's zero-masked structures; "groups" removes dimension groups for real
MASKED_STRUCTURES = ("rows_columns", "unstructured", "2:4")
STRUCTURES = ("groups", *MASKED_STRUCTURES)


def curvature_of(method: str) -> str:
    if method not in METHODS:
        raise InvalidOption(f"surgeon: method must be one of {', '.join(METHODS)}, got {method!r}")
    return METHODS[method]


def check_target(target: object, structures: str) -> float:
    """`target` is the share removed: of the model's parameters for "groups", of the decoder linears' weights
    (zeroed) for the masked structures; 2:4 zeroes at most half of them."""
    if structures not in STRUCTURES:
        raise InvalidOption(f"surgeon: structures must be 'groups' (what shrinks the model) or one of the "
                            f"paper's zero-masked {MASKED_STRUCTURES}, got {structures!r}")
    half = structures == "2:4"
    what = "parameters to remove" if structures == "groups" else "decoder-linear weights to zero"
    number = not isinstance(target, bool) and isinstance(target, (int, float))
    if not number or not (0.0 < target <= 0.5 if half else 0.0 < target < 1.0):
        raise InvalidOption(f"surgeon: target (the fraction of {what}) must be in {'(0, 0.5]' if half else '(0, 1)'} "
                            f"for structures={structures!r}, got {target!r}")
    return float(target)
