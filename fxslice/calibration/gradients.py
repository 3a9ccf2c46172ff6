"""Gradient mode: forward and backward over the whole program for the causal-LM loss, batch by batch,
feeding observers with values (as the forward pass computes them) and with the loss's gradient at
values (as the backward pass reaches them).

This is what curvature-based methods need: the LLM Surgeon's Kronecker factors are `A` = Σ xxᵀ at a
linear's input and `G` = Σ ggᵀ at its output gradient (empirical Fisher with the data's next tokens
as labels, or the true Fisher with labels sampled from the model). The weights need no gradient:
the first observed value becomes the root of the autograd graph, so nothing upstream of it is tracked.
Only one batch's activations are alive at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx

from fxslice.calibration.distributed import all_reduce_observers, all_reduce_sum, shard
from fxslice.calibration.runner import Observers, notify, run_nodes
from fxslice.core.errors import InvalidOption
from fxslice.core.offload import WeightSource, keep_host_weights
from fxslice.core.program import Program
from fxslice.core.progress import progress_bar

__all__ = ["LABELS", "run_with_gradients", "mean_loss"]

#: where the loss's labels come from: the text's next tokens (empirical Fisher) or the model's own samples
LABELS = ("data", "sampled")


def _causal_lm_loss(logits: torch.Tensor, ids: torch.Tensor, labels: str, generator: torch.Generator | None) -> torch.Tensor:
    """Summed next-token cross entropy: a token's gradient is its own, not divided by the batch size."""
    logits = logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):  # the loss in float32, as HF computes it
        logits = logits.float()
    if labels == "data":
        target = ids[:, 1:]
    else:
        with torch.no_grad():
            probs = logits.softmax(-1).reshape(-1, logits.shape[-1])
            target = torch.multinomial(probs.cpu(), 1, generator=generator).reshape(logits.shape[:-1]).to(ids.device)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")


@torch.no_grad()
def mean_loss(program: Program, batches: Sequence[torch.Tensor]) -> float:
    """Mean next-token loss over the batches (the figure `run_with_gradients` returns, without gradients)."""
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(program.device)
        total += float(_causal_lm_loss(program(batch), batch, "data", None))
        count += batch[:, 1:].numel()
    return total / max(count, 1)


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
    roots = set(gradients)
    generator = torch.Generator().manual_seed(seed) if labels == "sampled" else None
    total, count = 0.0, 0
    weights = WeightSource(program.gm, program.execution_device)
    for batch in progress_bar(shard(batches), "forward and backward", enabled=progress):
        batch = batch.to(program.device)
        env: dict[fx.Node, object] = {next(iter(graph.find_nodes(op="placeholder"))): batch}
        with torch.enable_grad(), keep_host_weights(weights):
            for node in order:
                run_nodes(program.gm, env, [node], weights)
                if node in roots:
                    value = env[node]
                    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                        raise InvalidOption(f"gradient observer on {node.name}: its value is not a float tensor")
                    if not value.requires_grad:  # the first observed value: autograd starts here
                        value = value.detach().requires_grad_(True)
                        env[node] = value
                    watching = gradients[node]
                    for observer in (watching if isinstance(watching, Sequence) else (watching,)):
                        value.register_hook(lambda g, observer=observer: observer.update(g))
            if values:
                notify(env, values)
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
