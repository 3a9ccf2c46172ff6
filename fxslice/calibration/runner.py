"""Staged execution of a program over many batches, for sequential calibration (design.md §4).

`StagedRunner` runs the graph up to a node for every batch, keeps only the values a later node
still needs (the stream at the cut and side inputs such as masks and rotary tables), and lets the
caller edit weights, insert nodes downstream, and transform the cached values between stages.
Observers (`fxslice.calibration.observers`) attached to nodes see each batch's value as it is
computed. Running all stages costs one forward pass over the batches in total. For an offloaded
program (`Program.offload`) a stage's weights are copied to the device once, for all batches, and
dropped when it ends: the device holds one stage's weights and the cached values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import fx

from fxslice.calibration.distributed import all_reduce_observers, shard
from fxslice.calibration.observers import Observer
from fxslice.core.errors import UnsupportedStructure
from fxslice.core.offload import WeightSource, run_nodes, stage_weights
from fxslice.core.program import Program

__all__ = ["StagedRunner", "Observers", "notify", "run_nodes"]

Env = dict[fx.Node, Any]
#: which observers watch which node's value
Observers = Mapping[fx.Node, Observer | Sequence[Observer]]


def notify(env: Env, observers: Observers) -> None:
    """Give each observer its node's value in `env`."""
    for node, watching in observers.items():
        if node not in env:
            raise UnsupportedStructure(f"observer on {node.name}: the node has not run by the end of this stage")
        for observer in (watching if isinstance(watching, Sequence) else (watching,)):
            observer.update(env[node])


class StagedRunner:
    """Under a `torch.distributed` process group each rank runs its share of the batches and the observers'
    statistics are summed over the ranks at the end of every stage (`fxslice.calibration.distributed`)."""

    def __init__(self, program: Program, batches: Sequence[torch.Tensor]):
        self.program = program
        self.envs: list[Env] = [self._inputs(batch) for batch in shard(batches)]
        self.done: set[fx.Node] = set(program.graph.find_nodes(op="placeholder"))
        #: the most weight bytes one stage copied to the device (0 unless the program is offloaded)
        self.peak_staged_bytes = 0

    def _inputs(self, batch: torch.Tensor) -> Env:
        """The graph's inputs for one batch; a KV-cache graph computes the whole windows from an empty cache."""
        program, device = self.program, self.program.device
        placeholders = list(program.graph.find_nodes(op="placeholder"))
        env: Env = {placeholders[0]: batch.to(device)}
        if program.cache is not None:
            kv = program.cache.allocate(batch.shape[0], batch.shape[1], program.dtype, device)
            env |= {placeholders[1]: torch.tensor(0, device=device), **dict(zip(placeholders[2:], kv, strict=True))}
        return env

    def _weights(self, todo: list[fx.Node]) -> WeightSource:
        device = self.program.execution_device
        if device is None:
            return WeightSource(self.program.gm)
        staged = stage_weights(self.program.gm, todo, device)
        unique = {id(t): t.numel() * t.element_size() for t in staged.values()}
        self.peak_staged_bytes = max(self.peak_staged_bytes, sum(unique.values()))
        return WeightSource(self.program.gm, device, staged)

    def _todo(self, stop: fx.Node) -> list[fx.Node]:
        order = list(self.program.graph.nodes)
        return [n for n in order[: order.index(stop) + 1] if n not in self.done and n.op == "call_function"]

    @torch.no_grad()
    def run_through(self, stop: fx.Node, observers: Observers | None = None) -> None:
        """Execute every not-yet-run node up to and including `stop`, batch by batch; each batch's values of
        the observed nodes go to their observers before anything is dropped."""
        todo = self._todo(stop)
        self.done.update(todo)
        live = {n for n in self.done if any(u not in self.done for u in n.users)}
        keep = live | set(observers or ())
        weights = self._weights(todo)
        for env in self.envs:
            run_nodes(self.program.gm, env, todo, weights, keep=keep)
            if observers:
                notify(env, observers)
            for node in list(env):
                if node not in live:
                    del env[node]
        if observers:
            all_reduce_observers(observers.values())

    def transform(self, nodes: Sequence[fx.Node], fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the cached values of `nodes` (where cached) by fn(value)."""
        for env in self.envs:
            for node in nodes:
                if node in env and isinstance(env[node], torch.Tensor):
                    env[node] = fn(env[node])
