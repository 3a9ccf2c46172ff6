"""The weights the Surgeon works on, as out x in float64 matrices, and where they go back."""

from __future__ import annotations

import torch

from fxslice import Program
from fxslice.analysis.groups import Groups
from fxslice.analysis.matchers import LinearUse
from fxslice.analysis.weights import weight_matrix
from fxslice.core.graph import set_tensor, tensor_of

__all__ = ["matrix_of", "store_matrix", "decoder_linears"]


def matrix_of(program: Program, use: LinearUse) -> torch.Tensor:
    return weight_matrix(program.gm, use)


def store_matrix(program: Program, use: LinearUse, m: torch.Tensor) -> torch.Tensor:
    old = tensor_of(program.gm, use.weight)
    value = (m if use.out_axis % 2 == 0 else m.T).to(old.dtype).contiguous()
    set_tensor(program.gm, str(use.weight.target), value)
    return tensor_of(program.gm, use.weight)  # what is stored (on disk for a lazy program: not held here)


def decoder_linears(groups: Groups) -> list[str]:
    """The linears that own internal channels (q/k/v/o, gate/up/down, fc1/fc2, ... — found as the producers
    and readers of removable dimension groups): the paper's scope. Embeddings, the head (its channels reach
    the logits) and SliceGPT's shortcuts (they own no channel) are left out."""
    return sorted({u.weight for g in groups.groups for u in g.units})
