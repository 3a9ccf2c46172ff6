"""Export a program as a GGUF file for llama.cpp (and what runs on it: ollama, LM Studio, llama-cpp-python).

The structure comes from the graph (`decoder_layout`, proven on the logits): equal widths in every layer give
llama.cpp's `llama` architecture, per-layer head counts and MLP widths (what the Surgeon leaves) its `deci`
architecture. Weights keep what fxslice made of them:

- a weight fxslice quantized to 4 or 5 bits in groups of 32 (or 64, 96, ...: each group is whole blocks of 32 that
  share its scale) is written as the GGUF block type that holds those very integers: Q4_1 / Q5_1 (`w = d·q + m`,
  `d` its float16 scale, `m` its float16 offset — exactly, for `grid="offset"` — or `−zero·d` rounded to float16
  for an integer zero point), or for `grid="symmetric"` Q4_0 / Q5_0 (and Q8_0 at 8 bits), exactly; so GPTQ's
  and the width search's choices reach llama.cpp. Other 8-bit weights are re-rounded to Q8_0 (within half a
  step); other widths or group sizes have no block type and are refused by name;
- float weights are written as `weight_type` (f32, f16, bf16, or quantized by the `gguf` package's reference
  quantizers: q8_0, q5_1, q5_0, q4_1, q4_0); a matrix whose rows are not whole blocks of 32 stays f16;
- norms stay f32 (a norm fused into the linears becomes a scale of ones).

Rotary queries and keys are permuted into llama.cpp's pair order. The tokenizer comes from the source GGUF when the
model was captured from one (every `tokenizer.*` field copied), else from a byte-level BPE tokenizer.json; a model
with neither carries none (llama.cpp then runs it on token ids).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fxslice.core.errors import InvalidOption, UnsupportedStructure
from fxslice.core.graph import tensor_of
from fxslice.core.program import Program
from fxslice.core.quantized import QuantizedWeight
from fxslice.models.decoder_layout import DecoderLayout, decoder_layout

__all__ = ["export_gguf", "check_weight_type", "GgufExport", "WEIGHT_TYPES"]

#: what `weight_type` accepts for float matrices
WEIGHT_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
_BLOCK = 32
#: fxslice's (bits, grid) in groups of 32 -> the GGUF type that stores the same integers
_EXACT = {(4, "zero_point"): "Q4_1", (5, "zero_point"): "Q5_1", (4, "offset"): "Q4_1", (5, "offset"): "Q5_1",
          (4, "symmetric"): "Q4_0", (5, "symmetric"): "Q5_0", (8, "symmetric"): "Q8_0"}


@dataclass
class GgufExport:
    """What was written: the file, llama.cpp's architecture, how many tensors of each GGUF type, and notes."""

    path: Path
    architecture: str
    types: Counter = field(default_factory=Counter)
    tokenizer: str = ""
    notes: list[str] = field(default_factory=list)


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise InvalidOption("GGUF export needs the gguf package: pip install gguf") from None
    return gguf


