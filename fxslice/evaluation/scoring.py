"""Log-likelihoods of token sequences under a Program: what zero-shot benchmarks are made of.

`continuation_logprobs` scores a continuation after a context (multiple-choice tasks pick the choice with
the highest score); `rolling_logprob` scores a whole document with every token predicted once and as much
context as the model takes (the harness's perplexity tasks). Both are plain functions of the program, so the
lm-eval adapter is only a translation and its numbers can be checked against the program directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fxslice.core.errors import InvalidOption
from fxslice.core.program import Program
from fxslice.core.progress import progress_bar

__all__ = ["continuation_logprobs", "rolling_logprob"]


@torch.no_grad()
def continuation_logprobs(
    program: Program,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    max_length: int,
    batch_size: int = 8,
    progress: bool = False,
) -> list[tuple[float, bool]]:
    """Per (context ids, continuation ids): `log p(continuation | context)` summed over its tokens, and whether
    greedy decoding would have produced the continuation. The context is cut from the left to fit
    `max_length` tokens; sequences are batched longest first and padded on the right (causal attention: the
    padding is never seen by the scored positions)."""
    if max_length < 2:
        raise InvalidOption(f"max_length must be at least 2, got {max_length}")
    for i, (context, continuation) in enumerate(requests):
        if not continuation or not context:
            raise InvalidOption(f"request {i}: context and continuation must both be non-empty token lists")
        if len(continuation) >= max_length:
            raise InvalidOption(f"request {i}: a continuation of {len(continuation)} tokens does not fit a context "
                                f"of {max_length}")
    sequences = [list(c)[-(max_length + 1 - len(t)):] + list(t) for c, t in requests]
    order = sorted(range(len(requests)), key=lambda i: -len(sequences[i]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in progress_bar(batches, "scoring", enabled=progress):
        width = len(sequences[batch[0]]) - 1
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(sequences[i]) - 1] = torch.tensor(sequences[i][:-1])
        logprobs = program(ids).float().log_softmax(-1).cpu()
        for row, i in enumerate(batch):
            n, k = len(sequences[i]) - 1, len(requests[i][1])
            scored = logprobs[row, n - k: n]
            target = torch.tensor(sequences[i][-k:])
            total = float(scored.gather(-1, target[:, None]).sum())
            results[i] = (total, bool((scored.argmax(-1) == target).all()))
    return results


@torch.no_grad()
def rolling_logprob(program: Program, ids: Sequence[int], *, max_length: int, prefix: int) -> float:
    """`log p(ids | prefix)`: every token predicted once, in chunks of `max_length` predictions, each with as
    much of the preceding text as fits (the last chunk gets a full context)."""
    tokens = [prefix, *ids]
    total = 0.0
    for start in range(0, len(ids), max_length):
        end = min(start + max_length, len(ids))  # predict tokens[start + 1 .. end]
        first = max(0, end - max_length)
        window = torch.tensor(tokens[first:end])[None]
        logprobs = program(window).float().log_softmax(-1)[0].cpu()
        targets = torch.tensor(tokens[start + 1: end + 1])
        rows = logprobs[start - first: end - first]
        total += float(rows.gather(-1, targets[:, None]).sum())
    return total
