"""A safetensors file written one tensor at a time.

`safetensors.torch.save_file` takes every tensor at once, in memory. A program whose weights are kept on disk
(`fxslice.core.disk`) would then be read whole to be saved. The format needs only each tensor's dtype and shape up
front (the header: names, dtypes, shapes, byte ranges), which a `DiskTensor` knows without reading, so here the
header is written first and each tensor's bytes follow, read and released in turn. The result is an ordinary
safetensors file (`safe_open` and `load_file` read it; tests compare it with `save_file`'s).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fxslice.core.disk import DTYPE_CODES, DiskTensor

__all__ = ["write_tensors", "Deferred", "DTYPE_CODES"]

#: bytes: where the data starts, and the line tensors are ordered by
ALIGN = 64


@dataclass(frozen=True)
class Deferred:
    """A tensor computed only when its bytes are written, of a shape and dtype known before (a quantized weight's
    packed integers: holding every weight's until the file is written would be 3.5 GB at 7 B and 4 bits)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return self.dtype.itemsize

    def load(self) -> torch.Tensor:
        value = self.produce()
        if tuple(value.shape) != tuple(self.shape) or value.dtype != self.dtype:
            raise RuntimeError(f"a deferred tensor promised {self.dtype} {self.shape}, made {value.dtype} "
                               f"{tuple(value.shape)}")
        return value


def write_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor | Deferred],
                  metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` to the safetensors file `path`, holding one tensor's values at a time (a `DiskTensor` read, a
    `Deferred` computed, as its turn comes).

    The data starts on a 64-byte boundary, wider dtypes first and, among them, tensors of whole 64-byte lines first:
    most tensors read back start where the allocator would have put them, so the kernels that compute with them
    (which choose their paths by alignment) round as they did before the save."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    order = sorted(tensors.items(), key=lambda item: (-item[1].element_size(), _nbytes(item[1]) % ALIGN != 0))
    offset = 0
    for name, t in order:
        if t.dtype not in DTYPE_CODES:
            raise TypeError(f"{name}: safetensors cannot store {t.dtype}")
        size = _nbytes(t)
        header[name] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, t in order:
            values = (t.load() if isinstance(t, DiskTensor | Deferred) else t.detach()).cpu().contiguous()  # here only
            if values.numel():
                f.write(values.reshape(-1).view(torch.uint8).numpy().data)
            del values


def _nbytes(t: torch.Tensor | Deferred) -> int:
    return t.numel() * t.element_size()
