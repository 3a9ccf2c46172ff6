"""Recovery fine-tuning: low-rank adapters inserted into the graph as an exact pass, trained on the next-token
loss, and merged back exactly, so that a compressed model regains quality without changing size; and the closed-form
refit of the linears around a compressed stream (`refit`)."""

from fxslice.passes.recovery.adapters import Adapter, InsertAdapters, MergeAdapters, adaptable_linears, adapters
from fxslice.passes.recovery.recover import RecoverFull, RecoverLoRA, ReplayLowRank
from fxslice.passes.recovery.refit import LinearFit, RefitLinears, SetWeights
from fxslice.passes.recovery.train import TrainReport, train_adapters

__all__ = ["Adapter", "InsertAdapters", "MergeAdapters", "LinearFit", "RecoverFull", "RecoverLoRA", "RefitLinears", "ReplayLowRank", "SetWeights",
           "TrainReport", "adaptable_linears", "adapters", "train_adapters"]
