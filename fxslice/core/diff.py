"""What a pass changed: snapshots, per-pass records, and text/HTML renderings.

A record is computed by comparing snapshots taken before and after the pass, so it is
correct for any pass, including a user's, whatever API it used to edit the graph. Nodes a
pass created or rewired are also stamped in `node.meta` with the pass's name.
"""

from __future__ import annotations

import html
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from fxslice.core import graph as G

__all__ = ["GraphSnapshot", "PassRecord", "NodeInfo", "render_text", "render_html"]


@dataclass(frozen=True)
class NodeInfo:
    name: str
    op: str
    target: str
    inputs: tuple[str, ...]
    module: str
    arguments: str = ""  # every argument and keyword, literals included, other nodes by name


def _arguments(node: fx.Node) -> str:
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: _Name(n.name))
    return ", ".join([*(repr(a) for a in args), *(f"{k}={v!r}" for k, v in kwargs.items())])


class _Name(str):
    """A node's name that prints bare inside an argument list."""

    def __repr__(self) -> str:
        return str(self)


@dataclass(frozen=True)
class ParamInfo:
    shape: tuple[int, ...]
    dtype: str
    identity: tuple[int, int, int]  # id, data_ptr, version: changes whenever the values may have
    norm: float | None = None  # the Frobenius norm of a float tensor (what a diff shows of changed values)


def _norm(t: torch.Tensor) -> float | None:
    """The norm in float64, a million values at a time (a float64 copy of a whole token table would be the
    largest allocation of a snapshot)."""
    if not t.is_floating_point() or t.device.type == "meta" or not t.numel():
        return None
    flat = t.detach().reshape(-1)
    squares = sum(float(torch.linalg.vector_norm(part, dtype=torch.float64)) ** 2 for part in flat.split(2**20))
    return squares ** 0.5


@dataclass
class GraphSnapshot:
    nodes: dict[str, NodeInfo]
    params: dict[str, ParamInfo]

    def same(self, other: GraphSnapshot) -> bool:
        """No node, argument, literal or weight (identity, shape, dtype, in-place version) differs."""
        return self.nodes == other.nodes and self.params == other.params

    @staticmethod
    def take(gm: fx.GraphModule) -> GraphSnapshot:
        nodes = {}
        for n in gm.graph.nodes:
            inputs = tuple(a.name for a in n.all_input_nodes)
            target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
            nodes[n.name] = NodeInfo(n.name, n.op, str(target), inputs, G.module_path(n), _arguments(n))
        params = {}
        for name, t in [*gm.named_parameters(), *gm.named_buffers()]:
            params[name] = ParamInfo(tuple(t.shape), str(t.dtype).replace("torch.", ""), (id(t), t.data_ptr(), t._version),
                                     _norm(t))
        return GraphSnapshot(nodes, params)


