"""Weights that stay on disk: a tensor whose values live in a safetensors file and are read by each op that reads it.

A model larger than host memory cannot be held whole. A `DiskTensor` has a shape and a dtype like any weight (graph
analyses, shape checks and passes see an ordinary tensor), but no storage: every op it enters reads it from its file
(memory-mapped by safetensors), converts it to the dtype the program computes in (a bf16 checkpoint read as float32)
and drops it when the op is done, so a forward pass holds one weight at a time. Aliases (`detach`, `alias`) stay on
disk: the graph runner detaches every weight it reads.

`Scratch` is where edited weights go: a pass that writes a weight of a program whose weights are on disk
(`fxslice.core.graph.set_tensor`) has it written to the program's scratch folder and bound from there, so memory
does not grow with the number of weights a pass has edited. The folder is removed when nothing refers to it.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils._pytree import tree_map

__all__ = ["DiskTensor", "Scratch"]

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

    def load(self) -> torch.Tensor:
        """The values, as an ordinary tensor in this tensor's dtype (a new one on every call)."""
        with safe_open(str(self.path), framework="pt") as f:
            value = f.get_tensor(self.key)
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