def _rope_order(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a query or key projection from the half-split rotary order (HF) to llama.cpp's adjacent pairs."""
    out = rows.shape[0]
    return rows.reshape(heads, 2, out // heads // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def _pack_exact(q: QuantizedWeight, heads: int | None, gguf: Any) -> tuple[np.ndarray, Any]:
    """The integers, scales and anchors of `q` as GGUF blocks of 32 (one row of blocks per output row): Q4_1 / Q5_1
    (`d`, `m`, the integers), or for a symmetric grid Q4_0 / Q5_0 / Q8_0 (`d`, the integers about the middle)."""
    ints = q.q.to(torch.int64)  # arithmetic below (Q8_0's q − 128) must not wrap around as uint8
    # `m` is the weight of level 0: the offset itself, or −zero·d; a group of 64 is two blocks
    scale, m = (q.expand(t)[:, ::_BLOCK] for t in (q.scale, q.level_value(0)))
    if heads:
        ints, scale, m = (_rope_order(t, heads) for t in (ints, scale, m))
    out, cols = q.shape
    blocks = ints.reshape(out * cols // _BLOCK, _BLOCK).numpy()
    parts = [scale.reshape(-1, 1).numpy().astype(np.float16).view(np.uint8)]
    if q.grid != "symmetric":
        parts.append(m.reshape(-1, 1).numpy().astype(np.float16).view(np.uint8))
    if q.bits == 8:  # Q8_0: signed bytes, x = q·d
        parts.append((blocks - 128).astype(np.int8).view(np.uint8))
    else:
        blocks = blocks.astype(np.uint8)
        if q.bits == 5:  # the fifth bits first, 32 in 4 bytes
            parts.append(np.packbits((blocks >> 4).reshape(-1, 1, _BLOCK), axis=-1, bitorder="little").reshape(-1, 4))
        low = blocks & 0x0F
        parts.append((low[:, :16] | (low[:, 16:] << 4)).astype(np.uint8))
    data = np.concatenate(parts, axis=-1).reshape(out, -1)
    return data, getattr(gguf.GGMLQuantizationType, _EXACT[q.bits, q.grid])


def _matrix(name: str, value: torch.Tensor, q: QuantizedWeight | None, heads: int | None, weight_type: str,
            gguf: Any, report: GgufExport) -> tuple[np.ndarray, Any]:
    """One 2-D weight as GGUF data and type (see the module docstring for the rules)."""
    kinds = gguf.GGMLQuantizationType
    if q is not None:
        whole = q.group_size % _BLOCK == 0 and q.shape[1] % _BLOCK == 0 and not q.transposed
        if (q.bits, q.grid) in _EXACT and whole:
            return _pack_exact(q, heads, gguf)
        if q.bits == 8 and q.shape[1] % _BLOCK == 0:
            weight_type = "q8_0"  # re-rounded, within half a step
        else:
            raise UnsupportedStructure(
                f"'{name}' holds {q.bits}-bit integers ({q.grid} grid) in groups of {q.group_size}, which no GGUF block "
                "type stores: quantize with --bits 4 or 5 (or 8 with --grid symmetric) and a --group-size that is a "
                "multiple of 32 for an exact export (other 8-bit weights go to Q8_0), or export the float model and let "
                "--type quantize it")
    matrix = value.detach().to(torch.float32)
    if heads:
        matrix = _rope_order(matrix, heads)
    array = matrix.contiguous().numpy()
    if weight_type == "f32":
        return array, kinds.F32
    if weight_type == "f16" or (weight_type != "bf16" and array.shape[1] % _BLOCK):
        if weight_type not in ("f16", "bf16"):
            report.notes.append(f"{name}: rows of {array.shape[1]} are not whole blocks of {_BLOCK}, written as F16")
        return array.astype(np.float16), kinds.F16
    kind = getattr(kinds, weight_type.upper())
    return gguf.quants.quantize(array, kind), kind


def _tensors(program: Program, layout: DecoderLayout, weight_type: str, gguf: Any,
             report: GgufExport) -> dict[str, tuple[np.ndarray, Any]]:
    """Every tensor of the file by llama.cpp's name."""
    gm = program.gm

    def norm(weight: str | None) -> tuple[np.ndarray, Any]:
        value = layout.norm_scale(gm, weight)
        return value.to(torch.float32).contiguous().numpy(), gguf.GGMLQuantizationType.F32

    def matrix(weight: str, heads: int | None = None) -> tuple[np.ndarray, Any]:
        return _matrix(weight, tensor_of(gm, weight), program.quantized.get(weight), heads, weight_type, gguf, report)

    out = {"token_embd.weight": matrix(layout.table), "output_norm.weight": norm(layout.output_norm)}
    if layout.head_projection is not None:  # the tied table times the projection in front of it: a head of its own
        out["output.weight"] = _matrix("output.weight", layout.head_weight(gm), None, None, weight_type, gguf, report)
        report.notes.append("output.weight: the tied table times the projection in front of the head (the tie SliceGPT "
                            "kept), written as a head of its own: vocab x width more in the file")
    elif not layout.tied:
        out["output.weight"] = matrix(layout.head)
    for i, layer in enumerate(layout.layers):
        if layer.attention is not None:
            a = layer.attention
            out |= {f"blk.{i}.attn_norm.weight": norm(layer.attention_norm),
                    f"blk.{i}.attn_q.weight": matrix(a.q, a.heads), f"blk.{i}.attn_k.weight": matrix(a.k, a.kv_heads),
                    f"blk.{i}.attn_v.weight": matrix(a.v), f"blk.{i}.attn_output.weight": matrix(a.o)}
        if layer.mlp is not None:
            m = layer.mlp
            out |= {f"blk.{i}.ffn_norm.weight": norm(layer.mlp_norm), f"blk.{i}.ffn_gate.weight": matrix(m.gate),
                    f"blk.{i}.ffn_up.weight": matrix(m.up), f"blk.{i}.ffn_down.weight": matrix(m.down)}
    return out


def _source_gguf(program: Program) -> Path | None:
    """The GGUF file the program was captured from, if it is still there."""
    from fxslice.models.capture import DEFAULT_MODEL, default_model_path

    source = str(program.record.get("source") or program.source or "")
    try:
        path = default_model_path() if source == DEFAULT_MODEL else Path(source)
    except Exception:  # noqa: BLE001 - the default model's package may be gone: then there is no source file
        return None
    return path if path.suffix == ".gguf" and path.is_file() else None


def _vocabulary(writer: Any, program: Program, vocab: int, gguf: Any) -> str:
    """Write the tokenizer fields; returns where they came from."""
    source = _source_gguf(program)
    if source is not None:
        reader = gguf.GGUFReader(str(source))
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is not None and len(tokens.data) == vocab:
            for name, f in reader.fields.items():
                if name.startswith("tokenizer."):
                    sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
                    writer.add_key_value(name, f.contents(), f.types[0], sub)
            return f"copied from {source.name}"
    tokenizer = program.tokenizer
    model = _bpe(tokenizer)
    if model is None:
        writer.add_tokenizer_model("no_vocab")  # with the vocabulary size written above: dummy tokens
        return "none (the model's tokenizer is not byte-level BPE): llama.cpp runs it on token ids"
    ranks, merges = model
    special = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}
    names = {i: t for t, i in ranks.items()}
    tokens, types = [], []
    for i in range(vocab):
        name = names.get(i, f"[PAD{i}]")
        tokens.append(name)
        types.append(gguf.TokenType.UNUSED if i not in names else
                     gguf.TokenType.CONTROL if name in special else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attribute, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                           ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, attribute, None)
        if isinstance(value, int) and 0 <= value < vocab:
            add(value)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)
    return "byte-level BPE from the model's tokenizer.json"


def _bpe(tokenizer: Any) -> tuple[dict[str, int], list[str]] | None:
    """(token -> id with added tokens, merges as "a b") of a byte-level BPE tokenizer, else None."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    data = json.loads(backend.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not model.get("merges"):
        return None
    ranks = dict(model["vocab"])
    ranks |= {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return ranks, merges


def check_weight_type(weight_type: str) -> None:
    """The one check of `--type` (the CLI calls it before loading the model)."""
    if weight_type not in WEIGHT_TYPES:
        raise InvalidOption(f"--type must be one of {', '.join(WEIGHT_TYPES)}, got {weight_type!r}")


def export_gguf(program: Program, path: str | os.PathLike, *, weight_type: str = "f16") -> GgufExport:
    """Write `program` as a new GGUF file at `path` (whole or not at all); see the module docstring."""
    from fxslice.models.io import check_output_dir, write_file

    check_weight_type(weight_type)
    gguf = _gguf()
    out = Path(path)
    check_output_dir(out)
    layout = decoder_layout(program)
    architecture = "llama" if layout.uniform else "deci"
    report = GgufExport(out, architecture)
    tensors = _tensors(program, layout, weight_type, gguf, report)
    report.types = Counter(kind.name for _, kind in tensors.values())
    context = int((program.config or {}).get("max_position_embeddings") or 2048)

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, architecture)
        writer.add_name(f"fxslice: {program.record.get('source') or program.source or program.model_class}")
        writer.add_context_length(context)
        writer.add_embedding_length(layout.width)
        writer.add_block_count(len(layout.layers))
        heads = [layer.attention.heads if layer.attention else 0 for layer in layout.layers]
        kv_heads = [layer.attention.kv_heads if layer.attention else 0 for layer in layout.layers]
        widths = [layer.mlp.width if layer.mlp else 0 for layer in layout.layers]
        one = architecture == "llama"
        writer.add_head_count(heads[0] if one else heads)
        writer.add_head_count_kv(kv_heads[0] if one else kv_heads)
        writer.add_feed_forward_length(widths[0] if one else widths)
        writer.add_key_length(layout.head_dim)
        writer.add_value_length(layout.head_dim)
        writer.add_rope_dimension_count(layout.head_dim)
        writer.add_rope_freq_base(layout.rope_base)
        writer.add_layer_norm_rms_eps(layout.eps)
        writer.add_vocab_size(layout.vocab)
        report.tokenizer = _vocabulary(writer, program, layout.vocab, gguf)
        for name, (data, kind) in tensors.items():
            writer.add_tensor(name, data, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_file(out, write)
    return report

