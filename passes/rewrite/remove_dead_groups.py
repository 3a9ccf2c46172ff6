"""Remove dead dimension groups: the pruned model becomes a smaller dense model. Exact.

A group (`fxslice.analysis.groups`) is dead when every column it owns in the linears that read it is
zero: whatever its channels carry is multiplied by zero, so deleting the channels — the producers' rows
and biases, the readers' columns — changes nothing. Sizes written as literals in views, reshapes,
expands, slices and splits along those channels are rewritten to the kept counts, and a KV cache that
holds them (a graph input) shrinks in `Program.cache`; a group whose sizes cannot be rewritten (a symbolic
size, a pattern that is not a product of per-dimension masks) stays.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import torch
from torch import fx

from fxslice import Pass, PassResult, Program
from fxslice.analysis.groups import DimensionGroup, Groups, group_analysis
from fxslice.core.graph import aten, refresh_vals, set_tensor, tensor_of

__all__ = ["RemoveDeadGroups", "dead_groups", "removable_groups"]


def dead_groups(program: Program, groups: Groups) -> list[int]:
    """Indices of groups whose reader columns are all zero (a column of shape only, in a `Program.skeleton`,
    is not known to be)."""
    gm = program.gm
    dead = []
    for i, group in enumerate(groups.groups):
        if all(_is_zero(_column(gm, groups, u.weight, u.index)) for u in group.cols):
            dead.append(i)
    return dead


def _is_zero(column: torch.Tensor) -> bool:
    return column.device.type != "meta" and bool(column.eq(0).all())


def _column(gm: fx.GraphModule, groups: Groups, weight: str, index: int) -> torch.Tensor:
    use = groups.linears[weight]
    return tensor_of(gm, use.weight).select(use.in_axis, index)


def _keep_one_per_site(groups: Groups, dead: set[int]) -> set[int]:
    """A view of attention heads (or MLP channels) cannot shrink to nothing: where every group a sized op
    carries is dead, the first of them stays (zero, so the model is the same)."""
    dead = set(dead)
    for index in groups.sites.values():
        present = {int(i) for i in index.unique()} - {-1}
        if present and present <= dead:
            dead.discard(min(present))
    return dead


def removable_groups(groups: Groups) -> set[int]:
    """Indices of the groups that this pass could delete once dead (each alone): a pruning method should
    choose among these, or it zeroes what stays."""
    present: set[int] = set()
    for _, index in groups.operands:
        present |= {int(i) for i in index.unique()} - {-1}
    blocked = {i for i in present if not _fit_operands(groups, {i})}
    return set(range(len(groups.groups))) - blocked


def _fit_operands(groups: Groups, dead: set[int]) -> set[int]:
    """Keep the dead groups whose removal would shrink a dimension along which an untracked operand (a
    residual added to the channels, say) has several elements: that operand cannot shrink with them."""
    dead = set(dead)
    changed = True
    while changed and dead:
        changed = False
        dead_index = torch.tensor(sorted(dead), dtype=torch.long)
        for shape, index in groups.operands:
            kept = ~torch.isin(index, dead_index)
            if bool(kept.all()):
                continue
            for d, size in enumerate(shape):
                along = kept.movedim(d, 0).reshape(kept.shape[d], -1).any(1)
                if size > 1 and not bool(along.all()):
                    stay = {int(i) for i in index.movedim(d, 0)[~along].unique()} & dead
                    if stay:
                        dead -= stay
                        changed = True
    return dead


def _separable(kept: torch.Tensor) -> list[torch.Tensor] | None:
    """Per dimension, which indices stay; None when the kept set is not their product."""
    masks = [kept.movedim(d, 0).reshape(kept.shape[d], -1).any(1) for d in range(kept.dim())]
    product = torch.ones_like(kept)
    for d, m in enumerate(masks):
        shape = [1] * kept.dim()
        shape[d] = -1
        product = product & m.reshape(shape)
    return masks if torch.equal(product, kept) else None


class RemoveDeadGroups(Pass):
    name = "remove_dead_groups"
    exact = True

    def call(self, program: Program) -> PassResult:
        groups = program.analysis(group_analysis)
        dead = _fit_operands(groups, _keep_one_per_site(groups, set(dead_groups(program, groups))))
        if not dead:
            return PassResult(False)
        edits = self._size_edits(groups, dead)
        if edits is None:
            return PassResult(False, {"skipped": len(dead), "why": "sizes along the channels cannot be rewritten"})
        gm = program.gm
        rows: dict[str, set[int]] = defaultdict(set)
        cols: dict[str, set[int]] = defaultdict(set)
        for i in dead:
            for u in groups.groups[i].rows:
                rows[u.weight].add(u.index)
            for u in groups.groups[i].cols:
                cols[u.weight].add(u.index)
        for weight in sorted(set(rows) | set(cols)):
            use = groups.linears[weight]
            value = tensor_of(gm, use.weight)
            for axis, drop in ((use.out_axis, rows.get(weight, ())), (use.in_axis, cols.get(weight, ()))):
                if drop:
                    keep = torch.tensor([i for i in range(value.shape[axis]) if i not in drop], dtype=torch.long)
                    value = value.index_select(axis, keep.to(value.device))
                    if axis == use.out_axis and use.bias is not None and use.bias.op == "get_attr":
                        bias = tensor_of(gm, use.bias)
                        set_tensor(gm, str(use.bias.target), bias.index_select(bias.dim() - 1, keep.to(bias.device)))
            set_tensor(gm, weight, value)
        for node, args in edits.items():
            if node.op == "placeholder":
                self._shrink_cache(program, node, args)
            else:
                node.args = args
        refresh_vals(gm)
        removed = [groups.groups[i] for i in sorted(dead)]
        return PassResult(True, {"groups": len(removed), "mlp_channels": _count(removed, "mlp_channel"),
                                 "head_groups": _count(removed, "heads"), "removed": sorted(dead)})

    @staticmethod
    def _shrink_cache(program: Program, node: fx.Node, shape: tuple) -> None:
        """A cache input of kept (heads, head_dim): the layout the caller allocates, and the input's fake value."""
        index = program.input_names.index(str(node.target)) - 2  # after input_ids and past_length
        shapes = list(program.cache.shapes)
        shapes[index] = (int(shape[1]), int(shape[3]))
        program.cache = replace(program.cache, shapes=tuple(shapes))
        old = node.meta.get("val")
        if isinstance(old, torch.Tensor):
            node.meta["val"] = old.new_empty((old.shape[0], shape[1], old.shape[2], shape[3]))

    @staticmethod
    def _size_edits(groups: Groups, dead: set[int]) -> dict[fx.Node, tuple] | None:
        """New arguments of every sized op on the channel paths, or None if one cannot be rewritten."""
        dead_index = torch.tensor(sorted(dead), dtype=torch.long)
        edits: dict[fx.Node, tuple] = {}
        for node, index in groups.sites.items():
            kept = ~torch.isin(index, dead_index)
            if bool(kept.all()):
                continue
            masks = _separable(kept)
            if masks is None:
                return None
            if node.op == "placeholder":  # a KV cache, [batch, heads, positions, head_dim]
                if kept.dim() != 4 or not (bool(masks[0].all()) and bool(masks[2].all())):
                    return None
                edits[node] = tuple(int(m.sum()) for m in masks)
                continue
            args = _rewrite(node, masks, index.shape)
            if args is None:
                return None
            edits[node] = args
        return edits


