"""A loss that is exactly quadratic in a weight matrix with Kronecker-factored curvature, G ⊗ A: the case in
which the LLM Surgeon's costs and updates are exact, so tests can hold them to round-off."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["random_spd", "kronecker_quadratic"]


def random_spd(n: int, generator: torch.Generator) -> torch.Tensor:
    """A well-conditioned random symmetric positive definite n x n matrix (float64)."""
    x = torch.randn(n, 2 * n, generator=generator, dtype=torch.float64)
    return x @ x.T / n + 0.1 * torch.eye(n, dtype=torch.float64)


def kronecker_quadratic(w0: torch.Tensor, g: torch.Tensor, a: torch.Tensor) -> Callable[[torch.Tensor], float]:
    """L(W) = ½ tr((W - W0) A (W - W0)ᵀ G): its Hessian is exactly G ⊗ A."""
    return lambda w: 0.5 * float(torch.trace((w - w0) @ a @ (w - w0).T @ g))
