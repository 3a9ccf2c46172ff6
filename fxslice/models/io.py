"""Save and load compiled programs as self-describing directories.

    DIR/model.safetensors   the weights the graph uses, by their qualified names
    DIR/graph.pt2           the graph (torch.export.save, with its weights left out); with a KV cache
                            when the program has one (`Program.cache`, recorded as "kv_cache")
    DIR/tokenizer/          the tokenizer, when the program has one
    DIR/fxslice.json        what was done: version, passes, widths, calibration, parameter counts, metrics

Writes go to a hidden sibling directory that is renamed into place at the end, so an interrupted or
failed save never leaves a directory that `load` accepts; an existing DIR is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxslice.core.errors import CorruptModel, InvalidOption
from fxslice.core.graph import set_tensor, tensor_of
from fxslice.core.program import Program, program_inputs
from fxslice.models.kvcache import CacheLayout

__all__ = ["save", "load", "RECORD", "WEIGHTS", "GRAPH"]

RECORD, WEIGHTS, GRAPH, TOKENIZER = "fxslice.json", "model.safetensors", "graph.pt2", "tokenizer"


def _used_weights(program: Program) -> dict[str, torch.Tensor]:
    """The tensors the graph reads, each stored once under its own name (tied tensors are copied)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for node in program.graph.nodes:
        if node.op == "get_attr" and node.users and str(node.target) not in out:
            t = tensor_of(program.gm, node).detach()
            out[str(node.target)] = t.clone() if id(t) in seen else t.contiguous()
            seen.add(id(t))
    return out


def _example_inputs(program: Program) -> tuple[tuple, tuple]:
    """Inputs to re-export the graph with, and their dynamic dimensions (batch, length, cache length)."""
    from torch.export import Dim

    probe = program.probe_input()
    if program.cache is None:
        return (probe,), ({0: Dim.AUTO, 1: Dim.AUTO},)
    kv = program.cache.allocate(probe.shape[0], probe.shape[1] + 4, program.dtype)
    return (probe, torch.tensor(0), *kv), ({0: Dim.AUTO, 1: Dim.AUTO}, None, *({0: Dim.AUTO, 2: Dim.AUTO} for _ in kv))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save(program: Program, out_dir: str | os.PathLike, record: dict[str, Any] | None = None) -> Path:
    """Write `program` to the new directory `out_dir`, atomically; returns its path."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists():
        raise InvalidOption(f"output directory {out} already exists; choose another path or remove it first")
    if not out.parent.is_dir():
        raise InvalidOption(f"the parent of the output directory is {'not a directory' if out.parent.exists() else 'missing'}: "
                            f"{out.parent}")
    if not os.access(out.parent, os.W_OK):
        raise InvalidOption(f"cannot write to {out.parent}: permission denied")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
    except OSError as exc:
        raise InvalidOption(f"cannot create a directory in {out.parent}: {exc.strerror}") from None
    try:
        weights = _used_weights(program)
        save_file(weights, str(tmp / WEIGHTS))
        args, shapes = _example_inputs(program)
        with torch.no_grad():
            exported = torch.export.export(program.gm, args, dynamic_shapes=shapes, strict=False)
        for name, value in list(exported.state_dict.items()):  # the weights live in the safetensors file
            empty = torch.zeros(0, dtype=value.dtype)
            exported.state_dict[name] = nn.Parameter(empty, requires_grad=False) if isinstance(value, nn.Parameter) else empty
        for name in list(exported.constants):
            if isinstance(exported.constants[name], torch.Tensor) and name in weights:
                exported.constants[name] = torch.zeros(0, dtype=exported.constants[name].dtype)
        torch.export.save(exported, str(tmp / GRAPH))
        if program.tokenizer is not None:
            program.tokenizer.save_pretrained(str(tmp / TOKENIZER))
        from fxslice.core.version import __version__

        full = {
            "fxslice_version": __version__,
            "model_class": program.model_class,
            "source": program.source,
            "dtype": str(program.dtype).replace("torch.", ""),
            "parameters": program.num_parameters(),
            "weights": {k: list(v.shape) for k, v in weights.items()},
            "weights_sha256": _sha256(tmp / WEIGHTS),
            "config": program.config,
            "kv_cache": program.cache.to_json() if program.cache is not None else None,
            **(record or {}),
        }
        (tmp / RECORD).write_text(json.dumps(full, indent=1, default=str), encoding="utf-8")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load(path: str | os.PathLike) -> Program:
    """Load a directory written by `save`; checks that the files agree with the record."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from fxslice.models.capture import plain_graph_module

    root = Path(path)
    if not root.is_dir():
        raise CorruptModel(f"{root} is not a directory saved by fxslice")
    missing = [f for f in (RECORD, WEIGHTS, GRAPH) if not (root / f).is_file()]
    if missing:
        raise CorruptModel(f"{root} is missing {', '.join(missing)}; it was not saved completely by fxslice")
    try:
        record = json.loads((root / RECORD).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptModel(f"{root / RECORD} is not valid JSON: {exc}") from None
    if record.get("weights_sha256") != _sha256(root / WEIGHTS):
        raise CorruptModel(f"{root / WEIGHTS} does not match the checksum in {RECORD}: the file was changed or truncated")
    try:
        weights = load_file(str(root / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise CorruptModel(f"cannot read {root / WEIGHTS}: {exc}") from None
    shapes = {k: list(v.shape) for k, v in weights.items()}
    if shapes != record.get("weights"):
        raise CorruptModel(f"the weights in {root / WEIGHTS} disagree with the shapes recorded in {RECORD}")
    try:
        exported = torch.export.load(str(root / GRAPH))
    except Exception as exc:  # noqa: BLE001 - any deserialisation failure means a bad file
        raise CorruptModel(f"cannot read the graph {root / GRAPH}: {exc}") from None
    layout = CacheLayout.from_json(record["kv_cache"]) if record.get("kv_cache") else None
    gm = plain_graph_module(exported.module(), inputs=program_inputs(None if layout is None else len(layout.shapes)))
    for name, value in weights.items():
        set_tensor(gm, name, value)
    program = Program(gm, record.get("model_class", "nn.Module"), record.get("config"), None, str(root), cache=layout)
    if program.num_parameters() != record.get("parameters"):
        raise CorruptModel(f"{root} holds {program.num_parameters()} parameters but its record says {record.get('parameters')}")
    if (root / TOKENIZER).is_dir():
        import transformers

        program.tokenizer = transformers.AutoTokenizer.from_pretrained(str(root / TOKENIZER))
    program.record = record
    return program
