"""Running a program whose weights stay in host memory while it computes on a device.

A model larger than the device's memory is sliced by keeping its weights where they are (the CPU) and copying
each one to the device only for the ops that read it (`Program.offload`). Everything that runs a program goes
through `run_nodes`: it evaluates nodes in order and reads weights through a `WeightSource`, which hands out
the weight itself for a program that is not offloaded and a transient copy on the device for one that is (a copy
even when the device is the weights' own, so that a CPU test runs what a GPU runs). `execute` runs a whole graph
that way, dropping every value after its last use, so a forward pass holds one weight and the live activations.
Under gradients, `keep_host_weights` makes autograd save the host weight instead of the device copy, so a
backward pass does not pin every weight of the model on the device either.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx

from fxslice.core.graph import tensor_of

__all__ = ["WeightSource", "run_nodes", "execute", "stage_weights", "keep_host_weights"]

Env = dict[fx.Node, Any]


class WeightSource:
    """Reads a program's weights for ops that compute on `device`: a copy there, or with no device the weight itself.
    `detach`: calibration never needs the weights' gradients (some captures leave `requires_grad` set); training does
    (recovery's adapters), and then the copy is differentiable, so gradients reach the weight where it is kept."""

    def __init__(self, gm: fx.GraphModule, device: torch.device | None = None,
                 staged: Mapping[fx.Node, torch.Tensor] | None = None, detach: bool = True):
        self.gm, self.device, self.staged, self.detach = gm, device, staged or {}, detach
        self._copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(copy) -> (copy, host weight)

    def __call__(self, node: fx.Node) -> Any:
        if node in self.staged:
            return self.staged[node]
        weight = tensor_of(self.gm, node)
        if not isinstance(weight, torch.Tensor):
            return weight
        if self.detach:
            weight = weight.detach()
        if self.device is None:
            return weight
        copy = weight.to(self.device, copy=True)  # a copy even on the same device: what runs is what a GPU runs
        self._copies[id(copy)] = (copy, weight)
        return copy

    def host_of(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The host weight `tensor` (or the tensor it is a view of) was copied from, if any."""
        for t in (tensor, tensor._base):
            entry = self._copies.get(id(t)) if t is not None else None
            if entry is not None and entry[0] is t:
                return entry[1]
        return None

    def release(self) -> None:
        """Forget the copies handed out so far (the ops that read them have run)."""
        self._copies.clear()


def run_nodes(gm: fx.GraphModule, env: Env, nodes: Sequence[fx.Node], weights: WeightSource | None = None,
              keep: Collection[fx.Node] | None = None) -> None:
    """Evaluate `nodes` in order into `env`, reading weights when used (they change between calibration stages).
    With `keep`, a value is dropped from `env` after its last use among `nodes` unless it is in `keep`: a long
    stretch of graph then holds the live activations only, not every intermediate of the stretch."""
    weights = weights or WeightSource(gm)
    last_use = {n: i for i, node in enumerate(nodes) for n in node.all_input_nodes} if keep is not None else {}

    def value(n: fx.Node) -> Any:
        return weights(n) if n.op == "get_attr" else env[n]

    for i, node in enumerate(nodes):
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), value)
        env[node] = node.target(*args, **kwargs)
        weights.release()
        if keep is not None:
            for n in node.all_input_nodes:
                if last_use[n] == i and n not in keep:
                    env.pop(n, None)


def execute(gm: fx.GraphModule, inputs: Sequence[Any], device: torch.device) -> Any:
    """Run the whole graph on `inputs`, weights copied to `device` op by op and values dropped after their last use."""
    graph = gm.graph
    placeholders = list(graph.find_nodes(op="placeholder"))
    if len(inputs) != len(placeholders):
        raise TypeError(f"the graph takes {len(placeholders)} inputs ({', '.join(p.name for p in placeholders)}), "
                        f"got {len(inputs)}")
    env: Env = dict(zip(placeholders, inputs, strict=True))
    output = next(iter(graph.find_nodes(op="output")))
    weights = WeightSource(gm, device, detach=False)
    with keep_host_weights(weights):
        run_nodes(gm, env, [n for n in graph.nodes if n.op == "call_function"], weights,
                  keep=set(output.all_input_nodes))
    return fx.node.map_arg(output.args[0], lambda n: weights(n) if n.op == "get_attr" else env[n])


def stage_weights(gm: fx.GraphModule, nodes: Sequence[fx.Node], device: torch.device) -> dict[fx.Node, torch.Tensor]:
    """The weights `nodes` read, each copied once to `device`: what a calibration stage needs there."""
    source = WeightSource(gm, device)
    return {n: source(n) for node in nodes for n in node.all_input_nodes
            if n.op == "get_attr" and isinstance(tensor_of(gm, n), torch.Tensor)}


@contextmanager
def keep_host_weights(weights: WeightSource) -> Iterator[None]:
    """While active, autograd saves a weight copied by `weights` as its host tensor and copies it back to the
    device only when the backward pass reads it: saved activations stay, saved weights do not."""
    device = weights.device

    def pack(t: torch.Tensor) -> Any:
        host = weights.host_of(t)
        if host is None or host.requires_grad:  # a trained weight is small (an adapter): keep its copy
            return t
        return (host, t.size(), t.stride(), t.storage_offset())

    def unpack(saved: Any) -> torch.Tensor:
        if isinstance(saved, torch.Tensor):
            return saved
        host, size, stride, offset = saved
        return host.to(device).as_strided(size, stride, offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
