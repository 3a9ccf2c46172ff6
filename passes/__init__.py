"""fxslice's built-in passes, written only against fxslice's public API.

The exact SliceGPT pipeline is `[CleanupIR(), ProjectNormWriters(), FuseNorms(), RotateStream(source)]`.
"""

from passes.causal_attention import CausalAttention
from passes.cleanup import CleanupIR
from passes.fuse_norms import FuseNorms
from passes.fuse_repeat_kv import FuseRepeatKV
from passes.project_norm_writers import ProjectNormWriters
from passes.rotate_stream import RotateStream

__all__ = ["CausalAttention", "CleanupIR", "FuseNorms", "FuseRepeatKV", "ProjectNormWriters", "RotateStream", "exact_pipeline"]


def exact_pipeline(rotations) -> list:
    """The passes that make the model rotation-ready and rotate it; none changes the function."""
    return [CleanupIR(), ProjectNormWriters(), FuseNorms(), RotateStream(rotations)]
