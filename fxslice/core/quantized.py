"""Group-wise integer weights: the format a quantized program stores, and the arithmetic both sides of it share.

A matrix `W` [out, in] is cut along `in` into groups of `group_size` columns (the last may be shorter); every
(row, group) gets a grid of `2^bits` levels, anchored one of three ways (`GRIDS`):

    zero_point  w ≈ (q − zero) · scale, `zero` an integer in [0, 2^bits) (GPTQ checkpoints)
    offset      w ≈ q · scale + offset, `offset` a float16 (llama.cpp's Q4_1 / Q5_1 blocks: d·q + m)
    symmetric   w ≈ (q − 2^(bits−1)) · scale, no anchor stored; the scale's sign puts the extra negative level on
                the side of the group's larger magnitude (llama.cpp's Q4_0 / Q8_0; compressed-tensors' symmetric
                int, what transformers and vLLM load)

`q` is an integer in [0, 2^bits), `scale` a float16. An integer zero point puts 0 exactly on the grid and costs
`bits` per group; a float offset spans exactly [min, max] of the group (no level spent below 0 for a group of
positive weights) and costs 16; a symmetric grid costs nothing and spans [−max|w|, max|w|]. What is stored is
exactly that: `q` and zero points packed `bits` to the bit, scales and offsets as float16 — so the bytes on disk
are the bytes the record reports. In memory the program keeps computing with `dequantize()` of it (the same
numbers, to the last bit, after a save and a load).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fxslice.core.disk import DiskTensor
from fxslice.core.errors import InvalidOption

__all__ = ["QuantizedWeight", "pack_bits", "unpack_bits", "group_grid", "packed_nbytes", "check_format", "BITS",
           "GRIDS", "to_levels", "from_levels", "stored_shapes", "round_trip"]

#: bit widths a weight can take
BITS = (2, 3, 4, 5, 6, 8)
#: how a group's grid is anchored: an integer zero point, a float16 offset (its minimum), or the middle level
GRIDS = ("zero_point", "offset", "symmetric")


#: values packed or unpacked per step: a multiple of 8 (each step ends on a byte boundary), small enough that the
#: bit planes (8 bytes per bit per value) stay tens of MB for a token table of 50 M values, not gigabytes
_PACK_CHUNK = 1 << 18


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers in [0, 2^bits) as a little-endian bit stream in uint8 (ceil(n·bits / 8) bytes)."""
    flat = values.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise InvalidOption(f"values do not fit in {bits} bits")
    positions, byte = torch.arange(bits, dtype=torch.int64), torch.arange(8, dtype=torch.int64)
    parts = []
    for start in range(0, flat.numel(), _PACK_CHUNK):
        chunk = flat[start:start + _PACK_CHUNK].to(torch.int64)
        stream = ((chunk[:, None] >> positions) & 1).reshape(-1)  # value i's bit j at i·bits + j
        stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8))
        parts.append((stream.view(-1, 8) << byte).sum(1).to(torch.uint8))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first `count` integers of a stream written by `pack_bits`, as uint8 (every width in `BITS` fits)."""
    if bits > 8:
        raise InvalidOption(f"unpack_bits holds widths up to 8 bits, got {bits}")
    if packed.numel() * 8 < count * bits:
        raise InvalidOption(f"{packed.numel()} bytes cannot hold {count} values of {bits} bits")
    positions, byte = torch.arange(bits, dtype=torch.int64), torch.arange(8, dtype=torch.int64)
    out = torch.empty(count, dtype=torch.uint8)
    for start in range(0, count, _PACK_CHUNK):
        n = min(_PACK_CHUNK, count - start)
        first = start * bits // 8  # a whole number: `start` is a multiple of 8
        chunk = packed[first:first + (n * bits + 7) // 8].to(torch.int64)
        stream = ((chunk[:, None] >> byte) & 1).reshape(-1)[: n * bits].view(n, bits)
        out[start:start + n] = (stream << positions).sum(1)
    return out


def _half(x: torch.Tensor, *, up: bool) -> torch.Tensor:
    """`x` rounded to a float16 value, never below it (`up`) or never above it."""
    half = x.to(torch.float16)
    wrong = half.to(x.dtype) < x if up else half.to(x.dtype) > x
    return torch.where(wrong, torch.nextafter(half, torch.full_like(half, torch.inf if up else -torch.inf)), half).to(x.dtype)


def group_grid(w: torch.Tensor, bits: int, grid: str = "zero_point") -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max grid for each row of `w` [rows, group]: (scales, float16-representable, and the anchor: zero points
    as integral floats with 0 always on the grid, float16 offsets at the rows' minima, or for a symmetric grid the
    middle level 2^(bits−1)). Rounded outwards, so the grid spans the row and no weight is clamped."""
    top = (1 << bits) - 1
    if grid == "offset":
        offset = _half(w.min(-1).values, up=False)
        scale = _half((w.max(-1).values - offset) / top, up=True)
        return torch.where(scale > 0, scale, torch.ones_like(scale)), offset
    if grid == "symmetric":  # levels −half..half−1 times the scale: a negative scale mirrors them
        half = 1 << (bits - 1)
        low, high = (-w.min(-1).values).clamp(min=0), w.max(-1).values.clamp(min=0)
        positive = torch.maximum(low / half, high / (half - 1))
        negative = torch.maximum(low / (half - 1), high / half)
        magnitude = _half(torch.minimum(positive, negative), up=True)
        magnitude = torch.where(magnitude > 0, magnitude, torch.ones_like(magnitude))
        return torch.where(positive <= negative, magnitude, -magnitude), torch.full_like(magnitude, half)
    low = w.min(-1).values.clamp(max=0)
    high = w.max(-1).values.clamp(min=0)
    scale = _half((high - low) / top, up=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale is exact
    zero = torch.round(-low / scale).clamp(0, top)
    return scale, zero


def to_levels(w: torch.Tensor, scale: torch.Tensor, anchor: torch.Tensor, bits: int, grid: str) -> torch.Tensor:
    """`w` to the nearest of the grid's integer levels (as floats), elementwise against `scale` and `anchor`."""
    top = (1 << bits) - 1
    if grid == "offset":
        return torch.round((w - anchor) / scale).clamp_(0, top)
    return (torch.round(w / scale) + anchor).clamp_(0, top)


def from_levels(q: torch.Tensor, scale: torch.Tensor, anchor: torch.Tensor, grid: str) -> torch.Tensor:
    """The weights integer levels `q` stand for."""
    return q * scale + anchor if grid == "offset" else (q - anchor) * scale


def _groups(m: torch.Tensor, group_size: int) -> torch.Tensor:
    """`m` [out, in] in float32 as [out, groups, group_size], the last group padded by repeating the last column
    (repeats keep each group's min and max)."""
    out, cols = m.shape
    work = m.detach().to(torch.float32)
    pad = (-cols) % group_size
    padded = torch.cat([work, work[:, -1:].expand(out, pad)], 1) if pad else work
    return padded.view(out, -1, group_size)


def round_trip(m: torch.Tensor, bits: int, group_size: int, grid: str = "zero_point") -> torch.Tensor:
    """`m` [out, in] as round to nearest stores it, dequantized: `QuantizedWeight.from_matrix(m, ...).dequantize()`
    without building the integers, for a loop that rounds every weight at every step (a learned rotation)."""
    out, cols = m.shape
    groups = _groups(m, group_size)
    scale, anchor = group_grid(groups, bits, grid)
    scale, anchor = scale[..., None], anchor.to(torch.float32)[..., None]
    value = from_levels(to_levels(groups, scale, anchor, bits, grid), scale, anchor, grid)
    return value.reshape(out, -1)[:, :cols].to(m.dtype)


#: weights dequantized at a time (float32 work: 4 bytes each)
DEQUANTIZE_NUMBERS = 1 << 22


@dataclass
class QuantizedWeight:
    """One weight in group-wise integer form. `transposed`: the parameter is stored [in, out] (Conv1D, addmm)."""

    bits: int
    group_size: int
    shape: tuple[int, int]  # the matrix's [out, in]
    q: torch.Tensor  # uint8 [out, in]: every width fits a byte, an eighth of int64's memory for a large model
    scale: torch.Tensor  # float32 holding float16 values [out, groups]
    zero: torch.Tensor  # the anchor [out, groups]: int64 zero points (symmetric: all 2^(bits−1)), or float32 offsets
    transposed: bool = False
    dtype: torch.dtype = torch.float32
    grid: str = "zero_point"  # or "offset", "symmetric": see GRIDS

    def __post_init__(self) -> None:
        self.q = self.q.to(torch.uint8)
        if self.grid != "offset":  # zero points are integers, however the grid fitting computed them
            self.zero = self.zero.to(torch.int64)

    def level_value(self, level: int) -> torch.Tensor:
        """[out, groups]: the weight each group's integer `level` stands for (0: Q4_1's `m`; 8: what the int4
        kernel adds after `(q − 8)·scale`)."""
        return from_levels(torch.full_like(self.scale, level), self.scale, self.zero.to(self.scale.dtype), self.grid)

    @property
    def groups(self) -> int:
        return math.ceil(self.shape[1] / self.group_size)

    def expand(self, per_group: torch.Tensor) -> torch.Tensor:
        """[out, groups] -> [out, in]: each group's value on each of its columns."""
        return per_group.repeat_interleave(self.group_size, dim=1)[:, : self.shape[1]]

    def dequantize(self) -> torch.Tensor:
        """The parameter as the program computes with it (its own layout and dtype). Group by group against each
        group's scale and anchor, whole rows of at most `DEQUANTIZE_NUMBERS` weights at a time: expanding them to
        the matrix's shape cost 28 bytes per weight (1.3 GB for a 7 B model's down-projection)."""
        out, cols = self.shape
        pad = (-cols) % self.group_size
        scale, anchor = self.scale.to(torch.float32)[..., None], self.zero.to(torch.float32)[..., None]
        m = torch.empty(out, cols, dtype=torch.float32)
        levels = self.q.load() if isinstance(self.q, DiskTensor) else self.q  # read once, not once per step
        step = max(1, DEQUANTIZE_NUMBERS // (cols + pad))
        for start in range(0, out, step):
            rows = slice(start, start + step)
            q = levels[rows].to(torch.float32)
            q = torch.nn.functional.pad(q, (0, pad)) if pad else q
            value = from_levels(q.view(len(q), -1, self.group_size), scale[rows], anchor[rows], self.grid)
            m[rows] = value.view(len(q), -1)[:, :cols]
        return (m.T.contiguous() if self.transposed else m).to(self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes as stored: packed integers, float16 scales, and the anchors (packed zero points, float16 offsets or
        nothing)."""
        return packed_nbytes(self.shape, self.bits, self.group_size, self.grid)

    @classmethod
    def from_matrix(cls, m: torch.Tensor, bits: int, group_size: int, *, transposed: bool = False,
                    dtype: torch.dtype | None = None, grid: str = "zero_point") -> QuantizedWeight:
        """Round-to-nearest on a min-max grid per group of `m` [out, in]."""
        check_format(bits, group_size, grid)
        scale, anchor = group_grid(_groups(m, group_size), bits, grid)
        weight = cls(bits, group_size, tuple(m.shape), torch.zeros(0), scale, anchor, transposed, dtype or m.dtype, grid)
        weight.q = weight.round(m.detach())
        return weight

    def round(self, m: torch.Tensor, columns: slice = slice(None)) -> torch.Tensor:
        """`m`'s columns (`columns` of the matrix) to integers on this weight's grid."""
        scale = self.expand(self.scale)[:, columns]
        anchor = self.expand(self.zero)[:, columns].to(torch.float32)
        return to_levels(m.to(torch.float32), scale, anchor, self.bits, self.grid).to(torch.uint8)

    # storage --------------------------------------------------------------------------------------------

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """What goes into the safetensors file for the parameter `name`."""
        return {key: make() for key, (_, _, make) in self.stored(name).items()}

    def stored(self, name: str) -> dict[str, tuple[list[int], torch.dtype, Callable[[], torch.Tensor]]]:
        """`tensors(name)` as (shape, dtype, how to make it) per key: a writer makes each one as its turn comes."""
        shapes = stored_shapes(name, self.bits, self.group_size, self.shape, self.grid)
        makers: dict[str, tuple[torch.dtype, Callable[[], torch.Tensor]]] = {
            f"{name}.qweight": (torch.uint8, lambda: pack_bits(self.q, self.bits)),
            f"{name}.qzeros": (torch.uint8, lambda: pack_bits(self.zero, self.bits)),
            f"{name}.offsets": (torch.float16, lambda: self.zero.to(torch.float16)),
            f"{name}.scales": (torch.float16, lambda: self.scale.to(torch.float16))}
        return {key: (shape, *makers[key]) for key, shape in shapes.items()}

    def meta(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "shape": list(self.shape),
                "transposed": self.transposed, "dtype": str(self.dtype).replace("torch.", ""),
                **({"grid": self.grid} if self.grid != "zero_point" else {})}

    @classmethod
    def from_tensors(cls, name: str, tensors: dict[str, torch.Tensor], meta: dict) -> QuantizedWeight:
        bits, group_size, (out, cols) = int(meta["bits"]), int(meta["group_size"]), meta["shape"]
        grid = meta.get("grid", "zero_point")
        check_format(bits, group_size, grid)
        groups = math.ceil(cols / group_size)
        q = unpack_bits(tensors[f"{name}.qweight"], bits, out * cols).view(out, cols)
        if grid == "offset":
            zero = tensors[f"{name}.offsets"].to(torch.float32)
        elif grid == "symmetric":
            zero = torch.full((out, groups), 1 << (bits - 1), dtype=torch.int64)
        else:
            zero = unpack_bits(tensors[f"{name}.qzeros"], bits, out * groups).view(out, groups)
        scale = tensors[f"{name}.scales"].to(torch.float32)
        for what, t in (("scales", scale), ("offsets" if grid == "offset" else "zero points", zero)):
            if tuple(t.shape) != (out, groups):
                raise InvalidOption(f"'{name}': {what} of shape {tuple(t.shape)}, expected {(out, groups)}")
        return cls(bits, group_size, (out, cols), q, scale, zero, bool(meta["transposed"]),
                   getattr(torch, meta.get("dtype", "float32")), grid)


def stored_shapes(name: str, bits: int, group_size: int, shape: tuple[int, int] | list[int],
                  grid: str = "zero_point") -> dict[str, list[int]]:
    """The tensors a quantized weight `name` is stored as, with their shapes (packed ones are flat uint8)."""
    out, cols = shape
    groups = math.ceil(cols / group_size)
    anchor = ({f"{name}.offsets": [out, groups]} if grid == "offset" else {} if grid == "symmetric"
              else {f"{name}.qzeros": [math.ceil(out * groups * bits / 8)]})
    return {f"{name}.qweight": [math.ceil(out * cols * bits / 8)], **anchor, f"{name}.scales": [out, groups]}


def packed_nbytes(shape: tuple[int, int], bits: int, group_size: int, grid: str = "zero_point") -> int:
    """Bytes of an [out, in] matrix stored at `bits` with `group_size` columns per float16 scale and per anchor
    (a `bits`-wide zero point, a float16 offset, or none for a symmetric grid)."""
    out, cols = shape
    groups = math.ceil(cols / group_size)
    anchors = {"offset": 2 * out * groups, "symmetric": 0}.get(grid, math.ceil(out * groups * bits / 8))
    return math.ceil(out * cols * bits / 8) + anchors + 2 * out * groups


def check_format(bits: int, group_size: int, grid: str = "zero_point") -> None:
    if bits not in BITS:
        raise InvalidOption(f"bits must be one of {BITS}, got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise InvalidOption(f"group_size must be a positive integer, got {group_size!r}")
    if grid not in GRIDS:
        raise InvalidOption(f"grid must be one of {GRIDS} (an integer zero point, llama.cpp's float offset, or none), "
                            f"got {grid!r}")
