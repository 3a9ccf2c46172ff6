"""Compose your own recipe: built-in stages plus a pass and a stage of your own.

`RoundLinearWeights` is a user's pass (round every linear's weights to `bits`, per output row); the stage
`RoundWeights` wraps it and declares that it leaves the program quantized, so a recipe that slices after
it is refused before anything runs. The recipe is written to YAML, read back and run on a tiny Llama.

Run it:  python examples/custom_recipe.py
"""

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from fxslice import InvalidOption, Pass, PassResult, capture
from fxslice.analysis.matchers import match_linear
from fxslice.core import relative_error
from fxslice.core.graph import set_tensor, tensor_of
from fxslice.passes import STAGES
from fxslice.passes.rewrite.stages import Cleanup
from fxslice.passes.slicegpt.stages import SliceGPT
from fxslice.recipes import Recipe, Stage
from fxslice.testing import tiny_causal_lm


class RoundLinearWeights(Pass):
    """Symmetric round-to-nearest of every linear's weight to `bits`, one scale per output row (lossy)."""

    name = "round_linear_weights"
    exact = False

    def __init__(self, bits: int = 8):
        self.bits = bits

    def call(self, program):
        levels = 2 ** (self.bits - 1) - 1
        seen = set()
        for node in program.graph.nodes:
            use = match_linear(program.gm, node)
            if use is None or use.weight.target in seen:
                continue
            seen.add(use.weight.target)
            w = tensor_of(program.gm, use.weight)
            scale = w.abs().amax(dim=use.in_axis, keepdim=True).clamp_min(1e-12) / levels
            set_tensor(program.gm, str(use.weight.target), torch.round(w / scale) * scale)
        return PassResult(bool(seen), {"linears": len(seen), "bits": self.bits})


@dataclass(frozen=True, kw_only=True)
class RoundWeights(Stage):
    kind = "round_weights"
    needs = frozenset({"captured", "clean"})
    provides = frozenset({"quantized"})

    bits: int = 8

    def __post_init__(self):
        if not 2 <= self.bits <= 16:
            raise InvalidOption(f"round_weights: bits must be in [2, 16], got {self.bits}")

    def run(self, program, context):
        return self.run_passes(program, [RoundLinearWeights(self.bits)], context)


if __name__ == "__main__":
    program = capture(tiny_causal_lm("llama"))
    ids = program.probe_input()
    with torch.no_grad():
        dense = program(ids)
    calibration = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))

    recipe = Recipe((Cleanup(), SliceGPT(sparsity=0.25), RoundWeights(bits=6)), name="slice then round")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        recipe.save(path)
        print(path.read_text())
        # the built-in stages and ours by name (`fxslice compress` takes `examples/custom_recipe.py:RoundWeights`)
        again = Recipe.load(path, {**STAGES, RoundWeights.kind: RoundWeights})
    assert again == recipe
    result = again.run(program, calibration=calibration)
    for stage, done in result.stages:
        print(f"{stage.kind:14s} {done.seconds:6.2f}s  " + "; ".join(r.summary() for r in done.records))
    with torch.no_grad():
        error = relative_error(program(ids), dense)
    print(f"parameters {result.dense_parameters:,} -> {result.parameters:,}; max relative logit change {error:.3f}")

    try:
        Recipe((Cleanup(), RoundWeights(bits=6), SliceGPT(sparsity=0.25)))
    except InvalidOption as exc:
        print(f"refused before running: {exc}")
