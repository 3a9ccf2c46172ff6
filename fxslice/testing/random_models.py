"""Random small transformer-like models, to fuzz the exact passes (tests/test_fuzz.py, benchmarks/fuzz.py).

A `ModelSpec` says how a model is put together: block layout (sequential, parallel with one or two
norms, sandwich norms, post-norm), norm kind (LayerNorm with or without affine/bias, RMSNorm spelled
five ways), biases, fused or split projections, tied or untied embeddings, learned positions, an
embedding norm, and sometimes an operation on the stream that breaks rotation invariance. `build`
turns a spec into an `nn.Module` whose norm weights and biases are far from 1 and 0, so that a
fusion that forgets one cannot pass by luck. `specs()` is the hypothesis strategy over all of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fxslice.core.numerics import relative_error

__all__ = ["ModelSpec", "Outcome", "build", "compile_and_compare", "specs", "BREAKERS", "NORMS", "LAYOUTS"]

NORMS = ("layernorm", "layernorm_no_bias", "layernorm_plain", "rms_torch", "rms_llama", "rms_gemma", "rms_plain", "rms_sum")
LAYOUTS = ("sequential", "parallel_shared", "parallel_two", "sandwich", "post")
#: operations on the stream: "scalar" keeps invariance, the others break it and must be refused
BREAKERS = (None, "scalar", "tanh", "feature_scale", "feature_max", "feature_roll")


@dataclass(frozen=True)
class ModelSpec:
    width: int = 16
    blocks: int = 2
    layout: str = "sequential"
    norm: str = "layernorm"
    bias: bool = True
    fused_qkv: bool = False
    gated_mlp: bool = False
    tied: bool = False
    positions: bool = False
    embedding_norm: bool = False
    breaker: str | None = None
    breaker_block: int = 0
    seed: int = 0

    @property
    def must_be_exact(self) -> bool:
        """What the compiler has to accept (everything else may be refused, never miscompiled)."""
        return (self.breaker in (None, "scalar") or self.breaker_block >= self.blocks) and self.layout != "post"


class _Norm(nn.Module):
    def __init__(self, kind: str, width: int, gen: torch.Generator):
        super().__init__()
        self.kind, self.width = kind, width
        affine = kind not in ("layernorm_plain", "rms_plain")
        if affine:
            self.weight = nn.Parameter(1.5 + torch.rand(width, generator=gen))
        if kind == "layernorm":
            self.bias = nn.Parameter(0.5 + torch.rand(width, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = self.kind
        if kind.startswith("layernorm"):
            return F.layer_norm(x, (self.width,), getattr(self, "weight", None), getattr(self, "bias", None), 1e-5)
        if kind == "rms_torch":
            return F.rms_norm(x, (self.width,), self.weight, 1e-6)
        if kind == "rms_sum":
            return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / self.width + 1e-6) * self.weight
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        if kind == "rms_gemma":
            return (h * (1.0 + self.weight.float())).to(x.dtype)
        return h.to(x.dtype) if kind == "rms_plain" else self.weight * h.to(x.dtype)


class _Attention(nn.Module):
    def __init__(self, spec: ModelSpec, heads: int = 2):
        super().__init__()
        d, self.heads = spec.width, heads
        if spec.fused_qkv:
            self.qkv = nn.Linear(d, 3 * d, bias=spec.bias)
        else:
            self.q, self.k, self.v = (nn.Linear(d, d, bias=spec.bias) for _ in range(3))
        self.out = nn.Linear(d, d, bias=spec.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).split(d, -1) if hasattr(self, "qkv") else (self.q(x), self.k(x), self.v(x))
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, s, d))


class _MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        d, hidden = spec.width, 2 * spec.width
        self.up = nn.Linear(d, hidden, bias=spec.bias)
        self.gate = nn.Linear(d, hidden, bias=spec.bias) if spec.gated_mlp else None
        self.down = nn.Linear(hidden, d, bias=spec.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.gate(x)) * self.up(x) if self.gate is not None else F.gelu(self.up(x))
        return self.down(h)


class _Block(nn.Module):
    def __init__(self, spec: ModelSpec, gen: torch.Generator, breaker: str | None):
        super().__init__()
        self.layout, self.breaker = spec.layout, breaker
        self.attn, self.mlp = _Attention(spec), _MLP(spec)
        count = {"sequential": 2, "parallel_shared": 1, "parallel_two": 2, "sandwich": 4, "post": 2}[spec.layout]
        self.norms = nn.ModuleList(_Norm(spec.norm, spec.width, gen) for _ in range(count))
        if breaker == "feature_scale":
            self.scale = nn.Parameter(0.5 + torch.rand(spec.width, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, layout = self.norms, self.layout
        if layout == "sequential":
            x = x + self.attn(n[0](x))
            x = self._break(x)
            return x + self.mlp(n[1](x))
        if layout == "parallel_shared":
            h = n[0](x)
            return self._break(x + self.attn(h) + self.mlp(h))
        if layout == "parallel_two":
            return self._break(x + self.attn(n[0](x)) + self.mlp(n[1](x)))
        if layout == "sandwich":
            x = x + n[1](self.attn(n[0](x)))
            x = self._break(x)
            return x + n[3](self.mlp(n[2](x)))
        x = n[0](x + self.attn(x))  # post-norm: the norm's output is the stream
        return self._break(n[1](x + self.mlp(x)))

    def _break(self, x: torch.Tensor) -> torch.Tensor:
        kind = self.breaker
        if kind == "scalar":
            return x * 0.5
        if kind == "tanh":
            return torch.tanh(x)
        if kind == "feature_scale":
            return x * self.scale
        if kind == "feature_max":
            return x - x.amax(-1, keepdim=True)
        if kind == "feature_roll":
            return torch.cat([x[..., 1:], x[..., :1]], -1)
        return x


class RandomLM(nn.Module):
    """input_ids -> logits, built from a ModelSpec."""

    vocab = 32
    context = 64

    def __init__(self, spec: ModelSpec):
        super().__init__()
        gen = torch.Generator().manual_seed(spec.seed)
        torch.manual_seed(spec.seed)
        self.spec = spec
        self.embed = nn.Embedding(self.vocab, spec.width)
        self.positions = nn.Embedding(self.context, spec.width) if spec.positions else None
        self.embed_norm = _Norm(spec.norm, spec.width, gen) if spec.embedding_norm else None
        self.blocks = nn.ModuleList(
            _Block(spec, gen, spec.breaker if i == spec.breaker_block else None) for i in range(spec.blocks))
        self.final_norm = _Norm(spec.norm, spec.width, gen)
        self.head = nn.Linear(spec.width, self.vocab, bias=spec.bias and not spec.tied)
        if spec.tied:
            self.head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        x = self.embed(input_ids)
        if self.positions is not None:
            x = x + self.positions(torch.arange(input_ids.shape[1], device=input_ids.device))
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x))


def build(spec: ModelSpec) -> RandomLM:
    return RandomLM(spec).eval()


def specs():
    """Hypothesis strategy over ModelSpec (hypothesis is a test dependency, imported here only)."""
    from hypothesis import strategies as st

    return st.builds(
        ModelSpec,
        width=st.sampled_from([8, 12, 16]),
        blocks=st.integers(1, 3),
        layout=st.sampled_from(LAYOUTS),
        norm=st.sampled_from(NORMS),
        bias=st.booleans(),
        fused_qkv=st.booleans(),
        gated_mlp=st.booleans(),
        tied=st.booleans(),
        positions=st.booleans(),
        embedding_norm=st.booleans(),
        breaker=st.sampled_from(BREAKERS),
        breaker_block=st.integers(0, 2),
        seed=st.integers(0, 2**16),
    )


@dataclass(frozen=True)
class Outcome:
    """`exact` with the error reached, or `refused` with fxslice's message."""

    kind: str
    error: float = 0.0
    message: str = ""


