"""The LLM Surgeon on dimension groups: global allocation by curvature cost, correlated OBS updates, several
shots, each group removed for real (design: ../shared/methods.md §1, arXiv 2312.17244).

Each shot: collect, for every linear that reads a group's channels (o_proj, down_proj, ...), `A` = Σ xxᵀ of its
input and, for "kfac", `G` = Σ ggᵀ of the causal-LM loss's gradient at its output; cost each group as the
correlated OBS cost of removing its columns from those readers — zero columns kill the channel, so the
producers' rows (q/k/v, gate/up) go for free and are not charged or compensated twice; rank all groups of all
layers together by cost per parameter and take the cheapest until the shot's share of the target is met (one
threshold across the model: the allocation between layers follows from the costs); update each reader's
remaining columns through `A⁻¹` to compensate, zero the group, and let `RemoveDeadGroups` shrink the matrices.
The next shot re-estimates the curvature on the pruned model.

Curvatures (`fxslice.passes.surgeon.curvature`): "kfac" (the Surgeon), "kobd" (the same factors, diagonal
costs, no update), "activations" (`G = I`: L-OBD), "identity" (magnitude: no update).
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from fxslice import InvalidOption, Pass, PassManager, PassResult, Program, UnsupportedStructure
from fxslice.analysis.groups import DimensionGroup, Groups, group_analysis
from fxslice.calibration.distributed import rank_and_size
from fxslice.calibration.gradients import mean_loss
from fxslice.calibration.moments import LinearStatistics, dense_linears, linear_statistics
from fxslice.core.disk import DiskTensor, Scratch
from fxslice.core.graph import set_tensor, tensor_of
from fxslice.core.memory import available_bytes, release_freed
from fxslice.core.progress import progress_bar
from fxslice.passes.rewrite.remove_dead_groups import RemoveDeadGroups, removable_groups
from fxslice.passes.surgeon.base import SurgeonPass
from fxslice.passes.surgeon.curvature import Factors, factors, needs_activations, needs_gradients, updates
from fxslice.passes.surgeon.linears import matrix_of, store_matrix
from fxslice.passes.surgeon.obs import column_cost, remove_columns
from fxslice.passes.surgeon.options import check_target

__all__ = ["SurgeonPrune", "ShotReport"]


@dataclass(frozen=True)
class ShotReport:
    shot: int
    parameters: int  # after the shot, counted on the graph
    removed_groups: int
    removed_heads: int
    removed_channels: int
    predicted_loss_increase: float | None  # of the mean next-token loss, from the KFAC costs (A, G are sums: / tokens²)
    loss_before: float  # mean next-token loss on the calibration windows, at the start of the shot
    loss_after: float  # and at its end: loss_after - loss_before is the measured increase
    per_module: dict[str, int]  # groups removed per module


class SurgeonPrune(SurgeonPass):
    name = "surgeon_prune"

    def __init__(self, windows: torch.Tensor, *, target: float, shots: int = 4, curvature: str = "kfac",
                 damp_a: float = 0.01, batch_size: int = 1, labels: str = "data", multiple: int = 1,
                 factor_bytes: int | None = None, progress: bool = False,
                 after_shot: Callable[[dict[str, Any], list[Pass]], None] | None = None,
                 resume: dict[str, Any] | None = None):
        super().__init__(windows, shots=shots, curvature=curvature, batch_size=batch_size, labels=labels,
                         progress=progress, after_shot=after_shot, resume=resume)
        if not damp_a > 0:
            raise InvalidOption(f"surgeon: damping must be positive, got damp_a={damp_a}")
        if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
            raise InvalidOption(f"surgeon: multiple must be a positive integer, got {multiple!r}")
        if factor_bytes is not None and (isinstance(factor_bytes, bool) or not isinstance(factor_bytes, int)
                                         or factor_bytes < 1):
            raise InvalidOption(f"surgeon: factor_bytes must be a positive number of bytes, got {factor_bytes!r}")
        self.target, self.damp_a, self.multiple = check_target(target, "groups"), damp_a, multiple
        self.factor_bytes = factor_bytes
        self._last_loss: float | None = None
        self.reports: list[ShotReport] = []
        self.dense: int | None = None  # parameters before the first shot

    def call(self, program: Program) -> PassResult:
        state = self.resumed()
        if state is not None:
            return self._shots(program, int(state["dense"]), [ShotReport(**r) for r in state["reports"]], state["loss"])
        dense = program.num_parameters()
        reach = self.reachable(program)
        if reach == 0:
            _refuse_without_groups(program.analysis(group_analysis))
        if self.target > reach:
            raise InvalidOption(f"surgeon: target {self.target:.1%} is more than this model's groups can give: at most "
                                f"{reach:.1%} of its {dense:,} parameters can go (MLP channels and key/value head "
                                "groups, each layer keeping one head group and one multiple of MLP channels; the token "
                                f"table, norms and the residual width stay); give target ≤ {math.floor(reach * 1000) / 1000}")
        return self._shots(program, dense, [], None)

    def _shots(self, program: Program, dense: int, reports: list[ShotReport], loss: float | None) -> PassResult:
        """The shots after `reports` (those done: none, or the ones an interrupted run finished)."""
        self.dense, self.reports, self.updated, self._last_loss = dense, list(reports), [], loss
        shots = range(len(reports) + 1, self.shots + 1)
        for shot in progress_bar(shots, "surgeon shots", enabled=self.progress):
            goal = round(dense * (1.0 - self.target * shot / self.shots))
            report = self._shot(program, shot, goal)
            self.reports.append(report)
            self.shot_done(shot, dense=dense, loss=self._last_loss, reports=[asdict(r) for r in self.reports])
        return PassResult(True, {"parameters": [dense, *(r.parameters for r in self.reports)],
                                 "groups_removed": sum(r.removed_groups for r in self.reports)})

    def _shot(self, program: Program, shot: int, goal: int) -> ShotReport:
        groups = program.analysis(group_analysis)
        removable = removable_groups(groups)
        candidates = [g for i, g in enumerate(groups.groups) if i in removable]
        if not candidates:
            _refuse_without_groups(groups)
        readers = sorted({u.weight for g in candidates for u in g.cols})
        batches = list(self.windows.split(self.batch_size))
        loss_before = self._last_loss if self._last_loss is not None else mean_loss(program, batches, progress=self.progress)
        stats = self._statistics(program, readers) if needs_activations(self.curvature) else None

        def curvature(w: str, m: torch.Tensor) -> Factors:  # one reader's at a time, built again for its update
            return factors(stats, w, tuple(m.shape), self.curvature, damp_a=self.damp_a, damp_g=0.01)

        costs = self._costs(program, groups, candidates, curvature)
        sizes = [self._size(g, groups.linears, program) for g in candidates]
        chosen = self._select(candidates, costs, sizes, program.num_parameters() - goal)
        if self.multiple > 1:
            chosen = _round_widths(candidates, costs, sizes, chosen, groups.groups, self.multiple)
        rows: dict[str, list[int]] = defaultdict(list)
        cols: dict[str, list[int]] = defaultdict(list)
        for i in chosen:
            for u in candidates[i].rows:
                rows[u.weight].append(u.index)
            for u in candidates[i].cols:
                cols[u.weight].append(u.index)
        written: dict[str, torch.Tensor] = {}
        for w in sorted(set(rows) | set(cols)):
            m = matrix_of(program, groups.linears[w])
            if w in cols:  # the readers' columns carry the whole cost; the others compensate through A⁻¹
                a_inv = curvature(w, m).a_inv if updates(self.curvature) else None
                m = remove_columns(m, a_inv, cols[w]) if a_inv is not None else _zero(m, cols=cols[w])
            if w in rows:  # a producer row whose channel nobody reads any more: zero, nothing to compensate
                m = _zero(m, rows=rows[w])
            written[w] = store_matrix(program, groups.linears[w], m)
        for w in rows:
            bias = groups.linears[w].bias
            if bias is not None and bias.op == "get_attr":
                value = tensor_of(program.gm, bias).clone()
                value[..., torch.as_tensor(rows[w])] = 0
                set_tensor(program.gm, str(bias.target), value)
                written[str(bias.target)] = value
        program.mark_changed()
        self.updated.append(written)
        PassManager([RemoveDeadGroups()], check_numerics=False).run(program)
        per_module: dict[str, int] = defaultdict(int)
        for i in chosen:
            per_module[candidates[i].module.rpartition(".")[0]] += 1
        tokens = self.windows[:, 1:].numel()
        self._last_loss = mean_loss(program, batches, progress=self.progress)
        predicted = sum(costs[i] for i in chosen) / tokens**2 if self.curvature == "kfac" else None
        return ShotReport(shot, program.num_parameters(), len(chosen),
                          sum(candidates[i].kind == "heads" for i in chosen),
                          sum(candidates[i].kind == "mlp_channel" for i in chosen),
                          predicted, loss_before, self._last_loss, dict(per_module))

    def _statistics(self, program: Program, readers: list[str]) -> LinearStatistics | _FactorsOnDisk:
        """The readers' Kronecker factors: from one sweep, or — when they would take more than `factor_bytes` (by
        default a quarter of the memory available; under torchrun, only when given) — from several sweeps, each over
        the readers whose factors fit, kept on disk between (a 7 B Llama's `A` and `G` of o_proj and down_proj are
        44 GB in float64)."""
        gradients = needs_gradients(self.curvature)
        # ranks must sweep alike, and each sees its own free memory: under torchrun only a given budget splits
        free = available_bytes() if rank_and_size()[1] == 1 else None
        budget = self.factor_bytes or max(1, (free or 2**62) // 4)
        chunks = _chunks(program, readers, budget, gradients)

        def sweep(linears: list[str]) -> LinearStatistics:  # one bar: the sweep's, or the chunks'
            return linear_statistics(program, self.windows, batch_size=self.batch_size, linears=linears,
                                     gradients=gradients, labels=self.labels, progress=self.progress and len(chunks) == 1)

        if len(chunks) == 1:
            return sweep(readers)
        kept = _FactorsOnDisk(Scratch())
        for chunk in progress_bar(chunks, "curvature, the readers that fit at a time", enabled=self.progress):
            kept.keep(sweep(chunk), chunk)
            release_freed()
        return kept

    def _costs(self, program: Program, groups: Groups, candidates: list[DimensionGroup],
               curvature: Callable[[str, torch.Tensor], Factors]) -> list[float]:
        """Each group's loss increase when removed through its readers' columns (OBS: correlated within each reader;
        OBD: each column alone, ½ (WᵀGW)_cc A_cc); magnitude: half the squared norm of all its rows and columns.
        One matrix and one reader's factors are held at a time: for every layer at once they would be several
        times the model (float64 inverses of every `A` and `G`)."""
        costs = [0.0] * len(candidates)
        touched: dict[str, list[tuple[int, str, list[int]]]] = defaultdict(list)  # weight -> (group, axis, indices)
        for i, group in enumerate(candidates):
            units = group.units if self.curvature == "identity" else group.cols
            for (weight, axis), members in itertools.groupby(sorted(units, key=lambda u: (u.weight, u.axis)),
                                                             key=lambda u: (u.weight, u.axis)):
                touched[weight].append((i, axis, [u.index for u in members]))
        for weight, uses in touched.items():
            m = matrix_of(program, groups.linears[weight])
            if self.curvature == "identity":
                for i, axis, idx in uses:
                    costs[i] += 0.5 * float((m[idx] if axis == "row" else m[:, idx]).pow(2).sum())
                continue
            f = curvature(weight, m)
            if not updates(self.curvature):
                per_column = _obd_columns(m, f)
                for i, _, idx in uses:
                    costs[i] += float(per_column[idx].sum())
            else:
                g = _or_eye(f.g, m.shape[0])
                for i, _, idx in uses:
                    costs[i] += column_cost(m, g, f.a_inv, idx)
        return costs

    @staticmethod
    def _size(group: DimensionGroup, linears, program: Program) -> int:
        n = 0
        for u in group.units:
            use = linears[u.weight]
            shape = tensor_of(program.gm, use.weight).shape
            n += shape[use.in_axis] if u.axis == "row" else shape[use.out_axis]
            if u.axis == "row" and use.bias is not None:
                n += 1
        return n

    def _kept(self, kind: str) -> int:
        """Groups of a kind each block keeps: one head group (a layer of zero heads cannot be written as a view),
        one multiple of MLP channels (an MLP of width 0 is a different architecture)."""
        return self.multiple if kind == "mlp_channel" else 1

    def reachable(self, program: Program) -> float:
        """The largest fraction of `program`'s parameters this pass can remove: every removable group but the
        ones each block keeps (`_kept`), the smallest of them counted as kept."""
        groups = program.analysis(group_analysis)
        removable = removable_groups(groups)
        families: dict[tuple[tuple[str, ...], str], list[int]] = defaultdict(list)
        for i, g in enumerate(groups.groups):
            if i in removable:
                families[(g.weights, g.kind)].append(self._size(g, groups.linears, program))
        gone = sum(sum(sorted(sizes)[self._kept(kind):]) for (_, kind), sizes in families.items())
        return gone / max(program.num_parameters(), 1)

    def _select(self, groups: list[DimensionGroup], costs: list[float], sizes: list[int], needed: int) -> list[int]:
        """The cheapest groups per parameter, across all layers, until `needed` parameters are covered; a group
        that would overshoot by more than the smallest group is passed over for cheaper-to-fit ones, so the
        count lands within one group of the target. Each block keeps what `_kept` says."""
        left: dict[tuple[tuple[str, ...], str], int] = defaultdict(int)
        for g in groups:
            left[(g.weights, g.kind)] += 1
        order = sorted(range(len(groups)), key=lambda i: costs[i] / max(sizes[i], 1))
        smallest = min(sizes) if sizes else 0
        chosen, covered = [], 0
        for i in order:
            if covered >= needed:
                break
            if covered + sizes[i] > needed + smallest:
                continue
            g = groups[i]
            if left[(g.weights, g.kind)] <= self._kept(g.kind):
                continue
            left[(g.weights, g.kind)] -= 1
            chosen.append(i)
            covered += sizes[i]
        return chosen


class _FactorsOnDisk:
    """Kronecker factors of several sweeps, written to a scratch folder and read back one reader at a time (what
    `factors` asks of `LinearStatistics`)."""

    def __init__(self, scratch: Scratch):
        self.scratch = scratch
        self.a: dict[str, DiskTensor] = {}
        self.g: dict[str, DiskTensor] = {}

    def keep(self, stats: LinearStatistics, linears: list[str]) -> None:
        for w in linears:
            self.a[w] = self.scratch.write(stats.A(w))
            if stats.output_gradients:
                self.g[w] = self.scratch.write(stats.G(w))

    def A(self, weight: str) -> torch.Tensor:  # noqa: N802 - the paper's name
        return self.a[weight].load()

    def G(self, weight: str) -> torch.Tensor:  # noqa: N802 - the paper's name
        return self.g[weight].load()


def _chunks(program: Program, readers: list[str], budget: int, gradients: bool) -> list[list[str]]:
    """`readers` in graph order, cut into runs whose float64 factors (`A`: in², `G`: out²) fit in `budget` bytes
    (a reader larger than the budget alone)."""
    linears = dense_linears(program)
    chunks: list[list[str]] = [[]]
    used = 0
    for w in readers:
        shape = tensor_of(program.gm, linears[w].weight).shape
        out, inp = shape[linears[w].out_axis], shape[linears[w].in_axis]
        size = 8 * (inp * inp + (out * out if gradients else 0))
        if chunks[-1] and used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(w)
        used += size
    return chunks


def _refuse_without_groups(groups: Groups) -> None:
    reasons = "\n".join(f"  {w}: {why}" for w, why in list(groups.blocked.items())[:8])
    raise UnsupportedStructure(f"surgeon: the graph has no removable dimension groups; what blocks them:\n"
                               f"{reasons}\n  what to do: `fxslice inspect MODEL --groups` lists them all")


def _round_widths(groups: list[DimensionGroup], costs: list[float], sizes: list[int], chosen: list[int],
                  every: list[DimensionGroup], multiple: int) -> list[int]:
    """`chosen` adjusted so that every MLP keeps a multiple of `multiple` channels (GGUF blocks of 32, GPU tiles):
    per MLP, the few channels over a multiple go too (the cheapest not chosen) or, when fewer than half a multiple
    short of the next one, the dearest chosen stay."""
    width: dict[tuple[str, ...], int] = defaultdict(int)
    for g in every:
        if g.kind == "mlp_channel":
            width[g.weights] += 1
    picked = set(chosen)
    for family, channels in width.items():
        mine = [i for i, g in enumerate(groups) if g.weights == family and g.kind == "mlp_channel"]
        gone = [i for i in mine if i in picked]
        over = (channels - len(gone)) % multiple
        if not over:
            continue
        cost = lambda i: costs[i] / max(sizes[i], 1)  # noqa: E731 - the ranking `_select` uses
        spare = sorted((i for i in mine if i not in picked), key=cost)
        if over <= multiple // 2 and len(spare) >= over and channels - len(gone) - over >= multiple:
            picked |= set(spare[:over])
        elif len(gone) >= multiple - over:
            picked -= set(sorted(gone, key=cost)[len(gone) - (multiple - over):])
        elif len(spare) >= over:
            picked |= set(spare[:over])
    return sorted(picked)


def _or_eye(m: torch.Tensor | None, n: int) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64) if m is None else m


def _obd_columns(m: torch.Tensor, f: Factors) -> torch.Tensor:
    """½ (Wᵀ G W)_cc · A_cc for every column: K-OBD's cost, each column alone."""
    return 0.5 * ((_or_eye(f.g, m.shape[0]) @ m) * m).sum(0) * f.t


def _zero(m: torch.Tensor, *, rows=(), cols=()) -> torch.Tensor:
    m = m.clone()
    if rows:
        m[torch.as_tensor(list(rows))] = 0
    if cols:
        m[:, torch.as_tensor(list(cols))] = 0
    return m
