"""Perplexity: mean next-token NLL over token windows, exponentiated (design.md §5)."""

from __future__ import annotations

import math

import torch

from fxslice.core.health import check_tokens
from fxslice.core.program import Program
from fxslice.core.progress import progress_bar

__all__ = ["perplexity"]


@torch.no_grad()
def perplexity(program: Program, windows: torch.Tensor, *, batch_size: int = 1, progress: bool = False) -> float:
    check_tokens(program, windows)
    total, count = 0.0, 0
    batches = list(windows.split(batch_size))
    for batch in progress_bar(batches, "perplexity", enabled=progress):
        batch = batch.to(program.device)
        logits = program(batch).float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += batch[:, 1:].numel()
    return math.exp(total / count)
