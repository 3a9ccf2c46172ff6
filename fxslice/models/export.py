"""Export a program to formats that load without fxslice.

`pt2`: one `torch.export` archive with the weights inside. `torch.export.load(path).module()` runs it with PyTorch
alone: `(input_ids) -> logits` for a plain program; for a KV-cache program `(input_ids, past_length, *kv) -> logits`
with the cache tensors updated in place, their per-layer `[heads, head_dim]` shapes in the archive's extra file
`fxslice.json` (`{"kv_cache": [[h, d], ...]}`; allocate `zeros(batch, h, length, d)` each). Quantized weights are
stored dequantized: the archive runs in float, like the program.

`hf`: a directory that stock transformers loads. When the program is a stock Llama after compression (one width in
every layer; `fxslice.models.stock_hf`), it is that architecture's own checkpoint: `from_pretrained(DIR)`, no remote
code. Otherwise `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` and
`AutoTokenizer.from_pretrained(DIR)`: the weights in model.safetensors under their
program names, the graph (with the weights as its first inputs, so it holds none) as JSON data in a byte buffer of
the same file, a `config.json`, and one generic modeling file (`fxslice/models/remote/modeling_fxslice.py`, the same
for every model) with the reader it imports (`graph_data.py`), which builds nothing but calls of PyTorch operators. `generate()` uses the program's KV cache when it has one. Quantized weights are stored dequantized.

`gguf`: one file llama.cpp runs (`fxslice.models.gguf_export`), for programs that are a Llama-style decoder.

`onnx`: the same program through `torch.onnx.export` (dynamo), one `.onnx` file that onnxruntime runs. A KV-cache
program's caches become outputs (ONNX has no in-place inputs): inputs `input_ids, past_length, kv_0, ...`,
outputs the logits and then every cache, updated, to feed into the next step.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import fx

from fxslice.core.errors import InvalidOption, UnsupportedStructure
from fxslice.core.graph import tensor_of
from fxslice.core.program import Program
from fxslice.models.io import check_output_dir, example_inputs, write_file
from fxslice.models.remote.graph_data import GraphDataError, graph_to_data

__all__ = ["export_pt2", "export_onnx", "export_hf", "HfExport", "FORMATS"]

FORMATS = ("pt2", "onnx", "hf", "gguf")
REMOTE_CODE = Path(__file__).parent / "remote" / "modeling_fxslice.py"
GRAPH_READER = Path(__file__).parent / "remote" / "graph_data.py"


def export_pt2(program: Program, path: str | os.PathLike) -> Path:
    """Write `program` as one self-contained `.pt2` file at `path` (a new file; written whole or not at all)."""
    out = Path(path)
    check_output_dir(out)
    args, shapes = example_inputs(program)
    with torch.no_grad():
        exported = torch.export.export(program.gm, args, dynamic_shapes=shapes, strict=False)
    extra = {"fxslice.json": json.dumps({
        "inputs": program.input_names, "model_class": program.model_class, "source": program.source,
        "kv_cache": program.cache.to_json() if program.cache is not None else None,
        "parameters": program.num_parameters()})}
    buffer = io.BytesIO()  # in memory first: torch's zip writer aborts the process when the disk fills
    torch.export.save(exported, buffer, extra_files=extra)
    return write_file(out, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))


def export_onnx(program: Program, path: str | os.PathLike) -> Path:
    """Write `program` as one `.onnx` file at `path`; where the exporter cannot take an op, one error naming it."""
    out = Path(path)
    check_output_dir(out)
    gm = program.gm
    if program.cache is not None:  # return the caches the graph writes in place
        gm = copy.deepcopy(gm)
        output = next(iter(gm.graph.find_nodes(op="output")))
        caches = [n for n in gm.graph.find_nodes(op="placeholder")][2:]
        output.args = ((output.args[0], *caches),)
        gm.recompile()
    args, shapes = example_inputs(program)
    try:
        with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
            onnx_program = torch.onnx.export(gm, args, dynamic_shapes=shapes, dynamo=True, verbose=False)
    except ImportError as exc:
        raise InvalidOption(f"ONNX export needs onnx and onnxscript: pip install 'fxslice[onnx]' ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds; the user needs its first line
        reason = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise UnsupportedStructure(f"torch.onnx.export cannot take this program: {reason}") from exc
    return write_file(out, onnx_program.save)


def weights_as_inputs(program: Program) -> tuple[fx.GraphModule, dict[str, torch.Tensor]]:
    """A copy of the graph that reads every weight from a leading input instead of an attribute, and those weights
    by name (in input order): exported, it is a graph without state, whose weights can live anywhere."""
    graph = copy.deepcopy(program.gm.graph)
    first = next(iter(graph.find_nodes(op="placeholder")))
    weights: dict[str, torch.Tensor] = {}
    inputs: dict[str, fx.Node] = {}
    keep: dict[str, object] = {}
    for node in list(graph.find_nodes(op="get_attr")):
        target = str(node.target)
        value = tensor_of(program.gm, node)
        if not isinstance(value, torch.Tensor):
            keep[target] = program.gm.get_submodule(target)  # a subgraph of a higher-order op stays an attribute
            continue
        if target not in inputs:
            with graph.inserting_before(first):
                inputs[target] = graph.placeholder("w_" + target.replace(".", "_"))
            inputs[target].meta = dict(node.meta)
            weights[target] = value.detach()
        node.replace_all_uses_with(inputs[target])
        graph.erase_node(node)
    return fx.GraphModule(keep, graph), weights


@dataclass(frozen=True)
class HfExport:
    """Where the hf export went, why it needs remote code (None: a stock architecture's own checkpoint), how many
    linears a stock checkpoint holds as compressed-tensors integers, and which quantized weights it holds in float,
    with the reason."""

    path: Path
    remote_code: str | None
    dequantized: dict[str, str] = field(default_factory=dict)
    integer_linears: int = 0


def export_hf(program: Program, out_dir: str | os.PathLike, *, stock: bool = True) -> HfExport:
    """Write `program` as a new transformers model directory at `out_dir` (written whole or not at all): a stock
    Llama checkpoint where one computes the program (unless `stock=False`), else the generic remote-code model."""
    out = Path(out_dir)
    check_output_dir(out)
    if stock:
        from fxslice.models.compressed_tensors import compress_linears
        from fxslice.models.stock_hf import stock_llama

        try:
            config, weights, sources = stock_llama(program)
        except UnsupportedStructure as exc:
            reason = str(exc)
        else:
            linears = {hf: program.quantized[source] for hf, source in sources.items()
                       if source in program.quantized and hf != "model.embed_tokens.weight"}
            compressed = compress_linears(weights, linears, program.dtype)
            if compressed.config is not None:
                config["quantization_config"] = compressed.config
            dequantized = {**compressed.skipped, **{hf: "a token table (an embedding, which compressed-tensors does "
                                                    "not pack)" for hf, source in sources.items()
                                                    if source in program.quantized and hf not in linears}}
            return HfExport(_write_hf(program, out, config, compressed.tensors), None, dequantized,
                            len(linears) - len(compressed.skipped))
    else:
        reason = "asked for (stock=False)"
    return HfExport(_export_remote(program, out), reason)


def _write_hf(program: Program, out: Path, config: dict, tensors: dict[str, torch.Tensor],
              extra_files: tuple[Path, ...] = ()) -> Path:
    """config.json, model.safetensors, generation_config.json, the tokenizer and `extra_files`, all or nothing."""
    from fxslice.models.io import save_tokenizer, write_directory
    from fxslice.models.tensor_file import write_tensors

    def write(tmp: Path) -> None:
        write_tensors(tmp / "model.safetensors", tensors, {"format": "pt"})  # tensor by tensor: weights on disk too
        (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str), encoding="utf-8")
        for file in extra_files:
            shutil.copyfile(file, tmp / file.name)
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=1), encoding="utf-8")
        if program.tokenizer is not None:
            save_tokenizer(program.tokenizer, tmp)

    return write_directory(out, write)


def _export_remote(program: Program, out: Path) -> Path:
    """The generic model: the graph as data in the weights file, read by modeling_fxslice.py (remote code)."""
    gm, weights = weights_as_inputs(program)
    if any(n.op == "get_attr" for n in gm.graph.nodes):
        raise UnsupportedStructure("the graph holds subgraphs (higher-order ops), which the hf export cannot store")
    try:
        data = graph_to_data(gm.graph)
    except GraphDataError as exc:
        raise UnsupportedStructure(f"this program cannot be exported: {exc}") from None
    graph = torch.frombuffer(bytearray(json.dumps(data, separators=(",", ":")).encode()), dtype=torch.uint8)
    source = program.config or {}
    parameters = dict(program.gm.named_parameters(remove_duplicate=False))
    config = {
        "model_type": "fxslice", "architectures": ["FxsliceForCausalLM"],
        "auto_map": {"AutoConfig": "modeling_fxslice.FxsliceConfig",
                     "AutoModelForCausalLM": "modeling_fxslice.FxsliceForCausalLM"},
        "vocab_size": program.vocab_size,
        "weights": [[name, list(t.shape), str(t.dtype).replace("torch.", ""), name in parameters]
                    for name, t in weights.items()],
        "kv_cache": program.cache.to_json() if program.cache is not None else None,
        "program_bytes": graph.numel(),
        "max_position_embeddings": source.get("max_position_embeddings"),
        "dtype": str(program.dtype).replace("torch.", ""),
        "tie_word_embeddings": False,
        **{k: source[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if source.get(k) is not None},
        "fxslice": {"source": program.source, "model_class": program.model_class,
                    "parameters": program.num_parameters(),
                    "passes": [str(p) for p in program.record.get("passes", [])]},
    }
    tensors = {f"weights.{name}": t.contiguous() for name, t in weights.items()}
    tensors["program"] = graph
    return _write_hf(program, out, config, tensors, (REMOTE_CODE, GRAPH_READER))
