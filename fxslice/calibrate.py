"""Staged execution of a program over many batches, for sequential calibration (design.md §4).

`StagedRunner` runs the graph up to a node for every batch, keeps only the values a later node
still needs (the stream at the cut and side inputs such as masks and rotary tables), and lets the
caller edit weights, insert nodes downstream, and transform the cached values between stages.
Running all stages costs one forward pass over the batches in total.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from fxslice.graph import tensor_of
from fxslice.program import Program

__all__ = ["StagedRunner"]

Env = dict[fx.Node, Any]


class StagedRunner:
    def __init__(self, program: Program, batches: Sequence[torch.Tensor]):
        self.program = program
        placeholder = next(n for n in program.graph.nodes if n.op == "placeholder")
        self.envs: list[Env] = [{placeholder: batch} for batch in batches]
        self.done: set[fx.Node] = {placeholder}

    @torch.no_grad()
    def run_through(self, stop: fx.Node, observe: Callable[[Env], None] | None = None) -> None:
        """Execute every not-yet-run node up to and including `stop`, batch by batch; `observe(env)` after each."""
        gm = self.program.gm
        order = list(gm.graph.nodes)
        todo = [n for n in order[: order.index(stop) + 1] if n not in self.done and n.op == "call_function"]
        self.done.update(todo)
        live = {n for n in self.done if any(u not in self.done for u in n.users)}
        for env in self.envs:

            def value(n: fx.Node, env: Env = env) -> Any:  # weights are read when used: they change between stages
                return tensor_of(gm, n) if n.op == "get_attr" else env[n]

            for node in todo:
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), value)
                env[node] = node.target(*args, **kwargs)
            if observe is not None:
                observe(env)
            for node in list(env):
                if node not in live:
                    del env[node]

    def transform(self, nodes: Sequence[fx.Node], fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the cached values of `nodes` (where cached) by fn(value)."""
        for env in self.envs:
            for node in nodes:
                if node in env and isinstance(env[node], torch.Tensor):
                    env[node] = fn(env[node])
