"""Weight quantization: group-wise integer weights (round to nearest or GPTQ) stored packed, with the true
size in bytes."""

from fxslice.passes.quantize.gptq import gptq
from fxslice.passes.quantize.kernels import Int4Kernels
from fxslice.passes.quantize.learned_rotation import LearnRotation
from fxslice.passes.quantize.quantize import QUANTIZERS, QuantizeWeights

__all__ = ["QUANTIZERS", "Int4Kernels", "LearnRotation", "QuantizeWeights", "gptq"]
