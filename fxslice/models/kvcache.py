"""Capture a decoder-only LM *with* a key/value cache, for generation.

The cached graph is `gm(input_ids, past_length, *kv) -> logits`: `kv` holds one preallocated key
and one value tensor per layer, `[batch, kv_heads, max_length, head_dim]`, which the graph writes
in place at positions `past_length ...`. Batch and cache length stay dynamic, so one graph serves
prefill and decode at any batch size. Slicing never touches attention heads, so the same passes
apply to this graph; `fxslice.replay` repeats a compiled pipeline on it (see `Program.cache`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxslice.core.errors import CaptureError
from fxslice.core.numerics import relative_error

__all__ = ["CacheLayout", "capture_cached"]


@dataclass(frozen=True)
class CacheLayout:
    """Per cache tensor (keys and values of each layer, alternating): (heads, head_dim)."""

    shapes: tuple[tuple[int, int], ...]

    def allocate(self, batch: int, length: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        return [torch.zeros(batch, h, length, d, dtype=dtype, device=device) for h, d in self.shapes]

    def to_json(self) -> list[list[int]]:
        return [list(s) for s in self.shapes]

    @classmethod
    def from_json(cls, shapes: list[list[int]]) -> CacheLayout:
        return cls(tuple((int(h), int(d)) for h, d in shapes))


class _CachedStep(nn.Module):
    """`model(input_ids)` continuing from `past_length` tokens held in the given cache tensors.

    HF's StaticLayer is used as written (in-place `index_copy_` at the running position); only
    its storage comes from the caller, so that it shows up as graph inputs rather than buffers.
    transformers 5.x changed how the cache is passed: early 5.x takes `past_key_values` and the
    positions as `cache_position`, later 5.x takes `cache` and keeps the position in the layer
    (`cumulative_length`); both are given in the form the installed model's forward accepts.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        accepted = inspect.signature(model.forward).parameters
        self.cache_name = "cache" if "cache" in accepted else "past_key_values"
        self.takes_positions = "cache_position" in accepted

    def forward(self, input_ids: torch.Tensor, past_length: torch.Tensor, kv: list[torch.Tensor]) -> torch.Tensor:
        from transformers.cache_utils import Cache, StaticLayer

        layers = []
        for keys, values in zip(kv[0::2], kv[1::2], strict=True):
            layer = StaticLayer(keys.shape[2])
            # early 5.x counts the filled slots (data-dependent, which export cannot trace); the caller knows it
            layer.get_seq_length = lambda *args, past=past_length, **kwargs: past
            layer.keys, layer.values = keys, values
            layer.cumulative_length = past_length.clone()
            layer.batch_size, layer.num_heads = keys.shape[0], keys.shape[1]
            layer.k_head_dim, layer.v_head_dim = keys.shape[-1], values.shape[-1]
            layer.device = keys.device
            layer.is_initialized = True
            layers.append(layer)
        # a mask over the whole cache: models that would build one from the (traced) past length get a static size
        kwargs = {self.cache_name: Cache(layers=layers),
                  "attention_mask": torch.ones(input_ids.shape[0], kv[0].shape[2], dtype=torch.long, device=input_ids.device)}
        if self.takes_positions:
            kwargs["cache_position"] = past_length + torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.model(input_ids=input_ids, use_cache=True, **kwargs).logits


def cache_layout(model: nn.Module) -> CacheLayout:
    """Read the per-layer cache shapes from one eager step (no config arithmetic: MQA, GQA, MLA all differ)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 2
    with torch.no_grad():
        out = model(input_ids=torch.randint(0, vocab, (1, 2)), use_cache=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    layers = getattr(cache, "layers", None)
    if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
        raise CaptureError(f"{type(model).__name__} returns no per-layer key/value cache; generation will recompute")
    return CacheLayout(tuple((int(t.shape[1]), int(t.shape[-1])) for layer in layers for t in (layer.keys, layer.values)))


def capture_cached(model: nn.Module, *, example_length: int = 5, cache_length: int = 16,
                   bind: Callable[[nn.Module], Any] | None = None):
    """Export `model` with a KV cache as a Program whose `cache` is set; raises CaptureError if it cannot. `bind`: as
    in `fxslice.models.capture.capture_module`."""
    from torch.export import Dim

    from fxslice.core.program import Program, program_inputs
    from fxslice.models.capture import plain_graph_module

    model = model.eval()
    try:
        layout = cache_layout(model)
        config = model.config
        example = torch.randint(0, config.vocab_size, (2, example_length))
        dtype = next(model.parameters()).dtype
        kv = layout.allocate(2, cache_length, dtype)
        shapes = ({0: Dim.AUTO, 1: Dim.AUTO}, None, [{0: Dim.AUTO, 2: Dim.AUTO} for _ in kv])
        with torch.no_grad():
            exported = torch.export.export(_CachedStep(model), (example, torch.tensor(0), kv),
                                           dynamic_shapes=shapes, strict=False)
        unlifted = exported.module()
        if bind is not None:
            bind(unlifted)
        gm = plain_graph_module(unlifted, inputs=program_inputs(len(kv)), root="model")
        program = Program(gm, model_class=type(model).__name__, config=config.to_dict(), cache=layout)
        _check_decoding(model, program)
    except CaptureError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure means: no cached graph for this model
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CaptureError(f"could not capture {type(model).__name__} with a KV cache: {type(exc).__name__}: {first}") from exc
    return program


def _check_decoding(model: nn.Module, program) -> None:
    """Prefill then decode one token at a time must give the logits of the whole sequence at once."""
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False).logits
        kv = program.cache.allocate(2, 9, reference.dtype)
        got = [program.step(ids[:, :4], 0, kv)]
        got += [program.step(ids[:, j : j + 1], j, kv) for j in range(4, 7)]
    error = relative_error(torch.cat(got, 1), reference)
    # a few roundings of the dtype apart (SmolLM2 in bfloat16: 0.017); a wrong cache is off by order 1
    if not error <= max(1e-3, 8 * torch.finfo(reference.dtype).eps):
        raise CaptureError(f"the KV-cache capture of {type(model).__name__} decodes wrongly (relative error {error:.2g})")
