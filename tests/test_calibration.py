"""Calibration service: observers on graph values, gradient mode, per-linear A and G statistics checked
against hooks on the eager HF model (an independent computation), in float64."""

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fxslice import InvalidOption, PassManager, capture_module
from fxslice.calibration import gradients as gradients_module
from fxslice.calibration.gradients import run_with_gradients, stretches
from fxslice.calibration.moments import dense_linears, linear_statistics
from fxslice.calibration.observers import Recorder, SecondMoment
from fxslice.calibration.runner import StagedRunner
from fxslice.passes import CleanupIR
from fxslice.testing import tiny_causal_lm

WINDOWS = torch.randint(3, 128, (6, 11), generator=torch.Generator().manual_seed(0))


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), width=st.integers(1, 12), splits=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_second_moment_streams_to_the_same_sum_as_all_at_once(rows, width, splits, seed):
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    moment = SecondMoment()
    for part in x.chunk(splits):
        moment.update(part.reshape(1, -1, width))
    exact = x.double().T @ x.double()
    torch.testing.assert_close(moment.sum, exact, rtol=1e-12, atol=1e-12)
    assert moment.rows == rows and moment.sum.dtype == torch.float64
    torch.testing.assert_close(moment.mean(), exact / rows)


def test_an_empty_second_moment_says_so():
    with pytest.raises(ValueError, match="no data"):
        SecondMoment().mean()


def _eager_statistics(model, windows, names, *, gradients):
    """A and G per linear module from forward / full-backward hooks on the HF model itself."""
    a = {n: 0 for n in names}
    g = {n: 0 for n in names}
    handles = []
    for name in names:
        module = model.get_submodule(name)

        def forward(mod, args, out, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            a[name] = a[name] + x.T @ x

        def backward(mod, grad_in, grad_out, name=name):
            y = grad_out[0].detach().reshape(-1, grad_out[0].shape[-1]).double()
            g[name] = g[name] + y.T @ y

        handles.append(module.register_forward_hook(forward))
        if gradients:
            handles.append(module.register_full_backward_hook(backward))
    try:
        for ids in windows.split(2):
            with torch.set_grad_enabled(gradients):
                logits = model(ids, use_cache=False).logits
                if gradients:
                    model.zero_grad()
                    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                           reduction="sum")
                    loss.backward()
    finally:
        for h in handles:
            h.remove()
    return a, g


@pytest.mark.parametrize("name", ["llama", "gpt2", "phi3"])
@pytest.mark.parametrize("pieces", ["default", "small"])
def test_linear_statistics_equal_hooks_on_the_eager_model(name, pieces, monkeypatch):
    if pieces == "small":  # many checkpointed stretches and loss slices of a few tokens, one ragged
        monkeypatch.setattr(gradients_module, "STRETCH_OPS", 5)
        monkeypatch.setattr(gradients_module, "LOSS_TOKENS", 3)
    model = tiny_causal_lm(name, dtype=torch.float64)
    program = capture_module(model)
    PassManager([CleanupIR()]).run(program)
    stats = linear_statistics(program, WINDOWS, batch_size=2, gradients=True)
    modules = {w.rpartition(".")[0]: w for w in stats.linears if w.endswith(".weight")}
    modules = {m: w for m, w in modules.items() if isinstance(model.get_submodule(m), torch.nn.Linear)
               or type(model.get_submodule(m)).__name__ == "Conv1D"}
    assert len(modules) >= 4 * model.config.num_hidden_layers // 2
    for p in model.parameters():
        p.requires_grad_(True)
    a, g = _eager_statistics(model, WINDOWS, list(modules), gradients=True)
    for module, weight in modules.items():
        torch.testing.assert_close(stats.A(weight), a[module], rtol=1e-9, atol=1e-9, msg=f"A of {module}")
        torch.testing.assert_close(stats.G(weight), g[module], rtol=1e-8, atol=1e-10, msg=f"G of {module}")
    assert stats.loss is not None and 0 < stats.loss < 10


@settings(max_examples=30, deadline=None)
@given(size=st.integers(1, 200))
def test_stretches_cover_the_graph_in_order_in_pieces_of_about_the_size(size):
    nodes = _tiny_llama_ops()
    parts = stretches(nodes, size)
    assert [n for part in parts for n in part] == nodes
    assert all(size - size // 4 <= len(part) <= size + size // 4 for part in parts[:-1])
    assert 1 <= len(parts[-1]) <= size + size // 4


@functools.cache
def _tiny_llama_ops() -> list:
    program = capture_module(tiny_causal_lm("llama"))
    return [n for n in program.graph.nodes if n.op == "call_function"]


def test_linears_reading_one_value_share_one_input_statistic(tiny):
    _, program = tiny("llama")
    PassManager([CleanupIR()]).run(program)
    stats = linear_statistics(program, WINDOWS[:2], batch_size=2)
    q, k, v = (f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv")
    assert stats.inputs[q] is stats.inputs[k] is stats.inputs[v]
    assert stats.inputs[q] is not stats.inputs["model.layers.0.self_attn.o_proj.weight"]
    with pytest.raises(InvalidOption, match="gradients=True"):
        stats.G(q)


def test_activation_only_statistics_match_gradient_mode(tiny):
    _, program = tiny("llama")
    program = program.to(torch.float64)
    PassManager([CleanupIR()]).run(program)
    plain = linear_statistics(program, WINDOWS, batch_size=3)
    both = linear_statistics(program, WINDOWS, batch_size=2, gradients=True)
    for weight in plain.linears:
        torch.testing.assert_close(plain.A(weight), both.A(weight), rtol=1e-10, atol=1e-10)


def test_sampled_labels_give_another_fisher_and_are_seeded(tiny):
    _, program = tiny("llama")
    PassManager([CleanupIR()]).run(program)
    head = "lm_head.weight"
    data = linear_statistics(program, WINDOWS, linears=[head], gradients=True)
    sampled = [linear_statistics(program, WINDOWS, linears=[head], gradients=True, labels="sampled") for _ in range(2)]
    assert not torch.allclose(data.G(head), sampled[0].G(head))
    torch.testing.assert_close(sampled[0].G(head), sampled[1].G(head), rtol=0, atol=0)
    with pytest.raises(InvalidOption, match="labels"):
        run_with_gradients(program, [WINDOWS], gradients={dense_linears(program)[head].output: SecondMoment()},
                           labels="mine")


def test_observers_see_a_stage_value_batch_by_batch_and_nothing_is_kept(tiny):
    _, program = tiny("llama")
    nodes = [n for n in program.graph.nodes if n.op == "call_function"]
    middle = nodes[len(nodes) // 2]
    record = Recorder()
    runner = StagedRunner(program, list(WINDOWS.split(4)))
    runner.run_through(middle, {middle: record})
    assert [v.shape[0] for v in record.values] == [4, 2]
    assert all(middle not in env or any(u not in runner.done for u in middle.users) for env in runner.envs)


def test_unknown_linears_are_refused(tiny):
    _, program = tiny("llama")
    with pytest.raises(InvalidOption, match="no linear reads"):
        linear_statistics(program, WINDOWS, linears=["model.nothing.weight"])
