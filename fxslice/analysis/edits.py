"""Structural edits a pass can build on: take a writer out of the residual stream, drop a whole layer.

Both leave the stream's other values untouched and let `erase_unused` take what no longer feeds the logits (the
branch's weights, its norm, its attention and, in a KV-cache graph, its cache updates), so that the saved model
really is smaller.
"""

from __future__ import annotations

from torch import fx

from fxslice.analysis.stream import Writer, stream_analysis
from fxslice.core.errors import InvalidOption, UnsupportedStructure, node_location
from fxslice.core.graph import aten, erase_unused, module_path
from fxslice.core.program import Program

__all__ = ["remove_writer", "drop_layer"]


def remove_writer(program: Program, writer: Writer) -> int:
    """Remove `writer`'s contribution to the residual stream: the sum `h + f(x)` it enters becomes `h`. Returns the
    number of nodes that went. Call `program.mark_changed()` (or return modified=True from a pass) after it."""
    graph = program.graph
    members = {n for s in program.analysis(stream_analysis).segments for n in s.nodes}
    node = writer.output
    while True:
        users = [u for u in node.users if u in members]
        if len(users) != 1:
            raise UnsupportedStructure(f"writer {writer.output.name} reaches the stream through {len(users)} values, "
                                       f"not one sum\n  at {node_location(node)}")
        (user,) = users
        if user.target == aten.add.Tensor and len(user.args) == 2 and all(isinstance(a, fx.Node) for a in user.args):
            break
        node = user
    residual = user.args[1] if user.args[0] is node else user.args[0]
    user.replace_all_uses_with(residual)
    graph.erase_node(user)
    program.mark_changed()
    return 1 + erase_unused(program.gm)


def drop_layer(program: Program, module: str) -> int:
    """Remove every branch that `module` (`model.layers.11`) adds into the residual stream, and with them its weights;
    the stream passes through. Where the config counts layers (`num_hidden_layers`), it counts one fewer. Returns
    the number of nodes that went."""
    stream = program.analysis(stream_analysis)
    writers = [w for w in stream.writers if w.kind == "linear" and module_path(w.output).startswith(module + ".")]
    if not writers:
        modules = sorted({module_path(w.output).rpartition(".")[0] for w in stream.writers if w.kind == "linear"})
        raise InvalidOption(f"no branch of '{module}' writes into the residual stream; modules that do: "
                            f"{', '.join(modules[:6])}{', ...' if len(modules) > 6 else ''}")
    order = {node: i for i, node in enumerate(program.graph.nodes)}
    removed = 0
    for writer in sorted(writers, key=lambda w: -order[w.output]):  # the last first: each sum still has its inputs
        removed += remove_writer(program, writer)
    config = program.config
    if config is not None and isinstance(config.get("num_hidden_layers"), int):
        program.config = {**config, "num_hidden_layers": config["num_hidden_layers"] - 1}
    return removed
