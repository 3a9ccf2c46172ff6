"""A custom pass in ~20 lines: fold a constant scale `y = x * c` into the linear that reads it.

    x * c -> linear(., W, b)   becomes   linear(x, c * W, b)

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
            for linear in readers:
                weight = linear.args[1]
                set_tensor(program.gm, weight.target, tensor_of(program.gm, weight) * node.args[1])
            node.replace_all_uses_with(node.args[0])
            program.graph.erase_node(node)
            changed = True
        return PassResult(changed)


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
