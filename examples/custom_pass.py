"""A custom pass in ~25 lines: fold a constant scale `y = x * c` into the linear that reads it.

    x * c -> linear(., W, b)   becomes   linear(x, c * W, b)

Only where nothing else reads `W`: a weight tied to another use (an embedding table shared with the head) would be
scaled for that use too, so such a scale is left alone.

Run it:  python examples/custom_pass.py
"""

import torch
from torch import nn

from fxslice import Pass, PassManager, PassResult, capture
from fxslice.core.graph import aten, set_tensor, tensor_of


class FoldScaleIntoLinear(Pass):
    name = "fold_scale_into_linear"
    exact = True

    def call(self, program):
        changed = False
        for node in list(program.graph.nodes):
            if node.target != aten.mul.Tensor or not isinstance(node.args[1], (int, float)):
                continue
            readers = list(node.users)
            if not readers or any(u.target != aten.linear.default or u.args[0] is not node for u in readers):
                continue
            weights = {str(u.args[1].target) for u in readers}
            if any(_read_elsewhere(program, w, readers) for w in weights):
                continue
            for weight in weights:
                set_tensor(program.gm, weight, tensor_of(program.gm, weight) * node.args[1])
            node.replace_all_uses_with(node.args[0])
            program.graph.erase_node(node)
            changed = True
        return PassResult(changed)


def _read_elsewhere(program, weight, readers):
    """Whether the tensor `weight` (under any name: ties) is used by a node other than `readers`."""
    tensor = tensor_of(program.gm, weight)
    uses = [u for n in program.graph.find_nodes(op="get_attr") if tensor_of(program.gm, n) is tensor for u in n.users]
    return any(u not in readers for u in uses)


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.proj = nn.Embedding(50, 16), nn.Linear(16, 50)

    def forward(self, input_ids, use_cache=False):
        return self.proj(self.embed(input_ids) * 0.5)


if __name__ == "__main__":
    torch.manual_seed(0)
    program = capture(Scaled())
    result = PassManager([FoldScaleIntoLinear()], check_numerics=True).run(program)
    print(result.text())
