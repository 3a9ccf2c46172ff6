"""The curvature of one linear's weights as the Surgeon and its baselines see it, from the calibration
service's per-linear statistics (`fxslice.calibration.moments`): Kronecker factors `A` (inputs) and `G`
(output gradients), their damped inverses where the method updates weights, and the row and column scales
its costs use.

    kfac         A, G, OBS costs and updates (the LLM Surgeon)
    kobd         A, G, OBD costs (diagonals, no inverse), no update ("K-OBD")
    activations  A, G = I, OBS costs and updates of columns ("L-OBD")
    identity     A = G = I, no update (magnitude)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxslice.calibration.moments import LinearStatistics
from fxslice.passes.surgeon.obs import damped_inverse

__all__ = ["CURVATURES", "Factors", "factors", "needs_activations", "needs_gradients", "updates"]

CURVATURES = ("kfac", "kobd", "activations", "identity")


def needs_activations(curvature: str) -> bool:
    return curvature != "identity"


def needs_gradients(curvature: str) -> bool:
    return curvature in ("kfac", "kobd")


def updates(curvature: str) -> bool:
    """Whether the method compensates the remaining weights (OBS) or only zeroes (OBD, magnitude)."""
    return curvature in ("kfac", "activations")


@dataclass(frozen=True)
class Factors:
    """One linear's curvature, its weight oriented out x in. None stands for an identity factor (for the
    inverses: no compensation through that side)."""

    a: torch.Tensor | None
    g: torch.Tensor | None
    a_inv: torch.Tensor | None
    g_inv: torch.Tensor | None
    s: torch.Tensor  # per row: 1 / [G⁻¹]_rr (OBS) or G_rr (OBD)
    t: torch.Tensor  # per column: 1 / [A⁻¹]_cc (OBS) or A_cc (OBD)


def factors(stats: LinearStatistics | None, weight: str, shape: tuple[int, int], curvature: str, *,
            damp_a: float, damp_g: float) -> Factors:
    out, inp = shape
    ones_out = torch.ones(out, dtype=torch.float64)
    ones_in = torch.ones(inp, dtype=torch.float64)
    if curvature == "identity" or stats is None:
        return Factors(None, None, None, None, ones_out, ones_in)
    a = stats.A(weight).to(torch.float64)
    if curvature == "activations":
        a_inv = damped_inverse(a, damp_a)
        return Factors(a, None, a_inv, None, ones_out, 1.0 / a_inv.diagonal())
    g = stats.G(weight).to(torch.float64)
    if curvature == "kobd":
        return Factors(a, g, None, None, g.diagonal().clone(), a.diagonal().clone())
    a_inv, g_inv = damped_inverse(a, damp_a), damped_inverse(g, damp_g)
    return Factors(a, g, a_inv, g_inv, 1.0 / g_inv.diagonal(), 1.0 / a_inv.diagonal())
