"""Dimension groups found from the graph: MLP channels, key/value head groups (GQA, RoPE, q/k norms),
and groups that must not be removed, with the reason."""

import pytest
import transformers
from packaging.version import Version

from fxslice import PassManager
from fxslice.analysis.groups import group_analysis
from fxslice.passes import CleanupIR

#: family -> (MLP channel groups, head groups, rows and cols of one head group): 2 layers, 4 heads of 16
EXPECTED = {
    "llama": (256, 4, (64, 32)),  # 2 KV heads: 2 q heads + k + v rows, o columns of both q heads
    "qwen3": (256, 4, (64, 32)),  # q/k norms are per head: whole heads still go
    "gemma3": (256, 4, (64, 32)),
    "phi3": (256, 8, (48, 16)),  # fused qkv and gate_up: groups inside one matrix
    "gpt2": (512, 8, (48, 16)),  # Conv1D (addmm) and a split of c_attn
    "gpt_neox": (256, 8, (48, 16)),  # heads interleaved in query_key_value
    "opt": (256, 8, (48, 16)),
    # Falcon's multi-query attention: until transformers 5.24 its one key/value head reached the query heads through
    # an index op and broadcast_to, which hide the heads (blocked); from 5.25 Falcon uses the shared attention
    # (view, expand, SDPA) and each layer is one group: 4 query heads + k + v rows, the dense's 64 columns
    "falcon": (512, 2, (96, 64)) if Version(transformers.__version__) >= Version("5.25") else (512, 0, None),
    "gemma2": (256, 0, None),  # eager attention (matmul): heads blocked; see ATTENTION_DEPENDENT
    "olmo2": (256, 0, None),  # q/k norm over all heads at once: heads blocked
    "mixtral": (0, 4, (64, 32)),  # experts' grouped matmuls are not grouped
}


#: families whose default attention changed within the declared transformers range: Gemma-2 defaults to eager
#: attention (a matmul, whose heads the analysis does not follow: blocked) in 5.24, to SDPA in 5.15 (heads found,
#: as for Llama); the expectation follows the attention the installed transformers builds
ATTENTION_DEPENDENT = {"gemma2": (256, 4, (64, 32))}


@pytest.fixture(scope="module")
def analysed():
    from fxslice import capture
    from fxslice.testing import tiny_causal_lm

    cache = {}

    def get(name):
        if name not in cache:
            program = capture(tiny_causal_lm(name))
            PassManager([CleanupIR()]).run(program)
            cache[name] = program.analysis(group_analysis)
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_groups_per_family(analysed, name):
    mlp, heads, shape = EXPECTED[name]
    if name in ATTENTION_DEPENDENT:
        from fxslice.testing import tiny_causal_lm

        if tiny_causal_lm(name).config._attn_implementation != "eager":
            mlp, heads, shape = ATTENTION_DEPENDENT[name]
    groups = analysed(name)
    assert len(groups.by_kind("mlp_channel")) == mlp
    assert len(groups.by_kind("heads")) == heads
    if shape is not None:
        assert {(len(g.rows), len(g.cols)) for g in groups.by_kind("heads")} == {shape}
    units = [u for g in groups.groups for u in g.units]
    assert len(units) == len(set(units)), "a row or column in two groups"
    assert "lm_head.weight" in groups.blocked  # its rows are the logits (and in tied models, the table)


def test_a_key_value_group_holds_its_query_heads_and_rope_halves(analysed):
    group = analysed("llama").by_kind("heads")[1]  # layer 0, KV head 1 of 2; q heads 2 and 3
    by_weight = {}
    for u in group.units:
        by_weight.setdefault((u.weight.rsplit(".", 2)[-2], u.axis), []).append(u.index)
    assert by_weight[("k_proj", "row")] == list(range(16, 32))
    assert by_weight[("v_proj", "row")] == list(range(16, 32))
    assert by_weight[("q_proj", "row")] == list(range(32, 64))
    assert by_weight[("o_proj", "col")] == list(range(32, 64))


def test_an_mlp_channel_pairs_gate_and_up_rows_with_one_down_column(analysed):
    channel = analysed("phi3").by_kind("mlp_channel")[5]
    assert [(u.weight.rsplit(".", 2)[-2], u.axis, u.index) for u in channel.units] == [
        ("gate_up_proj", "row", 5), ("gate_up_proj", "row", 5 + 128), ("down_proj", "col", 5)]


def test_tied_and_stream_weights_are_never_grouped(analysed):
    groups = analysed("gemma3")  # post-norms: o_proj and down_proj rows feed the stream through a norm
    assert "residual stream" in groups.blocked["model.layers.0.self_attn.o_proj.weight"]
    assert not any(u.weight.endswith("o_proj.weight") and u.axis == "row" for g in groups.groups for u in g.units)


def test_cli_inspect_groups(tmp_path):
    import subprocess
    import sys

    from fxslice.testing import tiny_causal_lm

    tiny_causal_lm("llama").save_pretrained(tmp_path / "llama")
    done = subprocess.run([sys.executable, "-m", "fxslice.cli", "inspect", str(tmp_path / "llama"), "--groups"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dimension groups: 260 (256 MLP channels, 4 attention head groups)" in done.stdout


def test_a_kv_cache_graph_has_the_groups_of_the_plain_graph_with_the_cache_as_a_site():
    from fxslice import capture
    from fxslice.models.kvcache import capture_cached
    from fxslice.testing import tiny_causal_lm

    model = tiny_causal_lm("llama")
    cached, plain = capture_cached(model), capture(model)
    PassManager([CleanupIR()]).run(cached)
    PassManager([CleanupIR()]).run(plain)
    groups, expected = cached.analysis(group_analysis), plain.analysis(group_analysis)
    assert groups.groups == expected.groups and len(groups.by_kind("heads")) == 4
    caches = [n for n in groups.sites if n.op == "placeholder"]
    assert sorted(str(n.target) for n in caches) == [f"kv_{i}" for i in range(4)]
