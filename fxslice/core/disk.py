"""Weights that stay on disk: a tensor whose values live in a safetensors file and are read by each op that reads it.

A model larger than host memory cannot be held whole. A `DiskTensor` has a shape and a dtype like any weight (graph
analyses, shape checks and passes see an ordinary tensor), but no storage: every op it enters reads it from its file
(its bytes alone, read into new memory: no mapping of the file), converts it to the dtype the program computes in (a bf16 checkpoint read as float32)
and drops it when the op is done, so a forward pass holds one weight at a time. Aliases (`detach`, `alias`) stay on
disk: the graph runner detaches every weight it reads.

`Scratch` is where edited weights go: a pass that writes a weight of a program whose weights are on disk
(`fxslice.core.graph.set_tensor`) has it written to the program's scratch folder and bound from there, so memory
does not grow with the number of weights a pass has edited. The folder is removed when nothing refers to it.

`tensors_in` reads a safetensors header (names, dtypes, shapes, byte ranges) and nothing else: how a lazy load binds
weights, and how a `DiskTensor` finds its bytes. The file is read with plain reads, not mapped: safetensors' own
reader maps the whole file privately for every tensor it hands out, which the kernel counts as the process's data
(a limit on it, `RLIMIT_DATA`, would see a 5 GB shard for each weight read).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import shutil
import struct
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import save_file
from torch.utils._pytree import tree_map

from fxslice.core.errors import CorruptModel
from fxslice.core.memory import return_large_blocks

__all__ = ["DiskTensor", "Scratch", "TensorEntry", "tensors_in", "file_metadata", "read_tensor", "DTYPE_CODES"]

#: the safetensors names of the dtypes fxslice reads and writes
DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
_MAX_HEADER = 100 << 20  # the format's own limit on the header's JSON


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: its dtype, shape, and the file's bytes [start, end) that hold it."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def tensors_in(path: str | Path) -> dict[str, TensorEntry]:
    """Every tensor of the safetensors file `path`, from its header alone; `CorruptModel` naming the file where the
    header is not one (or names a dtype fxslice does not read)."""
    return _read_header(path)[0]


def file_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors file's own metadata (`__metadata__`: text keys and values), from the same header."""
    return _read_header(path)[1]


