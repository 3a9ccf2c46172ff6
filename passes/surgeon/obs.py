"""The LLM Surgeon's algebra on one matrix with Kronecker-factored curvature F ≈ G ⊗ A (arXiv 2312.17244).

`W` is oriented out x in (`y = x Wᵀ`); `A` is the input second moment (in x in), `G` the output-gradient
second moment (out x out). Removing a set R of rows together costs

    ΔL_R = ½ tr( ([G⁻¹]_RR)⁻¹ W_R A W_Rᵀ )

and is best compensated by ΔW = − G⁻¹[:, R] ([G⁻¹]_RR)⁻¹ W_R (A cancels). Columns C are the transpose:
ΔL_C = ½ tr( ([A⁻¹]_CC)⁻¹ W_Cᵀ G W_C ), ΔW = − W_C ([A⁻¹]_CC)⁻¹ A⁻¹[C, :] (G cancels). With one row
or column these are the paper's per-structure costs. Inverses are damped by a fraction of the mean diagonal
and taken in float64 by Cholesky.

Every row, column and element at once (`structure_costs`): row r costs ½ (W A Wᵀ)_rr · s_r, column c costs
½ (Wᵀ G W)_cc · t_c and element (i, j) ½ W_ij² · s_i t_j, with s = 1 / diag(G⁻¹), t = 1 / diag(A⁻¹) for OBS
(the Surgeon) and s = diag(G), t = diag(A) for OBD (no inverse, no update: "K-OBD").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["damped_inverse", "row_cost", "column_cost", "remove_rows", "remove_columns", "remove_rows_and_columns",
           "remove_elements", "StructureCosts", "structure_costs"]


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


def remove_rows_and_columns(w: torch.Tensor, g_inv: torch.Tensor | None, a_inv: torch.Tensor | None,
                            rows: Sequence[int], cols: Sequence[int]) -> torch.Tensor:
    """`w` with rows R and columns C removed together (the paper's correlated update: both deltas are added,
    then every pruned weight is set to zero). A missing inverse means that factor is not used to compensate."""
    w64 = w.to(torch.float64)
    out = w64.clone()
    r = torch.as_tensor(list(rows), dtype=torch.long)
    c = torch.as_tensor(list(cols), dtype=torch.long)
    if len(r) and g_inv is not None:
        out -= g_inv[:, r] @ _solve_block(g_inv[r][:, r], w64[r])
    if len(c) and a_inv is not None:
        out -= _solve_block(a_inv[c][:, c], w64[:, c].T).T @ a_inv[c]
    out[r] = 0
    out[:, c] = 0
    return out.to(w.dtype)


def remove_elements(w: torch.Tensor, a_inv: torch.Tensor | None, mask: torch.Tensor,
                    budget: int = 2**25) -> torch.Tensor:
    """`w` with the elements in `mask` removed and each row's other weights updated to compensate, correlated
    within the row (OBS with rows independent, the update SparseGPT approximates; the Surgeon's cross-row term
    through G⁻¹ is left out). For a row's pruned set Q and kept set K the optimum is

        ΔW_i = − w_iQ ([A⁻¹]_QQ)⁻¹ A⁻¹[Q, :]    or, the same, w'_iK = w_iK + (A_KK)⁻¹ A_KQ w_iQ,

    whichever system is smaller. Rows are solved in batches of similar size, padded with identity blocks
    (`budget`: float64 numbers per batch)."""
    out = w.to(torch.float64).clone()
    if a_inv is not None and bool(mask.any()):
        a = torch.cholesky_inverse(torch.linalg.cholesky(a_inv))  # the damped A that a_inv inverts
        width = w.shape[1]
        counts = mask.sum(1)
        kept_form = counts > width // 2
        sizes = torch.where(kept_form, width - counts, counts)
        for form in (False, True):
            rows = [r for r in torch.argsort(sizes).tolist() if bool(kept_form[r]) == form and sizes[r] > 0]
            start = 0
            while start < len(rows):  # rows sorted by size: a batch ends where the next would exceed the budget
                end = start + 1
                while end < len(rows) and (end + 1 - start) * int(sizes[rows[end]]) * width <= budget:
                    end += 1
                chunk = torch.tensor(rows[start:end])
                start = end
                k = int(sizes[chunk].max())
                picked = mask[chunk] if not form else ~mask[chunk]  # the unknowns: pruned (Q) or kept (K)
                idx = torch.sort((~picked).to(torch.int8), dim=1, stable=True).indices[:, :k]
                ok = torch.arange(k) < sizes[chunk][:, None]
                source = a if form else a_inv
                block = source[idx[:, :, None], idx[:, None, :]]
                block = torch.where(ok[:, :, None] & ok[:, None, :], block, torch.eye(k, dtype=torch.float64))
                if not form:
                    rhs = torch.where(ok, out[chunk].gather(1, idx), 0.0)
                    x = torch.cholesky_solve(rhs[..., None], torch.linalg.cholesky(block))[..., 0]
                    spread = torch.zeros(len(chunk), width, dtype=torch.float64).scatter_add_(1, idx, x)
                    out[chunk] -= spread @ a_inv  # padding solved to zero, so it adds nothing
                else:
                    pruned = out[chunk] * mask[chunk]
                    rhs = torch.where(ok, (pruned @ a).gather(1, idx), 0.0)
                    y = torch.cholesky_solve(rhs[..., None], torch.linalg.cholesky(block))[..., 0]
                    rows_k = chunk[:, None].expand_as(idx)
                    out[rows_k[ok], idx[ok]] += y[ok]
    out[mask] = 0
    return out.to(w.dtype)


@dataclass(frozen=True)
class StructureCosts:
    rows: torch.Tensor  # [out]
    cols: torch.Tensor  # [in]
    elements: torch.Tensor | None  # [out, in], float32 (there are as many as weights)


def structure_costs(w: torch.Tensor, a: torch.Tensor | None, g: torch.Tensor | None,
                    s: torch.Tensor, t: torch.Tensor, *, elements: bool = True) -> StructureCosts:
    """The cost of removing each row, column and element alone; `a`, `g` None for identity factors; `s`, `t`
    the row and column scales (OBS: 1 / diag of the inverse; OBD: the diagonal)."""
    w = w.to(torch.float64)
    wa = w if a is None else w @ a
    wg = w if g is None else g @ w
    rows = 0.5 * (wa * w).sum(1) * s
    cols = 0.5 * (wg * w).sum(0) * t
    each = (0.5 * w.pow(2) * s[:, None] * t[None, :]).to(torch.float32) if elements else None
    return StructureCosts(rows, cols, each)
