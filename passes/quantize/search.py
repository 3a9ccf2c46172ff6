"""Bayesian search with a multi-task Gaussian process, after NUQ (Gennari do Nascimento et al., ECCV 2020):
maximise an expensive function of a few continuous parameters, helped by a cheap, correlated one.

One GP over (x, task) with an intrinsic-coregionalisation kernel (BoTorch's `MultiTaskGP`, outcomes standardised
per task) models both. Every `expensive_every`-th step evaluates the expensive task where its upper confidence
bound is highest; the other steps evaluate the cheap task where that evaluation tells most about the expensive
function over the candidate set — `½ log(Var f_c(x) / Var[f_c(x) | f_e(candidates)])`, NUQ's information
criterion. The last expensive evaluation goes to the candidate with the best posterior mean (exploitation, unless
it is already known), and the answer is the best point the expensive task has *seen*: with a handful of
evaluations of a step function (widths are whole bits), an unevaluated posterior optimum is a guess (SmolLM2 at
4.77 bits: the single-task GP's unevaluated answer lost 3.7961 nats where its best evaluation lost 3.6531).
Candidates are a scrambled Sobol set (NUQ's full grid does not scale past two dimensions), filtered by a
constraint (a byte budget). `single_task_search` and `random_search` are the baselines a benchmark compares
against, with the same interface.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from fxslice import InvalidOption
from fxslice.core.progress import StepProgress

__all__ = ["CHEAP", "EXPENSIVE", "Evaluation", "SearchResult", "multitask_search", "single_task_search", "random_search", "candidates"]

CHEAP, EXPENSIVE = 0, 1


@dataclass
class Evaluation:
    x: list[float]
    task: int  # 0 cheap, 1 expensive
    value: float
    seconds: float
    info: dict = field(default_factory=dict)  # what the objective reports besides its value (bytes, bits, ...)


@dataclass
class SearchResult:
    best: list[float]  # the chosen point: the best expensive evaluation
    value: float  # what the expensive task measured there (not a model's prediction)
    evaluations: list[Evaluation]

    def to_dict(self) -> dict:
        return {"best": self.best, "value": self.value, "evaluations": [asdict(e) for e in self.evaluations]}

    @property
    def expensive(self) -> list[Evaluation]:
        return [e for e in self.evaluations if e.task == EXPENSIVE]


Objective = Callable[[list[float], int], "float | tuple[float, dict]"]


def candidates(dim: int, count: int, *, seed: int, feasible: Callable[[list[float]], bool] | None = None,
               allow_none: bool = False) -> torch.Tensor:
    """Those of `count` scrambled Sobol points in [0, 1]^dim that satisfy `feasible` (float64 [n, dim])."""
    points = torch.quasirandom.SobolEngine(dim, scramble=True, seed=seed).draw(count, dtype=torch.float64)
    if feasible is not None:
        points = points[torch.tensor([bool(feasible(p.tolist())) for p in points], dtype=torch.bool)]
    if len(points) == 0 and not allow_none:
        raise InvalidOption("no candidate satisfies the constraint (is the byte budget below the smallest model?)")
    return points


def _rounded(x: torch.Tensor) -> list[float]:
    """A point as evaluations record it (and as `_acquire` recognises it among them)."""
    return [round(v, 6) for v in x.tolist()]


def _evaluate(objective: Objective, x: torch.Tensor, task: int, log: list[Evaluation],
              on_evaluation: Callable[[Evaluation], None] | None) -> None:
    start = time.perf_counter()
    out = objective(x.tolist(), task)
    value, info = out if isinstance(out, tuple) else (out, {})
    if not math.isfinite(value):
        raise FloatingPointError(f"the objective returned {value} at {x.tolist()} (task {task})")
    log.append(Evaluation(_rounded(x), task, float(value), time.perf_counter() - start, info))
    if on_evaluation is not None:
        on_evaluation(log[-1])


def _fit(train_x: torch.Tensor, train_y: torch.Tensor, tasks: torch.Tensor | None, seed: int = 0):
    """A GP on the evaluations so far, hyperparameters by maximum marginal likelihood (seeded: the fit's
    restarts draw random numbers, and a search must be reproducible)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _fit_unseeded(train_x, train_y, tasks)


