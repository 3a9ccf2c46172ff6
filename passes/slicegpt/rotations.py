"""Sources of per-segment orthogonal matrices for the rotation pass (PCA is another one)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fxslice.analysis.stream import Segment

__all__ = ["RotationSource", "random_orthogonal", "randomized_hadamard", "hadamard", "identity", "orthogonality_error"]

RotationSource = Callable[[Segment, int], torch.Tensor]


def random_orthogonal(seed: int = 0) -> RotationSource:
    """A different Haar-random orthogonal matrix for every segment (QR of a Gaussian, signs fixed)."""

    def make(segment: Segment, width: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed * 100_003 + segment.index)
        q, r = torch.linalg.qr(torch.randn(width, width, generator=gen, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))

    return make


def hadamard(n: int) -> torch.Tensor:
    """The normalised Sylvester Hadamard matrix of order `n` (a power of two): orthogonal, entries ±1/√n."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def randomized_hadamard(seed: int = 0) -> RotationSource:
    """One matrix for every segment (so residual edges need no shortcut), QuaRot-style: random signs, then a
    Hadamard transform, which spreads any one large channel evenly over all of them before weights are rounded.
    A width that is not a power of two, 2^k * m, gets H_{2^k} ⊗ (a Haar-random m x m orthogonal matrix)."""

    def make(segment: Segment, width: int) -> torch.Tensor:
        power = width & -width  # the largest power of two dividing the width
        gen = torch.Generator().manual_seed(seed)
        odd = width // power
        q, r = torch.linalg.qr(torch.randn(odd, odd, generator=gen, dtype=torch.float64))
        mix = torch.kron(hadamard(power), (q * torch.sign(torch.diagonal(r))).contiguous())
        signs = torch.randint(0, 2, (width,), generator=gen).to(torch.float64) * 2 - 1
        return signs[:, None] * mix

    return make


def identity() -> RotationSource:
    return lambda segment, width: torch.eye(width, dtype=torch.float64)


def orthogonality_error(q: torch.Tensor) -> float:
    eye = torch.eye(q.shape[1], dtype=torch.float64)
    return float((q.to(torch.float64).T @ q.to(torch.float64) - eye).abs().max())
