"""The SliceGPT recipe: clean up, fuse norms, calibrate and slice, then speed up attention; one call, timed stage by stage."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from fxslice import Pass, PassManager, Program
from fxslice.stream import Segment
from passes.causal_attention import CausalAttention
from passes.cleanup import CleanupIR
from passes.fuse_norms import FuseNorms
from passes.fuse_repeat_kv import FuseRepeatKV
from passes.project_norm_writers import ProjectNormWriters
from passes.slice_stream import SegmentReport, SliceStream

__all__ = ["SliceResult", "slicegpt"]


@dataclass
class SliceResult:
    dense_parameters: int
    sliced_parameters: int
    segments: list[SegmentReport]
    seconds: dict[str, float] = field(default_factory=dict)
    passes: list[Pass] = field(default_factory=list)  # to `fxslice.replay` on another capture (a KV-cache one)


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

    `keep_ties=False` unties a tied head (better perplexity, a V x d table more; see README).
    `share=per_block` gives both halves of a block one basis: half the shortcut matrices, some quality."""
    dense = program.num_parameters()
    start = time.perf_counter()
    exact = [CleanupIR(), CausalAttention(), ProjectNormWriters(), FuseNorms(keep_ties=keep_ties)]  # causal: faster calibration
    PassManager(exact).run(program)
    fused = time.perf_counter()
    slicer = SliceStream(windows, widths, batch_size=batch_size, slice_head=slice_head, share=share,
                         progress=progress)
    finish = [FuseRepeatKV()]  # not on the residual stream: after slicing, so the analysis sees HF's graph
    PassManager([slicer, *finish]).run(program)
    done = time.perf_counter()
    return SliceResult(dense, program.num_parameters(), slicer.reports,
                       {"fuse": round(fused - start, 2), "calibrate_and_slice": round(done - fused, 2)},
                       [*exact, slicer, *finish])
