"""Find, from the graph alone, whether a program computes a Llama-style decoder, and where each of its weights is.

Runtimes such as llama.cpp implement one fixed computation: token table, then per layer an RMSNorm, rotary
self-attention (any key/value grouping), a residual add, an RMSNorm, a SiLU-gated MLP, a residual add; a final
RMSNorm and a head (tied or not). Widths may differ per layer (llama.cpp's `deci`), and a layer may lack its
attention or MLP. `decoder_layout` reads that structure off the graph — norms, the linears that read them, which of
them feed the attention's query, key and value, which one reads its output, which one passes through SiLU — with no
model-type string, and then *proves* it: the layout's own reference computation (written below, the runtime's
arithmetic) must give the program's logits in float64. A graph it does not describe is refused with the reason.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch
from torch import fx

from fxslice.analysis.matchers import LinearUse, NormMatch, match_embedding, match_linear, match_norms
from fxslice.core.errors import UnsupportedStructure
from fxslice.core.graph import module_path, tensor_of
from fxslice.core.program import Program

__all__ = ["Attention", "Mlp", "Layer", "DecoderLayout", "decoder_layout", "reference_logits"]

aten = torch.ops.aten
_SDPA = {aten.scaled_dot_product_attention.default}
_PASS_THROUGH = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.type_as.default, aten.clone.default,
                 aten.contiguous.default, aten.alias.default, aten.view.default, aten.reshape.default,
                 aten._assert_tensor_metadata.default}


@dataclass(frozen=True)
class Attention:
    q: str
    k: str
    v: str
    o: str
    heads: int
    kv_heads: int


@dataclass(frozen=True)
class Mlp:
    gate: str
    up: str
    down: str
    width: int


@dataclass(frozen=True)
class Layer:
    attention_norm: str | None  # weight names; a norm without a scale (fused away) is None
    attention: Attention | None
    mlp_norm: str | None
    mlp: Mlp | None


@dataclass(frozen=True)
class DecoderLayout:
    """Where every weight of a Llama-style decoder is, by the program's weight names, and its hyperparameters."""

    table: str
    layers: tuple[Layer, ...]
    output_norm: str | None
    head: str  # the table's name when the head is tied
    width: int
    vocab: int
    head_dim: int
    eps: float
    rope_base: float
    norm_gain: float = 1.0  # every norm's scale is multiplied by it (see `_norm_constants`)
    head_projection: str | None = None  # a square linear between the final norm and the head (a tie SliceGPT kept)

    def norm_scale(self, gm: fx.GraphModule, weight: str | None) -> torch.Tensor:
        """A norm's scale as the runtime multiplies by it: its weight (ones where fusion took it) times the gain."""
        value = tensor_of(gm, weight).detach() if weight else torch.ones(self.width, dtype=torch.float64)
        return value.to(torch.float64) * self.norm_gain if self.norm_gain != 1.0 else value  # one rounding, at the end

    @property
    def tied(self) -> bool:
        """One tensor for the table and the head, as the runtime reads it (a projected head is written untied)."""
        return self.head == self.table and self.head_projection is None

    def head_weight(self, gm: fx.GraphModule) -> torch.Tensor:
        """The head as one [vocab, width] matrix: the program's, or the tied table times the projection before it
        (exact: logits = x Pᵀ Eᵀ = x (E P)ᵀ)."""
        head = tensor_of(gm, self.head).detach()
        if self.head_projection is None:
            return head
        projection = tensor_of(gm, self.head_projection).detach()
        return (head.to(torch.float64) @ projection.to(torch.float64)).to(head.dtype)

    @property
    def uniform(self) -> bool:
        """One MLP width and one head count for every layer (llama.cpp's `llama`; otherwise `deci`)."""
        shapes = {(layer.attention.heads if layer.attention else None, layer.attention.kv_heads if layer.attention
                   else None, layer.mlp.width if layer.mlp else None) for layer in self.layers}
        return len(shapes) == 1 and None not in next(iter(shapes))


def _refuse(reason: str, node: fx.Node | None = None) -> UnsupportedStructure:
    where = f" (at {module_path(node) or node.name})" if node is not None else ""
    return UnsupportedStructure(f"this program is not a Llama-style decoder (what llama.cpp and stock Llama checkpoints "
                                f"compute): {reason}{where}")


def _keeps_values(node: fx.Node) -> bool:
    """A cast, a reshape, or a slice that keeps everything (`hidden[:, -0:]`, what `logits_to_keep=0` leaves)."""
    if node.target in _PASS_THROUGH:
        return True
    if node.target == aten.slice.Tensor:
        start = node.args[2] if len(node.args) > 2 else 0
        end = node.args[3] if len(node.args) > 3 else None
        return start in (0, None) and (end is None or (isinstance(end, int) and end >= 2**62))
    return False


