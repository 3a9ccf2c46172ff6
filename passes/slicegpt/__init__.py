"""SliceGPT (Ashkboos et al., ICLR 2024): fuse the stream's norms, rotate it, slice it by PCA.

The exact half is `exact_pipeline(rotations)`; calibration and slicing are `SliceStream`; `slicegpt()`
runs the whole method.
"""

from fxslice.passes.rewrite import CleanupIR, UnstackWeights
from fxslice.passes.slicegpt.fuse_norms import FuseNorms
from fxslice.passes.slicegpt.project_norm_writers import ProjectNormWriters
from fxslice.passes.slicegpt.rotate_heads import RotateHeads, head_hadamard
from fxslice.passes.slicegpt.rotate_stream import RotateStream
from fxslice.passes.slicegpt.rotations import RotationSource, identity, random_orthogonal
from fxslice.passes.slicegpt.slice_stream import SegmentReport, SliceStream, constant_widths, per_block, per_stream
from fxslice.passes.slicegpt.tied_head import CorrectTiedHead, HeadCorrection

__all__ = ["CorrectTiedHead", "FuseNorms", "HeadCorrection", "ProjectNormWriters", "RotateHeads", "RotateStream", "RotationSource", "SegmentReport", "SliceStream",
           "constant_widths", "exact_pipeline", "head_hadamard", "identity", "per_block", "per_stream", "random_orthogonal"]


def exact_pipeline(rotations: RotationSource) -> list:
    """The passes that make the model rotation-ready and rotate it; none changes the function."""
    return [CleanupIR(), UnstackWeights(), ProjectNormWriters(), FuseNorms(), RotateStream(rotations)]
