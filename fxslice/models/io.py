"""Save and load compiled programs as self-describing directories.

    DIR/model.safetensors   the weights the graph uses, by their qualified names
    DIR/graph.json          the graph as data (`fxslice.models.remote.graph_data`): PyTorch operators, literal
                            arguments and weight names; with a KV cache when the program has one (`Program.cache`,
                            recorded as "kv_cache")
    DIR/tokenizer/          the tokenizer, when the program has one
    DIR/fxslice.json        what was done: version, passes, widths, calibration, parameter counts, metrics

Writes go to a hidden sibling directory that is renamed into place at the end, so an interrupted or
failed save never leaves a directory that `load` accepts; an existing DIR is never overwritten.

Loading executes nothing from the directory: tensors come from safetensors, the graph from JSON that can name
only registered PyTorch operators, the record is checked field by field (`fxslice.models.record`), the tokenizer
is read without remote code. Directories written before graph.json (a pickled `graph.pt2`) load only with
`trust_pickle=True`, which says the user trusts whoever wrote them.
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
from torch import fx, nn

from fxslice.core.disk import DiskTensor, Scratch, file_metadata, tensors_in
from fxslice.core.errors import CorruptModel, InvalidOption, SaveFailed, UnsupportedStructure
from fxslice.core.graph import DEVICE_BOUND, SCRATCH, device_bound, propagate_fake_values, set_tensor, tensor_of
from fxslice.core.program import Program, program_inputs
from fxslice.core.quantized import QuantizedWeight, stored_shapes
from fxslice.models.kvcache import CacheLayout
from fxslice.models.record import check_record
from fxslice.models.remote.graph_data import GraphDataError, graph_from_data, graph_to_data
from fxslice.models.tensor_file import Deferred, write_tensors

__all__ = ["save", "load", "check_output_dir", "example_inputs", "write_directory", "write_file", "save_tokenizer",
           "write_graph", "graph_over", "is_saved_model", "RECORD", "WEIGHTS", "GRAPH", "LEGACY_GRAPH"]

RECORD, WEIGHTS, GRAPH, TOKENIZER = "fxslice.json", "model.safetensors", "graph.json", "tokenizer"
LEGACY_GRAPH = "graph.pt2"  # a torch.export archive: reading it unpickles (fxslice before graph.json)
_QUANTIZED_KEY = "fxslice_quantized"  # the quantized formats, also in the weights file's own header


def _used_weights(program: Program) -> dict[str, torch.Tensor]:
    """The tensors the graph reads, each under its own name (a tied tensor is written under each of its names)."""
    out: dict[str, torch.Tensor] = {}
    for node in program.graph.nodes:
        if node.op == "get_attr" and node.users and str(node.target) not in out:
            out[str(node.target)] = tensor_of(program.gm, node).detach()
    return out


def _packed(program: Program, weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor | Deferred], dict[str, dict]]:
    """Quantized weights as their packed integers, zero points and scales (`QuantizedWeight.stored`: packed when
    written), the rest as they are; and the quantized weights' formats, for the record."""
    by_id = {id(tensor_of(program.gm, name)): q for name, q in program.quantized.items()}
    stored: dict[str, torch.Tensor | Deferred] = {}
    formats: dict[str, dict] = {}
    for name, tensor in weights.items():
        q = by_id.get(id(tensor_of(program.gm, name)))
        if q is None:
            stored[name] = tensor
        elif not torch.equal(q.dequantize(), tensor.detach().cpu()):
            raise InvalidOption(f"'{name}' was changed after it was quantized, so its integers no longer describe it; "
                                "quantize last (the built-in lossy stages refuse a quantized model)")
        else:
            stored.update({key: Deferred(tuple(shape), dtype, make) for key, (shape, dtype, make) in q.stored(name).items()})
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


