"""Text generation from a Program: greedy or sampled, with the KV cache when the program has one.

A cached program (`Program.cache`, see `fxslice.models.kvcache`) runs the prompt once and then one token per
step; a plain program recomputes the whole sequence every step (correct, slow: quadratic). One decoding step of a
small model is a thousand small kernels, so on a GPU it is bound by their launches, not by arithmetic:
`compile=True` runs the steps through `torch.compile` (fused kernels; on CUDA replayed as one CUDA graph). The step
always has the same shapes (one token per row, a cache allocated once, the past length a tensor), so it compiles
once per batch size and cache length; the prompt runs as captured.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fxslice.core.errors import InvalidOption
from fxslice.core.program import Program

__all__ = ["generate", "decoding_step", "compiled_step"]

#: one decoding step, `(input_ids, past_length, kv) -> logits`, the cache updated in place
Step = Callable[[torch.Tensor, int, list[torch.Tensor]], torch.Tensor]


@torch.no_grad()
def generate(
    program: Program,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
    eos_token_id: int | None = None,
    on_tokens: Callable[[torch.Tensor], None] | None = None,
    compile: bool = False,  # noqa: A002 - the word users know from torch
) -> torch.Tensor:
    """Continue `input_ids` [batch, length]; returns [batch, length + new] (new <= max_new_tokens).

    `temperature == 0` is greedy; otherwise tokens are sampled from softmax(logits / temperature),
    restricted to the `top_k` most likely when `top_k > 0`. A row that produced `eos_token_id` is
    padded with it until every row has. `on_tokens(tokens)` sees each step's new tokens [batch].
    `compile`: decode through `decoding_step(program, compile=True)` (a KV-cache program on its weights' device).
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise InvalidOption(f"input_ids must be [batch, length] with length >= 1, got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 1 or temperature < 0 or top_k < 0:
        raise InvalidOption("max_new_tokens must be >= 1, temperature >= 0 and top_k >= 0")
    limit = (program.config or {}).get("max_position_embeddings")
    if limit and input_ids.shape[1] + max_new_tokens > limit:
        raise InvalidOption(f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                            f"context of {limit} tokens")
    step = decoding_step(program, compile=compile) if program.cache is not None or compile else None
    input_ids = input_ids.to(program.device)
    generator = torch.Generator(device=input_ids.device).manual_seed(seed) if seed is not None else None
    batch, length = input_ids.shape
    if program.cache is not None:
        kv = program.cache.allocate(batch, length + max_new_tokens, program.dtype, input_ids.device)
        logits = program.step(input_ids, 0, kv)
    else:
        logits = program(input_ids)
    out = [input_ids]
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    for index in range(max_new_tokens):
        token = _choose(logits[:, -1].float(), temperature, top_k, generator)
        if eos_token_id is not None:
            token = torch.where(finished, torch.full_like(token, eos_token_id), token)
            finished |= token == eos_token_id
        out.append(token[:, None])
        if on_tokens is not None:
            on_tokens(token)
        if bool(finished.all()) or index == max_new_tokens - 1:
            break
        if step is not None:
            logits = step(token[:, None], length + index, kv)
        else:
            logits = program(torch.cat(out, 1))
    return torch.cat(out, 1)


def decoding_step(program: Program, *, compile: bool = False) -> Step:  # noqa: A002 - as in generate()
    """One decoding step `(input_ids, past_length, kv) -> logits`, as `program.step` takes it: the captured graph, or
    with `compile` the compiled one (`compiled_step`), whose cache tensors are marked static on CUDA, where CUDA
    graphs write into them in place at fixed addresses."""
    if not compile:
        return program.step
    compiled = compiled_step(program)

    def step(input_ids: torch.Tensor, past_length: int, kv: list[torch.Tensor]) -> torch.Tensor:
        if kv[0].is_cuda:
            for t in kv:
                torch._dynamo.mark_static_address(t)
        return compiled(input_ids, torch.tensor(past_length, device=input_ids.device), *kv)

    return step


def compiled_step(program: Program) -> Callable[..., Any]:
    """`program.step` compiled: called as `(input_ids, past_length tensor, *kv)`, like the graph itself. Compiled once
    per graph version (cached with the program's analyses); CUDA graphs on a GPU (`mode="reduce-overhead"`)."""
    if program.cache is None:
        raise InvalidOption("compiling the decoding step needs a KV-cache program (`fxslice.models.kvcache."
                            "capture_cached`, or a model saved by `fxslice slice`); without a cache every step has "
                            "another shape")
    if program.execution_device is not None:
        raise InvalidOption("an offloaded program streams its weights op by op; compile it after moving it whole "
                            "with `program.to(device)`")
    return program.analysis(_compile_step)


def _compile_step(program: Program) -> Callable[..., Any]:
    mode = "reduce-overhead" if program.device.type == "cuda" else None
    return torch.compile(program.gm, fullgraph=True, dynamic=False, mode=mode)


def _choose(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]