def compile_and_compare(spec: ModelSpec, pipeline: Callable[[], Sequence], *, tolerance: float = 1e-9) -> Outcome:
    """Capture `build(spec)`, run `pipeline()` on it in float64 and compare the logits.

    Returns Outcome("exact") or Outcome("refused") for an UnsupportedStructure that names a node;
    raises AssertionError for a wrong model, an unexpected refusal, or any other exception."""
    from fxslice.core import PassManager, UnsupportedStructure
    from fxslice.models.capture import capture_module

    program = capture_module(build(spec)).to(torch.float64)
    ids = torch.randint(0, RandomLM.vocab, (2, 10), generator=torch.Generator().manual_seed(spec.seed))
    with torch.no_grad():
        before = program(ids)
    try:
        PassManager(list(pipeline()), check_numerics=False).run(program)  # measured below, with its own message
    except UnsupportedStructure as exc:
        message = str(exc)
        assert "node '" in message, f"refusal without a node for {spec}: {message}"
        assert not spec.must_be_exact, f"refused a supported model {spec}: {message}"
        return Outcome("refused", message=message)
    with torch.no_grad():
        after = program(ids)
    error = relative_error(after, before)
    assert error <= tolerance, f"WRONG MODEL: relative logit error {error:.3g} for {spec}"
    return Outcome("exact", error)
