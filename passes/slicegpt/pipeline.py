"""`slicegpt()`: the SliceGPT preset recipe as one call on a program and calibration windows."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from fxslice.analysis.stream import Segment
from fxslice.core import InvalidOption, Pass, Program
from fxslice.passes.slicegpt.slice_stream import ConstantWidths, SegmentReport, SliceStream, per_block, per_stream
from fxslice.recipes import Recipe, RecipeResult

__all__ = ["SliceResult", "slicegpt"]


@dataclass
class SliceResult:
    dense_parameters: int
    sliced_parameters: int
    segments: list[SegmentReport]
    seconds: dict[str, float] = field(default_factory=dict)  # per stage
    passes: list[Pass] = field(default_factory=list)  # to `fxslice.replay` on another capture (a KV-cache one)
    recipe: Recipe | None = None
    result: RecipeResult | None = None  # every pass's diff record


def slicegpt(
    program: Program,
    windows: torch.Tensor,
    widths: Callable[[Segment, int], int] | Sequence[int],
    *,
    batch_size: int = 8,
    slice_head: bool = True,
    keep_ties: bool = True,
    share: Callable[[Segment], str] | None = None,
    progress: bool = False,
) -> SliceResult:
    """Slice `program` in place; `windows` are the calibration token windows [n, length].

    `keep_ties=False` unties a tied head (better perplexity, a V x d table more; see docs/methods/slicegpt.md).
    `share=per_block` gives both halves of a block one basis: half the shortcut matrices, some quality;
    `share=per_stream` one basis for the whole stream: no shortcuts (a stock decoder, narrower)."""
    from fxslice.passes.presets import slicegpt_recipe

    shares = {None: "none", per_block: "block", per_stream: "stream"}
    if share not in shares:
        raise InvalidOption("slicegpt(): share is None, per_block or per_stream; for another grouping run SliceStream "
                            "yourself")
    # a recipe's sparsity is in (0, 1); full width (a change of basis only, what tests compare with) goes as a rule
    if isinstance(widths, ConstantWidths) and widths.sparsity > 0:
        rule: dict = {"sparsity": widths.sparsity, "multiple": widths.multiple}
    else:
        rule = {"widths": widths if callable(widths) else tuple(int(w) for w in widths)}
    recipe = slicegpt_recipe(**rule, batch_size=batch_size, slice_head=slice_head, keep_ties=keep_ties,
                             shared_basis=shares[share])
    result = recipe.run(program, calibration=windows, progress=progress)
    slicer = next(p for p in result.passes if isinstance(p, SliceStream))
    return SliceResult(result.dense_parameters, result.parameters, slicer.reports,
                       {stage.kind: round(r.seconds, 2) for stage, r in result.stages}, result.passes, recipe, result)