def _source(node: object) -> object:
    """`node` with casts, reshapes and whole slices walked back."""
    while isinstance(node, fx.Node) and node.op == "call_function" and _keeps_values(node):
        node = node.args[0]
    return node


def _reaches(start: fx.Node, targets: set, limit: int = 40) -> tuple[fx.Node, int] | None:
    """The first node calling one of `targets` downstream of `start` (breadth first), and which argument it got."""
    seen, queue = {start}, deque([(start, 0)])
    while queue:
        node, depth = queue.popleft()
        for user in node.users:
            if user.op == "call_function" and user.target in targets:
                index = next((i for i, a in enumerate(user.args) if a is node), -1)
                return user, index
            if user not in seen and depth < limit:
                seen.add(user)
                queue.append((user, depth + 1))
    return None


def _weight(gm: fx.GraphModule, use: LinearUse) -> torch.Tensor:
    """The linear's weight as [out, in]."""
    w = tensor_of(gm, use.weight)
    return w if use.in_axis in (-1, 1) else w.T


def _linear_name(gm: fx.GraphModule, use: LinearUse) -> str:
    if use.bias is not None:
        raise _refuse("a linear with a bias (llama.cpp's llama has none)", use.node)
    if use.in_axis not in (-1, 1) or tensor_of(gm, use.weight).dim() != 2:
        raise _refuse("a linear stored [in, out] or batched", use.node)
    return str(use.weight.target)


def _scaled(gm: fx.GraphModule, norm: NormMatch) -> tuple[str | None, fx.Node]:
    """The norm's scale (a weight name, or None) and the value it gives: the matcher's, or, where a cast kept the
    matcher from seeing it (a capture not cleaned up), the product with a vector weight right after the casts."""
    if norm.centres or norm.bias is not None or norm.kind == "layer_norm":
        raise _refuse("a LayerNorm (centring or shifting); llama.cpp's llama uses RMSNorm", norm.output)
    if norm.weight is not None:
        if norm.weight_offset != 0:
            raise _refuse("a norm scaled by (1 + w)", norm.output)
        return str(norm.weight.target), norm.output
    products = [u for u in norm.output.users if u.op == "call_function" and _keeps_values(u)]
    for node in [norm.output, *products]:
        for user in node.users:
            if user.target == aten.mul.Tensor:
                other = user.args[0] if user.args[1] is node else user.args[1]
                value = tensor_of(gm, other) if isinstance(other, fx.Node) and other.op == "get_attr" else None
                if isinstance(value, torch.Tensor) and value.dim() == 1:
                    return str(other.target), user
    return None, norm.output