def _fit_unseeded(train_x: torch.Tensor, train_y: torch.Tensor, tasks: torch.Tensor | None):
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import MultiTaskGP, SingleTaskGP
    from botorch.models.transforms.outcome import Standardize, StratifiedStandardize
    from gpytorch.mlls import ExactMarginalLogLikelihood

    if tasks is None:
        model = SingleTaskGP(train_x, train_y[:, None], outcome_transform=Standardize(1))
    else:
        inputs = torch.cat([train_x, tasks[:, None].double()], 1)
        model = MultiTaskGP(inputs, train_y[:, None], task_feature=-1, all_tasks=[CHEAP, EXPENSIVE],
                            output_tasks=[EXPENSIVE],
                            outcome_transform=StratifiedStandardize(stratification_idx=train_x.shape[1],
                                                                    all_task_values=torch.tensor([CHEAP, EXPENSIVE])))
    fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model), optimizer_kwargs={"options": {"maxiter": 100}})
    return model


def _with_task(x: torch.Tensor, task: int) -> torch.Tensor:
    return torch.cat([x, torch.full((len(x), 1), float(task), dtype=x.dtype)], 1)


def _ucb(mean: torch.Tensor, var: torch.Tensor, n: int, step: int, delta: float = 0.1) -> torch.Tensor:
    """GP-UCB with NUQ's schedule, β_t = 2 log(|D| t² π² / (6δ)) / 5."""
    beta = 2 * math.log(n * step**2 * math.pi**2 / (6 * delta)) / 5
    return mean + math.sqrt(beta) * var.clamp(min=0).sqrt()


def _information(model, pool: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per point of `pool`: how much evaluating the cheap task there reduces the uncertainty of the expensive
    function on `reference` (nats)."""
    with torch.no_grad():
        joint = model.posterior(torch.cat([_with_task(pool, CHEAP), _with_task(reference, EXPENSIVE)]))
        cov = joint.distribution.covariance_matrix
    n = len(pool)
    prior = torch.diagonal(cov[:n, :n]).clamp(min=1e-12)
    ref = cov[n:, n:] + 1e-8 * cov[n:, n:].diagonal().mean() * torch.eye(len(reference), dtype=cov.dtype)
    solved = torch.linalg.solve_triangular(torch.linalg.cholesky(ref), cov[n:, :n], upper=False)
    conditional = (prior - (solved**2).sum(0)).clamp(min=1e-12 * prior.max())
    return 0.5 * torch.log(prior / conditional)


def multitask_search(objective: Objective, dim: int, *, expensive: int, expensive_every: int = 4, seed: int = 0,
                     feasible: Callable[[list[float]], bool] | None = None, pool_size: int = 512,
                     reference_size: int = 128, history: list[Evaluation] | None = None, progress: bool = False,
                     on_evaluation: Callable[[Evaluation], None] | None = None,
                     start: list[float] | None = None) -> SearchResult:
    """Spend `expensive` evaluations of the expensive task and `expensive_every - 1` cheap ones before each.
    `history` (earlier evaluations, e.g. from a file) resumes a search; `start`, a known good point (the
    uniform allocation), is the first expensive evaluation instead of the best cheap one's neighbour."""
    if expensive < 1 or expensive_every < 1:
        raise InvalidOption("the search needs at least one expensive evaluation and expensive_every >= 1")
    pool = _with_start(candidates(dim, pool_size, seed=seed, feasible=feasible), start)
    reference = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:reference_size]]
    log = list(history or [])
    total = expensive * expensive_every
    with StepProgress(total, "multi-task GP search", enabled=progress) as bar:
        for step in range(len(log), total):
            task = EXPENSIVE if (step + 1) % expensive_every == 0 else CHEAP
            if not log:
                x = pool[1 if start is not None and len(pool) > 1 else 0]
            elif task == EXPENSIVE and not any(e.task == EXPENSIVE for e in log):
                x = pool[0] if start is not None else _best_observed(log, pool)
            else:
                model = _fit(*_training(log))
                with torch.no_grad():
                    if task == EXPENSIVE:
                        post = model.posterior(_with_task(pool, EXPENSIVE))
                        x = _acquire(post.mean[:, 0], post.variance[:, 0], pool, log, step + 1, last=step == total - 1)
                    else:
                        x = pool[int(_information(model, pool, reference).argmax())]
            _evaluate(objective, x, task, log, on_evaluation)
            bar.advance(f"{'expensive' if task else 'cheap'} {log[-1].value:.4f}")
    return _best_seen(log)