def _read_header(path: str | Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    path = Path(path)
    stat = path.stat()
    return _header(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _header(path: Path, size: int, mtime_ns: int) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """(tensors, metadata) of the file; cached by size and time, so that a file changed is read again."""
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= min(_MAX_HEADER, size - 8):
            raise CorruptModel(f"{path} is not a safetensors file (its header length is {length}, the file {size} bytes)")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptModel(f"{path}: the safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CorruptModel(f"{path}: the safetensors header is not a mapping")
    metadata = header.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CorruptModel(f"{path}: the safetensors metadata must map text to text, got {metadata!r:.100}")
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(n) for n in info["shape"])
            start, end = (8 + length + int(o) for o in info["data_offsets"])
        except KeyError as exc:
            if exc.args and exc.args[0] == info.get("dtype"):
                raise CorruptModel(f"{path}: tensor {name!r} has the dtype {info['dtype']}, which fxslice does not read "
                                   f"(it reads {', '.join(_DTYPES)})") from None
            raise CorruptModel(f"{path}: tensor {name!r} lacks {exc}") from None
        except (TypeError, ValueError, AttributeError):
            raise CorruptModel(f"{path}: tensor {name!r} has a malformed entry {info!r:.100}") from None
        if end - start != math.prod(shape) * dtype.itemsize or not 8 + length <= start <= end <= size:
            raise CorruptModel(f"{path}: tensor {name!r} claims bytes {start}..{end}, which do not fit its shape "
                               f"{shape} in {info['dtype']} or the file's {size} bytes")
        entries[name] = TensorEntry(dtype, shape, start, end)
    return entries, metadata


def read_tensor(path: str | Path, key: str) -> torch.Tensor:
    """Tensor `key` of the safetensors file `path`, read into a new tensor (no mapping of the file)."""
    entry = tensors_in(path).get(key)
    if entry is None:
        raise CorruptModel(f"{path} holds no tensor {key!r} (the file changed since it was bound)")
    out = torch.empty(entry.shape, dtype=entry.dtype)
    if not out.numel():
        return out
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    with open(path, "rb") as f:
        f.seek(entry.start)
        done = 0
        while done < len(view):
            got = f.readinto(view[done:])
            if not got:
                raise CorruptModel(f"{path} ends inside tensor {key!r}: it was truncated")
            done += got
    return out

aten = torch.ops.aten


_READ_ONLY = ("{} would edit a weight kept on disk, which is read-only: compute the new value and write it with "
              "fxslice.core.graph.set_tensor")


class DiskTensor(torch.Tensor):
    """`key` of the safetensors file `path`, read as `dtype` (the file's own dtype may differ) by every op that uses
    it. `scratch`: the folder the file is in when fxslice wrote it (kept alive while this tensor is)."""

    path: Path
    key: str
    scratch: Scratch | None

    #: ops that return the tensor itself (no new values): answered without reading the file
    ALIASES: ClassVar[set[Any]] = {aten.detach.default, aten.alias.default}

    @staticmethod
    def __new__(cls, path: str | Path, key: str, shape: torch.Size | tuple[int, ...], dtype: torch.dtype,
                scratch: Scratch | None = None) -> DiskTensor:
        return torch.Tensor._make_wrapper_subclass(cls, tuple(shape), dtype=dtype, device="cpu", requires_grad=False)

    def __init__(self, path: str | Path, key: str, shape: torch.Size | tuple[int, ...], dtype: torch.dtype,
                 scratch: Scratch | None = None) -> None:
        self.path, self.key, self.scratch = Path(path), key, scratch
        return_large_blocks()  # every op that reads this allocates and drops a weight-sized block

    def load(self) -> torch.Tensor:
        """The values, as an ordinary tensor in this tensor's dtype (a new one on every call)."""
        value = read_tensor(self.path, self.key)
        if tuple(value.shape) != tuple(self.shape):
            raise RuntimeError(f"{self.path}: tensor {self.key!r} has shape {tuple(value.shape)}, expected "
                               f"{tuple(self.shape)} (the file changed since it was bound)")
        return value.to(self.dtype)

    def same_place(self, dtype: torch.dtype | None = None) -> DiskTensor:
        return DiskTensor(self.path, self.key, self.shape, dtype or self.dtype, self.scratch)

    def __repr__(self) -> str:  # type: ignore[override]
        return f"DiskTensor({self.path.name}:{self.key}, shape={tuple(self.shape)}, dtype={self.dtype})"

    def __deepcopy__(self, memo: dict) -> DiskTensor:
        return self.same_place()

    def numpy(self, *, force: bool = False) -> Any:  # not an op: NumPy readers (exports) get the values
        return self.load().numpy(force=force)

    def tolist(self) -> Any:
        return self.load().tolist()

    def __setitem__(self, index: Any, value: Any) -> None:  # would write into a copy read for the occasion
        raise RuntimeError(_READ_ONLY.format(f"assigning to {self!r}[...]"))

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in cls.ALIASES and isinstance(args[0], DiskTensor):
            return args[0].same_place()
        if func is aten.empty_like.default:  # shape and dtype are known without reading
            like = args[0]
            return torch.empty(like.shape, dtype=kwargs.get("dtype") or like.dtype, device=kwargs.get("device"))
        for arg, value in zip(func._schema.arguments, args, strict=False):
            if isinstance(value, DiskTensor) and arg.alias_info is not None and arg.alias_info.is_write:
                raise RuntimeError(_READ_ONLY.format(f"{func.__name__} on {value!r}"))
        read = lambda t: t.load() if isinstance(t, DiskTensor) else t  # noqa: E731
        return func(*tree_map(read, args), **tree_map(read, kwargs))


class Scratch:
    """A folder of weights fxslice wrote while editing a program whose weights are on disk: one safetensors file per
    write, removed with the folder once no `DiskTensor` (nor program) refers to it."""

    def __init__(self, parent: str | Path | None = None) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="fxslice-weights-", dir=parent))
        self._count = itertools.count()
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.folder, True)

    def __deepcopy__(self, memo: dict) -> Scratch:  # copies of a program write to the same folder
        return self

    #: smaller tensors (norm weights, biases) stay in memory: a file per vector would cost more than it saves
    MIN_BYTES = 1 << 20

    def keep(self, value: Any) -> Any:
        """`value` as a program on disk keeps it: a host tensor of `MIN_BYTES` or more written here, anything else
        (small, on a device, on disk already, not a tensor) as it is."""
        if (not isinstance(value, torch.Tensor) or isinstance(value, DiskTensor) or value.device.type != "cpu"
                or value.nbytes < self.MIN_BYTES):
            return value
        return self.write(value)

    def write(self, value: torch.Tensor) -> DiskTensor:
        """`value` written to a new file of this folder, bound from there (its dtype kept: edited weights are not
        rounded back to the checkpoint's dtype)."""
        path = self.folder / f"{next(self._count):06d}.safetensors"
        save_file({"w": value.detach().contiguous().cpu()}, str(path))
        return DiskTensor(path, "w", value.shape, value.dtype, self)
