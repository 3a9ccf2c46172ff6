"""Run 4-bit weights as 4-bit weights: every eligible 4-bit linear computed by PyTorch's int4 weight-only kernel
(the one torchao's int4 path calls: `_weight_int4pack_mm_for_cpu` on the CPU, `_weight_int4pack_mm` on CUDA) from
its packed integers, instead of from the float copy the quantization pass keeps in the graph.

Why a pass: the quantized program computes with dequantized float weights, so it is as large in memory as the float
model. The kernel takes fxslice's format unchanged — a zero point becomes the kernel's additive offset
`(8 - zero) · scale`, so `(q - 8) · scale + offset = (q - zero) · scale` — and the float weight can go. The packed
layout is the device's own, which is why this is a run-time step: move and convert the program first
(`program.to(device, dtype)`), then apply it; the result can neither be moved to another device nor saved (save the
quantized program, and choose the kernels again after loading it).
"""

from __future__ import annotations

import torch
from torch import fx

from fxslice import InvalidOption, Pass, PassResult, Program
from fxslice.analysis.linears import weight_kinds
from fxslice.analysis.matchers import WEIGHT_VIEWS, LinearUse
from fxslice.core.graph import (
    DEVICE_BOUND,
    add_buffer,
    drop_unused_weights,
    insert_op,
    readers_of,
    refresh_vals,
    tensor_of,
)
from fxslice.core.quantized import QuantizedWeight

__all__ = ["Int4Kernels", "int4_eligibility", "packed_shape"]

aten = torch.ops.aten

#: group sizes the kernels take
GROUP_SIZES = (32, 64, 128, 256)

#: outputs are packed in multiples of this (the CPU kernel takes multiples of 16 rows, CUDA's of 8)
ROW_MULTIPLE = 16


def int4_eligibility(q: QuantizedWeight) -> str | None:
    """Why the kernel cannot run `q` (None: it can). Any shape can: see `packed_shape`."""
    if q.bits != 4:
        return f"{q.bits}-bit"
    if q.group_size not in GROUP_SIZES:
        return f"group size {q.group_size} (the kernel takes {', '.join(map(str, GROUP_SIZES))})"
    return None