def _acquire(mean: torch.Tensor, var: torch.Tensor, pool: torch.Tensor, log: list[Evaluation], step: int, *,
             last: bool) -> torch.Tensor:
    """The next expensive point: the upper confidence bound's, or on the `last` step the best posterior mean
    not yet seen by the expensive task (the answer is chosen among seen points only)."""
    if last:
        seen = {tuple(e.x) for e in log if e.task == EXPENSIVE}
        for i in mean.argsort(descending=True).tolist():
            if tuple(_rounded(pool[i])) not in seen:
                return pool[i]
    return pool[int(_ucb(mean, var, len(pool), step).argmax())]


def _best_seen(log: list[Evaluation]) -> SearchResult:
    best = max((e for e in log if e.task == EXPENSIVE), key=lambda e: e.value)
    return SearchResult(best.x, best.value, log)


def _training(log: list[Evaluation]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.tensor([e.x for e in log], dtype=torch.float64), torch.tensor([e.value for e in log], dtype=torch.float64),
            torch.tensor([e.task for e in log]))


def _with_start(pool: torch.Tensor, start: list[float] | None) -> torch.Tensor:
    """The pool with `start` first (it is evaluated first and may be the answer)."""
    if start is None:
        return pool
    return torch.cat([torch.tensor([start], dtype=pool.dtype), pool])


def _best_observed(log: list[Evaluation], pool: torch.Tensor) -> torch.Tensor:
    """The pool point nearest the best cheap evaluation: the first expensive step's natural guess."""
    best = torch.tensor(max(log, key=lambda e: e.value).x, dtype=torch.float64)
    return pool[int(((pool - best) ** 2).sum(1).argmin())]


def single_task_search(objective: Objective, dim: int, *, expensive: int, seed: int = 0,
                       feasible: Callable[[list[float]], bool] | None = None, pool_size: int = 512,
                       progress: bool = False, on_evaluation: Callable[[Evaluation], None] | None = None,
                       start: list[float] | None = None) -> SearchResult:
    """The baseline without the cheap task: GP-UCB on the expensive task alone (two initial points, the first
    `start` when given), the same last step and answer as the multi-task search."""
    pool = _with_start(candidates(dim, pool_size, seed=seed, feasible=feasible), start)
    log: list[Evaluation] = []
    with StepProgress(expensive, "single-task GP search", enabled=progress) as bar:
        for step in range(expensive):
            if step < 2:
                x = pool[step * (len(pool) // 2)]
            else:
                x_train, y_train, _ = _training(log)
                model = _fit(x_train, y_train, None)
                with torch.no_grad():
                    post = model.posterior(pool)
                    x = _acquire(post.mean[:, 0], post.variance[:, 0], pool, log, step + 1, last=step == expensive - 1)
            _evaluate(objective, x, EXPENSIVE, log, on_evaluation)
            bar.advance(f"{log[-1].value:.4f}")
    return _best_seen(log)


def random_search(objective: Objective, dim: int, *, expensive: int, seed: int = 0,
                  feasible: Callable[[list[float]], bool] | None = None, progress: bool = False,
                  on_evaluation: Callable[[Evaluation], None] | None = None,
                  start: list[float] | None = None) -> SearchResult:
    """The baseline without a model: `expensive` feasible points at random (the first `start` when given);
    the best one observed."""
    pool = candidates(dim, max(4 * expensive, 64), seed=seed, feasible=feasible)
    pick = _with_start(pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed + 1))], start)
    pick = pick[:expensive]
    log: list[Evaluation] = []
    with StepProgress(len(pick), "random search", enabled=progress) as bar:
        for x in pick:
            _evaluate(objective, x, EXPENSIVE, log, on_evaluation)
            bar.advance(f"{log[-1].value:.4f}")
    return _best_seen(log)
