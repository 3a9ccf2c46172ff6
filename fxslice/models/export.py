"""Export a program to formats that load without fxslice.

`pt2`: one `torch.export` archive with the weights inside. `torch.export.load(path).module()` runs it with PyTorch
alone: `(input_ids) -> logits` for a plain program; for a KV-cache program `(input_ids, past_length, *kv) -> logits`
with the cache tensors updated in place, their per-layer `[heads, head_dim]` shapes in the archive's extra file
`fxslice.json` (`{"kv_cache": [[h, d], ...]}`; allocate `zeros(batch, h, length, d)` each). Quantized weights are
stored dequantized: the archive runs in float, like the program.

`onnx`: the same program through `torch.onnx.export` (dynamo), one `.onnx` file that onnxruntime runs. A KV-cache
program's caches become outputs (ONNX has no in-place inputs): inputs `input_ids, past_length, kv_0, ...`,
outputs the logits and then every cache, updated, to feed into the next step.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from fxslice.core.errors import InvalidOption, SaveFailed, UnsupportedStructure
from fxslice.core.program import Program
from fxslice.models.io import example_inputs

__all__ = ["export_pt2", "export_onnx", "FORMATS"]

FORMATS = ("pt2", "onnx")


def _check_new_file(out: Path) -> None:
    if out.exists():
        raise InvalidOption(f"{out} already exists; choose another path or remove it first")
    if not out.parent.is_dir():
        raise InvalidOption(f"the directory {out.parent} does not exist")


def export_pt2(program: Program, path: str | os.PathLike) -> Path:
    """Write `program` as one self-contained `.pt2` file at `path` (a new file; written whole or not at all)."""
    out = Path(path)
    _check_new_file(out)
    args, shapes = example_inputs(program)
    with torch.no_grad():
        exported = torch.export.export(program.gm, args, dynamic_shapes=shapes, strict=False)
    extra = {"fxslice.json": json.dumps({
        "inputs": program.input_names, "model_class": program.model_class, "source": program.source,
        "kv_cache": program.cache.to_json() if program.cache is not None else None,
        "parameters": program.num_parameters()})}
    return _write(out, lambda tmp: torch.export.save(exported, tmp, extra_files=extra))


def export_onnx(program: Program, path: str | os.PathLike) -> Path:
    """Write `program` as one `.onnx` file at `path`; where the exporter cannot take an op, one error naming it."""
    out = Path(path)
    _check_new_file(out)
    gm = program.gm
    if program.cache is not None:  # return the caches the graph writes in place
        gm = copy.deepcopy(gm)
        output = next(iter(gm.graph.find_nodes(op="output")))
        caches = [n for n in gm.graph.find_nodes(op="placeholder")][2:]
        output.args = ((output.args[0], *caches),)
        gm.recompile()
    args, shapes = example_inputs(program)
    try:
        with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
            onnx_program = torch.onnx.export(gm, args, dynamic_shapes=shapes, dynamo=True, verbose=False)
    except ImportError as exc:
        raise InvalidOption(f"ONNX export needs onnx and onnxscript: pip install 'fxslice[onnx]' ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds; the user needs its first line
        reason = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise UnsupportedStructure(f"torch.onnx.export cannot take this program: {reason}") from exc
    return _write(out, onnx_program.save)


def _write(out: Path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp)` on a temporary file beside `out`, then move it into place: all of it, or nothing."""
    handle, tmp = tempfile.mkstemp(prefix=f".{out.name}.partial-", dir=out.parent)
    os.close(handle)
    try:
        write(tmp)
        os.replace(tmp, out)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise SaveFailed(f"could not write {out}: {exc.strerror or exc}; nothing was left behind") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
