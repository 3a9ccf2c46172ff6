"""Capture without the weights in memory: the model built from its config with fake parameters, traced, and every
weight then bound to the safetensors entry it comes from (`fxslice.core.disk.DiskTensor`), read by each op that
uses it. Capture holds no weight; evaluation holds one at a time; passes that edit weights write them to a scratch
folder (`fxslice.core.disk.Scratch`) instead of keeping them.

A weight is bound by the name transformers gives it, which must be the checkpoint's own: families whose loader
renames or restacks tensors (transformers' weight conversions) are refused with the names that are missing, and load
as usual without `lazy`. A GGUF file is read through its converted copy (`fxslice.models.gguf_cache`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxslice.core.disk import DiskTensor, Scratch, tensors_in
from fxslice.core.errors import CaptureError
from fxslice.core.graph import SCRATCH
from fxslice.core.program import Program
from fxslice.models import gguf_cache

__all__ = ["capture_lazily", "checkpoint_folder", "checkpoint_tensors", "local_checkpoint_numel"]

#: checkpoint files transformers writes (one file, or shards with an index)
_SINGLE, _INDEX = "model.safetensors", "model.safetensors.index.json"


def checkpoint_folder(name: str | os.PathLike) -> Path:
    """The local folder of safetensors weights behind `name`: 'smollm2', a .gguf file (its converted copy, made on
    first use), a directory, or a hub name (downloaded without running any code)."""
    from fxslice.models.capture import DEFAULT_MODEL, default_model_path, load_model

    path = default_model_path() if str(name) == DEFAULT_MODEL else Path(name)
    if path.suffix == ".gguf":
        copy = gguf_cache.converted_copy(path)
        if copy is None:  # converted once, as any float32 load of it does
            load_model(path)
            copy = gguf_cache.converted_copy(path)
        if copy is None:
            raise CaptureError(f"{path}: a lazy load reads the GGUF's converted copy, and none could be written "
                               f"(FXSLICE_CACHE={os.environ.get('FXSLICE_CACHE', '')!r}); turn the cache on")
        return copy
    if path.is_dir():
        return path
    if path.exists():
        raise CaptureError(f"{path} is neither a directory nor a .gguf file")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name), allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model",
                                                                 "*.txt"]))
    except Exception as exc:  # noqa: BLE001 - offline, unknown name, gated: one message
        raise CaptureError(f"could not find model '{name}' locally or download it: {type(exc).__name__}: {exc}\n"
                           "  what to try: a hub name needs network access (or a local copy)") from None


def checkpoint_tensors(folder: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Every tensor of the checkpoint in `folder`: the file that holds it and its shape (each header read once)."""
    index = folder / _INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        files = sorted({folder / file for file in weight_map.values()})
    elif (folder / _SINGLE).is_file():
        files = [folder / _SINGLE]
    else:
        raise CaptureError(f"{folder} holds no safetensors checkpoint ({_SINGLE} or {_INDEX}); a lazy load reads only "
                           "safetensors (no pickled .bin: loading one can run code)")
    return {key: (file, entry.shape) for file in files for key, entry in tensors_in(file).items()}


def local_checkpoint_numel(name: str | os.PathLike) -> int | None:
    """The number of values in the safetensors checkpoint of the local directory `name` (headers only), or None
    where `name` is not one (a hub name, a GGUF file, an fxslice save, a pickled checkpoint)."""
    path = Path(name)
    if not (path / "config.json").is_file() or not ((path / _INDEX).is_file() or (path / _SINGLE).is_file()):
        return None
    return sum(math.prod(shape) for _, shape in checkpoint_tensors(path).values())


def capture_lazily(name: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                   scratch: str | os.PathLike | None = None, with_cache: bool = False) -> tuple[Program, Program | None]:
    """Capture the model behind `name` with every weight left in its checkpoint file, read as `dtype` when used,
    and with `with_cache` its KV-cache capture too (None where the model has none). Edited weights go to a scratch
    folder under `scratch` (the system's temporary folder by default)."""
    from fxslice.models.capture import capture_module
    from fxslice.models.kvcache import capture_cached

    lazy = _LazyModel(name, dtype)
    program = lazy.capture(capture_module)
    cached = None
    if with_cache:
        try:
            cached = lazy.capture(capture_cached)
        except CaptureError:
            cached = None
    for p in (program, cached):
        if p is not None:
            p.gm.meta[SCRATCH] = Scratch(scratch)
            p.tokenizer, p.source = lazy.tokenizer, str(name)
    return program, cached


class _LazyModel:
    """The transformers model of a checkpoint with fake parameters (traceable, no memory) and, for each, the
    `DiskTensor` that gives its values once traced."""

    def __init__(self, name: str | os.PathLike, dtype: torch.dtype) -> None:
        import transformers
        from accelerate import init_empty_weights
        from torch._subclasses.fake_tensor import FakeTensorMode

        folder = checkpoint_folder(name)
        files = checkpoint_tensors(folder)
        try:
            config = transformers.AutoConfig.from_pretrained(folder)
            with init_empty_weights(include_buffers=False):  # parameters on `meta`; buffers (rotary tables) computed
                model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        except Exception as exc:  # noqa: BLE001 - a foreign or damaged config fails in transformers' own way
            raise CaptureError(f"could not build the model of {folder} from its config.json: {type(exc).__name__}: "
                               f"{exc}\n  what to try: check that it is a transformers checkpoint") from None
        model.tie_weights()  # as loading does: a tied head is the table itself, stored once
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.disk: dict[int, DiskTensor] = {}
        self.fakes: dict[str, nn.Parameter] = {}
        missing: list[str] = []
        for group in _tied_groups(model):
            key = next((n for n in group if n in files), None)
            param = model.get_parameter(group[0])
            if key is None:
                missing.append(group[0])
                continue
            file, shape = files[key]
            if shape != tuple(param.shape):
                raise CaptureError(f"{folder}: {key} has shape {shape} in the checkpoint, but {type(model).__name__} "
                                   f"expects {tuple(param.shape)}: the config and the weights disagree")
            with mode:
                fake = nn.Parameter(torch.empty(param.shape, dtype=dtype), requires_grad=False)
            self.disk[id(fake)] = DiskTensor(file, key, param.shape, dtype)
            for n in group:
                _replace(model, n, fake)
                self.fakes[n] = fake
        if missing:
            raise CaptureError(f"{folder}: {len(missing)} weight(s) of {type(model).__name__} are not in the checkpoint "
                               f"under their own names (first: {', '.join(missing[:3])}): transformers converts this "
                               "family's weights while loading, which a lazy load cannot follow; load it without lazy")
        self.model = model.eval()
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        except Exception:  # noqa: BLE001 - a graph needs none; commands that read text say so
            self.tokenizer = None

    def capture(self, capture: Callable[..., Program]) -> Program:
        """`capture(model, bind=...)` traced on the fake parameters, its exported module (and, for the capture's own
        checks, the model) given the weights from disk; the model is left fake for the next capture."""
        try:
            return capture(self.model, bind=lambda exported: (self._bind(exported), self._bind(self.model)))
        finally:
            for n, fake in self.fakes.items():
                _replace(self.model, n, fake)

    def _bind(self, module: nn.Module) -> None:
        for n, p in list(module.named_parameters(remove_duplicate=False)):
            if id(p) in self.disk:
                _replace(module, n, nn.Parameter(self.disk[id(p)], requires_grad=False))


def _tied_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names grouped by the tensor they name (a tied table has two)."""
    groups: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
    return list(groups.values())


def _replace(module: nn.Module, name: str, value: Any) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(module.get_submodule(owner) if owner else module, attr, value)
