"""Low-rank adapters as graph edits: inserted exactly (the function does not change until they are trained)
and merged back exactly (the saved model has no adapter left and the size it had before).

An adapter on the weight `W` of a linear adds `scale · (x Aᵀ) Bᵀ` to its output, with `A` [rank, in] drawn at
random and `B` [out, rank] zero, as LoRA does. One adapter per *weight*, shared by every linear that reads it,
so that merging (`W += scale · B A`) is exact whatever the graph does with the weight. peft cannot be used here:
it wraps `nn.Linear` modules, and a captured graph has none — its linears are `aten.linear`/`mm` calls on
parameters, which is exactly what these passes edit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fxslice import InvalidOption, Pass, PassResult, Program
from fxslice.analysis.linears import weight_kinds
from fxslice.analysis.matchers import LinearUse, match_linear
from fxslice.analysis.weights import insert_low_rank
from fxslice.core.graph import add_parameter, drop_unused_weights, set_tensor, tensor_of

__all__ = ["Adapter", "InsertAdapters", "MergeAdapters", "adapters", "adaptable_linears", "add_low_rank",
           "low_rank_updates"]

_ROLE = "adapter"
_META = "fxslice_adapter"  # on the `add` that joins an adapter to its linear: the adapted weight's target


@dataclass(frozen=True)
class Adapter:
    """One adapter in the graph: the weight it corrects and its factors' targets."""

    weight: str
    a: str
    b: str
    scale: float


def adaptable_linears(program: Program, *, head: bool = False) -> dict[str, list[LinearUse]]:
    """Per weight target, the linears that read it: 2-D weights only (batched expert weights are left alone),
    never a table an embedding also reads (a tied head: changing it would change the embedding), and the
    linear that produces the logits only with `head`."""
    kinds = weight_kinds(program, skip_role=_ROLE)
    found = dict(kinds.linears)
    if head and kinds.head is not None and kinds.head_uses:
        found[kinds.head] = kinds.head_uses
    return found


def adapters(program: Program) -> list[Adapter]:
    """The adapters in the graph now, one per adapted weight."""
    out: dict[str, Adapter] = {}
    for node in program.graph.nodes:
        if _META in node.meta and node.meta[_META] not in out:
            scaled = node.args[1]  # add(linear output, mul(linear(linear(x, A), B), scale))
            up = scaled.args[0]
            down = up.args[0]
            out[node.meta[_META]] = Adapter(node.meta[_META], str(down.args[1].target), str(up.args[1].target),
                                            float(scaled.args[1]))
    return list(out.values())


class InsertAdapters(Pass):
    """Put a zero-initialised rank-`rank` adapter on every adaptable linear's weight (see `adaptable_linears`);
    a program that has adapters already is left alone. Exact: `B = 0`, so every output is unchanged to the last
    bit. Their parameters are `fxslice.lora_a_*` and
    `fxslice.lora_b_*`; `adapters(program)` lists them, `MergeAdapters` folds them into the weights."""

    name = "insert_adapters"
    exact = True

    def __init__(self, rank: int = 8, alpha: float = 16.0, *, head: bool = False, seed: int = 0):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise InvalidOption(f"adapters: rank must be a positive integer, got {rank!r}")
        if not isinstance(alpha, (int, float)) or alpha <= 0:
            raise InvalidOption(f"adapters: alpha must be positive, got {alpha!r}")
        self.rank, self.alpha, self.head, self.seed = rank, float(alpha), head, seed

    def requires(self, program: Program) -> None:
        if not adapters(program) and not adaptable_linears(program, head=self.head):
            raise InvalidOption("no linear with a 2-D weight to adapt was found in the graph (tied tables and the "
                                "head are left out unless head=True)")

    def call(self, program: Program) -> PassResult:
        gm = program.gm
        if adapters(program):  # idempotent: an adapted program is left as it is
            return PassResult(False, {"adapters": len(adapters(program))})
        generator = torch.Generator().manual_seed(self.seed)
        scale = self.alpha / self.rank
        count = 0
        for target, uses in adaptable_linears(program, head=self.head).items():
            weight = tensor_of(gm, target)
            d_in, d_out = weight.shape[uses[0].in_axis], weight.shape[uses[0].out_axis]
            rank = min(self.rank, d_in, d_out)
            bound = 1 / math.sqrt(d_in)  # nn.Linear's default range: the adapter's input scale matches W's
            a = (torch.rand(rank, d_in, generator=generator, dtype=torch.float64) * 2 - 1) * bound
            a_name = add_parameter(gm, "lora_a", a.to(weight.dtype).to(weight.device))  # the same draw on any device
            b_name = add_parameter(gm, "lora_b", torch.zeros(d_out, rank, dtype=weight.dtype, device=weight.device))
            for use in uses:
                joined = insert_low_rank(gm, use.input, use.output, a_name, b_name, role=_ROLE, scale=scale)
                joined.meta[_META] = target
            count += 1
        return PassResult(count > 0, {"adapters": count, "rank": self.rank, "scale": scale})


class MergeAdapters(Pass):
    """Fold every adapter into its weight (`W += scale · B A`, in float64) and take it out of the graph: the
    program computes what it computed with the adapters, within round-off, at the size it had before."""

    name = "merge_adapters"
    exact = True

    def call(self, program: Program) -> PassResult:
        gm, graph = program.gm, program.graph
        updates = low_rank_updates(program)
        for target, (left, right) in updates.items():
            add_low_rank(program, target, left, right)
        for node in [n for n in graph.nodes if _META in n.meta]:
            node.replace_all_uses_with(node.args[0])
        for node in reversed(list(graph.nodes)):
            if node.meta.get("fxslice_role") == _ROLE and not node.users:
                graph.erase_node(node)
        drop_unused_weights(gm)
        return PassResult(bool(updates), {"merged": len(updates)})


def low_rank_updates(program: Program) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """What the adapters add to each weight, as float64 factors `(L, R)` with `ΔW = L @ R` in the parameter's
    own layout (out x in for nn.Linear, in x out for Conv1D/addmm weights)."""
    gm = program.gm
    layout = {str(u.weight.target): u.out_axis % 2 == 0
              for n in program.graph.nodes if (u := match_linear(gm, n)) is not None}
    updates = {}
    for adapter in adapters(program):
        b = adapter.scale * tensor_of(gm, adapter.b).detach().double()
        a = tensor_of(gm, adapter.a).detach().double()
        updates[adapter.weight] = (b, a) if layout[adapter.weight] else (a.T, b.T)
    return updates


def add_low_rank(program: Program, target: str, left: torch.Tensor, right: torch.Tensor) -> None:
    """`W += left @ right`, computed in float64 and stored in W's dtype."""
    weight = tensor_of(program.gm, target)
    delta = left.double() @ right.double()
    if delta.shape != weight.shape:
        raise InvalidOption(f"a low-rank update of shape {tuple(delta.shape)} does not fit '{target}' "
                            f"{tuple(weight.shape)}: was the model pruned or sliced differently?")
    set_tensor(program.gm, target, (weight.double() + delta.to(weight.device)).to(weight.dtype).contiguous())
