"""A hand-written SliceGPT for HF Llama modules, the way the official implementation works; one JSON object.

    python benchmarks/eager_slicegpt.py [--sparsity 0.25] [--calib-windows 16] [--eval-windows 16] [--batch-size 4]

The official code (microsoft/TransformerCompression) is neither on PyPI nor reachable offline, and it needs a
copied HF `forward` per model family. This module is a stand-in written from the paper: a Llama-only adapter
(`SlicedBlock` spells the decoder layer out with shortcut matrices on the residual adds), norms fused into
their readers, the head untied, and each layer calibrated with **two forward passes**, as the official code
does (one for the MLP input's PCA, one for the layer output's). It serves two ends:

- a differential test: fxslice (`FuseNorms(keep_ties=False)` + `SliceStream`) must compute the same sliced
  function from the graph alone (tests/test_eager_baseline.py, float64, tiny Llama);
- the comparison in one run on SmolLM2: perplexity of both, calibration time of both.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch
from torch import nn


class WidthRMSNorm(nn.Module):
    """RMSNorm without a scale that divides by the *original* width, whatever width it is fed."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.width, self.eps = width, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / self.width + self.eps)


class SlicedBlock(nn.Module):
    """A Llama decoder layer with `x @ shortcut` on both residual edges (None: identity)."""

    def __init__(self, layer: nn.Module, width: int) -> None:
        super().__init__()
        eps = layer.input_layernorm.variance_epsilon
        self.attn_norm, self.mlp_norm = WidthRMSNorm(width, eps), WidthRMSNorm(width, eps)
        self.attn, self.mlp = layer.self_attn, layer.mlp
        self.attn_shortcut: torch.Tensor | None = None
        self.mlp_shortcut: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (stream after attention, stream after the MLP): the first is the MLP input's PCA signal."""
        h, _ = self.attn(self.attn_norm(x), position_embeddings=rope, attention_mask=None)
        mid = (x if self.attn_shortcut is None else x @ self.attn_shortcut) + h
        out = (mid if self.mlp_shortcut is None else mid @ self.mlp_shortcut) + self.mlp(self.mlp_norm(mid))
        return mid, out


