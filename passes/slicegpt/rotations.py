"""Sources of per-segment orthogonal matrices for the rotation pass (PCA is another one)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fxslice.analysis.stream import Segment

__all__ = ["RotationSource", "random_orthogonal", "identity", "orthogonality_error"]

RotationSource = Callable[[Segment, int], torch.Tensor]


def random_orthogonal(seed: int = 0) -> RotationSource:
    """A different Haar-random orthogonal matrix for every segment (QR of a Gaussian, signs fixed)."""

    def make(segment: Segment, width: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed * 100_003 + segment.index)
        q, r = torch.linalg.qr(torch.randn(width, width, generator=gen, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))

    return make


def identity() -> RotationSource:
    return lambda segment, width: torch.eye(width, dtype=torch.float64)


def orthogonality_error(q: torch.Tensor) -> float:
    eye = torch.eye(q.shape[1], dtype=torch.float64)
    return float((q.to(torch.float64).T @ q.to(torch.float64) - eye).abs().max())
