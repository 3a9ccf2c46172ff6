"""A model compressed by fxslice, for stock transformers (`trust_remote_code=True`) with fxslice not installed.

One file serves every architecture and every compression method, because the model's computation is data: a graph
of PyTorch operators written as JSON (`graph_data.py`, beside this file, reads it and can build nothing but calls of
registered `torch.ops` operators: no pickle, no eval), kept as bytes in the buffer `program` of model.safetensors,
whose first inputs are the weights. The weights are ordinary tensors in the same file under the names fxslice gave them
(`weights.model.layers.0.self_attn.q_proj.weight`, ...), so `save_pretrained` and `push_to_hub` publish the model as
it is. A program captured with a key/value cache generates one token per step on it; its cache is not a
transformers `Cache` (the graph writes its own tensors in place), so the model prepares its inputs itself.
"""

from __future__ import annotations

import json

import torch
from torch import fx, nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .graph_data import graph_from_data


class FxsliceConfig(PretrainedConfig):
    """What the graph needs: its weights (name, shape, dtype, whether a parameter, in input order), its cache layout
    (heads, head_dim per cache tensor) and its size in bytes."""

    model_type = "fxslice"

    def __init__(self, vocab_size: int | None = None, weights: list | None = None, kv_cache: list | None = None,
                 program_bytes: int = 0, max_position_embeddings: int | None = None, fxslice: dict | None = None,
                 **kwargs):
        self.vocab_size = vocab_size
        self.weights = weights or []
        self.kv_cache = kv_cache
        self.program_bytes = program_bytes
        self.max_position_embeddings = max_position_embeddings
        self.fxslice = fxslice or {}
        kwargs.setdefault("tie_word_embeddings", False)  # a shared table is one tensor the graph reads twice
        super().__init__(**kwargs)


# transformers renamed `past_key_values` to `cache` during 5.x; the output says it by the installed version's name
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class ProgramCache:
    """The key and value tensors the graph updates in place, `[batch, heads, capacity, head_dim]` each, and how many
    positions already hold tokens. Capacity doubles when a step would not fit."""

    def __init__(self, shapes: list, batch: int, capacity: int, dtype: torch.dtype, device: torch.device):
        self.tensors = [torch.zeros(batch, h, capacity, d, dtype=dtype, device=device) for h, d in shapes]
        self.length = 0

    def reserve(self, length: int) -> None:
        capacity = self.tensors[0].shape[2]
        if length <= capacity:
            return
        grown = max(length, 2 * capacity)
        for i, t in enumerate(self.tensors):
            bigger = t.new_zeros(t.shape[0], t.shape[1], grown, t.shape[3])
            bigger[:, :, :capacity] = t
            self.tensors[i] = bigger

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the rows of the beams that survive."""
        self.tensors = [t.index_select(0, beam_idx.to(t.device)) for t in self.tensors]


def _place(root: nn.Module, name: str, tensor: torch.Tensor, parameter: bool) -> None:
    """Register `tensor` under the dotted `name` below `root` (a parameter or a buffer, as in the program), creating
    the modules on the way."""
    *path, leaf = name.split(".")
    module = root
    for part in path:
        if part not in module._modules:
            module.add_module(part, nn.Module())
        module = module._modules[part]
    if parameter:
        module.register_parameter(leaf, nn.Parameter(tensor, requires_grad=False))
    else:
        module.register_buffer(leaf, tensor)


class FxsliceForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = FxsliceConfig
    base_model_prefix = "fxslice"
    main_input_name = "input_ids"

    def __init__(self, config: FxsliceConfig):
        super().__init__(config)
        self.weights = nn.Module()
        for name, shape, dtype, parameter in config.weights:
            _place(self.weights, name, torch.empty(shape, dtype=getattr(torch, dtype)), parameter)
        self.register_buffer("program", torch.zeros(config.program_bytes, dtype=torch.uint8))
        self._graphs: dict[str, nn.Module] = {}
        self._data: dict | None = None
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing to initialise: every tensor comes from the checkpoint."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the graph keeps its own cache tensors

    def _graph(self, device: torch.device) -> nn.Module:
        """The graph for `device`, read from the buffer (ops that name a device name this one)."""
        key = str(device)
        if key not in self._graphs:
            if self._data is None:  # read once: the buffer moves with the model (to "meta" too)
                try:
                    self._data = json.loads(self.program.detach().cpu().numpy().tobytes())
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    raise ValueError(f"the 'program' buffer of this checkpoint is not a graph written as JSON ({exc}); "
                                     "it was damaged or written by an fxslice before graph data, which this file "
                                     "does not read") from None
            gm = fx.GraphModule(nn.Module(), graph_from_data(self._data))
            # fxslice.core.graph.retarget_device, restated: this file must run where fxslice is not installed
            for node in gm.graph.nodes:
                if node.op != "call_function":
                    continue
                node.args = tuple(device if isinstance(a, torch.device) else a for a in node.args)
                if isinstance(node.kwargs.get("device"), (torch.device, str)):
                    node.kwargs = {**node.kwargs, "device": device}
            gm.recompile()
            self._graphs[key] = gm
        return self._graphs[key]

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                cache: ProgramCache | None = None, past_key_values: ProgramCache | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None, **kwargs) -> CausalLMOutputWithPast:
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("this fxslice model was compiled without an attention-mask input, so it cannot read "
                             "padded batches; pass sequences of equal length (no padding) or one at a time")
        state = cache if isinstance(cache, ProgramCache) else past_key_values
        state = state if isinstance(state, ProgramCache) else None
        weights = [self._tensor(name) for name, *_ in self.config.weights]
        graph = self._graph(input_ids.device)
        if self.config.kv_cache is None:
            logits, state = graph(*weights, input_ids), None
        else:
            if state is None:
                state = ProgramCache(self.config.kv_cache, input_ids.shape[0], input_ids.shape[1], self.dtype,
                                     input_ids.device)
            state.reserve(state.length + input_ids.shape[1])
            past = torch.tensor(state.length, device=input_ids.device)
            logits = graph(*weights, input_ids, past, *state.tensors)
            state.length += input_ids.shape[1]
            if use_cache is False:
                state = None
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: state})

    def _tensor(self, name: str) -> torch.Tensor:
        module, _, leaf = name.rpartition(".")
        return getattr(self.weights.get_submodule(module) if module else self.weights, leaf)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                                      **kwargs) -> dict:
        """Feed only the tokens the cache does not hold yet (all of them on the first step)."""
        state = kwargs.get("cache")
        state = state if isinstance(state, ProgramCache) else kwargs.get("past_key_values")
        state = state if isinstance(state, ProgramCache) else None
        if state is not None:
            input_ids = input_ids[:, state.length:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "cache": state,
                "use_cache": kwargs.get("use_cache")}
