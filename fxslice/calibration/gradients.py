"""Gradient mode: forward and backward over the whole program for the causal-LM loss, batch by batch,
feeding observers with values (as the forward pass computes them) and with the loss's gradient at
values (as the backward pass reaches them).

This is what curvature-based methods need: the LLM Surgeon's Kronecker factors are `A` = Σ xxᵀ at a
linear's input and `G` = Σ ggᵀ at its output gradient (empirical Fisher with the data's next tokens
as labels, or the true Fisher with labels sampled from the model). The weights need no gradient:
the first observed value becomes the root of the autograd graph, so nothing upstream of it is tracked.

Memory is one batch's stream, not its whole autograd graph: the graph runs in stretches (`stretches`, about
one decoder layer each, cut where the fewest values cross) under activation checkpointing, so the backward pass
recomputes one stretch's intermediates at a time; and the loss and its gradient are taken a slice of tokens
at a time, so the vocabulary-wide log-softmax exists for one slice only.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx
from torch.utils.checkpoint import checkpoint

from fxslice.calibration.distributed import all_reduce_observers, all_reduce_sum, shard
from fxslice.calibration.runner import Observers, notify, run_nodes
from fxslice.core.errors import InvalidOption
from fxslice.core.offload import WeightSource, keep_host_weights
from fxslice.core.program import Program
from fxslice.core.progress import progress_bar

__all__ = ["LABELS", "run_with_gradients", "mean_loss", "stretches"]

#: where the loss's labels come from: the text's next tokens (empirical Fisher) or the model's own samples
LABELS = ("data", "sampled")

#: ops per checkpointed stretch, about one decoder layer of an ATen graph (a Llama layer is ~60)
STRETCH_OPS = 64
#: tokens per slice of the loss: the log-softmax over the vocabulary exists for this many tokens at a time
LOSS_TOKENS = 256


def _targets(logits: torch.Tensor, ids: torch.Tensor, labels: str, generator: torch.Generator | None) -> torch.Tensor:
    """The next token each position is scored against: the text's, or one drawn from the model's own output."""
    if labels == "data":
        return ids[:, 1:]
    with torch.no_grad():
        probs = logits[:, :-1].float().softmax(-1).reshape(-1, logits.shape[-1])
        return torch.multinomial(probs.cpu(), 1, generator=generator).reshape(ids[:, 1:].shape).to(ids.device)


def _slice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if logits.dtype in (torch.float16, torch.bfloat16):  # the loss in float32, as HF computes it
        logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")


def _causal_lm_loss(logits: torch.Tensor, ids: torch.Tensor, labels: str, generator: torch.Generator | None) -> torch.Tensor:
    """Summed next-token cross entropy (a token's gradient is its own, not divided by the batch size), a slice of
    `LOSS_TOKENS` positions at a time, each slice recomputed in the backward pass rather than kept."""
    target = _targets(logits, ids, labels, generator)
    logits = logits[:, :-1]
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, target.shape[1], LOSS_TOKENS):
        part = (logits[:, start:start + LOSS_TOKENS], target[:, start:start + LOSS_TOKENS])
        total = total + (checkpoint(_slice_loss, *part, use_reentrant=False) if logits.requires_grad
                         else _slice_loss(*part))
    return total


@torch.no_grad()
def mean_loss(program: Program, batches: Sequence[torch.Tensor], *, progress: bool = False) -> float:
    """Mean next-token loss over the batches (the figure `run_with_gradients` returns, without gradients)."""
    total, count = 0.0, 0
    for batch in progress_bar(batches, "calibration loss", enabled=progress):
        batch = batch.to(program.device)
        total += float(_causal_lm_loss(program(batch), batch, "data", None))
        count += batch[:, 1:].numel()
    return total / max(count, 1)


def stretches(nodes: Sequence[fx.Node], size: int = STRETCH_OPS) -> list[list[fx.Node]]:
    """`nodes` (in graph order) cut into consecutive stretches of about `size` ops, each cut placed, within a
    quarter of `size` of where it would fall, where the fewest values cross it (between decoder layers: the
    stream and the shared tables)."""
    position = {n: i for i, n in enumerate(nodes)}
    last = {n: max((position.get(u, -1) for u in n.users), default=-1) for n in nodes}
    starts = [0] * (len(nodes) + 1)  # a value made at i and last read at j crosses the cuts after i, ..., j - 1
    for i, n in enumerate(nodes):
        if last[n] > i:
            starts[i] += 1
            starts[last[n]] -= 1
    crossing = list(itertools.accumulate(starts))
    cuts, start, slack = [], 0, size // 4
    while len(nodes) - start > size + slack:
        end = min(range(start + size - slack, start + size + slack + 1),
                  key=lambda e: (crossing[e - 1], abs(e - start - size)))
        cuts.append(end)
        start = end
    bounds = [0, *cuts, len(nodes)]
    return [list(nodes[a:b]) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


class _Stretch:
    """One checkpointed stretch: runs its ops from the values it reads and returns the values read later. On its
    first run (not the backward pass's recomputation) it hands values to their observers and hooks the gradient
    observers; the first observed value becomes a leaf, the root of the autograd graph."""

    def __init__(self, gm: fx.GraphModule, nodes: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node],
                 weights: WeightSource, values: Observers, gradients: Observers):
        self.gm, self.nodes, self.inputs, self.outputs, self.weights = gm, nodes, inputs, outputs, weights
        mine = set(nodes)
        self.values = {n: o for n, o in values.items() if n in mine}
        self.gradients = {n: o for n, o in gradients.items() if n in mine}
        self.first_run = True

    def __call__(self, *inputs: Any) -> tuple[Any, ...]:
        env: dict[fx.Node, Any] = dict(zip(self.inputs, inputs, strict=True))
        for node in self.nodes:
            run_nodes(self.gm, env, [node], self.weights)
            if node in self.gradients:
                env[node] = self._observe_gradient(node, env[node])
        if self.first_run and self.values:
            notify(env, self.values)
        self.first_run = False
        return tuple(env[n] for n in self.outputs)

    def _observe_gradient(self, node: fx.Node, value: Any) -> torch.Tensor:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise InvalidOption(f"gradient observer on {node.name}: its value is not a float tensor")
        if not value.requires_grad:  # the first observed value: autograd starts here
            value = value.detach().requires_grad_(True)
        if self.first_run:
            watching = self.gradients[node]
            for observer in (watching if isinstance(watching, Sequence) else (watching,)):
                value.register_hook(lambda g, observer=observer: observer.update(g))
        return value


def run_with_gradients(
    program: Program,
    batches: Sequence[torch.Tensor],
    *,
    values: Observers | None = None,
    gradients: Observers | None = None,
    labels: str = "data",
    seed: int = 0,
    progress: bool = False,
) -> float:
    """Run every batch forward and backward; returns the mean next-token loss (a sanity figure).

    `values` observers see the forward value of their node; `gradients` observers see d loss / d value.
    """
    if labels not in LABELS:
        raise InvalidOption(f"labels must be one of {LABELS}, got {labels!r}")
    values, gradients = dict(values or {}), dict(gradients or {})
    if not gradients and not values:
        raise InvalidOption("run_with_gradients: give at least one observer")
    graph = program.graph
    output = next(iter(graph.find_nodes(op="output")))
    logits_node = output.args[0][0] if isinstance(output.args[0], (tuple, list)) else output.args[0]
    order = [n for n in graph.nodes if n.op == "call_function"]
    unreached = [n for n in [*values, *gradients] if n not in set(order)]
    if unreached:
        raise InvalidOption(f"observer on {unreached[0].name}: only values an op computes can be observed")
    parts = stretches(order)
    made = {n: k for k, part in enumerate(parts) for n in part}
    placeholder = next(iter(graph.find_nodes(op="placeholder")))
    generator = torch.Generator().manual_seed(seed) if labels == "sampled" else None
    total, count = 0.0, 0
    weights = WeightSource(program.gm, program.execution_device)
    position = {n: i for i, n in enumerate(graph.nodes)}
    plan = []  # per stretch: the values it reads from before it, the values read after it, the last readers' drops
    for k, part in enumerate(parts):
        reads = {a for n in part for a in n.all_input_nodes if a.op != "get_attr" and made.get(a, -1) < k}
        needed = {n for n in part if any(made.get(u, len(parts)) > k for u in n.users)}
        done = {a for a in reads if all(made.get(u, len(parts)) <= k for u in a.users)}
        plan.append((part, sorted(reads, key=position.__getitem__), sorted(needed, key=position.__getitem__), done))
    for batch in progress_bar(shard(batches), "forward and backward", enabled=progress):
        batch = batch.to(program.device)
        env: dict[fx.Node, Any] = {placeholder: batch}
        with torch.enable_grad(), keep_host_weights(weights):
            for part, reads, needed, done in plan:
                stretch = _Stretch(program.gm, part, reads, needed, weights, values, gradients)
                args = [env[n] for n in reads]
                tracked = any(isinstance(a, torch.Tensor) and a.requires_grad for a in args) or stretch.gradients
                outputs = checkpoint(stretch, *args, use_reentrant=False) if tracked else stretch(*args)
                env.update(zip(needed, outputs, strict=True))
                for n in done:  # no later stretch reads it
                    del env[n]
            logits = env[logits_node]
            loss = _causal_lm_loss(logits, batch, labels, generator)
            if gradients:
                loss.backward()
        total += float(loss.detach())
        count += batch[:, 1:].numel()
        del env, logits, loss
    all_reduce_observers([*values.values(), *gradients.values()])
    total, count = all_reduce_sum([total, count])
    return total / max(count, 1)

