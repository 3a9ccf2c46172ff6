"""Group-wise integer weights: the format a quantized program stores, and the arithmetic both sides of it share.

A matrix `W` [out, in] is cut along `in` into groups of `group_size` columns (the last may be shorter); every
(row, group) gets an asymmetric grid of `2^bits` levels, `w ≈ (q - zero) · scale`, with `q` and `zero` integers
in `[0, 2^bits)` and `scale` in float16. What is stored is exactly that: `q` and `zero` packed `bits` to the
bit, the scales as float16 — so the bytes on disk are the bytes the record reports, scales included. In
memory the program keeps computing with `dequantize()` of it (the same numbers, to the last bit, after a save
and a load).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fxslice.core.errors import InvalidOption

__all__ = ["QuantizedWeight", "pack_bits", "unpack_bits", "group_grid", "packed_nbytes", "check_format", "BITS"]

#: bit widths a weight can take
BITS = (2, 3, 4, 5, 6, 8)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers in [0, 2^bits) as a little-endian bit stream in uint8 (ceil(n·bits / 8) bytes)."""
    flat = values.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise InvalidOption(f"values do not fit in {bits} bits")
    positions = torch.arange(bits, dtype=torch.int64)
    stream = ((flat[:, None] >> positions) & 1).reshape(-1)  # value i's bit j at i·bits + j
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8))
    return (stream.view(-1, 8) << torch.arange(8, dtype=torch.int64)).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first `count` integers of a stream written by `pack_bits`, as int64."""
    if packed.numel() * 8 < count * bits:
        raise InvalidOption(f"{packed.numel()} bytes cannot hold {count} values of {bits} bits")
    stream = (packed.to(torch.int64)[:, None] >> torch.arange(8, dtype=torch.int64)) & 1
    stream = stream.reshape(-1)[: count * bits].view(count, bits)
    return (stream << torch.arange(bits, dtype=torch.int64)).sum(1)


def group_grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max grid for each row of `w` [rows, group] (zero always on it): (scales, float16-representable, and
    zero points as integral floats)."""
    top = (1 << bits) - 1
    low = w.min(-1).values.clamp(max=0)
    high = w.max(-1).values.clamp(min=0)
    exact = (high - low) / top
    half = exact.to(torch.float16)
    half = torch.where(half.to(exact.dtype) < exact, torch.nextafter(half, torch.full_like(half, torch.inf)), half)
    scale = half.to(w.dtype)  # float16 rounded up: the grid still spans [low, high], so no weight is clamped
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale is exact
    zero = torch.round(-low / scale).clamp(0, top)
    return scale, zero


@dataclass
class QuantizedWeight:
    """One weight in group-wise integer form. `transposed`: the parameter is stored [in, out] (Conv1D, addmm)."""

    bits: int
    group_size: int
    shape: tuple[int, int]  # the matrix's [out, in]
    q: torch.Tensor  # int64 [out, in]
    scale: torch.Tensor  # float32 holding float16 values [out, groups]
    zero: torch.Tensor  # int64 [out, groups]
    transposed: bool = False
    dtype: torch.dtype = torch.float32

    @property
    def groups(self) -> int:
        return math.ceil(self.shape[1] / self.group_size)

    def expand(self, per_group: torch.Tensor) -> torch.Tensor:
        """[out, groups] -> [out, in]: each group's value on each of its columns."""
        return per_group.repeat_interleave(self.group_size, dim=1)[:, : self.shape[1]]

    def dequantize(self) -> torch.Tensor:
        """The parameter as the program computes with it (its own layout and dtype)."""
        m = (self.q - self.expand(self.zero)).to(torch.float32) * self.expand(self.scale).to(torch.float32)
        return (m.T if self.transposed else m).contiguous().to(self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes as stored: packed integers, packed zero points, float16 scales."""
        return packed_nbytes(self.shape, self.bits, self.group_size)

    @classmethod
    def from_matrix(cls, m: torch.Tensor, bits: int, group_size: int, *, transposed: bool = False,
                    dtype: torch.dtype | None = None) -> QuantizedWeight:
        """Round-to-nearest on a min-max grid per group of `m` [out, in]."""
        check_format(bits, group_size)
        out, cols = m.shape
        work = m.detach().to(torch.float32)
        pad = (-cols) % group_size
        padded = torch.cat([work, work[:, -1:].expand(out, pad)], 1) if pad else work  # repeats keep min/max
        scale, zero = group_grid(padded.view(out, -1, group_size), bits)
        weight = cls(bits, group_size, (out, cols), torch.zeros(0), scale, zero.to(torch.int64), transposed,
                     dtype or m.dtype)
        weight.q = weight.round(work)
        return weight

    def round(self, m: torch.Tensor, columns: slice = slice(None)) -> torch.Tensor:
        """`m`'s columns (`columns` of the matrix) to integers on this weight's grid."""
        scale = self.expand(self.scale)[:, columns]
        zero = self.expand(self.zero)[:, columns]
        return (torch.round(m.to(torch.float32) / scale) + zero).clamp(0, (1 << self.bits) - 1).to(torch.int64)

    # storage --------------------------------------------------------------------------------------------

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """What goes into the safetensors file for the parameter `name`."""
        return {f"{name}.qweight": pack_bits(self.q, self.bits), f"{name}.qzeros": pack_bits(self.zero, self.bits),
                f"{name}.scales": self.scale.to(torch.float16)}

    def meta(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "shape": list(self.shape),
                "transposed": self.transposed, "dtype": str(self.dtype).replace("torch.", "")}

    @classmethod
    def from_tensors(cls, name: str, tensors: dict[str, torch.Tensor], meta: dict) -> QuantizedWeight:
        bits, group_size, (out, cols) = int(meta["bits"]), int(meta["group_size"]), meta["shape"]
        check_format(bits, group_size)
        groups = math.ceil(cols / group_size)
        q = unpack_bits(tensors[f"{name}.qweight"], bits, out * cols).view(out, cols)
        zero = unpack_bits(tensors[f"{name}.qzeros"], bits, out * groups).view(out, groups)
        scale = tensors[f"{name}.scales"].to(torch.float32)
        if tuple(scale.shape) != (out, groups):
            raise InvalidOption(f"'{name}': scales of shape {tuple(scale.shape)}, expected {(out, groups)}")
        return cls(bits, group_size, (out, cols), q, scale, zero, bool(meta["transposed"]),
                   getattr(torch, meta.get("dtype", "float32")))


def packed_nbytes(shape: tuple[int, int], bits: int, group_size: int) -> int:
    """Bytes of an [out, in] matrix stored at `bits` with `group_size` columns per float16 scale and zero point."""
    out, cols = shape
    groups = math.ceil(cols / group_size)
    return math.ceil(out * cols * bits / 8) + math.ceil(out * groups * bits / 8) + 2 * out * groups


def check_format(bits: int, group_size: int) -> None:
    if bits not in BITS:
        raise InvalidOption(f"bits must be one of {BITS}, got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise InvalidOption(f"group_size must be a positive integer, got {group_size!r}")