def packed_shape(q: QuantizedWeight) -> tuple[int, int]:
    """[out, in] as packed: outputs padded with zero rows to a multiple of `ROW_MULTIPLE`, inputs to whole groups
    (the last group of a width a slicing or a pruning left is often short). The input is padded with zeros to match and the
    output cut back, so that any width a slicing or a pruning leaves runs on the kernel."""
    return -(-q.shape[0] // ROW_MULTIPLE) * ROW_MULTIPLE, q.groups * q.group_size


def _pack(q: QuantizedWeight, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The integers in the kernel's layout for `device`, and its [groups, out, 2] scales and offsets (zero for the
    padding rows, so that they compute zeros)."""
    (out, cols), (rows, padded) = q.shape, packed_shape(q)
    ints = torch.zeros(rows, padded, dtype=torch.int32)
    ints[:out, :cols] = q.q
    scale = torch.zeros(rows, q.groups)
    scale[:out] = q.scale
    offsets = torch.zeros(rows, q.groups)
    offsets[:out] = q.level_value(8)  # the kernel computes (q − 8)·scale + offset
    if device.type == "cuda":
        nibbles = (ints[:, ::2] << 4 | ints[:, 1::2]).to(torch.uint8).to(device)  # two per byte, high one first
        tiles = next(t for t in (8, 4, 2) if padded % (16 * t) == 0)
        packed = aten._convert_weight_to_int4pack(nibbles, tiles)
    else:
        packed = aten._convert_weight_to_int4pack_for_cpu(ints, 1)
    scales = torch.stack([scale, offsets], -1).transpose(0, 1).contiguous()
    return packed, scales.to(device, dtype)


class Int4Kernels(Pass):
    """Every 4-bit quantized linear the kernel can take, computed from its packed integers on the program's
    device in the program's dtype (CUDA's kernel takes bfloat16 only); the float copies go. Weights it cannot take
    (other widths or group sizes, a table also read by an embedding lookup) stay as they are and are listed in the
    result's `kept`. Requires a program on the CPU or CUDA, not offloaded."""

    name = "int4_kernels"
    exact = False  # the kernel's own rounding (4e-7 relative in float32)

    def requires(self, program: Program) -> None:
        device = program.device
        if program.execution_device is not None:
            raise InvalidOption("int4 kernels: this program is offloaded (its weights stay in host memory); the packed "
                                "weights live where the kernel runs: move it with program.to(device) first")
        if device.type not in ("cpu", "cuda"):
            raise InvalidOption(f"int4 kernels: PyTorch has them on the CPU and CUDA, not on {device.type}")
        if device.type == "cuda" and program.dtype != torch.bfloat16:
            raise InvalidOption(f"int4 kernels: CUDA's int4 kernel computes in bfloat16 and this program computes in "
                                f"{str(program.dtype).replace('torch.', '')}: quantize a bfloat16 capture "
                                "(capture(name, dtype=torch.bfloat16); --dtype bfloat16 on the command line)")
        if not program.quantized:
            raise InvalidOption("int4 kernels: the program has no quantized weights; quantize it first "
                                "(fxslice quantize, or the QuantizeWeights pass)")

    def call(self, program: Program) -> PassResult:
        gm, device, dtype = program.gm, program.device, program.dtype
        kinds = program.analysis(weight_kinds)
        linears = {**kinds.linears, **({kinds.head: kinds.head_uses} if kinds.head else {})}
        kept: dict[str, str] = {}
        done: list[str] = []
        for name, q in list(program.quantized.items()):
            reason = int4_eligibility(q) or self._unfit_uses(program, name, q, linears.get(name))
            if reason is not None:
                kept[name] = reason
                continue
            packed, scales = _pack(q, device, dtype)
            packed_name = add_buffer(gm, "int4_weight", packed)
            scales_name = add_buffer(gm, "int4_scales", scales)
            for use in linears[name]:
                self._rewrite(gm, use, packed_name, scales_name, q)
            done.append(name)
        if not done:
            name, reason = next(iter(kept.items()))
            raise InvalidOption(f"int4 kernels: nothing to run on them: '{name}' is {reason}"
                                + (f" (and {len(kept) - 1} more weights)" if len(kept) > 1 else "")
                                + "; quantize to 4 bits with a group size of 32, 64, 128 or 256")
        for name in done:
            del program.quantized[name]
        gm.graph.eliminate_dead_code()
        drop_unused_weights(gm)
        refresh_vals(gm)
        return PassResult(bool(done), {"weights": len(done), "replaced": done, "kept": kept, "bytes": program.num_bytes()})

    @staticmethod
    def _unfit_uses(program: Program, name: str, q: QuantizedWeight, uses: list[LinearUse] | None) -> str | None:
        """Why the weight's readers are not all linears the kernel can replace (None: they are)."""
        if name in program.analysis(weight_kinds).tables:
            return "a token table (the embedding lookup reads its rows)"
        if not uses:
            return "not read as a linear's weight"
        readers = readers_of(program.gm, tensor_of(program.gm, name))
        linears = {u.node for u in uses}
        for reader in readers:
            for user in reader.users:
                through_view = user.target in WEIGHT_VIEWS and all(u in linears for u in user.users)
                if user not in linears and not through_view:
                    return f"also read by {user.name}, which is not a linear"
        for use in uses:
            parameter_transposed = use.out_axis % 2 != 0
            if parameter_transposed != q.transposed:
                return "read along other axes than it was quantized on"
            x = use.input.meta.get("val")
            if not isinstance(x, torch.Tensor) or x.dtype != program.dtype:
                return f"its input is {getattr(x, 'dtype', 'unknown')}, not the program's dtype"
            if use.node.target not in (aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default):
                return f"read by {use.node.target}"
        return None

    @staticmethod
    def _rewrite(gm: fx.GraphModule, use: LinearUse, packed: str, scales: str, q: QuantizedWeight) -> None:
        """`use.node` becomes reshape -> kernel -> reshape back (-> + the bias the node itself added)."""
        graph = gm.graph
        (out_features, in_features), (rows_packed, in_packed) = q.shape, packed_shape(q)
        x = use.input
        rank = x.meta["val"].dim()
        with graph.inserting_before(use.node):
            rows = insert_op(graph, aten.reshape.default, (x, [-1, in_features]), like=use.node)
            if in_packed > in_features:
                rows = insert_op(graph, aten.constant_pad_nd.default, (rows, [0, in_packed - in_features], 0.0),
                                 like=use.node)
            w = graph.get_attr(packed)
            s = graph.get_attr(scales)
            w.meta["val"], s.meta["val"] = tensor_of(gm, packed), tensor_of(gm, scales)
            kernel = aten._weight_int4pack_mm if tensor_of(gm, packed).device.type == "cuda" else aten._weight_int4pack_mm_for_cpu
            y = insert_op(graph, kernel, (rows, w, q.group_size, s), like=use.node)
            y.meta[DEVICE_BOUND] = tensor_of(gm, packed).device.type
            if rows_packed > out_features:
                y = insert_op(graph, aten.slice.Tensor, (y, 1, 0, out_features), like=use.node)
            if rank != 2:
                lead = [insert_op(graph, aten.sym_size.int, (x, d), like=use.node) for d in range(rank - 1)]
                y = insert_op(graph, aten.reshape.default, (y, [*lead, out_features]), like=use.node)
            bias = use.node.args[0] if use.node.target == aten.addmm.default else (
                use.bias if use.node.target == aten.linear.default and use.output is use.node else None)
            if bias is not None:
                y = insert_op(graph, aten.add.Tensor, (y, bias), like=use.node)
        use.node.replace_all_uses_with(y)
        graph.erase_node(use.node)
