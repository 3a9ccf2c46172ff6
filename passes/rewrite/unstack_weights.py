"""Stacked weights read one slice at a time become one weight per slice.

Some mixtures of experts keep all experts' matrices in one 3-D parameter and run expert `i` as
`linear(x_i, W[i])` (JetMoE's `ParallelExperts`): in the graph, `select(W, 0, i)` with a constant `i`
feeds an ordinary linear. When every read of such a parameter is a constant `select` along its first
dimension, the parameter is split into 2-D parameters `<name>_<i>` (registered beside it) and each
`select` becomes a read of its slice: the function is the same, and every later analysis sees plain
linears, whose weights passes can change one by one. Parameters read any other way are left alone.
"""

from __future__ import annotations

from torch import fx, nn

from fxslice import Pass, PassResult, Program
from fxslice.core.graph import aten, is_param, owner_of, tensor_of

__all__ = ["UnstackWeights"]


def _constant_selects(node: fx.Node) -> dict[int, list[fx.Node]] | None:
    """`{i: [select nodes]}` when every user of `node` is `select(node, 0, i)` with a constant `i`, else None."""
    found: dict[int, list[fx.Node]] = {}
    for user in node.users:
        if user.target != aten.select.int or user.args[0] is not node or len(user.args) != 3 or user.kwargs:
            return None
        dim, index = user.args[1], user.args[2]
        if dim != 0 or not isinstance(index, int):
            return None
        found.setdefault(index, []).append(user)
    return found or None


class UnstackWeights(Pass):
    name = "unstack_weights"
    exact = True

    def call(self, program: Program) -> PassResult:
        gm, graph = program.gm, program.graph
        reads: dict[str, list[fx.Node]] = {}
        for node in graph.find_nodes(op="get_attr"):
            if is_param(gm, node) and tensor_of(gm, node).dim() == 3:
                reads.setdefault(str(node.target), []).append(node)
        split = 0
        for target, nodes in reads.items():
            selects = [_constant_selects(node) for node in nodes]
            if any(s is None for s in selects):
                continue
            stacked = tensor_of(gm, target)
            owner, name = owner_of(gm, target)
            n = stacked.shape[0]
            for node, found in zip(nodes, selects, strict=True):
                for index, users in found.items():
                    part = f"{name}_{index % n}"
                    if not hasattr(owner, part):
                        value = stacked[index].detach().clone()
                        if name in owner._parameters:
                            owner.register_parameter(part, nn.Parameter(value, requires_grad=stacked.requires_grad))
                        else:
                            owner.register_buffer(part, value)
                    with graph.inserting_before(users[0]):
                        read = graph.get_attr(f"{target}_{index % n}")
                    read.meta = {**users[0].meta}
                    for user in users:
                        user.replace_all_uses_with(read)
                        graph.erase_node(user)
                graph.erase_node(node)
            delattr(owner, name)
            split += 1
        if split:
            graph.lint()
            gm.recompile()
        return PassResult(bool(split), {"unstacked": split})
