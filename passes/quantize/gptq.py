"""GPTQ (Frantar et al., ICLR 2023): quantize a matrix column by column, each column's rounding error spread
over the columns not yet quantized through the inverse Hessian `H = Σ xxᵀ` of the linear's inputs — the
second moment the calibration service collects for every linear anyway.

Group grids are fitted when the loop reaches a group's first column, on the columns as updated so far (the
reference implementation's default); blocks are whole groups, so a group never straddles two blocks.
"""

from __future__ import annotations

import math

import torch

from fxslice import InvalidOption
from fxslice.core.quantized import QuantizedWeight, check_format, from_levels, group_grid, to_levels

__all__ = ["gptq", "check_damp"]


def check_damp(damp: float) -> None:
    """GPTQ's dampening is a fraction of the mean Hessian diagonal added to it: finite and at least 0."""
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp < 0:
        raise InvalidOption(f"quantize: damp must be a finite number >= 0 (a fraction of the mean Hessian diagonal, "
                            f"0.01 by default), got {damp!r}")


def _upper_inverse_factor(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of `h`⁻¹, with no more than two [in, in] matrices alive at once besides `h` (a 7 B
    model's down-projection: 485 MB each)."""
    factor = torch.linalg.cholesky(h)
    inverse = torch.cholesky_inverse(factor)
    del factor
    return torch.linalg.cholesky(inverse, upper=True)


def gptq(m: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, *, damp: float = 0.01,
         block: int = 128, act_order: bool = False, transposed: bool = False,
         dtype: torch.dtype | None = None, grid: str = "zero_point") -> QuantizedWeight:
    """`m` [out, in] quantized against `h` [in, in]; `damp` is a fraction of the mean diagonal. `act_order`
    quantizes the columns with the largest input energy first, on grids fitted beforehand per stored group
    (the "static groups" of later GPTQ implementations: the order changes, the storage format does not).
    `grid`: how each group's grid is anchored (`fxslice.core.quantized.GRIDS`)."""
    check_format(bits, group_size, grid)
    out, cols = m.shape
    w = m.detach().to(torch.float32, copy=True)
    h = h.detach().to(torch.float32, copy=True)
    dead = torch.diagonal(h) == 0  # inputs that are always zero: their weights cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(damp * torch.diagonal(h).mean())  # not h + d·I: no second [in, in] matrix
    groups = math.ceil(cols / group_size)
    scale = torch.ones(out, groups)
    zero = torch.zeros(out, groups)  # the anchor: integral zero points or float offsets
    order = torch.arange(cols)
    if act_order:
        order = torch.argsort(torch.diagonal(h), descending=True)
        for g in range(groups):
            scale[:, g], zero[:, g] = group_grid(w[:, g * group_size: (g + 1) * group_size], bits, grid)
        w, h = w[:, order], h[order[:, None], order]
    inverse = _upper_inverse_factor(h)
    del h
    q = torch.zeros(out, cols, dtype=torch.uint8)
    block = max(group_size, block // group_size * group_size)
    wt = w.T.contiguous()  # [in, out]: a column of W is a contiguous row here, and updates are rank-1 BLAS calls
    for start in range(0, cols, block):
        end = min(start + block, cols)
        chunk = wt[start:end].clone()
        errors = torch.zeros_like(chunk)
        inv = inverse[start:end, start:end]
        for i in range(end - start):
            column = int(order[start + i])
            g = column // group_size
            if not act_order and column % group_size == 0:
                span = chunk[i: min(i + group_size, end - start)].T
                scale[:, g], zero[:, g] = group_grid(span, bits, grid)
            s, z = scale[:, g], zero[:, g]
            ints = to_levels(chunk[i], s, z, bits, grid)
            q[:, column] = ints.to(torch.uint8)
            error = (chunk[i] - from_levels(ints, s, z, grid)) / inv[i, i]
            chunk[i:].addr_(inv[i, i:], error, alpha=-1)
            errors[i] = error
        wt[end:] -= inverse[start:end, end:].T @ errors
    return QuantizedWeight(bits, group_size, (out, cols), q, scale, zero, transposed, dtype or m.dtype, grid)
