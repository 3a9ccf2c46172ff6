"""Quantized linears of a stock checkpoint in the compressed-tensors format (what llm-compressor writes and vLLM
serves), so that transformers (with the `compressed-tensors` package) loads fxslice's integers instead of float copies.

Symmetric grids are written as `pack-quantized` groups: per linear `weight_packed` (int32 words, each row a
little-endian bit stream of its levels `q` in [0, 2^bits), the format's signed values offset by 2^(bits−1)),
`weight_scale` [out, groups] and `weight_shape`; `config.json` gets a `quantization_config` with one config group
per (bits, group size) naming its linears. Zero-point and offset grids stay float in the checkpoint: transformers
cannot yet load asymmetric pack-quantized weights (llm-compressor issue 1618), and an offset is no integer zero
point; `CompressedLinears.skipped` says which and why.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from fxslice.core.quantized import QuantizedWeight, pack_bits

__all__ = ["CompressedLinears", "compress_linears", "packed_rows"]


@dataclass
class CompressedLinears:
    """The checkpoint's tensors with the quantized linears replaced, the `quantization_config` (None when no linear
    could be written as integers), and the linears kept in float with the reason."""

    tensors: dict[str, torch.Tensor]
    config: dict[str, Any] | None
    skipped: dict[str, str] = field(default_factory=dict)


def packed_rows(q: QuantizedWeight) -> torch.Tensor:
    """[out, ceil(in·bits/32)] int32: each row's levels as one little-endian bit stream. Rows padded to a multiple
    of 32 levels fill whole words, so the matrix packs in one call; the padding's words are cut off again."""
    out, cols = q.shape
    levels = torch.nn.functional.pad(q.q, (0, (-cols) % 32))
    words = pack_bits(levels, q.bits).view(torch.int32).reshape(out, -1)
    return words[:, : math.ceil(cols * q.bits / 32)].contiguous()


def compress_linears(tensors: dict[str, torch.Tensor], quantized: dict[str, QuantizedWeight],
                     dtype: torch.dtype) -> CompressedLinears:
    """`tensors` (a stock checkpoint's weights by name) with every linear in `quantized` (by the same names) that a
    symmetric grid holds written as pack-quantized integers; scales in `dtype` (the checkpoint's)."""
    out = dict(tensors)
    groups: dict[tuple[int, int], list[str]] = {}
    skipped = {}
    for name, q in quantized.items():
        if q.grid != "symmetric":
            skipped[name] = (f"its {q.grid} grid has no compressed-tensors form transformers loads (symmetric grids "
                             "do: --grid symmetric)")
            continue
        if q.transposed or not name.endswith(".weight"):
            skipped[name] = "not a linear's [out, in] weight"
            continue
        if q.shape[1] % q.group_size:
            skipped[name] = f"its {q.shape[1]} columns are not whole groups of {q.group_size}"
            continue
        module = name.removesuffix(".weight")
        del out[name]
        out[f"{module}.weight_packed"] = packed_rows(q)
        out[f"{module}.weight_scale"] = q.scale.to(dtype)
        out[f"{module}.weight_shape"] = torch.tensor(q.shape, dtype=torch.int64)
        groups.setdefault((q.bits, q.group_size), []).append(module)
    if not groups:
        return CompressedLinears(out, None, skipped)
    config = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {
            f"group_{i}": {"targets": [f"re:^{re.escape(m)}$" for m in modules],
                           "weights": {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group",
                                       "group_size": group_size}}
            for i, ((bits, group_size), modules) in enumerate(sorted(groups.items()))},
        "ignore": [],
    }
    return CompressedLinears(out, config, skipped)
