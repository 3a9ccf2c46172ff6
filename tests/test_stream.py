"""The residual-stream analysis finds the structure from the graph alone."""

import subprocess
import sys

import pytest

from fxslice import PassManager
from fxslice.analysis.stream import stream_analysis
from fxslice.passes import CleanupIR

LAYERS = 2


@pytest.mark.parametrize("name,segments,writers_per_layer", [
    ("llama", 2 * LAYERS + 1, 2), ("gpt2", 2 * LAYERS + 1, 2), ("mixtral", 2 * LAYERS + 1, 2),
    ("phi", LAYERS + 1, 2), ("gpt_neox", LAYERS + 1, 2), ("falcon", LAYERS + 1, 2),
])
def test_segments_writers_and_readers(tiny, name, segments, writers_per_layer):
    _, program = tiny(name)
    PassManager([CleanupIR()]).run(program)
    stream = program.analysis(stream_analysis)
    assert not stream.violations
    assert stream.width == 64
    assert len(stream.segments) == segments and len(stream.shortcuts) == segments - 1
    linear_writers = [w for w in stream.writers if w.kind == "linear"]
    assert len(linear_writers) == writers_per_layer * LAYERS
    assert stream.segments[0].writers[0].kind == "embedding"
    assert all(seg.norms for seg in stream.segments)  # every segment is read through a norm
    assert "lm_head" in {r.linear.node.meta["nn_module_stack"].popitem()[1][0] for r in stream.segments[-1].readers}


def test_post_norm_writers_are_reported(tiny):
    _, program = tiny("gemma3")
    PassManager([CleanupIR()]).run(program)
    stream = program.analysis(stream_analysis)
    assert [w.kind for w in stream.writers].count("norm") == 2 * LAYERS


def test_stream_analysis_is_cached_until_the_graph_changes(tiny):
    _, program = tiny("llama")
    first = program.analysis(stream_analysis)
    assert program.analysis(stream_analysis) is first
    PassManager([CleanupIR()]).run(program)
    assert program.analysis(stream_analysis) is not first


def test_cli_inspect_stream(tmp_path):
    from fxslice.testing import tiny_causal_lm

    tiny_causal_lm("phi").save_pretrained(tmp_path / "phi")
    result = subprocess.run([sys.executable, "-m", "fxslice.cli", "inspect", str(tmp_path / "phi"), "--stream"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "residual stream: width 64, 3 segments, 2 shortcuts" in result.stdout
    assert "writer  linear     model.layers.0.mlp.fc2" in result.stdout
