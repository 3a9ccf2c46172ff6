"""Human-readable summaries of a Program: op counts and the module tree the graph came from."""

from __future__ import annotations

import re
from collections import Counter

from fxslice.core.program import Program

__all__ = ["op_counts", "module_tree", "summarize"]

_INDEX = re.compile(r"\.(\d+)(?=\.|$)")


def op_counts(program: Program) -> Counter:
    return Counter(
        getattr(n.target, "__name__", str(n.target)) for n in program.graph.nodes if n.op == "call_function"
    )


def module_tree(program: Program) -> list[tuple[str, str, int]]:
    """(module path with layer indices folded to a range, class name, node count), in graph order."""
    counts: Counter = Counter()
    classes: dict[str, str] = {}
    indices: dict[str, set[int]] = {}
    for node in program.graph.nodes:
        for path, cls in (node.meta.get("nn_module_stack") or {}).values():
            if not path or path.startswith("_"):
                continue
            folded = _INDEX.sub(".*", path)
            counts[folded] += 1
            classes[folded] = str(cls).rpartition(".")[2]
            indices.setdefault(folded, set()).update(int(i) for i in _INDEX.findall(path)[:1])
    rows = []
    for folded in counts:
        idx = sorted(indices[folded])
        label = folded.replace("*", f"{idx[0]}-{idx[-1]}", 1) if len(idx) > 1 else _INDEX.sub(f".{idx[0]}", folded, 1) if idx else folded
        rows.append((label, classes[folded], counts[folded]))
    return rows


def summarize(program: Program, *, top: int = 15) -> str:
    ops = op_counts(program)
    lines = [
        f"model       {program.model_class}" + (f"  ({program.source})" if program.source else ""),
        f"parameters  {program.num_parameters():,}  (dtype {str(program.dtype).replace('torch.', '')})",
        f"graph       {len(program.graph.nodes)} nodes, {sum(ops.values())} ops of {len(ops)} kinds",
        "ops:",
    ]
    lines += [f"  {name:<40} {k}" for name, k in ops.most_common(top)]
    if len(ops) > top:
        lines.append(f"  ... {len(ops) - top} more kinds")
    lines.append("module tree (nodes per module; repeated layers folded):")
    for label, cls, k in module_tree(program):
        parts = label.split(".")
        short = ".".join(parts[-2:]) if parts[-1][:1].isdigit() else parts[-1]
        depth = sum(1 for part in parts[:-1] if not part[:1].isdigit()) - (len(short.split(".")) - 1)
        indent = "  " * depth
        lines.append(f"  {indent + short:<36} {cls:<28} {k}")
    return "\n".join(lines)
