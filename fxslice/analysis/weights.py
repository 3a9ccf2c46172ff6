"""Exact edits of the weights behind linear-like ops and embeddings, computed in float64.

`transform_input(use, M)`: the op now reads `x @ M` instead of `x` (its weight absorbs M⁻¹ = Mᵀ for
orthogonal M; for a diagonal scale it absorbs the scale), `transform_output(use, M)`: the op now
writes `y @ M`. Both contract one axis of the weight parameter with M, so they work for nn.Linear
(out x in), Conv1D (in x out) and stacked expert weights alike. A parameter shared by several ops
(tied embeddings) is copied first, so only the op being edited changes.
"""

from __future__ import annotations

import torch
from torch import fx

from fxslice.analysis.matchers import LinearUse, match_linear
from fxslice.core.disk import DiskTensor
from fxslice.core.graph import (
    add_parameter,
    aten,
    insert_op,
    module_path,
    owner_of,
    readers_of,
    set_role,
    set_tensor,
    tensor_of,
)

__all__ = ["contract", "transform_input", "transform_output", "transform_table", "transform_vector", "add_input_shift", "own_weight", "private_weight",
           "insert_linear", "insert_low_rank", "remove_linear", "replace_weight", "weight_matrix"]


#: float64 numbers of a weight contracted at a time: a whole table in float64, and its product, would be four times
#: its float32 self (SmolLM2's: 0.9 GB; a 7 B model's: 2 GB)
CONTRACT_CHUNK = 1 << 22