def _graph_json(program: Program) -> bytes:
    """The graph as data (`graph_data`), with which of its weights are parameters (the rest are buffers)."""
    try:
        data = graph_to_data(program.graph)
    except GraphDataError as exc:
        raise UnsupportedStructure(f"this program cannot be saved: {exc}") from None
    data["parameters"] = sorted({name for name, _ in program.gm.named_parameters(remove_duplicate=False)})
    return json.dumps(data, separators=(",", ":")).encode()


def write_graph(program: Program, path: Path) -> None:
    """The graph of `program` alone, as in graph.json: a second graph over another program's weights (the KV-cache
    capture a job keeps beside the program it compresses), read back by `graph_over`."""
    path.write_bytes(_graph_json(program))


def graph_over(path: Path, program: Program, cache: CacheLayout | None) -> Program:
    """The graph `write_graph` wrote to `path`, computing with `program`'s weights (by name), with `cache`'s layout."""
    weights = {str(n.target): tensor_of(program.gm, n) for n in program.graph.find_nodes(op="get_attr")}
    gm = _read_graph(path, weights, program_inputs(None if cache is None else len(cache.shapes)))
    return Program(gm, program.model_class, program.config, program.tokenizer, program.source, cache=cache,
                   quantized=dict(program.quantized), static_shape=program.static_shape)


