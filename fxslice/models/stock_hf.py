"""A program that is a stock architecture after compression, written as that architecture's own checkpoint.

When `decoder_layout` finds a Llama-style decoder with one width everywhere (dense, quantized, or pruned evenly),
stock transformers' `LlamaForCausalLM` computes it: `config.json` from transformers' own `LlamaConfig` and the weights
under its names load with `AutoModelForCausalLM.from_pretrained(DIR)` — no remote code — and so in every tool that
reads Llama checkpoints (vLLM, SGLang, llama.cpp's converter). Quantized linears on a symmetric grid are written as
compressed-tensors integers (`fxslice.models.compressed_tensors`); other quantized weights are written dequantized.
"""

from __future__ import annotations

from typing import Any

import torch

from fxslice.core.errors import UnsupportedStructure
from fxslice.core.graph import tensor_of
from fxslice.core.program import Program
from fxslice.models.decoder_layout import decoder_layout

__all__ = ["stock_llama"]


def stock_llama(program: Program) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """(config.json's content, weights by transformers' Llama names, each of those names -> the program's weight it
    holds, norms aside: their scales may be rescaled) for `program`, or UnsupportedStructure saying why a stock Llama
    cannot compute it."""
    import transformers

    layout = decoder_layout(program)
    if not layout.uniform:
        raise UnsupportedStructure("its layers have different widths (heads or MLP channels per layer), which a stock "
                                   "Llama config cannot state")
    first = layout.layers[0]
    source = program.config or {}
    config = transformers.LlamaConfig(
        vocab_size=layout.vocab, hidden_size=layout.width, intermediate_size=first.mlp.width,
        num_hidden_layers=len(layout.layers), num_attention_heads=first.attention.heads,
        num_key_value_heads=first.attention.kv_heads, head_dim=layout.head_dim, rms_norm_eps=layout.eps,
        rope_theta=layout.rope_base, max_position_embeddings=source.get("max_position_embeddings") or 2048,
        tie_word_embeddings=layout.tied, bos_token_id=source.get("bos_token_id"), eos_token_id=source.get("eos_token_id"),
        pad_token_id=source.get("pad_token_id"))
    data = config.to_dict()
    data["architectures"] = ["LlamaForCausalLM"]
    data["dtype"] = str(program.dtype).removeprefix("torch.")
    gm = program.gm

    def tensor(name: str) -> torch.Tensor:
        return tensor_of(gm, name).detach().contiguous().clone()

    def norm(name: str | None) -> torch.Tensor:
        return layout.norm_scale(gm, name).to(program.dtype).contiguous()

    names = {"model.embed_tokens.weight": layout.table}
    norms = {"model.norm.weight": layout.output_norm}
    if not layout.tied and layout.head_projection is None:
        names["lm_head.weight"] = layout.head
    for i, layer in enumerate(layout.layers):
        a, m, prefix = layer.attention, layer.mlp, f"model.layers.{i}"
        norms |= {f"{prefix}.input_layernorm.weight": layer.attention_norm,
                  f"{prefix}.post_attention_layernorm.weight": layer.mlp_norm}
        names |= {f"{prefix}.self_attn.q_proj.weight": a.q, f"{prefix}.self_attn.k_proj.weight": a.k,
                  f"{prefix}.self_attn.v_proj.weight": a.v, f"{prefix}.self_attn.o_proj.weight": a.o,
                  f"{prefix}.mlp.gate_proj.weight": m.gate, f"{prefix}.mlp.up_proj.weight": m.up,
                  f"{prefix}.mlp.down_proj.weight": m.down}
    weights = {hf: tensor(source) for hf, source in names.items()} | {hf: norm(source) for hf, source in norms.items()}
    if layout.head_projection is not None:  # the tied table times the projection in front of it
        weights["lm_head.weight"] = layout.head_weight(gm).contiguous()
    return data, weights, names
