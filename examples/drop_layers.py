"""A structural pass with an argument: drop the last `n` decoder layers.

Each layer is found from the graph (the modules whose branches write into the residual stream), removed with
`fxslice.analysis.edits.drop_layer`, and dead-code elimination takes its weights, its norms and its KV-cache updates.
Lossy: the manager measures how far it moves the logits.

In a recipe (a pass with arguments):  - {stage: passes, passes: [{pass: drop_layers.py:DropLastLayers, n: 2}]}
Run it:  python examples/drop_layers.py
"""

from fxslice import InvalidOption, Pass, PassManager, capture
from fxslice.analysis.edits import drop_layer
from fxslice.analysis.stream import stream_analysis
from fxslice.core.graph import module_path


class DropLastLayers(Pass):
    name = "drop_last_layers"
    exact = False

    def __init__(self, n: int = 1):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidOption(f"drop_last_layers: n must be a positive integer, got {n!r}")
        self.n = n

    def call(self, program):
        layers = []  # the modules writing into the stream, in graph order: "model.layers.3" for ".3.mlp.down_proj"
        for writer in program.analysis(stream_analysis).writers:
            if writer.kind == "linear":
                layer = module_path(writer.output).rsplit(".", 2)[0]
                layers += [layer] if layer not in layers else []
        if self.n >= len(layers):
            raise InvalidOption(f"drop_last_layers: the model has {len(layers)} layers; n={self.n} would leave none")
        for layer in layers[-self.n:]:
            drop_layer(program, layer)
        return True


if __name__ == "__main__":
    from fxslice.testing.tiny_models import tiny_causal_lm

    program = capture(tiny_causal_lm("llama"))
    before = program.num_parameters()
    result = PassManager([DropLastLayers(1)]).run(program)
    print(result.text())
    print(f"parameters {before:,} -> {program.num_parameters():,}")
