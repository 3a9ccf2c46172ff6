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
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxslice.core.errors import CorruptModel, InvalidOption, SaveFailed
from fxslice.core.graph import DEVICE_BOUND, device_bound, set_tensor, tensor_of
from fxslice.core.program import Program, program_inputs
from fxslice.core.quantized import QuantizedWeight
from fxslice.models.kvcache import CacheLayout

__all__ = ["save", "load", "check_output_dir", "example_inputs", "write_directory", "save_tokenizer", "RECORD", "WEIGHTS",
           "GRAPH"]

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


def _packed(program: Program, weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Quantized weights as their packed integers, zero points and scales (`QuantizedWeight.tensors`), the rest
    as they are; and the quantized weights' formats, for the record."""
    by_id = {id(tensor_of(program.gm, name)): q for name, q in program.quantized.items()}
    stored: dict[str, torch.Tensor] = {}
    formats: dict[str, dict] = {}
    for name, tensor in weights.items():
        q = by_id.get(id(tensor_of(program.gm, name)))
        if q is None:
            stored[name] = tensor
        elif not torch.equal(q.dequantize(), tensor.detach().cpu()):
            raise InvalidOption(f"'{name}' was changed after it was quantized, so its integers no longer describe it; "
                                "quantize last (the built-in lossy stages refuse a quantized model)")
        else:
            stored.update(q.tensors(name))
            formats[name] = q.meta()
    return stored, formats


def example_inputs(program: Program) -> tuple[tuple, tuple]:
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


def _tree_sha256(root: Path) -> str:
    """One digest of every file under `root` (names and contents), in a fixed order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + _sha256(path).encode())
    return digest.hexdigest()


def _graph_bytes(program: Program, weights: dict[str, torch.Tensor]) -> bytes:
    """The re-exported graph, serialised in memory, its weights left out (they live in the safetensors file)."""
    import io

    args, shapes = example_inputs(program)
    with torch.no_grad():
        exported = torch.export.export(program.gm, args, dynamic_shapes=shapes, strict=False)
    for name, value in list(exported.state_dict.items()):
        empty = torch.zeros(0, dtype=value.dtype)
        exported.state_dict[name] = nn.Parameter(empty, requires_grad=False) if isinstance(value, nn.Parameter) else empty
    for name in list(exported.constants):
        if isinstance(exported.constants[name], torch.Tensor) and name in weights:
            exported.constants[name] = torch.zeros(0, dtype=exported.constants[name].dtype)
    buffer = io.BytesIO()
    torch.export.save(exported, buffer)
    return buffer.getvalue()


def check_output_dir(out: Path) -> None:
    """Refuse an output path that cannot be written, before any long work."""
    if out.exists():
        raise InvalidOption(f"output directory {out} already exists; choose another path or remove it first")
    if not out.parent.is_dir():
        raise InvalidOption(f"the parent of the output directory is {'not a directory' if out.parent.exists() else 'missing'}: "
                            f"{out.parent}")
    if not os.access(out.parent, os.W_OK):
        raise InvalidOption(f"cannot write to {out.parent}: permission denied")


def save(program: Program, out_dir: str | os.PathLike, record: dict[str, Any] | None = None) -> Path:
    """Write `program` to the new directory `out_dir`, atomically; returns its path. Whatever stops the write
    (a full disk, another process creating `out_dir`, Ctrl-C) leaves nothing behind and raises one error."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    out = Path(out_dir)
    bound = device_bound(program.gm)
    if bound:
        raise InvalidOption(f"this program computes {len(bound)} ops ({bound[0].name}, ...) with weights packed for the "
                            f"{bound[0].meta[DEVICE_BOUND]}'s kernels, which the saved model does not keep: save the "
                            "quantized program before choosing kernels, and choose them again after loading it")
    check_output_dir(out)
    if program.device.type != "cpu":  # the file is device-free; `load` gives a CPU program, `.to(...)` moves it
        program = program.to("cpu")
    weights = _used_weights(program)
    graph = _graph_bytes(program, weights)  # in memory first: torch's zip writer aborts the process on a full disk
    weights, quantized = _packed(program, weights)
    needed = sum(t.numel() * t.element_size() for t in weights.values()) + len(graph) + (32 << 20)
    free = shutil.disk_usage(out.parent).free
    if free < needed:
        raise SaveFailed(f"not enough space in {out.parent}: the model needs about {needed / 2**20:.0f} MiB, "
                         f"{free / 2**20:.0f} MiB are free; free some space or choose another --out")

    def write(tmp: Path) -> None:
        try:
            save_file(weights, str(tmp / WEIGHTS))
        except SafetensorError as exc:
            raise OSError(f"the weights could not be written ({exc})") from exc
        (tmp / GRAPH).write_bytes(graph)
        if program.tokenizer is not None:
            save_tokenizer(program.tokenizer, tmp / TOKENIZER)
        from fxslice.core.version import __version__

        full = {
            "fxslice_version": __version__,
            "model_class": program.model_class,
            "static_shape": program.static_shape,
            "source": program.source,
            "dtype": str(program.dtype).replace("torch.", ""),
            "parameters": program.num_parameters(),
            "weights": {k: list(v.shape) for k, v in weights.items()},
            "weight_bytes": sum(t.numel() * t.element_size() for t in weights.values()),
            "quantized": quantized,
            "weights_sha256": _sha256(tmp / WEIGHTS),
            "graph_sha256": _sha256(tmp / GRAPH),
            "tokenizer_sha256": _tree_sha256(tmp / TOKENIZER) if (tmp / TOKENIZER).is_dir() else None,
            "config": program.config,
            "kv_cache": program.cache.to_json() if program.cache is not None else None,
            **(record or {}),
        }
        (tmp / RECORD).write_text(json.dumps(full, indent=1, default=str), encoding="utf-8")

    return write_directory(out, write)


def save_tokenizer(tokenizer: Any, path: Path) -> None:
    """`tokenizer.save_pretrained(path)`, a failed write as an OSError (tokenizers raise a bare Exception)."""
    try:
        tokenizer.save_pretrained(str(path))
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - tokenizers raise a bare Exception when a write fails
        raise OSError(f"the tokenizer could not be written ({exc})") from exc


def write_directory(out: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a new hidden directory beside `out`, then rename it to `out`. Whatever stops the write
    (a full disk, another process creating `out`, Ctrl-C) leaves nothing behind and raises one error."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would become the saved directory's mode
    except OSError as exc:
        raise SaveFailed(f"cannot create a directory in {out.parent}: {exc.strerror}") from None
    try:
        write(tmp)
        try:
            tmp.rename(out)
        except OSError as exc:
            if out.exists():
                raise SaveFailed(f"{out} was created by another process while this one worked; that one is kept, "
                                 "this result is discarded: choose another --out") from None
            raise exc
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = exc.strerror or str(exc)
        raise SaveFailed(f"could not write {out}: {reason}; nothing was left behind (check free space and "
                         "permissions, or choose another --out)") from None
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
    quantized = {}
    for name, meta in (record.get("quantized") or {}).items():
        try:
            quantized[name] = QuantizedWeight.from_tensors(name, weights, meta)
        except (KeyError, InvalidOption, RuntimeError) as exc:
            raise CorruptModel(f"the quantized weight '{name}' in {root / WEIGHTS} cannot be read: {exc}") from None
        for suffix in (".qweight", ".qzeros", ".scales"):
            del weights[name + suffix]
        weights[name] = quantized[name].dequantize()
    for key, name in (("graph_sha256", GRAPH), ("tokenizer_sha256", TOKENIZER)):
        if key not in record:
            continue  # saved before the record covered it
        found = _sha256(root / name) if (root / name).is_file() else (
            _tree_sha256(root / name) if (root / name).is_dir() else None)
        if found != record[key]:
            raise CorruptModel(f"{root / name} does not match the checksum in {RECORD}: it was changed, swapped or "
                               "truncated; save the model again")
    try:
        exported = torch.export.load(str(root / GRAPH))
    except Exception as exc:  # noqa: BLE001 - any deserialisation failure means a bad file
        raise CorruptModel(f"cannot read the graph {root / GRAPH}: {exc}") from None
    layout = CacheLayout.from_json(record["kv_cache"]) if record.get("kv_cache") else None
    gm = plain_graph_module(exported.module(), inputs=program_inputs(None if layout is None else len(layout.shapes)))
    expected = {str(n.target): n.meta.get("val") for n in gm.graph.find_nodes(op="get_attr")}
    unknown = sorted(set(expected) - set(weights))
    if unknown:
        raise CorruptModel(f"the graph {root / GRAPH} reads weights that {root / WEIGHTS} does not hold: "
                           f"{', '.join(unknown[:5])}; the files come from different models")
    for name, value in weights.items():
        val = expected.get(name)
        if isinstance(val, torch.Tensor) and val.numel() and (tuple(val.shape) != tuple(value.shape) or val.dtype != value.dtype):
            raise CorruptModel(f"the graph {root / GRAPH} expects '{name}' as {tuple(val.shape)} {val.dtype}, "
                               f"{root / WEIGHTS} holds {tuple(value.shape)} {value.dtype}")
        set_tensor(gm, name, value)
    static = record.get("static_shape")
    program = Program(gm, record.get("model_class", "nn.Module"), record.get("config"), None, str(root), cache=layout,
                      quantized=quantized, static_shape=tuple(static) if static else None)
    if program.num_parameters() != record.get("parameters"):
        raise CorruptModel(f"{root} holds {program.num_parameters()} parameters but its record says {record.get('parameters')}")
    if (root / TOKENIZER).is_dir():
        import transformers

        program.tokenizer = transformers.AutoTokenizer.from_pretrained(str(root / TOKENIZER))
    program.record = record
    return program
