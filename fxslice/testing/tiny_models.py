"""Tiny randomly initialised causal LMs for tests and for checking your own passes.

Every norm gets weights and biases drawn far from 1 and 0, so that a fusion that forgets a
scale, a shift or a mean cannot pass by accident. The configs are data: adding a family
is adding a row, and nothing in fxslice depends on which family a model is.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn

__all__ = ["TINY_CONFIGS", "char_tokenizer", "tiny_causal_lm", "perturb_norms", "arithmetic_sequences", "trained_tiny_causal_lm"]

_COMMON = dict(vocab_size=128, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_ATTN = dict(num_attention_heads=4, num_hidden_layers=2)

#: name -> (config class name, model class name, config kwargs)
TINY_CONFIGS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(hidden_size=64, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=False)),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM",
                   dict(hidden_size=64, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(hidden_size=64, intermediate_size=128, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(hidden_size=64, intermediate_size=128, num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(hidden_size=64, intermediate_size=128, num_key_value_heads=2, head_dim=16)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM",
              dict(hidden_size=64, intermediate_size=128, num_key_value_heads=2, head_dim=16)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(hidden_size=64, intermediate_size=128, num_key_value_heads=2, head_dim=16,
                    sliding_window=16)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(hidden_size=64, intermediate_size=128, num_key_value_heads=2, head_dim=16,
                    sliding_window=16)),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(hidden_size=64, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64)),
    "opt-project": ("OPTConfig", "OPTForCausalLM",
                    dict(hidden_size=64, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=32)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(n_embd=64, n_layer=2, n_head=4, n_positions=256)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(hidden_size=64, intermediate_size=128)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(hidden_size=64, intermediate_size=128)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(hidden_size=64, intermediate_size=128, pad_token_id=0)),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(hidden_size=64, num_attention_heads=4)),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=64, n_head=4, n_layer=2)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM",
                 dict(hidden_size=64, intermediate_size=128, num_key_value_heads=4)),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", dict(hidden_size=64, intermediate_size=128)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(hidden_size=64, intermediate_size=128)),
    "nemotron": ("NemotronConfig", "NemotronForCausalLM",  # LayerNorm1P: layer_norm(x, w + 1, b)
                 dict(hidden_size=64, intermediate_size=128, num_key_value_heads=2, head_dim=16)),
    "mpt": ("MptConfig", "MptForCausalLM",  # x.permute(...).contiguous().view(...) in its attention
            dict(d_model=64, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=256)),
    "cohere": ("CohereConfig", "CohereForCausalLM",  # LayerNorm without bias written out: x - mean, rsqrt(var)
               dict(hidden_size=64, intermediate_size=128, num_key_value_heads=2)),
    "modernbert_decoder": ("ModernBertDecoderConfig", "ModernBertDecoderForCausalLM",  # block 0 has no attention norm:
                           dict(hidden_size=64, intermediate_size=64, local_attention=8,  # reads the embedding norm
                                cls_token_id=1, sep_token_id=2)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(hidden_size=64, intermediate_size=64, num_key_value_heads=2, num_local_experts=4,
                     num_experts_per_tok=2)),
    "jetmoe": ("JetMoeConfig", "JetMoeForCausalLM",  # experts in attention and MLP: tokens split by expert, x @ W[i]
               dict(hidden_size=64, intermediate_size=64, num_key_value_heads=2, kv_channels=16, num_local_experts=4,
                    num_experts_per_tok=2)),
}


def perturb_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Draw every norm's scale from U(0.5, 1.5) + 0.5 and shift from ±U(0.2, 0.7)."""
    with torch.no_grad():
        for module in model.modules():
            if "norm" not in type(module).__name__.lower():
                continue
            for name, param in module.named_parameters(recurse=False):
                noise = torch.rand(param.shape, generator=generator, dtype=torch.float64)
                if name == "bias":
                    sign = torch.where(torch.rand(param.shape, generator=generator) < 0.5, -1.0, 1.0)
                    value = sign * (0.2 + 0.5 * noise)
                else:
                    value = 1.0 + noise  # far from the identity for w and for Gemma's (1 + w)
                param.copy_(value.to(param.dtype))


def tiny_causal_lm(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build the tiny model `name` (a key of TINY_CONFIGS) in eval mode."""
    if name not in TINY_CONFIGS:
        raise KeyError(f"unknown tiny model {name!r}; known: {', '.join(sorted(TINY_CONFIGS))}")
    config_cls, model_cls, kwargs = TINY_CONFIGS[name]
    config = getattr(transformers, config_cls)(**{**_COMMON, **_ATTN, **kwargs})
    torch.manual_seed(seed)
    try:
        config._attn_implementation = "sdpa"
        model = getattr(transformers, model_cls)(config)
    except ValueError:  # families without an SDPA path
        config._attn_implementation = "eager"
        model = getattr(transformers, model_cls)(config)
    perturb_norms(model, torch.Generator().manual_seed(seed + 1))
    return model.to(dtype).eval()


def arithmetic_sequences(count: int, length: int = 24, *, seed: int = 0) -> torch.Tensor:
    """Token windows that count up from a random start by a random step (mod the vocabulary): text a tiny
    model learns in seconds, so that what compression costs in quality can be measured on it."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(3, 128, (count, 1), generator=gen)
    step = torch.randint(1, 5, (count, 1), generator=gen)
    return (start + step * torch.arange(length)) % 125 + 3


def trained_tiny_causal_lm(name: str, *, steps: int = 150, seed: int = 0) -> nn.Module:
    """`tiny_causal_lm(name)` trained with Adam on `arithmetic_sequences` (about 3 s on 2 cores)."""
    model = tiny_causal_lm(name, seed=seed).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(seed)
    for step in range(steps):
        batch = arithmetic_sequences(32, seed=seed * 100_000 + step)
        loss = model(batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval().requires_grad_(False)


def char_tokenizer() -> Any:
    """A character-level tokenizer over ids 0..95 (printable ASCII, then [UNK]), built offline, so that a tiny
    model can read text; counting sequences of ids are runs of consecutive letters."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i + 32): i for i in range(95)}
    vocab["[UNK]"] = 95
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
