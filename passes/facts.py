"""What built-in stages say about a program (`Stage.needs`, `refuses`, `provides`): one vocabulary, so that
a stage of one method can refuse what another leaves behind."""

from fxslice.recipes import CAPTURED, KV_CACHE

__all__ = ["CAPTURED", "KV_CACHE", "CLEAN", "GQA_FUSED", "SLICED", "ROTATED", "PRUNED", "QUANTIZED", "RECOVERED", "FACTS"]

CLEAN = "clean"  # CleanupIR ran: the analyses' precondition
GQA_FUSED = "gqa_fused"  # attention reads K/V heads without copies: stream and group analyses see a changed graph
SLICED = "sliced"  # the residual stream has its own bases and shortcuts
ROTATED = "rotated"
PRUNED = "pruned"  # dimension groups were removed
QUANTIZED = "quantized"
RECOVERED = "recovered"  # fine-tuned after compression (adapters merged: same structure, new weights)

#: every fact, for a stage that declares its own (`passes` with `needs_facts` / `provides_facts`)
FACTS = (CAPTURED, KV_CACHE, CLEAN, GQA_FUSED, SLICED, ROTATED, PRUNED, QUANTIZED, RECOVERED)
