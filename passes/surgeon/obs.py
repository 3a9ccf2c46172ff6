"""The LLM Surgeon's algebra on one matrix with Kronecker-factored curvature F ≈ G ⊗ A (arXiv 2312.17244).

`W` is oriented out x in (`y = x Wᵀ`); `A` is the input second moment (in x in), `G` the output-gradient
second moment (out x out). Removing a set R of rows together costs

    ΔL_R = ½ tr( ([G⁻¹]_RR)⁻¹ W_R A W_Rᵀ )

and is best compensated by ΔW = − G⁻¹[:, R] ([G⁻¹]_RR)⁻¹ W_R (A cancels). Columns C are the transpose:
ΔL_C = ½ tr( ([A⁻¹]_CC)⁻¹ W_Cᵀ G W_C ), ΔW = − W_C ([A⁻¹]_CC)⁻¹ A⁻¹[C, :] (G cancels). With one row
or column these are the paper's per-structure costs. Inverses are damped by a fraction of the mean diagonal
and taken in float64 by Cholesky.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["damped_inverse", "row_cost", "column_cost", "remove_rows", "remove_columns"]


def damped_inverse(m: torch.Tensor, damp: float) -> torch.Tensor:
    """(M + damp · mean(diag M) · I)⁻¹ in float64; an all-zero M (a dead input) inverts to the identity / damp."""
    m = m.to(torch.float64)
    scale = float(m.diagonal().mean())
    if not scale > 0:
        scale = 1.0
    eye = torch.eye(m.shape[0], dtype=torch.float64, device=m.device)
    return torch.cholesky_inverse(torch.linalg.cholesky(m + damp * scale * eye))


def _solve_block(block: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """block⁻¹ rhs for a symmetric positive definite block (a principal submatrix of an inverse)."""
    return torch.cholesky_solve(rhs, torch.linalg.cholesky(block))


def row_cost(w: torch.Tensor, a: torch.Tensor, g_inv: torch.Tensor, rows: Sequence[int]) -> float:
    r = torch.as_tensor(list(rows), dtype=torch.long)
    w_r = w[r].to(torch.float64)
    return 0.5 * float(torch.trace(_solve_block(g_inv[r][:, r], w_r @ a @ w_r.T)))


def column_cost(w: torch.Tensor, g: torch.Tensor, a_inv: torch.Tensor, cols: Sequence[int]) -> float:
    c = torch.as_tensor(list(cols), dtype=torch.long)
    w_c = w[:, c].to(torch.float64)
    return 0.5 * float(torch.trace(_solve_block(a_inv[c][:, c], w_c.T @ g @ w_c)))


def remove_rows(w: torch.Tensor, g_inv: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """`w` with rows R removed (zeroed) and the others updated to compensate (correlated OBS)."""
    r = torch.as_tensor(list(rows), dtype=torch.long)
    w64 = w.to(torch.float64)
    delta = -g_inv[:, r] @ _solve_block(g_inv[r][:, r], w64[r])
    out = w64 + delta
    out[r] = 0
    return out.to(w.dtype)


def remove_columns(w: torch.Tensor, a_inv: torch.Tensor, cols: Sequence[int]) -> torch.Tensor:
    """`w` with columns C removed (zeroed) and the others updated to compensate (correlated OBS)."""
    c = torch.as_tensor(list(cols), dtype=torch.long)
    w64 = w.to(torch.float64)
    delta = -_solve_block(a_inv[c][:, c], w64[:, c].T).T @ a_inv[c]
    out = w64 + delta
    out[:, c] = 0
    return out.to(w.dtype)