@dataclass
class PassRecord:
    """What one pass did to the graph and the weights."""

    name: str
    exact: bool
    modified: bool
    seconds: float
    added: list[NodeInfo] = field(default_factory=list)
    removed: list[NodeInfo] = field(default_factory=list)
    rewired: list[tuple[NodeInfo, NodeInfo]] = field(default_factory=list)
    params: list[tuple[str, str, str]] = field(default_factory=list)  # (name, change, detail)
    info: dict[str, Any] = field(default_factory=dict)
    #: how far the logits moved on the manager's probe, in the program's dtype (an exact pass: its round-off)
    max_relative_error: float | None = None
    #: how an exact pass was checked: "float64" (proved on a float64 copy), the program's dtype only, or "" (not)
    checked: str = ""
    float64_error: float | None = None  # the logits' relative change on the float64 copy
    unproved: str = ""  # why an exact pass was not proved in float64

    @staticmethod
    def between(name: str, exact: bool, before: GraphSnapshot, after: GraphSnapshot, result: Any, seconds: float) -> PassRecord:
        rec = PassRecord(name, exact, bool(result.modified), seconds, info=dict(result.info))
        rec.added = [after.nodes[k] for k in after.nodes if k not in before.nodes]
        rec.removed = [before.nodes[k] for k in before.nodes if k not in after.nodes]
        rec.rewired = [
            (before.nodes[k], after.nodes[k])
            for k in after.nodes
            if k in before.nodes and before.nodes[k] != after.nodes[k]
        ]
        for key in sorted(set(before.params) | set(after.params)):
            old, new = before.params.get(key), after.params.get(key)
            if old is None:
                rec.params.append((key, "added", _shape(new.shape)))
            elif new is None:
                rec.params.append((key, "removed", _shape(old.shape)))
            elif old.shape != new.shape:
                rec.params.append((key, "reshaped", f"{_shape(old.shape)} -> {_shape(new.shape)}"))
            elif old.dtype != new.dtype:
                rec.params.append((key, "dtype", f"{old.dtype} -> {new.dtype}"))
            elif old.identity != new.identity or old.norm != new.norm:
                norms = f", norm {old.norm:.6g} -> {new.norm:.6g}" if old.norm is not None and new.norm is not None else ""
                rec.params.append((key, "values", _shape(new.shape) + norms))
        return rec

    def stamp(self, gm: fx.GraphModule) -> None:
        """Record this pass's name in the meta of the nodes it created or rewired."""
        added = {n.name for n in self.added}
        rewired = {new.name for _, new in self.rewired}
        for node in gm.graph.nodes:
            if node.name in added:
                node.meta["fxslice_created_by"] = self.name
            elif node.name in rewired:
                # a new list: a copied graph's nodes share their meta's values with the original's (torch.fx copies
                # meta shallowly), and an append would stamp the pass on every copy
                node.meta["fxslice_rewired_by"] = [*node.meta.get("fxslice_rewired_by", ()), self.name]

    @property
    def changed_node_names(self) -> set[str]:
        return {n.name for n in self.added} | {new.name for _, new in self.rewired}

    def check_text(self) -> str:
        """How the logits were checked, in words: `proved in float64 (2e-16), own dtype 3.1e-07`."""
        if self.max_relative_error is None:
            return ""
        if not self.exact:
            return f"logits moved {self.max_relative_error:.2g}"
        if self.float64_error is not None:
            return f"proved in float64 ({self.float64_error:.2g}), own dtype {self.max_relative_error:.2g}"
        text = f"checked in {self.checked} ({self.max_relative_error:.2g})"
        return f"{text}, not proved in float64: {self.unproved}" if self.unproved else text

    def summary(self) -> str:
        kind = "exact" if self.exact else "lossy"
        check = self.check_text()
        return (
            f"{self.name} ({kind}, {self.seconds:.2f}s{', ' + check if check else ''}): +{len(self.added)} nodes, "
            f"-{len(self.removed)} nodes, {len(self.rewired)} rewired, {len(self.params)} parameters changed"
        )


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


_LAYER = re.compile(r"\.(\d+)(?=\.|$)")
_NODE_SUFFIX = re.compile(r"(?<=[a-z])_\d+\b")


def _group(module: str) -> str:
    """Module path with layer indices replaced by `*`, so repeated layers collapse together."""
    return _LAYER.sub(".*", module) if module else "<top level>"


def _describe(n: NodeInfo) -> str:
    return f"{n.name} = {n.target}({n.arguments})" if n.op == "call_function" else f"{n.name} ({n.op} {n.target})"


def _collapsed(lines: list[tuple[str, str]], limit: int) -> list[str]:
    """Group (module, text) lines by module path; identical per-layer changes are shown once with a count."""
    by_group: dict[str, Counter] = defaultdict(Counter)
    layers: dict[str, set[str]] = defaultdict(set)
    for module, text in lines:
        group = _group(module)
        folded = group != module
        by_group[group][_NODE_SUFFIX.sub("", _LAYER.sub(".*", text)) if folded else text] += 1
        layers[group].add(module)
    out = []
    for group in sorted(by_group):
        count = len(layers[group])
        out.append(f"    {group}" + (f"  ({count} layers)" if count > 1 else ""))
        items = by_group[group].most_common()
        for text, k in items[:limit]:
            out.append(f"      {text}" + (f"  x{k}" if k > 1 else ""))
        if len(items) > limit:
            out.append(f"      ... {len(items) - limit} more")
    return out


