"""Mixed-precision allocation by search: the fidelities post-training quantization really has, under a byte budget.

Cheap task: round to nearest, scored on the first `cheap_windows` windows. Expensive task: GPTQ (the input
moments collected once, shared by every evaluation), scored on all windows. The score is minus the mean
next-token loss. Each evaluation quantizes a copy of the program; the bytes of a point are known beforehand
(`BitAllocation.nbytes`), so only points within the budget are ever evaluated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fxslice import InvalidOption, PassManager, Program
from fxslice.analysis.linears import weight_kinds
from fxslice.calibration.gradients import mean_loss
from fxslice.calibration.moments import linear_statistics
from fxslice.passes.quantize.allocation import BitAllocation, width_counts
from fxslice.passes.quantize.quantize import QuantizeWeights
from fxslice.passes.quantize.search import (
    EXPENSIVE,
    Evaluation,
    SearchResult,
    candidates,
    multitask_search,
    random_search,
    single_task_search,
)

__all__ = ["SEARCHES", "search_allocation"]

SEARCHES = ("mtgp", "gp", "random")


def search_allocation(program: Program, windows: torch.Tensor, *, budget_bits: float, group_size: int,
                      embeddings: int | None, head: int | None, shortcuts: int | None = 8, search: str = "mtgp",
                      evaluations: int = 6, expensive_every: int = 4, cheap_windows: int = 4, seed: int = 0,
                      log: str | Path | None = None, fill: float = 0.95, spread: int = 1,
                      search_tables: bool = True, grid: str = "zero_point",
                      progress: bool = False) -> tuple[dict[str, int], SearchResult, BitAllocation]:
    """Widths per linear that keep the whole model within `budget_bits` per parameter on average (tables,
    scales and float tensors included), found by `search` with `evaluations` expensive evaluations.

    Every search starts from the widest uniform allocation within the budget (its first expensive evaluation) and
    considers only points that use at least `fill` of the budget (unless fewer than 16 of 512 candidates do): a
    point far below the budget leaves bytes unspent that some linear could have used. Linears choose among that
    uniform width and `spread` widths either side of it: over all widths from 2 to 8 bits most points within a
    5-bit budget put some linears at 2 bits, which GPTQ cannot save (SmolLM2: 0.09-0.74 nats lost). With
    `search_tables`, the token tables take one width between that uniform width and `embeddings` as a fifth
    coordinate; the answer's widths then name the tables too."""
    if search not in SEARCHES:
        raise InvalidOption(f"quantize: search must be one of {SEARCHES}, got {search!r}")
    allocation = BitAllocation.of(program, group_size=group_size, embeddings=embeddings, head=head,
                                  shortcuts=shortcuts, search_tables=search_tables, grid=grid)
    budget = budget_bits * program.num_parameters() / 8
    smallest = allocation.nbytes(allocation.uniform(allocation.choices[0]))
    if smallest > budget:  # every search starts from a uniform point
        raise InvalidOption(f"quantize: {budget_bits} bits per parameter is below the smallest allocation "
                            f"({8 * smallest / program.num_parameters():.2f} with every linear at "
                            f"{allocation.choices[0]} bits and tables at {embeddings}); raise the budget or lower "
                            "--embeddings")
    widest = max(b for b in allocation.choices if allocation.nbytes(allocation.uniform(b)) <= budget)
    allocation = allocation.around(widest, spread)
    start = allocation.uniform(widest)
    settings = {"search": search, "budget_bits": budget_bits, "group_size": group_size, "seed": seed,
                "embeddings": embeddings, "head": head, "shortcuts": shortcuts, "expensive_every": expensive_every,
                "cheap_windows": cheap_windows, "fill": fill, "spread": spread, "search_tables": search_tables,
                **({"grid": grid} if grid != "zero_point" else {})}
    history, record = _resume(log, program, windows, settings, allocation)
    kinds = program.analysis(weight_kinds)
    observed = [*allocation.names, *([kinds.head] if head and kinds.head else []),
                *(sorted(kinds.shortcuts) if shortcuts else [])]
    statistics = linear_statistics(program, windows, linears=observed, progress=progress)
    cheap = windows[: max(1, cheap_windows)]
    batches = {0: list(cheap.split(1)), 1: list(windows.split(1))}

    def objective(x: list[float], task: int) -> tuple[float, dict[str, Any]]:
        candidate = program.clone()
        widths = allocation.widths(x)
        method = "gptq" if task == EXPENSIVE else "rtn"
        PassManager([QuantizeWeights(widths, group_size=group_size, method=method, statistics=statistics,
                                     embeddings=embeddings, head=head, shortcuts=shortcuts, grid=grid)],
                    check_numerics=False).run(candidate)  # a candidate: measured by its loss
        nbytes = candidate.num_bytes()
        return -mean_loss(candidate, batches[task]), {
            "bytes": nbytes, "bits_per_parameter": round(8 * nbytes / candidate.num_parameters(), 4),
            "widths": width_counts(widths)}

    def spends(x: list[float], least: float) -> bool:
        return least <= allocation.nbytes(x) <= budget

    near = candidates(allocation.dim, 512, seed=seed, feasible=lambda x: spends(x, fill * budget), allow_none=True)
    lower = fill * budget if len(near) >= 16 else 0.0

    def feasible(x: list[float]) -> bool:
        return spends(x, lower)

    common = dict(seed=seed, feasible=feasible, progress=progress, on_evaluation=record, start=start)
    if search == "mtgp":
        result = multitask_search(objective, allocation.dim, expensive=evaluations, expensive_every=expensive_every,
                                  history=history, **common)
    elif search == "gp":
        result = single_task_search(objective, allocation.dim, expensive=evaluations, **common)
    else:
        result = random_search(objective, allocation.dim, expensive=evaluations, **common)
    return allocation.widths(result.best), result, allocation


def _resume(log: str | Path | None, program: Program, windows: torch.Tensor, settings: dict[str, Any],
            allocation: BitAllocation):
    """Earlier evaluations from the JSON-lines `log`, when its header names this search: the same model (graph and
    weights digest), the same calibration tokens and the same options; and a function that appends each new one."""
    if not log:
        return [], None
    import hashlib

    path = Path(log)
    header = {**settings, "model": program.digest(),
              "calibration": hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest(),
              "widths": list(allocation.choices)}
    if allocation.dim > 4:
        header["table_widths"] = list(allocation.table_choices)
    history: list[Evaluation] = []
    if path.is_dir():
        raise InvalidOption(f"--log {path} is a directory; give a file (JSON lines) for the search's evaluations")
    if path.exists():
        try:
            lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            first = lines[0] if lines else None
            history = [Evaluation(**entry) for entry in lines[1:]] if first == header else []
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
            raise InvalidOption(f"--log {path} is not a search log written by fxslice ({exc}); give a new --log") from None
        if first != header:
            differ = sorted(k for k in header if not isinstance(first, dict) or first.get(k) != header[k])
            raise InvalidOption(f"--log {path} holds another search (it differs in: {', '.join(differ)}); its "
                                "evaluations do not apply here: give a new --log")
        if history and settings["search"] != "mtgp":
            raise InvalidOption(f"{path}: only the mtgp search resumes from a log; give a new --log")
    else:
        try:
            path.write_text(json.dumps(header) + "\n")
        except OSError as exc:
            raise InvalidOption(f"cannot write the search log {path}: {exc.strerror}") from None

    def record(evaluation: Evaluation) -> None:
        with path.open("a") as f:
            f.write(json.dumps(evaluation.__dict__) + "\n")

    return history, record
