"""Tiny random models and checks for testing passes (fxslice's own and yours)."""

from fxslice.testing.float64 import lifted_float32
from fxslice.testing.pass_checks import ExactPassReport, check_exact_pass, check_pass_leaves_alone
from fxslice.testing.tiny_models import (
    TINY_CONFIGS,
    arithmetic_sequences,
    char_tokenizer,
    perturb_norms,
    tiny_causal_lm,
    trained_tiny_causal_lm,
)

__all__ = ["TINY_CONFIGS", "ExactPassReport", "arithmetic_sequences", "char_tokenizer", "check_exact_pass", "check_pass_leaves_alone",
           "lifted_float32", "perturb_norms", "tiny_causal_lm", "trained_tiny_causal_lm"]