def _attention(gm: fx.GraphModule, readers: list[LinearUse], uses: list[LinearUse]) -> tuple[Attention, int]:
    found = [_reaches(r.output, _SDPA) for r in readers]
    if any(f is None for f in found) or len({f[0] for f in found}) != 1:
        raise _refuse("three linears read a norm but do not feed one attention", readers[0].node)
    sdpa = found[0][0]
    by_slot = {index: use for (_, index), use in zip(found, readers, strict=True)}
    if sorted(by_slot) != [0, 1, 2]:
        raise _refuse("the linears reading the attention's norm are not its query, key and value", sdpa)
    head_dim = int(sdpa.args[0].meta["val"].shape[-1])
    scale = sdpa.kwargs.get("scale")
    if scale is not None and not math.isclose(scale, head_dim**-0.5, rel_tol=1e-6):
        raise _refuse(f"attention scaled by {scale}, not 1/sqrt({head_dim})", sdpa)
    out = next((u for u in uses if _reaches_from(sdpa, u.input)), None)
    if out is None:
        raise _refuse("no linear reads the attention's output", sdpa)
    q, k, v = (_weight(gm, by_slot[i]) for i in range(3))
    if q.shape[0] % head_dim or k.shape[0] % head_dim or k.shape != v.shape:
        raise _refuse(f"query and key widths {q.shape[0]}, {k.shape[0]} are not whole heads of {head_dim}", sdpa)
    names = [_linear_name(gm, by_slot[i]) for i in range(3)]
    return Attention(*names, _linear_name(gm, out), q.shape[0] // head_dim, k.shape[0] // head_dim), head_dim


def _reaches_from(start: fx.Node, node: fx.Node, limit: int = 12) -> bool:
    """Whether `node` is `start` or computed from it through at most `limit` single-input ops."""
    for _ in range(limit):
        if node is start:
            return True
        if not isinstance(node, fx.Node) or node.op != "call_function" or not node.args:
            return False
        node = node.args[0]
    return node is start


def _mlp(gm: fx.GraphModule, readers: list[LinearUse], uses: list[LinearUse]) -> Mlp:
    gated = [r for r in readers if _reaches(r.output, {aten.silu.default}, limit=3) is not None]
    if len(gated) != 1:
        raise _refuse("two linears read a norm but exactly one of them must pass through SiLU (a gated MLP)",
                      readers[0].node)
    gate = gated[0]
    up = next(r for r in readers if r is not gate)
    product = _reaches(up.output, {aten.mul.Tensor}, limit=3)
    gated_product = _reaches(gate.output, {aten.mul.Tensor}, limit=4)
    down = next((u for u in uses if product is not None and _source(u.input) is product[0]), None)
    if down is None or gated_product is None or gated_product[0] is not product[0]:
        raise _refuse("the gated MLP's product is not read by one linear", up.node)
    width = _weight(gm, gate).shape[0]
    return Mlp(_linear_name(gm, gate), _linear_name(gm, up), _linear_name(gm, down), width)


def _rope_base(gm: fx.GraphModule, head_dim: int) -> float:
    """The rotary base from the inverse frequencies the graph reads: `inv[i] = base^(-2i/head_dim)`."""
    for node in gm.graph.find_nodes(op="get_attr"):
        value = tensor_of(gm, node)
        if isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() == head_dim // 2 and \
                value.numel() > 1 and float(value[0]) == 1.0:
            base = float(value[1].double() ** (-head_dim / 2))
            expected = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
            if torch.allclose(value.double(), expected, rtol=1e-5):
                return float(round(base)) if abs(base - round(base)) < 1e-6 * base else base  # float32's rounding
    raise _refuse("no rotary inverse frequencies of the form base^(-2i/d) (scaled or partial rotary)")


def _norm_constants(norm: NormMatch) -> tuple[float, float]:
    """(epsilon, gain) of the norm as a runtime's RMSNorm over the width it reads.

    A sliced stream keeps dividing the sum of squares by the original width D (what keeps slicing exact), where a
    runtime divides by the current width d: rsqrt(S/D + eps) = sqrt(D/d) · rsqrt(S/d + eps·D/d), so the runtime's
    epsilon is eps·D/d and the scale is multiplied by sqrt(D/d) — the same function, stock arithmetic."""
    width = int(norm.input.meta["val"].shape[-1])
    if width == norm.width:
        return float(norm.eps), 1.0
    return float(norm.eps) * norm.width / width, math.sqrt(norm.width / width)


def decoder_layout(program: Program) -> DecoderLayout:
    """The layout of `program` as a Llama-style decoder, proven on the logits; else UnsupportedStructure why."""
    gm = program.gm
    tables = [t for n in gm.graph.nodes if (t := match_embedding(gm, n)) is not None]
    if len(tables) != 1:
        raise _refuse(f"{len(tables)} token tables (one expected)")
    table = tables[0]
    uses = [u for n in gm.graph.nodes if (u := match_linear(gm, n)) is not None]
    norms = match_norms(gm)
    if not norms:
        raise _refuse("no norms")
    scaled = {id(norm): _scaled(gm, norm) for norm in norms}
    readers = {id(norm): [u for u in uses if _source(u.input) is _source(scaled[id(norm)][1])] for norm in norms}
    constants = {_norm_constants(norm) for norm in norms}
    if len(constants) != 1:
        raise _refuse(f"norms with different epsilons or widths {sorted(constants)}")
    (eps, gain), = constants
    *body, final = norms
    if len(readers[id(final)]) != 1:
        raise _refuse("the last norm is not read by the head alone", final.output)
    head, projection = readers[id(final)][0], None
    vocab = int(tensor_of(gm, table).shape[0])
    if _weight(gm, head).shape[0] != vocab:  # a projection in front of the head, which the runtime's head absorbs
        after = [u for u in uses if _source(u.input) is _source(head.output)]
        if len(after) != 1 or _weight(gm, after[0]).shape[0] != vocab:
            raise _refuse("the last norm is read by a linear that is neither the head nor one projection before it",
                          head.node)
        projection, head = _linear_name(gm, head), after[0]
    layers: list[Layer] = []
    head_dim = None
    for norm in body:
        found = readers[id(norm)]
        if len(found) == 3:
            attention, head_dim = _attention(gm, found, uses)
            layers.append(Layer(scaled[id(norm)][0], attention, None, None))
        elif len(found) == 2:
            mlp = _mlp(gm, found, uses)
            last = layers[-1] if layers else None
            if last is not None and last.mlp is None:
                layers[-1] = Layer(last.attention_norm, last.attention, scaled[id(norm)][0], mlp)
            else:
                layers.append(Layer(None, None, scaled[id(norm)][0], mlp))
        else:
            raise _refuse(f"a norm read by {len(found)} linears (3 for attention, 2 for a gated MLP)", norm.output)
    if head_dim is None:
        raise _refuse("no attention")
    if any(layer.attention is not None and layer.mlp is None for layer in layers):
        raise _refuse("a layer with attention but no MLP, whose attention output llama.cpp's deci drops")
    if layers[0].attention is None:
        raise _refuse("a first layer without attention (llama.cpp reads the head size from the first layer)")
    placed = {projection, _linear_name(gm, head)}
    for layer in layers:
        placed |= {layer.attention.q, layer.attention.k, layer.attention.v, layer.attention.o} if layer.attention else set()
        placed |= {layer.mlp.gate, layer.mlp.up, layer.mlp.down} if layer.mlp else set()
    stray = next((u for u in uses if str(u.weight.target) not in placed), None)
    if stray is not None:
        raise _refuse(f"the linear '{stray.weight.target}' is no part of a decoder layer (a sliced model's shortcut "
                      "matrix, say: one basis for the whole stream, --shared-basis stream, leaves none)", stray.node)
    table_value = tensor_of(gm, table)
    layout = DecoderLayout(
        table=str(table.target), layers=tuple(layers), output_norm=scaled[id(final)][0],
        head=str(head.weight.target) if head.weight is not table else str(table.target),
        width=int(table_value.shape[1]), vocab=int(table_value.shape[0]), head_dim=head_dim, eps=eps,
        rope_base=_rope_base(gm, head_dim), norm_gain=gain, head_projection=projection)
    _prove(program, layout)
    return layout


def reference_logits(layout: DecoderLayout, weights: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """The logits a Llama-style runtime computes from `weights` (by the program's names) for token ids `ids`."""
    def rms(x: torch.Tensor, name: str | None) -> torch.Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + layout.eps) * layout.norm_gain
        return x * weights[name] if name else x

    def rotate(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    batch, length = ids.shape
    d = layout.head_dim
    frequencies = layout.rope_base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * frequencies[None]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    h = weights[layout.table][ids]
    for layer in layout.layers:
        if layer.attention is not None:
            a = layer.attention
            x = rms(h, layer.attention_norm)
            q = (x @ weights[a.q].T).view(batch, length, a.heads, d).transpose(1, 2)
            k = (x @ weights[a.k].T).view(batch, length, a.kv_heads, d).transpose(1, 2)
            v = (x @ weights[a.v].T).view(batch, length, a.kv_heads, d).transpose(1, 2)
            k, v = (t.repeat_interleave(a.heads // a.kv_heads, 1) for t in (k, v))
            out = torch.nn.functional.scaled_dot_product_attention(rotate(q), rotate(k), v, is_causal=True)
            h = h + out.transpose(1, 2).reshape(batch, length, -1) @ weights[a.o].T
        if layer.mlp is not None:
            m = layer.mlp
            x = rms(h, layer.mlp_norm)
            h = h + (torch.nn.functional.silu(x @ weights[m.gate].T) * (x @ weights[m.up].T)) @ weights[m.down].T
    x = rms(h, layout.output_norm)
    if layout.head_projection is not None:
        x = x @ weights[layout.head_projection].T
    return x @ weights[layout.head].T


def _prove(program: Program, layout: DecoderLayout) -> None:
    """The layout's reference computation must give the program's logits (float64, relative 1e-6)."""
    exact = program.to(torch.float64)
    names = {str(n.target) for n in exact.graph.find_nodes(op="get_attr")}
    weights = {name: tensor_of(exact.gm, name).detach() for name in names}
    ids = program.probe_input(batch=2, length=9)
    with torch.no_grad():
        expected = exact(ids)
        try:
            got = reference_logits(layout, weights, ids)
        except RuntimeError as exc:  # shapes that do not compose: the weights found are not such a decoder's
            raise _refuse(f"the weights found do not compose as a Llama-style decoder ({str(exc).splitlines()[0]}); "
                          "a sliced model's shortcut matrices, say (one basis for the whole stream, --shared-basis stream, leaves none)") from None
    if got.shape != expected.shape:
        raise _refuse(f"the weights found give logits of shape {tuple(got.shape)}, the program "
                      f"{tuple(expected.shape)}: a sliced model's shortcut matrices, say (one basis for the whole stream, --shared-basis stream, leaves none)")
    error = float((got - expected).norm() / expected.norm().clamp_min(1e-30))
    if not math.isfinite(error) or error > 1e-6:
        raise _refuse(f"the weights found as a Llama-style decoder compute other logits (relative error {error:.2e}): "
                      "the model has an op that layout lacks (biases on the residual, scaled embeddings, soft-capping, "
                      "a non-causal mask, a scaled rotary, ...)")
