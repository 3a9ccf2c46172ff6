"""PyTorch's own int4 weight-only matmul against the float matmul it would replace, in one run; one JSON object.

    python benchmarks/int4_kernel.py [--device auto] [--shapes 1536x576,4096x4096,11008x4096] [--rows 1,8,512]
                                     [--group-size 64] [--repeats 20]

The kernel is the one torchao's int4 weight-only path calls (`_weight_int4pack_mm_for_cpu` on the CPU,
`_weight_int4pack_mm` on CUDA, which takes bfloat16 only). Each weight is quantized by fxslice's own 4-bit format
(`QuantizedWeight`) and handed to the kernel unchanged — zero points become the kernel's additive offsets,
`(8 - zero) · scale` — so the relative error against the dequantized float weight says whether the format maps
exactly, and the time ratio (kernel / float, same dtype, same inputs) whether running the packed weights pays. The
first shape is SmolLM2's MLP, the others a 7B model's attention and MLP.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from fxslice.core.devices import resolve_device
from fxslice.core.quantized import QuantizedWeight


def _seconds(fn, repeats: int, device: torch.device) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--shapes", default="1536x576,4096x4096,11008x4096", help="[out]x[in] of each weight")
    parser.add_argument("--rows", default="1,8,512", help="input rows: 1 is a decoding step, 512 a prefill")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    dtypes = (torch.bfloat16,) if cuda else (torch.float32, torch.bfloat16)
    convert = torch.ops.aten._convert_weight_to_int4pack if cuda else torch.ops.aten._convert_weight_to_int4pack_for_cpu
    matmul = torch.ops.aten._weight_int4pack_mm if cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
    rows = []
    for shape in args.shapes.split(","):
        out, cols = (int(v) for v in shape.split("x"))
        m = torch.randn(out, cols, generator=torch.Generator().manual_seed(out + cols))
        q = QuantizedWeight.from_matrix(m, 4, args.group_size)
        dense = q.dequantize().to(device)
        weights = q.q.to(torch.int32).to(device)
        packed = convert(_nibbles(weights) if cuda else weights, 8 if cuda else 1)
        offsets = torch.stack([q.scale, (8 - q.zero).to(torch.float32) * q.scale], -1).transpose(0, 1).contiguous()
        for dtype in dtypes:
            w = dense.to(dtype)
            scales = offsets.to(device, dtype)
            for n in (int(r) for r in args.rows.split(",")):
                x = torch.randn(n, cols, generator=torch.Generator().manual_seed(n)).to(device, dtype)
                reference = x.float() @ dense.T
                y = matmul(x, packed, args.group_size, scales)
                float_s = _seconds(lambda x=x, w=w: x @ w.T, args.repeats, device)
                int4_s = _seconds(lambda x=x, s=scales, p=packed: matmul(x, p, args.group_size, s), args.repeats, device)
                rows.append({"shape": [out, cols], "rows": n, "dtype": str(dtype).replace("torch.", ""),
                             "relative_error": float((y.float() - reference).norm() / reference.norm()),
                             "float_ms": round(1e3 * float_s, 4), "int4_ms": round(1e3 * int4_s, 4),
                             "int4_vs_float_time": round(int4_s / float_s, 3),
                             "weight_bytes": {"float": w.numel() * w.element_size(), "int4": q.nbytes}})
    print(json.dumps({"device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
                      "torch": torch.__version__, "threads": torch.get_num_threads(), "group_size": args.group_size,
                      "results": rows}, indent=1))


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """[out, in] integers in [0, 16) as [out, in / 2] bytes, two per byte (high nibble first): the CUDA packer's
    input."""
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)


if __name__ == "__main__":
    main()