def render_text(records: list[PassRecord], *, limit: int = 12) -> str:
    """A readable per-pass report; changes repeated across layers are folded into one line."""
    out = []
    for rec in records:
        out.append(rec.summary())
        for title, items in (("added", rec.added), ("removed", rec.removed)):
            if items:
                out.append(f"  {title}:")
                out += _collapsed([(n.module, _describe(n)) for n in items], limit)
        if rec.rewired:
            out.append("  rewired:")
            rows = [(new.module, f"{new.name}: {old.target}({old.arguments}) -> {new.target}({new.arguments})")
                    for old, new in rec.rewired]
            out += _collapsed(rows, limit)
        if rec.params:
            out.append("  parameters:")
            out += _collapsed([(p[0].rpartition(".")[0], f"{p[0].rpartition('.')[2]} {p[1]} {p[2]}") for p in rec.params], limit)
    return "\n".join(out)


_STYLE = """
body{font:13px system-ui,sans-serif;margin:1.5em;color:#222} h1{font-size:18px} h2{font-size:15px;margin-top:1.5em}
details{margin:2px 0 2px 1em} summary{cursor:pointer} .n{font-family:monospace;white-space:pre;margin-left:1.5em}
.added{background:#d9f7d9} .removed{background:#fadada;text-decoration:line-through} .rewired{background:#fff0c2}
.same{color:#888} .tag{font-size:11px;border-radius:3px;padding:0 4px;margin-left:6px;background:#eee}
"""


def render_html(program: Any, records: list[PassRecord]) -> str:
    """A self-contained page: the final graph grouped by module path, changed nodes highlighted.

    Groups (repeated layers folded into one `layers.*` entry) that no pass touched are collapsed.
    """
    status: dict[str, tuple[str, str]] = {}
    for rec in records:
        for n in rec.added:
            status[n.name] = ("added", rec.name)
        for _, n in rec.rewired:
            status.setdefault(n.name, ("rewired", rec.name))
    removed = [(n, rec.name) for rec in records for n in rec.removed if n.name not in status]
    groups: dict[str, list[str]] = defaultdict(list)
    changed_groups: set[str] = set()
    for node in program.gm.graph.nodes:
        module = G.module_path(node)
        kind, by = status.get(node.name, ("same", ""))
        target = getattr(node.target, "__name__", str(node.target))
        text = f"{node.name} = {target}({', '.join(a.name for a in node.all_input_nodes)})"
        tag = f"<span class=tag>{html.escape(by)}</span>" if by else ""
        groups[_group(module)].append(f"<div class='n {kind}' title='{html.escape(module)}'>{html.escape(text)}{tag}</div>")
        if kind != "same":
            changed_groups.add(_group(module))
    for n, by in removed:
        group = _group(n.module)
        groups[group].append(f"<div class='n removed'>{html.escape(_describe(n))}<span class=tag>{html.escape(by)}</span></div>")
        changed_groups.add(group)
    body = [f"<h1>fxslice diff: {html.escape(program.model_class)}</h1>", "<ul>"]
    body += [f"<li>{html.escape(rec.summary())}</li>" for rec in records]
    body.append("</ul><p><span class=added>added</span> <span class=rewired>rewired</span> "
                "<span class=removed>removed</span>; repeated layers are folded into <code>.*</code></p>")
    for group in groups:
        opened = " open" if group in changed_groups else ""
        mark = "" if group in changed_groups else " <span class=same>(unchanged)</span>"
        body.append(f"<details{opened}><summary>{html.escape(group)} - {len(groups[group])} nodes{mark}</summary>")
        body += groups[group]
        body.append("</details>")
    return f"<!doctype html><meta charset=utf-8><title>fxslice diff</title><style>{_STYLE}</style>{''.join(body)}"

