"""The object every pass works on: a captured graph plus what is known of its source."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import fx, nn

from fxslice.core import graph as G
from fxslice.core.errors import InvalidOption
from fxslice.core.offload import execute

__all__ = ["Program", "program_inputs"]

T = TypeVar("T")


def program_inputs(kv_tensors: int | None = None) -> list[str]:
    """The graph inputs of a program: `input_ids`, and for a KV-cache graph `past_length` and one `kv_i` per
    cache tensor."""
    return ["input_ids"] + ([] if kv_tensors is None else ["past_length", *(f"kv_{i}" for i in range(kv_tensors))])


@dataclass
class Program:
    """A causal LM as an ATen-level FX graph: `program(input_ids) -> logits`.

    Weights are `get_attr` nodes whose targets are the model's own fully qualified names
    (`model.layers.3.self_attn.q_proj.weight`). `version` counts graph changes; analyses
    are cached against it (see `analysis`).
    """

    gm: fx.GraphModule
    model_class: str = "nn.Module"
    config: dict[str, Any] | None = None
    tokenizer: Any = None
    source: str = ""
    record: dict[str, Any] = field(default_factory=dict)  # what fxslice did to it (see fxslice.models.io)
    cache: Any = None  # a fxslice.models.kvcache.CacheLayout when the graph reads and writes a KV cache
    quantized: dict[str, Any] = field(default_factory=dict)  # weight target -> fxslice.core.quantized.QuantizedWeight
    static_shape: tuple[int, int] | None = None  # the one (batch, length) a capture without dynamic shapes accepts
    # where an offloaded program computes while its weights stay where they are (`offload`); None: with its weights
    execution_device: torch.device | None = None
    version: int = 0
    _analyses: dict[Callable, tuple[int, Any]] = field(default_factory=dict, repr=False)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits for whole sequences (a cached graph starts from an empty cache), on the program's device."""
        input_ids = input_ids.to(self.device)
        if self.static_shape is not None and tuple(input_ids.shape) != self.static_shape:
            raise ValueError(f"this {self.model_class} was captured with static shapes and takes input_ids of shape "
                             f"{self.static_shape} only, not {tuple(input_ids.shape)}; pad or cut the inputs to that "
                             "shape, or make the model's shape-dependent code traceable and capture it again")
        return self._run(*self.whole_sequence_inputs(input_ids))

    def whole_sequence_inputs(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What the graph takes to compute whole sequences: `input_ids`, and for a KV-cache graph a past length of 0
        and an empty cache (for `torch.func.functional_call(program.gm, weights, inputs)`, say)."""
        if self.cache is None:
            return (input_ids,)
        kv = self.cache.allocate(input_ids.shape[0], input_ids.shape[1], self.dtype, input_ids.device)
        return (input_ids, torch.tensor(0, device=input_ids.device), *kv)

    def step(self, input_ids: torch.Tensor, past_length: int, kv: list[torch.Tensor]) -> torch.Tensor:
        """Logits of `input_ids` following `past_length` tokens already in `kv`, which is updated in place."""
        if self.cache is None:
            raise TypeError("this program has no KV cache; capture it with fxslice.models.kvcache.capture_cached")
        return self._run(input_ids, torch.tensor(past_length, device=input_ids.device), *kv)

    def _run(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.execution_device is None:
            return self.gm(*inputs)
        return execute(self.gm, inputs, self.execution_device)

    @property
    def input_names(self) -> list[str]:
        """What the graph must take (the manager checks it after every pass)."""
        return program_inputs(None if self.cache is None else len(self.cache.shapes))

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    @property
    def device(self) -> torch.device:
        """Where the program computes: where its weights are, or where an offloaded program copies them to."""
        return self.execution_device or self.weights_device

    @property
    def weights_device(self) -> torch.device:
        """Where the weights are kept."""
        return next((p.device for p in self.gm.parameters()), torch.device("cpu"))

    @property
    def dtype(self) -> torch.dtype:
        floats = [p.dtype for p in self.gm.parameters() if p.is_floating_point()]
        return floats[0] if floats else torch.float32

    @property
    def vocab_size(self) -> int:
        for node in self.graph.nodes:
            if node.op == "call_function" and node.target == torch.ops.aten.embedding.default:
                return G.tensor_of(self.gm, node.args[0]).shape[0]
        raise LookupError("the graph has no token embedding")

    def num_parameters(self) -> int:
        """Parameters the graph actually uses (a tied table counts once)."""
        seen: dict[int, int] = {}
        for node in self.graph.nodes:
            if node.op == "get_attr" and node.users:
                value = G.tensor_of(self.gm, node)
                if isinstance(value, nn.Parameter):
                    seen[id(value)] = value.numel()
        return sum(seen.values())

    def num_bytes(self) -> int:
        """Bytes of the tensors the graph reads, as stored: quantized weights packed (scales and zero points
        included), the rest (buffers such as RoPE's frequencies too) in their dtype; a tied table once."""
        packed = {id(G.tensor_of(self.gm, name)): q for name, q in self.quantized.items()}
        seen: dict[int, int] = {}
        for node in self.graph.nodes:
            if node.op == "get_attr" and node.users:
                value = G.tensor_of(self.gm, node)
                if isinstance(value, torch.Tensor):
                    q = packed.get(id(value))
                    seen[id(value)] = q.nbytes if q is not None else value.numel() * value.element_size()
        return sum(seen.values())

    def digest(self) -> str:
        """A sha256 of the graph's code and of every tensor it reads: equal digests, the same computation (what a
        resumed search checks that it resumes on the model it started on)."""
        import hashlib

        h = hashlib.sha256(self.gm.code.encode())
        for node in self.graph.find_nodes(op="get_attr"):
            value = G.tensor_of(self.gm, node)
            if isinstance(value, torch.Tensor):
                data = value.detach().cpu().contiguous()
                h.update(str(node.target).encode() + str(data.dtype).encode() + str(tuple(data.shape)).encode())
                h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        return h.hexdigest()

    def analysis(self, fn: Callable[[Program], T]) -> T:
        """Run the analysis `fn` once per graph version and cache its result."""
        cached = self._analyses.get(fn)
        if cached is not None and cached[0] == self.version:
            return cached[1]
        result = fn(self)
        self._analyses[fn] = (self.version, result)
        return result

    def mark_changed(self) -> None:
        """Call after editing the graph or weights outside a PassManager."""
        self.version += 1
        self._analyses.clear()

    def clone(self, dtype: torch.dtype | None = None) -> Program:
        """An independent copy (graph and weights); with `dtype`, its float weights converted as they are copied (a
        float64 copy of a float32 model never holds a second float32 copy; a program whose weights are on disk gets
        its copy on disk too)."""
        memo: dict[int, Any] = {}
        if dtype is not None:
            for t in [*self.gm.parameters(), *self.gm.buffers()]:
                if t.is_floating_point() and id(t) not in memo:
                    value = G.kept(self.gm, G.converted(t, dtype, copy=True).detach())  # on disk if kept there
                    memo[id(t)] = nn.Parameter(value, requires_grad=False) if isinstance(t, nn.Parameter) else value
        return self._copy(memo)

    def skeleton(self) -> Program:
        """A copy whose weights are shapes only (`meta` tensors, no memory): a graph to `fxslice.replay` passes onto
        that takes its weights from the program it follows. A compression keeps its KV-cache capture this way, so the
        original weights are not held for it while the passes replace them, nor computed twice when it follows."""
        memo: dict[int, Any] = {}
        for t in [*self.gm.parameters(), *self.gm.buffers()]:
            if id(t) not in memo:
                empty = torch.empty_like(t, device="meta")
                memo[id(t)] = nn.Parameter(empty, requires_grad=False) if isinstance(t, nn.Parameter) else empty
        return self._copy(memo)

    def _copy(self, memo: dict[int, Any]) -> Program:
        """A copy of this program whose tensors are `memo`'s replacements where it has one (deepcopy's memo)."""
        return Program(copy.deepcopy(self.gm, memo), self.model_class, self.config, self.tokenizer, self.source,
                       dict(self.record), cache=self.cache, quantized=dict(self.quantized),
                       static_shape=self.static_shape, execution_device=self.execution_device)

    @property
    def is_skeleton(self) -> bool:
        """Whether any weight the graph reads is shape only (see `skeleton`)."""
        return any(isinstance(t := G.tensor_of(self.gm, n), torch.Tensor) and t.device.type == "meta"
                   for n in self.graph.find_nodes(op="get_attr"))

    def to(self, *target: torch.device | torch.dtype | str, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> Program:
        """A copy on `device` and/or computing in `dtype` (given as in `torch.Tensor.to`: `to("cuda")`,
        `to(torch.bfloat16)`, `to("cuda", torch.bfloat16)`); the program itself is left as it is.

        Weights move and convert, and so does the graph: every float cast is retargeted to `dtype` (HF models cast
        to float32 inside their norms; a float64 check must lift those casts too, or it measures float32 round-off
        instead of the passes) — below float32, except the model's own float32 islands, which stay as transformers
        runs them (`fxslice.core.graph.float32_islands`) — and every op that creates a tensor (`arange`, `full`,
        ...) creates it on `device`, so that no tensor of the captured device is left in the computation.
        """
        for item in target:
            if isinstance(item, torch.dtype):
                dtype = item
            else:
                device = item
        if device is not None:
            self._check_movable(torch.device(device))
        out = self.clone(dtype)
        if dtype is not None:
            G.retarget_float_casts(out.gm, dtype)
        if device is not None:
            G.retarget_device(out.gm, torch.device(device))
            out.execution_device = None
        return out

    def offload(self, device: torch.device | str) -> Program:
        """A copy that computes on `device` while its weights stay where they are (in host memory): for a model
        larger than the device's memory. Each weight is copied to the device only while an op or a calibration stage
        needs it (`fxslice.core.offload`); the passes edit the weights where they are kept. `to(device)` undoes it."""
        device = torch.device(device)
        self._check_movable(device, offload=True)
        out = self.clone()
        G.retarget_device(out.gm, device, weights=False)
        out.execution_device = device
        return out

    def _check_movable(self, device: torch.device, offload: bool = False) -> None:
        bound = G.device_bound(self.gm)
        if bound and (offload or device.type != bound[0].meta[G.DEVICE_BOUND]):
            raise InvalidOption(f"{bound[0].name} reads weights packed for the {bound[0].meta[G.DEVICE_BOUND]}'s kernel "
                                f"({len(bound)} such ops), which {device} cannot read: move the program before choosing "
                                "its kernels (load the quantized model again, move it, then apply the kernels)")

    def probe_input(self, batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, self.vocab_size, self.static_shape or (batch, length), generator=gen)
