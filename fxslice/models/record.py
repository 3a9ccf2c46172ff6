"""What `load` reads from a saved model's `fxslice.json`, checked before any of it is used.

The record is data a user can edit; a field of the wrong type or out of range must be refused naming the field
(`CorruptModel`), never turn into a traceback or, worse, into other weights. Fields `load` does not read (the
passes, perplexities, the recipe) are the user's to read and are not checked here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fxslice.core.errors import CorruptModel
from fxslice.core.quantized import BITS, GRIDS, stored_shapes

__all__ = ["check_record", "check_quantized_format"]

_SHA256 = re.compile(r"[0-9a-f]{64}\Z")


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _sizes(v: Any) -> bool:
    return isinstance(v, list) and all(_count(s) for s in v)


def _dtype(v: Any) -> bool:
    return isinstance(v, str) and v.isidentifier() and isinstance(getattr(torch, v, None), torch.dtype)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


#: field -> (check, what it must be); a missing field is an error unless it is optional (None allowed)
_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "fxslice_version": (lambda v: isinstance(v, str), "a version string"),
    "model_class": (lambda v: isinstance(v, str), "a string"),
    "source": (lambda v: isinstance(v, str), "a string"),
    "dtype": (_dtype, "a torch dtype name such as float32"),
    "parameters": (_count, "a non-negative integer"),
    "weight_bytes": (_count, "a non-negative integer"),
    "weights": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and _sizes(s) for k, s in v.items()),
                "a mapping of weight names to shapes"),
    "weights_sha256": (lambda v: isinstance(v, str) and bool(_SHA256.match(v)), "a sha256 hex digest"),
    "graph_sha256": (lambda v: isinstance(v, str) and bool(_SHA256.match(v)), "a sha256 hex digest"),
    "tokenizer_sha256": (_optional(lambda v: isinstance(v, str) and bool(_SHA256.match(v))), "a sha256 hex digest or null"),
    "static_shape": (_optional(lambda v: _sizes(v) and len(v) == 2 and min(v) >= 1), "null or [batch, length]"),
    "config": (_optional(lambda v: isinstance(v, dict)), "a mapping or null"),
    "kv_cache": (_optional(lambda v: isinstance(v, list) and bool(v) and all(_sizes(s) and len(s) == 2 and min(s) >= 1
                                                                              for s in v)),
                 "null or a list of [heads, head_dim] pairs"),
    "quantized": (_optional(lambda v: isinstance(v, dict)), "a mapping of weight names to formats"),
}


def check_record(record: Any, path: Path) -> dict[str, Any]:
    """`record` if every field `load` reads has its type and range; else `CorruptModel` naming the first that has not."""
    if not isinstance(record, dict):
        raise CorruptModel(f"{path} must hold a JSON object, not {type(record).__name__}")
    for field, (check, what) in _FIELDS.items():
        value = record.get(field)
        if field not in record and not check(None):
            raise CorruptModel(f"{path} has no field '{field}'; it was not written by this fxslice's save")
        if not check(value):
            raise CorruptModel(f"{path}: field '{field}' must be {what}, got {value!r:.80}")
    for name, meta in (record.get("quantized") or {}).items():
        check_quantized_format(name, meta, record["weights"], path)
    return record


def check_quantized_format(name: str, meta: Any, stored: dict[str, list[int]], path: Path) -> None:
    """A quantized weight's format is consistent with the sizes of the tensors stored for it: its packed integers
    hold exactly `out·in·bits` bits, its zero points `out·groups·bits` (or its float16 offsets are `[out, groups]`),
    its scales are `[out, groups]`."""
    where = f"{path}: quantized weight '{name}'"
    keys = {"bits", "group_size", "shape", "transposed", "dtype"}
    if not isinstance(meta, dict) or not keys <= set(meta) <= keys | {"grid"}:
        raise CorruptModel(f"{where} must be {{bits, group_size, shape, transposed, dtype[, grid]}}, got {meta!r:.120}")
    grid = meta.get("grid", "zero_point")
    if grid not in GRIDS:
        raise CorruptModel(f"{where}: field 'grid' must be one of {GRIDS}, got {grid!r:.40}")
    bits, group_size, shape = meta["bits"], meta["group_size"], meta["shape"]
    if bits not in BITS or isinstance(bits, bool):
        raise CorruptModel(f"{where}: field 'bits' must be one of {BITS}, got {bits!r}")
    if not _count(group_size) or group_size < 1:
        raise CorruptModel(f"{where}: field 'group_size' must be a positive integer, got {group_size!r}")
    if not (_sizes(shape) and len(shape) == 2 and min(shape) >= 1):
        raise CorruptModel(f"{where}: field 'shape' must be [out, in], got {shape!r:.60}")
    if not isinstance(meta["transposed"], bool) or not _dtype(meta["dtype"]):
        raise CorruptModel(f"{where}: field 'transposed' must be true or false and 'dtype' a torch dtype name")
    for tensor, size in stored_shapes(name, bits, group_size, shape, grid).items():
        if stored.get(tensor) != size:
            raise CorruptModel(f"{where}: {bits} bits in groups of {group_size} over {shape[0]}x{shape[1]} need '{tensor}' of "
                               f"shape {size}, the weights file holds {stored.get(tensor)}; the record and the weights "
                               "disagree")
