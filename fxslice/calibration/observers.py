"""Observers: statistics accumulated at one value of the graph as calibration batches stream by.

An observer sees one batch's value at a time (`update`) and keeps only its running statistic, so
nothing holds all activations at once. Sums are kept in float64 whatever the program computes in.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["Observer", "SecondMoment", "Recorder"]


@runtime_checkable
class Observer(Protocol):
    def update(self, value: torch.Tensor) -> None:
        """Take one batch's value of the observed node."""


class SecondMoment:
    """Σ xxᵀ over every row x of the last dimension (tokens of every window), in float64.

    SliceGPT's PCA reads it at a stream cut; GPTQ and the LLM Surgeon's `A` factor read it at a linear's
    input, and the Surgeon's `G` factor at a linear's output gradient. `rows` counts what was summed,
    so `mean()` is the second moment E[xxᵀ]. `directions=True` sums x̂x̂ᵀ of the rows scaled to unit length:
    every token's direction counts once, whatever its norm (what an RMSNorm after the cut reads).
    """

    def __init__(self, *, directions: bool = False) -> None:
        self.sum: torch.Tensor | None = None
        self.rows = 0
        self.directions = directions

    def update(self, value: torch.Tensor) -> None:
        x = value.detach().reshape(-1, value.shape[-1]).to(torch.float64)
        if self.directions:
            x = x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        if self.sum is None:
            self.sum = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        self.sum.addmm_(x.T, x)
        self.rows += x.shape[0]

    def all_reduce(self) -> None:
        """Sum over the ranks of a process group (data-parallel calibration); every rank must have seen data. The
        runner calls it once at the end of the stage the observer was made for: an observer is one stage's."""
        import torch.distributed as dist

        if self.sum is None:
            raise ValueError("the observer has seen no data on this rank; every rank needs calibration batches")
        dist.all_reduce(self.sum)
        rows = torch.tensor([self.rows], dtype=torch.int64, device=self.sum.device)
        dist.all_reduce(rows)
        self.rows = int(rows.item())

    def mean(self) -> torch.Tensor:
        if self.sum is None or self.rows == 0:
            raise ValueError("the observer has seen no data")
        return self.sum / self.rows

    def __repr__(self) -> str:
        width = None if self.sum is None else self.sum.shape[0]
        return f"SecondMoment(width={width}, rows={self.rows})"


class Recorder:
    """Keeps a copy of every value it sees: for tests and small experiments, not for calibration at scale."""

    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []

    def update(self, value: torch.Tensor) -> None:
        self.values.append(value.detach().clone())
