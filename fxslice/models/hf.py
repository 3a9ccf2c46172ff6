"""A compiled program where a Hugging Face model is expected: `model.generate()`, beam search, `pipeline()`.

`as_hf_model(program)` wraps the graph in a `PreTrainedModel` whose forward returns the graph's logits.
HF's generation loop then drives it without a cache (every step recomputes the whole sequence): all of
HF's decoding strategies work, at the cost of speed. For fast decoding use `fxslice.evaluation.generate`, which runs
the KV-cache graph. The graph has no attention-mask input, so left padding (batched prompts of different
lengths) is refused rather than silently attended to.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from transformers.modeling_outputs import CausalLMOutput

from fxslice.core.errors import InvalidOption
from fxslice.core.program import Program

__all__ = ["FxsliceForCausalLM", "as_hf_model"]

_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


class FxsliceConfig(transformers.PretrainedConfig):
    model_type = "fxslice"


class FxsliceForCausalLM(transformers.PreTrainedModel, transformers.GenerationMixin):
    config_class = FxsliceConfig
    base_model_prefix = "graph"
    main_input_name = "input_ids"

    def __init__(self, config: FxsliceConfig, program: Program):
        super().__init__(config)
        self.program = program
        self.graph = program.gm  # a submodule: .to(), .parameters() and .device reach the weights
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> CausalLMOutput:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise InvalidOption("fxslice graphs take no attention mask: prompts must not be padded "
                                "(generate one prompt at a time, or prompts of equal length)")
        return CausalLMOutput(logits=self.program(input_ids))

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                      **_: Any) -> dict[str, Any]:
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def _init_weights(self, module: torch.nn.Module) -> None:  # the weights are the program's: never re-initialise
        return None


def as_hf_model(program: Program) -> FxsliceForCausalLM:
    """`program` as a `PreTrainedModel` for HF's `generate()` (uncached: see the module docstring)."""
    source = program.config or {}
    vocab = program.vocab_size
    config = FxsliceConfig(vocab_size=vocab, use_cache=False, is_encoder_decoder=False,
                           **{k: source[k] for k in _TOKEN_IDS if source.get(k) is not None})
    model = FxsliceForCausalLM(config, program).eval()
    model.generation_config = transformers.GenerationConfig.from_model_config(config)
    model.generation_config.use_cache = False
    return model