def is_saved_model(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory `save` wrote (its record beside a graph), rather than a checkpoint to capture."""
    root = Path(path)
    return root.is_dir() and (root / RECORD).is_file() and ((root / GRAPH).is_file() or (root / LEGACY_GRAPH).is_file())


def check_output_dir(out: Path) -> None:
    """Refuse an output path that cannot be written, before any long work."""
    if out.exists() or out.is_symlink():
        raise InvalidOption(f"the output {out} already exists; choose another path or remove it first")
    if not out.parent.is_dir():
        raise InvalidOption(f"the folder of the output is {'not a directory' if out.parent.exists() else 'missing'}: "
                            f"{out.parent}")
    if not os.access(out.parent, os.W_OK):
        raise InvalidOption(f"cannot write to {out.parent}: permission denied")


def save(program: Program, out_dir: str | os.PathLike, record: dict[str, Any] | None = None) -> Path:
    """Write `program` to the new directory `out_dir`, atomically; returns its path. Whatever stops the write
    (a full disk, another process creating `out_dir`, Ctrl-C) leaves nothing behind and raises one error."""
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
    graph = _graph_json(program)
    weights, quantized = _packed(program, weights)
    needed = sum(t.numel() * t.element_size() for t in weights.values()) + len(graph) + (32 << 20)
    free = shutil.disk_usage(out.parent).free
    if free < needed:
        raise SaveFailed(f"not enough space in {out.parent}: the model needs about {needed / 2**20:.0f} MiB, "
                         f"{free / 2**20:.0f} MiB are free; free some space or choose another --out")

    def write(tmp: Path) -> None:
        write_tensors(tmp / WEIGHTS, weights, {_QUANTIZED_KEY: json.dumps(quantized, sort_keys=True)})
        (tmp / GRAPH).write_bytes(graph)
        if program.tokenizer is not None:
            save_tokenizer(program.tokenizer, tmp / TOKENIZER)
        from fxslice.core.version import __version__

        full = {  # what the caller records first, then what save measures itself (never the caller's copy of it)
            **(record or {}),
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
        }
        (tmp / RECORD).write_text(json.dumps(full, indent=1, default=str), encoding="utf-8")

    return write_directory(out, write)


def write_file(out: Path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp)` on a temporary file beside `out`, then move it into place: all of it, or nothing, and a
    failed write is one `SaveFailed`."""
    try:
        handle, tmp = tempfile.mkstemp(prefix=f".{out.name}.partial-", dir=out.parent)
        os.close(handle)
    except OSError as exc:
        raise SaveFailed(f"cannot create a file in {out.parent}: {exc.strerror or exc}") from None
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would become the file's mode: a file to share is readable
        os.replace(tmp, out)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise SaveFailed(f"could not write {out}: {exc.strerror or exc}; nothing was left behind") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


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


def load(path: str | os.PathLike, *, trust_pickle: bool = False, lazy: bool = False) -> Program:
    """Load a directory written by `save`. Nothing in it is executed: the record is checked field by field, the
    files against its checksums and against each other, the graph may call PyTorch operators only, and any
    disagreement is one `CorruptModel` naming the file and field. `trust_pickle=True` also reads a directory saved
    before graph.json, whose pickled `graph.pt2` can run code: only for directories you wrote or trust. `lazy`: the
    weights stay in the file, read by each op that uses them (`fxslice.core.disk`); quantized ones are dequantized
    into a scratch folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = Path(path)
    if not root.is_dir():
        raise CorruptModel(f"{root} is not a directory saved by fxslice")
    legacy = not (root / GRAPH).exists() and (root / LEGACY_GRAPH).is_file()
    if legacy and not trust_pickle:
        raise CorruptModel(f"{root} was saved by an older fxslice, whose {LEGACY_GRAPH} is read by unpickling, which "
                           "can run code hidden in the file; fxslice does not do that unasked. If you trust whoever "
                           f"wrote it, convert it once: fxslice upgrade {root} --out NEW --trust-pickle")
    graph_file = LEGACY_GRAPH if legacy else GRAPH
    missing = [f for f in (RECORD, WEIGHTS, graph_file) if not (root / f).is_file()]
    if missing:
        raise CorruptModel(f"{root} is missing {', '.join(missing)}; it was not saved completely by fxslice")
    try:
        record = json.loads((root / RECORD).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptModel(f"{root / RECORD} is not valid JSON: {exc}") from None
    record = check_record(record, root / RECORD)
    for key, name in (("weights_sha256", WEIGHTS), ("graph_sha256", graph_file), ("tokenizer_sha256", TOKENIZER)):
        found = _sha256(root / name) if (root / name).is_file() else (
            _tree_sha256(root / name) if (root / name).is_dir() else None)
        if found != record.get(key):
            raise CorruptModel(f"{root / name} does not match the checksum in {RECORD}: it was changed, swapped or "
                               "truncated; save the model again")
    scratch = Scratch() if lazy else None
    try:
        weights = _on_disk(root / WEIGHTS) if lazy else load_file(str(root / WEIGHTS))
        header = file_metadata(root / WEIGHTS)
    except (SafetensorError, OSError) as exc:
        raise CorruptModel(f"cannot read {root / WEIGHTS}: {exc}") from None
    shapes = {k: list(v.shape) for k, v in weights.items()}
    if shapes != record["weights"]:
        raise CorruptModel(f"the weights in {root / WEIGHTS} disagree with the shapes recorded in {RECORD}")
    formats = record.get("quantized") or {}
    if not legacy and header.get(_QUANTIZED_KEY, "{}") != json.dumps(formats, sort_keys=True):
        raise CorruptModel(f"the quantized formats in {RECORD} ('quantized') disagree with those written into "
                           f"{root / WEIGHTS}; the record was edited: save the model again")
    quantized = {}
    for name, meta in formats.items():
        try:
            quantized[name] = QuantizedWeight.from_tensors(name, weights, meta)
        except (KeyError, InvalidOption, RuntimeError) as exc:
            raise CorruptModel(f"the quantized weight '{name}' in {root / WEIGHTS} cannot be read: {exc}") from None
        for tensor in stored_shapes(name, meta["bits"], meta["group_size"], meta["shape"], quantized[name].grid):
            del weights[tensor]
        weights[name] = quantized[name].dequantize()
        if scratch is not None:
            weights[name] = scratch.keep(weights[name])
    layout = CacheLayout.from_json(record["kv_cache"]) if record.get("kv_cache") else None
    inputs = program_inputs(None if layout is None else len(layout.shapes))
    gm = _legacy_graph(root, weights, inputs) if legacy else _read_graph(root / GRAPH, weights, inputs)
    if scratch is not None:
        gm.meta[SCRATCH] = scratch
    static = record.get("static_shape")
    program = Program(gm, record["model_class"], record.get("config"), None, str(root), cache=layout,
                      quantized=quantized, static_shape=tuple(static) if static else None)
    if program.num_parameters() != record["parameters"]:
        raise CorruptModel(f"{root} holds {program.num_parameters()} parameters but its record says {record['parameters']}")
    if (root / TOKENIZER).is_dir():
        import transformers

        try:
            program.tokenizer = transformers.AutoTokenizer.from_pretrained(str(root / TOKENIZER), trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - tokenizers fail in their own ways
            raise CorruptModel(f"cannot read the tokenizer {root / TOKENIZER}: {type(exc).__name__}: {exc}") from None
    program.record = record
    return program


def _on_disk(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file `path` as a `DiskTensor` (nothing read but the header)."""
    return {key: DiskTensor(path, key, entry.shape, entry.dtype) for key, entry in tensors_in(path).items()}


def _read_graph(path: Path, weights: dict[str, torch.Tensor], inputs: list[str]) -> fx.GraphModule:
    """The graph of graph.json over `weights`, with fake values on every node, or `CorruptModel` saying why."""
    try:
        data = json.loads(path.read_bytes())
        graph = graph_from_data(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CorruptModel(f"{path} is not valid JSON: {exc}") from None
    except GraphDataError as exc:
        raise CorruptModel(f"{path} cannot be read: {exc}") from None
    placeholders = [n.name for n in graph.find_nodes(op="placeholder")]
    if placeholders != inputs:
        raise CorruptModel(f"{path} takes the inputs {placeholders}, its record says {inputs}")
    parameters = data.get("parameters")
    if not (isinstance(parameters, list) and all(isinstance(p, str) for p in parameters)):
        raise CorruptModel(f"{path}: 'parameters' must be a list of weight names")
    read = {str(n.target) for n in graph.find_nodes(op="get_attr")}
    unknown = sorted(read - set(weights))
    if unknown:
        raise CorruptModel(f"the graph {path} reads weights that the weights file does not hold: "
                           f"{', '.join(unknown[:5])}; the files come from different models")
    chosen = set(parameters)
    root = {name: nn.Parameter(weights[name], requires_grad=False) if name in chosen else weights[name] for name in read}
    gm = fx.GraphModule(root, graph, class_name="CapturedLM")
    try:
        propagate_fake_values(gm, {n.name: n.meta.get("value") for n in graph.find_nodes(op="placeholder")})
    except ValueError as exc:
        raise CorruptModel(f"the graph {path} does not compute with the stored weights: {exc}") from None
    return gm


def _legacy_graph(root: Path, weights: dict[str, torch.Tensor], inputs: list[str]) -> fx.GraphModule:
    """A graph.pt2 of an older fxslice (unpickled: only with `trust_pickle`)."""
    from fxslice.models.capture import plain_graph_module

    try:
        exported = torch.export.load(str(root / LEGACY_GRAPH))
    except Exception as exc:  # noqa: BLE001 - any deserialisation failure means a bad file
        raise CorruptModel(f"cannot read the graph {root / LEGACY_GRAPH}: {exc}") from None
    gm = plain_graph_module(exported.module(), inputs=inputs)
    read = {str(n.target) for n in gm.graph.find_nodes(op="get_attr")}
    unknown = sorted(read - set(weights))
    if unknown:
        raise CorruptModel(f"the graph {root / LEGACY_GRAPH} reads weights the weights file does not hold: "
                           f"{', '.join(unknown[:5])}; the files come from different models")
    for name in read:
        set_tensor(gm, name, weights[name])
    return gm
