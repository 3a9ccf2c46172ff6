"""Export a program to formats that load without fxslice.

`pt2`: one `torch.export` archive with the weights inside. `torch.export.load(path).module()` runs it with PyTorch
alone: `(input_ids) -> logits` for a plain program; for a KV-cache program `(input_ids, past_length, *kv) -> logits`
with the cache tensors updated in place, their per-layer `[heads, head_dim]` shapes in the archive's extra file
`fxslice.json` (`{"kv_cache": [[h, d], ...]}`; allocate `zeros(batch, h, length, d)` each). Quantized weights are
stored dequantized: the archive runs in float, like the program.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from fxslice.core.errors import InvalidOption, SaveFailed
from fxslice.core.program import Program
from fxslice.models.io import example_inputs

__all__ = ["export_pt2", "FORMATS"]

FORMATS = ("pt2",)


def export_pt2(program: Program, path: str | os.PathLike) -> Path:
    """Write `program` as one self-contained `.pt2` file at `path` (a new file; written whole or not at all)."""
    out = Path(path)
    if out.exists():
        raise InvalidOption(f"{out} already exists; choose another path or remove it first")
    if not out.parent.is_dir():
        raise InvalidOption(f"the directory {out.parent} does not exist")
    args, shapes = example_inputs(program)
    with torch.no_grad():
        exported = torch.export.export(program.gm, args, dynamic_shapes=shapes, strict=False)
    extra = {"fxslice.json": json.dumps({
        "inputs": program.input_names, "model_class": program.model_class, "source": program.source,
        "kv_cache": program.cache.to_json() if program.cache is not None else None,
        "parameters": program.num_parameters()})}
    handle, tmp = tempfile.mkstemp(prefix=f".{out.name}.partial-", dir=out.parent)
    os.close(handle)
    try:
        torch.export.save(exported, tmp, extra_files=extra)
        os.replace(tmp, out)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise SaveFailed(f"could not write {out}: {exc.strerror or exc}; nothing was left behind") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