def contract(t: torch.Tensor, axis: int, m: torch.Tensor) -> torch.Tensor:
    """`t` with index i along `axis` replaced by sum_i t[.., i, ..] m[i, j], in float64, cast back; a slab of
    `CONTRACT_CHUNK` numbers at a time, written into the contiguous result."""
    t = t.load() if isinstance(t, DiskTensor) else t.detach()  # read once, not once per slab
    m = m.to(t.device, torch.float64)
    axis %= t.dim()
    if t.dim() == 1:
        return (t.to(torch.float64) @ m).to(t.dtype)
    shape = list(t.shape)
    shape[axis] = m.shape[1]
    out = torch.empty(shape, dtype=t.dtype, device=t.device)  # contiguous: GEMM speed and safetensors
    along = 1 if axis == 0 else 0
    step = max(1, CONTRACT_CHUNK // max(1, t.numel() // max(1, t.shape[along])))
    for start in range(0, t.shape[along], step):
        size = min(step, t.shape[along] - start)
        slab = t.narrow(along, start, size).to(torch.float64).movedim(axis, -1) @ m
        out.narrow(along, start, size).copy_(slab.movedim(-1, axis))
    return out


def _set_param(gm: fx.GraphModule, node: fx.Node, value: torch.Tensor) -> None:
    set_tensor(gm, str(node.target), value)
    node.meta["val"] = tensor_of(gm, node).detach()  # what is stored: on disk, the value is not held here


def private_weight(gm: fx.GraphModule, weight: fx.Node, consumer: fx.Node) -> fx.Node:
    """The get_attr node `consumer` reads its weight through, copied first if anything else shares it."""
    tensor = tensor_of(gm, weight)
    if sum(len(n.users) for n in readers_of(gm, tensor)) <= 1:
        return weight
    stem = module_path(consumer).replace(".", "_") + "_" + str(weight.target).rpartition(".")[2]
    target = add_parameter(gm, stem, tensor.detach().clone())
    with gm.graph.inserting_before(consumer):
        copy = gm.graph.get_attr(target)
    copy.meta["val"] = tensor.detach()
    consumer.replace_input_with(weight, copy)
    return copy


def _weight_consumer(use: LinearUse) -> fx.Node:
    """The node that reads the weight's get_attr directly (the op itself or a transpose in front of it)."""
    node = use.node
    while use.weight not in node.all_input_nodes:
        node = next(a for a in node.all_input_nodes if a.op == "call_function" and a is not use.input)
    return node


def weight_matrix(gm: fx.GraphModule, use: LinearUse) -> torch.Tensor:
    """A plain 2-D weight as an out x in float64 matrix (`y = x Wᵀ`), whatever its layout (nn.Linear or Conv1D)."""
    w = tensor_of(gm, use.weight).detach().to(torch.float64)
    return w if use.out_axis % 2 == 0 else w.T


def own_weight(gm: fx.GraphModule, use: LinearUse) -> str:
    """Make `use` read a weight nothing else reads (a copy, if the parameter is shared: a tied head, say); returns
    its name."""
    return str(private_weight(gm, use.weight, _weight_consumer(use)).target)


def replace_weight(gm: fx.GraphModule, use: LinearUse, value: torch.Tensor) -> str:
    """Give `use` the weight `value` (same layout as its parameter), copying a shared parameter first;
    returns the name it was stored under."""
    weight = private_weight(gm, use.weight, _weight_consumer(use))
    _set_param(gm, weight, value)
    return str(weight.target)


def transform_input(gm: fx.GraphModule, use: LinearUse, m: torch.Tensor) -> None:
    """Make `use` compute the same output from the input `x @ m` (m orthogonal or diagonal: pass m itself)."""
    weight = private_weight(gm, use.weight, _weight_consumer(use))
    _set_param(gm, weight, contract(tensor_of(gm, weight), use.in_axis, m))


def transform_output(gm: fx.GraphModule, use: LinearUse, m: torch.Tensor) -> None:
    """Make `use` produce `y @ m` instead of `y` (weight and bias)."""
    weight = private_weight(gm, use.weight, _weight_consumer(use))
    _set_param(gm, weight, contract(tensor_of(gm, weight), use.out_axis, m))
    if use.bias is not None:
        bias = private_weight(gm, use.bias, use.output)
        _set_param(gm, bias, contract(tensor_of(gm, bias), -1, m))


def transform_table(gm: fx.GraphModule, lookup: fx.Node, m: torch.Tensor) -> None:
    """Make the embedding lookup `lookup` return rows `e @ m`."""
    table = private_weight(gm, lookup.args[0], lookup)
    _set_param(gm, table, contract(tensor_of(gm, table), -1, m))


def transform_vector(gm: fx.GraphModule, total: fx.Node, m: torch.Tensor) -> None:
    """Make the sum `total` = `x ± b` of a value and a parameter vector `b` add (or subtract) `b @ m`."""
    vector = private_weight(gm, total.args[1], total)
    _set_param(gm, vector, contract(tensor_of(gm, vector), -1, m))


def add_input_shift(gm: fx.GraphModule, use: LinearUse, shift: torch.Tensor) -> None:
    """Make `use` compute from `x` what it computed from `x + shift`: adds `shift @ A` to the bias, or, for
    batched (expert) weights without one, inserts `x + shift` in front (a parameter in `x`'s basis)."""
    weight = tensor_of(gm, use.weight)
    delta = contract(weight.to(torch.float64).movedim(use.in_axis, -1), -1, shift.reshape(-1, 1)).squeeze(-1)
    if use.bias is not None:
        bias = private_weight(gm, use.bias, use.output)
        current = tensor_of(gm, bias)
        _set_param(gm, bias, (current.to(torch.float64) + delta).to(current.dtype))
        return
    if delta.dim() != 1:  # one weight per expert and no bias: keep `x + shift` in front, in the input's basis
        target = add_parameter(gm, module_path(use.node).replace(".", "_") + "_shift", shift.to(weight.dtype))
        with gm.graph.inserting_before(use.node):
            vector = gm.graph.get_attr(target)
            vector.meta["val"] = tensor_of(gm, target)
            shifted = insert_op(gm.graph, aten.add.Tensor, (use.input, vector), like=use.input)
        use.node.replace_input_with(use.input, shifted)
        return
    target = add_parameter(gm, module_path(use.node).replace(".", "_") + "_bias", delta.to(weight.dtype))
    with gm.graph.inserting_before(use.node):
        bias_node = gm.graph.get_attr(target)
    bias_node.meta["val"] = tensor_of(gm, target)
    if use.node.target == aten.linear.default:
        use.node.args = (use.node.args[0], use.node.args[1], bias_node)
        return
    with gm.graph.inserting_after(use.output):  # a matmul without a bias slot: add one after it
        biased = insert_op(gm.graph, aten.add.Tensor, (use.output, bias_node), like=use.output)
    use.output.replace_all_uses_with(biased, delete_user_cb=lambda user: user is not biased)


def insert_linear(gm: fx.GraphModule, source: fx.Node, weight: torch.Tensor, *, stem: str,
                  users: list[fx.Node] | None = None, role: str | None = None) -> LinearUse:
    """Insert `source @ weightᵀ` (a new parameter `fxslice.<stem>_N`) and feed it to `users` (all by default)
    instead of `source`. `role` is recorded with `set_role` (`fxslice.analysis.roles`)."""
    graph = gm.graph
    users = list(source.users) if users is None else users
    target = add_parameter(gm, stem, weight.to(source.meta["val"].dtype))
    with graph.inserting_after(source):
        param = graph.get_attr(target)
    param.meta["val"] = tensor_of(gm, target)
    with graph.inserting_after(param):
        node = insert_op(graph, aten.linear.default, (source, param), like=users[0] if users else source)
    if role is not None:
        set_role(node, role)
    for user in users:
        user.replace_input_with(source, node)
    return match_linear(gm, node)


def insert_low_rank(gm: fx.GraphModule, source: fx.Node, output: fx.Node, a: str, b: str, *, role: str,
                    scale: float | None = None) -> fx.Node:
    """Make every user of `output` read `output + scale · (source @ Aᵀ) @ Bᵀ` instead, A and B being the stored
    parameters `a` (r x d_in) and `b` (d_out x r); returns the add. The new nodes, in the order get_attr A,
    get_attr B, down, up, [scaled,] add, all carry `role`, so that a pass can find the branch again."""
    graph = gm.graph
    params, last = [], output
    for name in (a, b):
        with graph.inserting_after(last):
            last = graph.get_attr(name)
        last.meta["val"] = tensor_of(gm, name)
        params.append(last)
    with graph.inserting_after(last):
        down = insert_op(graph, aten.linear.default, (source, params[0]), like=output)
    with graph.inserting_after(down):
        branch = up = insert_op(graph, aten.linear.default, (down, params[1]), like=output)
    added = [*params, down, up]
    if scale is not None:
        with graph.inserting_after(up):
            branch = insert_op(graph, aten.mul.Tensor, (up, scale), like=output)
        added.append(branch)
    with graph.inserting_after(branch):
        joined = insert_op(graph, aten.add.Tensor, (output, branch), like=output)
    output.replace_all_uses_with(joined, delete_user_cb=lambda user: user is not joined)
    for node in (*added, joined):
        set_role(node, role)
    return joined


def remove_linear(gm: fx.GraphModule, use: LinearUse) -> None:
    """Undo `insert_linear` (its matrix turned out to be the identity): users read the input again."""
    use.output.replace_all_uses_with(use.input)
    target = str(use.weight.target)
    for node in dict.fromkeys((use.output, use.node, use.weight)):
        if not node.users:
            gm.graph.erase_node(node)
    owner, name = owner_of(gm, target)
    if not any(n.target == target for n in gm.graph.find_nodes(op="get_attr")):
        owner._parameters.pop(name, None)