def _count(groups: list[DimensionGroup], kind: str) -> int:
    return sum(g.kind == kind for g in groups)


def _rewrite(node: fx.Node, masks: list[torch.Tensor], shape: torch.Size) -> tuple | None:
    """`node`'s arguments with sizes along shrinking dimensions replaced by the kept counts."""
    target, args = node.target, list(node.args)
    shrinking = [d for d, m in enumerate(masks) if not bool(m.all())]
    if target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default):
        sizes = list(args[1])
        if len(sizes) != len(masks):
            return None
        for d in shrinking:
            if sizes[d] == -1:
                continue
            if not isinstance(sizes[d], int):
                return None  # a symbolic size along a channel
            sizes[d] = int(masks[d].sum())
        args[1] = sizes
        return tuple(args)
    dim = (args[2] if len(args) > 2 else node.kwargs.get("dim", 0)) if target in (
        aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default) else args[1]
    dim = dim % len(shape)
    if dim not in shrinking:
        return tuple(args)  # channels go along another dimension: this cut stays where it is
    kept_before = torch.cat([torch.zeros(1, dtype=torch.long), masks[dim].long().cumsum(0)])
    if target == aten.slice.Tensor:
        start = 0 if len(args) < 3 or args[2] is None else args[2]
        end = shape[dim] if len(args) < 4 or args[3] is None else args[3]
        step = args[4] if len(args) > 4 else 1
        if not all(isinstance(v, int) for v in (start, end)) or step != 1:
            return None
        start, end = (min(max(v + shape[dim] if v < 0 else v, 0), shape[dim]) for v in (start, end))
        return (args[0], args[1], int(kept_before[start]), int(kept_before[end]), *args[4:])
    if target == aten.narrow.default:
        start, length = args[2], args[3]
        return (args[0], args[1], int(kept_before[start]), int(kept_before[start + length] - kept_before[start]))
    if target == aten.split_with_sizes.default:
        bounds = torch.tensor([0, *args[1]]).cumsum(0)
        return (args[0], [int(kept_before[b] - kept_before[a]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)],
                *args[2:])
    if target == aten.split.Tensor:
        size = args[1]
        bounds = list(range(0, shape[dim], size)) + [shape[dim]]
        new = {int(kept_before[b] - kept_before[a]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)}
        return (args[0], new.pop(), *args[2:]) if len(new) == 1 else None
    if target == aten.chunk.default:
        size = -(-shape[dim] // args[1])
        bounds = list(range(0, shape[dim], size)) + [shape[dim]]
        new = {int(kept_before[b] - kept_before[a]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)}
        return tuple(args) if len(new) == 1 else None  # the count stays; the chunks must shrink alike
    return None
