"""The LLM Surgeon's own structures, zero-masked (arXiv 2312.17244, as its official code does it): rows and
columns of every decoder linear ("rows_columns"), single weights ("unstructured"), or two of every four
consecutive weights along a row ("2:4", the pattern of sparse tensor cores).

Each shot: per decoder linear, `A` and `G` from the calibration service; the cost of every structure alone
(`obs.structure_costs`); one threshold across all linears of all layers that zeroes the shot's cumulative
share of the decoder linears' weights (`target` · shot / shots — the paper's sparsity, not a count of model
parameters); the correlated update of what stays (rows and columns: both OBS deltas of the matrix;
elements: OBS per row through A⁻¹); then `RemoveDeadGroups` deletes whatever whole groups died (a column of
`down_proj` zeroed kills its MLP channel), so the model shrinks where the mask allows. Zeros elsewhere cost
memory and time like any weight, unless a sparse kernel runs them (2:4 on a GPU).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from fxslice import InvalidOption, Pass, PassManager, PassResult, Program, UnsupportedStructure
from fxslice.analysis.groups import DimensionGroup, group_analysis
from fxslice.calibration.gradients import mean_loss
from fxslice.calibration.moments import linear_statistics
from fxslice.core.graph import module_path
from fxslice.core.progress import progress_bar
from fxslice.passes.rewrite.remove_dead_groups import RemoveDeadGroups, removable_groups
from fxslice.passes.surgeon.base import SurgeonPass
from fxslice.passes.surgeon.curvature import (
    Factors,
    factors,
    needs_activations,
    needs_gradients,
    updates,
)
from fxslice.passes.surgeon.linears import decoder_linears, matrix_of, store_matrix
from fxslice.passes.surgeon.obs import StructureCosts, remove_elements, remove_rows_and_columns, structure_costs
from fxslice.passes.surgeon.options import MASKED_STRUCTURES, check_target

__all__ = ["SurgeonMask", "MaskReport", "MASKED_STRUCTURES"]

@dataclass(frozen=True)
class MaskReport:
    shot: int
    zeroed: int  # weights of the decoder linears that are zero or removed after the shot
    fraction: float  # zeroed / their dense count: the paper's sparsity
    parameters: int  # the model's parameters after the shot, counted on the graph (dead groups removed)
    predicted_loss_increase: float | None  # kfac: the chosen structures' costs summed (each alone) / tokens²
    loss_before: float
    loss_after: float
    per_module: dict[str, float]  # fraction of each module's decoder-linear weights zeroed or removed


class SurgeonMask(SurgeonPass):
    name = "surgeon_mask"

    def __init__(self, windows: torch.Tensor, *, target: float, shots: int = 4, structures: str = "rows_columns",
                 curvature: str = "kfac", damp_a: float = 0.01, damp_g: float = 0.01, batch_size: int = 1,
                 labels: str = "data", progress: bool = False,
                 after_shot: Callable[[dict[str, Any], list[Pass]], None] | None = None,
                 resume: dict[str, Any] | None = None):
        super().__init__(windows, shots=shots, curvature=curvature, batch_size=batch_size, labels=labels,
                         progress=progress, after_shot=after_shot, resume=resume)
        if structures not in MASKED_STRUCTURES:
            raise InvalidOption(f"surgeon: masked structures must be one of {MASKED_STRUCTURES}, got {structures!r}")
        target = check_target(target, structures)
        if not (damp_a > 0 and damp_g > 0):
            raise InvalidOption(f"surgeon: damping must be positive, got damp_a={damp_a}, damp_g={damp_g}")
        self.target, self.structures, self.damp_a, self.damp_g = float(target), structures, damp_a, damp_g
        self.reports: list[MaskReport] = []

    def call(self, program: Program) -> PassResult:
        state = self.resumed()
        if state is not None:  # the scope and sizes the first shot saw; the shots done
            return self._shots(program, state["scope"], state["dense"], [MaskReport(**r) for r in state["reports"]],
                               state["loss"])
        groups = program.analysis(group_analysis)
        scope = decoder_linears(groups)
        if not scope:
            raise UnsupportedStructure("surgeon: the graph has no decoder linears (no removable dimension groups); "
                                       "`fxslice inspect MODEL --groups` says what blocks them")
        uses = dict(groups.linears)
        if self.structures == "2:4":
            uneven = [w for w in scope if matrix_of(program, uses[w]).shape[1] % 4]
            if len(uneven) == len(scope):
                raise UnsupportedStructure("surgeon: 2:4 needs rows whose length is a multiple of 4; none is")
            scope = [w for w in scope if w not in uneven]
        dense = {w: matrix_of(program, uses[w]).numel() for w in scope}
        return self._shots(program, scope, dense, [], None)

    def _shots(self, program: Program, scope: list[str], dense: dict[str, int], reports: list[MaskReport],
               loss: float | None) -> PassResult:
        """The shots after `reports` (none, or those an interrupted run finished)."""
        total = sum(dense.values())
        self.reports, self.updated = list(reports), []
        batches = list(self.windows.split(self.batch_size))
        for shot in progress_bar(range(len(reports) + 1, self.shots + 1), "surgeon shots", enabled=self.progress):
            loss = mean_loss(program, batches, progress=self.progress) if loss is None else loss
            report = self._shot(program, shot, scope, dense, round(total * self.target * shot / self.shots), loss)
            loss = report.loss_after
            self.reports.append(report)
            self.shot_done(shot, scope=scope, dense=dense, loss=loss, reports=[asdict(r) for r in self.reports])
        return PassResult(True, {"structures": self.structures,
                                 "fraction_zeroed": [r.fraction for r in self.reports],
                                 "parameters": [r.parameters for r in self.reports]})

    def _shot(self, program: Program, shot: int, scope: list[str], dense: dict[str, int], goal: int,
              loss_before: float) -> MaskReport:
        groups = program.analysis(group_analysis)
        uses = groups.linears
        matrices = {w: matrix_of(program, uses[w]) for w in scope}
        gone = sum(dense[w] - m.numel() for w, m in matrices.items())  # removed for real by earlier shots
        stats = None
        if needs_activations(self.curvature):
            stats = linear_statistics(program, self.windows, batch_size=self.batch_size, linears=scope,
                                      gradients=needs_gradients(self.curvature), labels=self.labels,
                                      progress=self.progress)
        elements = self.structures != "rows_columns"

        def curvature(w: str) -> Factors:  # built twice (costs, then updates) rather than all kept at once
            return factors(stats, w, tuple(matrices[w].shape), self.curvature, damp_a=self.damp_a, damp_g=self.damp_g)

        costs = {w: _costs(m, curvature(w), elements=elements) for w, m in matrices.items()}
        removable = removable_groups(groups)
        dying = [g for i, g in enumerate(groups.groups) if i in removable]  # what RemoveDeadGroups would delete
        wanted = max(goal - gone, 0)
        if self.structures == "rows_columns":
            chosen, predicted = _threshold_rows_columns(matrices, costs, wanted, dying)
        else:
            pick = _threshold_elements if self.structures == "unstructured" else _threshold_blocks
            chosen, predicted = _with_dying_groups(pick, matrices, costs, wanted, dying)
        update = updates(self.curvature)
        written = {}
        for w, m in matrices.items():
            if self.structures == "rows_columns":
                rows, cols = chosen[w]
                if not rows and not cols:
                    continue
                f = curvature(w)
                new = remove_rows_and_columns(m, f.g_inv if update else None, f.a_inv if update else None, rows, cols)
            else:
                mask = chosen[w]
                if not mask.any():
                    continue
                new = remove_elements(m, curvature(w).a_inv if update else None, mask)
            written[w] = store_matrix(program, uses[w], new)
        program.mark_changed()
        self.updated.append(written)
        PassManager([RemoveDeadGroups()], check_numerics=False).run(program)
        uses = program.analysis(group_analysis).linears
        zeroed, per_module = 0, defaultdict(lambda: [0, 0])
        for w in scope:
            m = matrix_of(program, uses[w])
            z = dense[w] - int(m.count_nonzero())
            zeroed += z
            module = module_path(uses[w].node).rpartition(".")[0]
            per_module[module][0] += z
            per_module[module][1] += dense[w]
        tokens = self.windows[:, 1:].numel()
        loss_after = mean_loss(program, list(self.windows.split(self.batch_size)), progress=self.progress)
        return MaskReport(shot, zeroed, zeroed / sum(dense.values()), program.num_parameters(),
                          predicted / tokens**2 if self.curvature == "kfac" else None, loss_before, loss_after,
                          {k: round(z / n, 4) for k, (z, n) in per_module.items()})


def _costs(m: torch.Tensor, f: Factors, *, elements: bool) -> StructureCosts:
    """Every structure's cost alone; zero where it is dead already (a column that never sees input, a row
    no gradient reaches, weights that are zero). Element costs in float32, and only when asked for."""
    c = structure_costs(m, f.a, f.g, f.s, f.t, elements=elements)
    dead_cols = m.eq(0).all(0) | (f.a.diagonal() == 0 if f.a is not None else False)
    dead_rows = m.eq(0).all(1) | (f.g.diagonal() == 0 if f.g is not None else False)
    c.rows[dead_rows] = 0
    c.cols[dead_cols] = 0
    if c.elements is not None:
        c.elements[:, dead_cols] = 0
        c.elements[dead_rows] = 0
        c.elements[m.eq(0)] = 0
    return c


def _threshold_rows_columns(matrices, costs, wanted: int, groups: list[DimensionGroup]):
    """Rows and columns of all matrices, cheapest first, while the count of weights zeroed or removed stays
    within `wanted` (the official code's threshold; one that would overshoot is passed over, so that a head
    group dying at once does not end the sweep early). Rows and columns of one matrix overlap (nR·in + nC·out −
    nR·nC); once every column that reads a group is chosen, the group's producer rows are dead (removed by
    `RemoveDeadGroups`, not zeroed: an update through G⁻¹ would move live rows) and count too."""
    names = list(matrices)
    flat, owner, axis, index = [], [], [], []
    for k, w in enumerate(names):
        for ax, vec in ((0, costs[w].rows), (1, costs[w].cols)):
            flat.append(vec)
            owner.append(torch.full((len(vec),), k))
            axis.append(torch.full((len(vec),), ax))
            index.append(torch.arange(len(vec)))
    costs_all = torch.cat(flat)
    order = torch.argsort(costs_all, stable=True)
    columns_left = [len(g.cols) for g in groups]
    reading: dict[tuple[str, int], list[int]] = defaultdict(list)  # (reader, column) -> groups it reads
    for gi, g in enumerate(groups):
        for u in g.cols:
            reading[(u.weight, u.index)].append(gi)
    n_rows = dict.fromkeys(names, 0)
    n_cols = dict.fromkeys(names, 0)
    dead_rows: set[tuple[str, int]] = set()
    taken_rows: set[tuple[str, int]] = set()
    chosen = {w: ([], []) for w in names}
    total, predicted = 0, 0.0

    def take(w: str, ax: int) -> int:
        """Weights newly zeroed by one more row (ax 0) or column (ax 1) of `w`."""
        out, inp = matrices[w].shape
        extra = inp - n_cols[w] if ax == 0 else out - n_rows[w]
        (n_rows if ax == 0 else n_cols)[w] += 1
        return extra

    for c, k, ax, i in zip(costs_all[order].tolist(), torch.cat(owner)[order].tolist(),
                           torch.cat(axis)[order].tolist(), torch.cat(index)[order].tolist(), strict=True):
        w = names[k]
        if ax == 0 and (w, i) in dead_rows:
            continue
        out, inp = matrices[w].shape
        extra = inp - n_cols[w] if ax == 0 else out - n_rows[w]
        dying = []
        if ax == 1:
            for gi in reading.get((w, i), ()):
                if columns_left[gi] == 1:
                    dying += [(u.weight, u.index) for u in groups[gi].rows
                              if u.weight in matrices and (u.weight, u.index) not in dead_rows
                              and (u.weight, u.index) not in taken_rows]
        extra += sum(matrices[r].shape[1] - n_cols[r] for r, _ in dying)
        if total + extra > wanted:  # passed over: a cheaper one may still fit
            continue
        total += take(w, ax)
        predicted += c
        chosen[w][ax].append(i)
        if ax == 0:
            taken_rows.add((w, i))
        if ax == 1:
            for gi in reading.get((w, i), ()):
                columns_left[gi] -= 1
        for r, row in dying:
            total += take(r, 0)
            dead_rows.add((r, row))
    return chosen, predicted


def _with_dying_groups(pick, matrices, costs, wanted: int, groups: list[DimensionGroup]):
    """A mask that zeroes every column reading a group kills the group, and `RemoveDeadGroups` then removes
    its producer rows as well: the largest budget for the threshold whose zeros plus those rows stay within
    `wanted` (bisection: a head group dies in one piece, so the count jumps)."""

    def attempt(budget: int):
        chosen, predicted = pick(matrices, costs, budget)
        extra = 0
        for g in groups:
            if all(u.weight in chosen and bool(chosen[u.weight][:, u.index].all()) for u in g.cols):
                extra += sum(matrices[u.weight].shape[1] - int(chosen[u.weight][u.index].sum())
                             for u in g.rows if u.weight in chosen)
        return budget + extra <= wanted, (chosen, predicted)

    fits, best = attempt(wanted)
    if fits:
        return best
    low, high = 0, wanted - 1
    best = pick(matrices, costs, 0)
    for _ in range(16):
        if low > high:
            break
        middle = (low + high + 1) // 2
        fits, result = attempt(middle)
        if fits:
            low, best = middle + 1, result
        else:
            high = middle - 1
    return best


def _kth_smallest(values: torch.Tensor, k: int) -> float | None:
    if k <= 0:
        return None
    if k >= values.numel():
        return float("inf")
    return float(torch.kthvalue(values, k).values)


def _threshold_elements(matrices, costs, wanted: int):
    flat = torch.cat([costs[w].elements.reshape(-1) for w in matrices])
    threshold = _kth_smallest(flat, wanted)
    chosen, predicted = {}, 0.0
    for w in matrices:
        e = costs[w].elements
        chosen[w] = e <= threshold if threshold is not None else torch.zeros_like(e, dtype=torch.bool)
        predicted += float(e[chosen[w]].sum())
    return chosen, predicted


def _threshold_blocks(matrices, costs, wanted: int):
    """2:4: in each block of four consecutive weights of a row, the two cheapest; blocks across all matrices
    by the sum of those two, cheapest first, until `wanted` weights are zeroed."""
    pairs = {}
    for w in matrices:
        e = costs[w].elements
        vals, idx = e.reshape(e.shape[0], -1, 4).sort(dim=-1, stable=True)
        pairs[w] = (vals[..., :2].sum(-1), idx[..., :2])
    flat = torch.cat([p[0].reshape(-1).to(torch.float32) for p in pairs.values()])
    threshold = _kth_smallest(flat, wanted // 2)
    chosen, predicted = {}, 0.0
    for w, (block, idx) in pairs.items():
        pick = block <= threshold if threshold is not None else torch.zeros_like(block, dtype=torch.bool)
        mask = torch.zeros(*block.shape, 4, dtype=torch.bool)
        mask.scatter_(-1, idx, pick[..., None].expand_as(idx))
        chosen[w] = mask.reshape(block.shape[0], -1)
        predicted += float(block[pick].sum())
    return chosen, predicted
