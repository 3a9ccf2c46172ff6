"""Method-free rewrites: exact passes that tidy or speed up a captured graph, whatever compresses it later."""

from fxslice.passes.rewrite.causal_attention import CausalAttention
from fxslice.passes.rewrite.cleanup import CleanupIR
from fxslice.passes.rewrite.fuse_repeat_kv import FuseRepeatKV
from fxslice.passes.rewrite.remove_dead_groups import RemoveDeadGroups
from fxslice.passes.rewrite.unstack_weights import UnstackWeights
from fxslice.passes.rewrite.untie_head import UntieHead

__all__ = ["CausalAttention", "CleanupIR", "FuseRepeatKV", "RemoveDeadGroups", "UnstackWeights", "UntieHead"]