class SlicedLlama(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        inner, width = model.model, model.config.hidden_size
        self.embed, self.rotary = inner.embed_tokens, inner.rotary_emb
        self.blocks = nn.ModuleList(SlicedBlock(layer, width) for layer in inner.layers)
        self.norm = WidthRMSNorm(width, inner.norm.variance_epsilon)
        self.head = model.lm_head

    def rope(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
        x = self.embed.weight[:1].unsqueeze(0)
        return self.rotary(x.expand(ids.shape[0], -1, -1), positions)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x, rope = self.embed(ids), self.rope(ids)
        for block in self.blocks:
            x = block(x, rope)[1]
        return self.head(self.norm(x))


def _scale_inputs(linears: list[nn.Linear], scale: torch.Tensor) -> None:
    for linear in linears:
        linear.weight.mul_(scale.to(linear.weight.dtype))


def fuse_norm_scales(model: nn.Module) -> None:
    """Move every RMSNorm scale into the linears that read it, and untie the head (`E diag(γ_f)`)."""
    inner = model.model
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _scale_inputs([attn.q_proj, attn.k_proj, attn.v_proj], layer.input_layernorm.weight)
        _scale_inputs([mlp.gate_proj, mlp.up_proj], layer.post_attention_layernorm.weight)
    head = nn.Linear(inner.norm.weight.numel(), model.lm_head.out_features, bias=False)
    head.weight = nn.Parameter(model.lm_head.weight.detach().clone() * inner.norm.weight.detach())
    model.lm_head = head


def _principal(cov: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(cov)
    return vectors[:, values.argsort(descending=True)]


def _covariance(chunks: list[torch.Tensor]) -> torch.Tensor:
    cov = 0
    for x in chunks:
        flat = x.reshape(-1, x.shape[-1]).double()
        cov = cov + flat.T @ flat
    return cov


def _rotate_in(linears: list[nn.Linear], q: torch.Tensor) -> None:
    for linear in linears:
        linear.weight = nn.Parameter(linear.weight @ q.to(linear.weight.dtype))


def _rotate_out(linear: nn.Linear, q: torch.Tensor) -> None:
    linear.weight = nn.Parameter(q.T.to(linear.weight.dtype) @ linear.weight)


@torch.no_grad()
def slice_llama(model: nn.Module, calib: torch.Tensor, width: int, *, batch_size: int = 4) -> SlicedLlama:
    """SliceGPT on a copy of an HF Llama model: every segment keeps `width` principal components."""
    model = copy.deepcopy(model).eval()
    dtype = model.lm_head.weight.dtype
    fuse_norm_scales(model)
    sliced = SlicedLlama(model)
    batches = list(calib.split(batch_size))
    ropes = [sliced.rope(ids) for ids in batches]
    embedded = [sliced.embed(ids) for ids in batches]
    q = _principal(_covariance(embedded))[:, :width]
    sliced.embed.weight = nn.Parameter(sliced.embed.weight @ q.to(dtype))
    stream = [x @ q.to(dtype) for x in embedded]
    for block in sliced.blocks:
        attn, mlp = block.attn, block.mlp
        _rotate_in([attn.q_proj, attn.k_proj, attn.v_proj], q)
        block.attn_shortcut = q.T.to(dtype)  # back to the original basis for this layer's first pass
        # first pass: the stream after attention, in the original basis
        mid_q = _principal(_covariance([block(x, rope)[0] for x, rope in zip(stream, ropes, strict=True)]))[:, :width]
        _rotate_out(attn.o_proj, mid_q)
        block.attn_shortcut = (q.T @ mid_q).to(dtype)
        _rotate_in([mlp.gate_proj, mlp.up_proj], mid_q)
        block.mlp_shortcut = mid_q.T.to(dtype)
        # second pass: the layer output, in the original basis
        outputs = [block(x, rope)[1] for x, rope in zip(stream, ropes, strict=True)]
        q = _principal(_covariance(outputs))[:, :width]
        _rotate_out(mlp.down_proj, q)
        block.mlp_shortcut = (mid_q.T @ q).to(dtype)
        stream = [x @ q.to(dtype) for x in outputs]
    _rotate_in([sliced.head], q)
    return sliced


def parameters(module: nn.Module) -> int:
    shortcuts = sum(t.numel() for b in getattr(module, "blocks", []) for t in (b.attn_shortcut, b.mlp_shortcut)
                    if t is not None)
    return sum(p.numel() for p in module.parameters()) + shortcuts


@torch.no_grad()
def perplexity(forward, windows: torch.Tensor, batch_size: int) -> float:
    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        logits = forward(batch).float()
        total += float(nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def main() -> None:
    from fxslice import capture
    from fxslice.data import load_text, token_windows
    from fxslice.evaluation.perplexity import perplexity as program_perplexity
    from fxslice.models.capture import load_model
    from fxslice.passes.slicegpt import constant_widths
    from fxslice.passes.slicegpt.pipeline import slicegpt

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sparsity", type=float, default=0.25)
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--calib-length", type=int, default=2048)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2")
    calib = token_windows(tokenizer, load_text("wikitext2:validation"), args.calib_length, count=args.calib_windows,
                          seed=0)
    test = token_windows(tokenizer, load_text("wikitext2:test"), 2048)[: args.eval_windows]
    widths = constant_widths(args.sparsity)
    width = widths(None, model.config.hidden_size)

    start = time.perf_counter()
    program = capture(model)
    captured = time.perf_counter() - start
    result = slicegpt(program, calib, widths, batch_size=args.batch_size, keep_ties=False)
    passes = {r.name: r.seconds for _, s in result.result.stages for r in s.records}
    fx_calibrate = passes["slice_stream"]
    fx_prepare = captured + sum(passes.values()) - fx_calibrate

    start = time.perf_counter()
    baseline = slice_llama(model, calib, width, batch_size=args.batch_size)
    eager_calibrate = time.perf_counter() - start

    ours, theirs = program_perplexity(program, test, batch_size=args.batch_size), perplexity(baseline, test,
                                                                                              args.batch_size)
    print(json.dumps({
        "model": "SmolLM2-135M-Instruct, head untied (as the official implementation does)",
        "sparsity": args.sparsity, "width": width,
        "calibration": {"text": "wikitext2:validation", "windows": args.calib_windows, "length": args.calib_length},
        "evaluation": {"text": "wikitext2:test", "windows": len(test), "length": 2048},
        "fxslice": {"perplexity": round(ours, 3), "parameters": program.num_parameters(),
                    "capture_and_fuse_s": round(fx_prepare, 1), "calibrate_and_slice_s": round(fx_calibrate, 1)},
        "eager_two_pass": {"perplexity": round(theirs, 3), "parameters": parameters(baseline),
                           "calibrate_and_slice_s": round(eager_calibrate, 1)},
        "calibration_time_ratio_fxslice_over_eager": round(fx_calibrate / eager_calibrate, 3),
        "threads": torch.get_num_threads(),
    }, indent=1))


if __name__ == "__main__":
    main()
