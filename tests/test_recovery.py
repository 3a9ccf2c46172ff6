"""Recovery fine-tuning: adapters go in exactly, only they train, they merge back exactly, and training on
the right text lowers a held-out loss that compression raised."""

from __future__ import annotations

import pytest
import torch

from fxslice import InvalidOption, PassManager, as_pass, capture, replay
from fxslice.core.graph import set_tensor, tensor_of
from fxslice.passes.recovery import (
    InsertAdapters,
    MergeAdapters,
    RecoverFull,
    RecoverLoRA,
    adaptable_linears,
    adapters,
    train_adapters,
)
from fxslice.passes.recovery.stages import Recover
from fxslice.recipes import Recipe
from fxslice.testing import arithmetic_sequences, check_exact_pass

FAMILIES = ("llama", "gpt2", "opt-project", "phi3", "mixtral")  # nn.Linear and Conv1D layouts, MoE, projections


@as_pass(name="randomize_adapters", exact=False)
def randomize_adapters(program) -> bool:
    """Give every adapter a non-zero B, as training would, so that merging has something to prove."""
    gen = torch.Generator().manual_seed(7)
    for adapter in adapters(program):
        b = tensor_of(program.gm, adapter.b)
        set_tensor(program.gm, adapter.b, torch.randn(b.shape, generator=gen, dtype=torch.float64).to(b.dtype) * 0.1)
    return True


def test_inserted_adapters_leave_every_output_unchanged(tiny_programs):
    reports = check_exact_pass(lambda: InsertAdapters(rank=4), tiny_programs(*FAMILIES))
    assert all(r.max_relative_error == 0 for r in reports)  # B = 0: not round-off, the very same numbers


def test_merged_adapters_compute_what_the_adapted_graph_computed(tiny_programs):
    check_exact_pass(MergeAdapters, tiny_programs(*FAMILIES), prepare=lambda: [InsertAdapters(rank=4), randomize_adapters])


@pytest.mark.parametrize("name", FAMILIES)
def test_after_merging_nothing_of_the_adapters_is_left_and_the_size_is_the_same(tiny, name):
    _, program = tiny(name)
    size, code = program.num_parameters(), program.gm.code
    PassManager([InsertAdapters(rank=4), randomize_adapters]).run(program)
    assert program.num_parameters() > size
    PassManager([MergeAdapters()]).run(program)
    assert program.num_parameters() == size
    assert not adapters(program)
    assert not [n for n in program.gm.named_parameters() if "lora" in n[0]]
    assert program.gm.code == code


def test_the_tied_table_and_the_head_are_left_alone_unless_asked(tiny):
    _, tied = tiny("llama-tied")
    table = next(str(n.args[0].target) for n in tied.graph.nodes if n.target == torch.ops.aten.embedding.default)
    assert table not in adaptable_linears(tied) and table not in adaptable_linears(tied, head=True)
    _, untied = tiny("llama")
    head = set(adaptable_linears(untied, head=True)) - set(adaptable_linears(untied))
    assert head == {"lm_head.weight"}


def test_training_moves_only_the_adapters_and_restores_the_flags(tiny):
    _, program = tiny("llama")
    PassManager([InsertAdapters(rank=4)]).run(program)
    frozen = {name: p.detach().clone() for name, p in program.gm.named_parameters() if "lora" not in name}
    flags = {name: p.requires_grad for name, p in program.gm.named_parameters()}
    train_adapters(program, arithmetic_sequences(16, seed=1), steps=3, lr=1e-2, batch_size=4)
    for name, p in program.gm.named_parameters():
        assert p.requires_grad == flags[name] and p.grad is None
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert any(tensor_of(program.gm, a.b).abs().sum() > 0 for a in adapters(program))


@pytest.fixture(scope="module")
def damaged():
    """A trained tiny Llama with its MLP weights scaled by 0.6: a loss that recovery can win back."""
    from fxslice.testing import trained_tiny_causal_lm

    program = capture(trained_tiny_causal_lm("llama"))
    for name, p in list(program.gm.named_parameters()):
        if "mlp" in name:
            set_tensor(program.gm, name, p * 0.6)
    return program


def test_recovery_lowers_the_held_out_loss_and_replays_onto_another_capture(damaged):
    program = damaged.clone()
    train, held = arithmetic_sequences(64, seed=1), arithmetic_sequences(16, seed=2)
    recover = RecoverLoRA(train, rank=4, steps=30, lr=1e-2, batch_size=8, held_out=held)
    result = PassManager([recover]).run(program)
    report = recover.report
    assert report.held_out_after < 0.9 * report.held_out_before, report
    assert program.num_parameters() == damaged.num_parameters()
    again = damaged.clone()
    replay(result.passes, again, program)  # raises unless every weight comes out bit-identical
    x = arithmetic_sequences(4, seed=3)
    torch.testing.assert_close(again(x), program(x), rtol=1e-5, atol=1e-5)
    bare = damaged.skeleton()  # shapes only: the adapters' products are added to no values, then the weights arrive
    replay(result.passes, bare, program)
    torch.testing.assert_close(bare(x), program(x), rtol=1e-5, atol=1e-5)


def test_a_kv_cache_capture_trains_exactly_as_the_plain_one(tmp_path):
    """A saved model is a KV-cache graph: recovering it (later, from `fxslice.load`) must learn what recovering the
    plain capture learns, each window run from an empty cache."""
    from fxslice import load, save
    from fxslice.models.kvcache import capture_cached
    from fxslice.testing import trained_tiny_causal_lm

    model = trained_tiny_causal_lm("llama")
    learned = {}
    for kind, program in (("plain", capture(model)), ("cached", capture_cached(model))):
        for name, p in list(program.gm.named_parameters()):
            if "mlp" in name:
                set_tensor(program.gm, name, p * 0.6)
        if kind == "cached":
            save(program, tmp_path / "saved")
            program = load(tmp_path / "saved")
            assert program.cache is not None
        recover = RecoverLoRA(arithmetic_sequences(64, seed=1), rank=4, steps=10, lr=1e-2, batch_size=8,
                              held_out=arithmetic_sequences(16, seed=2))
        PassManager([recover]).run(program)
        learned[kind] = (recover.updates, recover.report, program)
    (plain, plain_report, plain_program), (cached, cached_report, cached_program) = learned["plain"], learned["cached"]
    assert plain.keys() == cached.keys() and plain
    for weight, (left, right) in plain.items():
        torch.testing.assert_close(cached[weight][0] @ cached[weight][1], left @ right, rtol=1e-5, atol=1e-6)
    assert cached_report.held_out_after == pytest.approx(plain_report.held_out_after, rel=1e-5)
    assert cached_report.held_out_after < 0.95 * cached_report.held_out_before
    x = arithmetic_sequences(2, seed=3)
    torch.testing.assert_close(cached_program(x), plain_program(x), rtol=1e-5, atol=1e-5)


def test_the_recover_stage_trains_on_calibration_windows_and_reports(damaged):
    stage = Recover(rank=4, steps=20, lr=1e-2, batch_size=8, text="", held_out=8)
    assert Recover.from_dict(stage.to_dict()) == stage
    program = damaged.clone()
    result = Recipe((stage,)).run(program, calibration=arithmetic_sequences(64, seed=4))
    report = result.stages[0][1].report
    assert report["training_windows"] == 56 and report["held_out_windows"] == 8
    assert len(report["losses"]) == 20
    assert report["held_out_after"] < report["held_out_before"]
    assert result.parameters == damaged.num_parameters()


def test_full_fine_tuning_moves_the_adaptable_weights_alone_and_replays(damaged):
    """Full recovery trains the weights LoRA would adapt, in place: the held-out loss falls, every other parameter
    (norms, the tied table) keeps its bits, the flags are restored, the size is unchanged, and another capture
    given the trained weights computes the same."""
    program = damaged.clone()
    train, held = arithmetic_sequences(64, seed=1), arithmetic_sequences(16, seed=2)
    trained = set(adaptable_linears(program))
    before = {name: p.detach().clone() for name, p in program.gm.named_parameters()}
    flags = {name: p.requires_grad for name, p in program.gm.named_parameters()}
    recover = RecoverFull(train, steps=30, lr=3e-3, batch_size=8, held_out=held)
    result = PassManager([recover]).run(program)
    assert recover.report.held_out_after < 0.9 * recover.report.held_out_before, recover.report
    assert program.num_parameters() == damaged.num_parameters() and program.gm.code == damaged.gm.code
    for name, p in program.gm.named_parameters():
        assert p.requires_grad == flags[name] and p.grad is None
        assert torch.equal(p, before[name]) != (name in trained), name  # exactly the trained weights moved
    again = damaged.clone()
    replay(result.passes, again, program)  # raises unless every weight comes out bit-identical
    x = arithmetic_sequences(4, seed=3)
    torch.testing.assert_close(again(x), program(x), rtol=0, atol=0)


def test_the_recover_stage_fine_tunes_in_full_by_distillation(damaged):
    from fxslice.testing import trained_tiny_causal_lm

    teacher = capture(trained_tiny_causal_lm("llama"))
    stage = Recover(method="full", steps=20, lr=3e-3, batch_size=8, text="", held_out=8, objective="distill")
    assert Recover.from_dict(stage.to_dict()) == stage
    program = damaged.clone()
    calibration, held = arithmetic_sequences(64, seed=4), arithmetic_sequences(16, seed=2)
    kl_before = _held_out_kl(program, teacher, held)
    result = Recipe((stage,)).run(program, calibration=calibration, teacher=teacher)
    report = result.stages[0][1].report
    assert report["objective"] == "distill" and len(report["losses"]) == 20
    assert _held_out_kl(program, teacher, held) < 0.6 * kl_before
    assert result.parameters == damaged.num_parameters()
    assert [r.name for r in result.stages[0][1].records] == ["recover_full"]


@pytest.mark.parametrize(("options", "message"), [
    (dict(method="qlora"), "method"), (dict(rank=0), "rank"), (dict(steps=-1), "steps"), (dict(lr=0), "lr"), (dict(held_out=-1), "held_out"),
    (dict(text="wikitext2:test"), "test split"), (dict(batch_size=True), "batch_size"),
])
def test_bad_recover_options_are_refused(options, message):
    with pytest.raises(InvalidOption, match=message):
        Recover(**options)


class Lookup(torch.nn.Module):
    def __init__(self, vocab: int = 16):
        super().__init__()
        self.table = torch.nn.Embedding(vocab, 8)

    def forward(self, input_ids, use_cache=False):
        return self.table(input_ids) @ self.table.weight.T  # a tied head and nothing else


def test_a_program_without_linears_to_adapt_is_refused():
    program = capture(Lookup())
    with pytest.raises(InvalidOption, match="no linear"):
        PassManager([InsertAdapters()]).run(program)


def test_cli_prune_then_recover_saves_a_model_of_the_pruned_size(tmp_path, tiny_model_dir):
    import json
    import subprocess
    import sys

    import fxslice

    out = tmp_path / "healed"
    cmd = [sys.executable, "-m", "fxslice.cli", "prune", str(tiny_model_dir("llama")), "--target", "0.3", "--shots", "1",
           "--calib-windows", "4", "--calib-length", "32", "--eval-windows", "2", "--eval-length", "32",
           "--recover-steps", "3", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "held-out loss" in done.stdout
    record = json.loads((out / "fxslice.json").read_text())
    assert [s["stage"] for s in record["stages"]] == ["cleanup", "surgeon", "fuse_gqa", "recover"]
    assert len(record["stages"][3]["report"]["losses"]) == 3
    assert fxslice.load(out).num_parameters() == record["parameters"] <= 0.72 * record["dense_parameters"]
    bad = subprocess.run([*cmd[:-2], "--recover-text", "wikitext2:test", "--out", str(tmp_path / "o2")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "test split" in bad.stderr
    bad = subprocess.run([*cmd[:-2], "--recover-method", "qlora", "--out", str(tmp_path / "o3")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "lora, full" in bad.stderr and not (tmp_path / "o3").exists()


def test_recovery_on_its_own_text_needs_no_calibration_section(tiny, tmp_path):
    from fxslice.testing import char_tokenizer

    text = tmp_path / "letters.txt"
    text.write_text("".join("abcdefghijklmnopqrstuvwxyz"[i % 26] for i in range(4000)))
    _, program = tiny("llama")
    program.tokenizer = char_tokenizer()
    stage = Recover(rank=2, steps=2, batch_size=2, length=32, held_out=2, text=str(text))
    assert not stage.calibrates and Recover(text="").calibrates
    result = Recipe((stage,)).run(program)  # no calibration windows given
    assert result.stages[0][1].report["training_windows"] == 4000 // 32 - 2


def _held_out_kl(student, teacher, windows) -> float:
    from fxslice.passes.recovery.train import distillation_loss

    with torch.no_grad():
        return float(distillation_loss(student, teacher, windows))


def test_distillation_from_the_model_itself_is_zero_and_moves_nothing(damaged):
    from fxslice.passes.recovery.train import distillation_loss

    program = damaged.clone()
    PassManager([InsertAdapters(rank=4, seed=3)]).run(program)  # B = 0: the same function as the teacher
    ids = arithmetic_sequences(4, seed=5)
    with torch.enable_grad():
        for p in program.gm.parameters():
            p.requires_grad_(True)
        loss = distillation_loss(program, damaged, ids, temperature=2.0)
        loss.backward()
    assert abs(float(loss.detach())) < 1e-6
    assert all(p.grad is None or float(p.grad.abs().max()) < 1e-6 for p in program.gm.parameters())


def test_distillation_brings_the_model_toward_its_teacher_more_than_the_text_does(damaged):
    from fxslice.testing import trained_tiny_causal_lm

    teacher = capture(trained_tiny_causal_lm("llama"))  # what `damaged` was before its MLPs were scaled
    train, held = arithmetic_sequences(64, seed=1), arithmetic_sequences(16, seed=2)
    kl_before = _held_out_kl(damaged, teacher, held)
    after = {}
    for objective in ("lm", "distill"):
        program = damaged.clone()
        recover = RecoverLoRA(train, rank=4, steps=30, lr=1e-2, batch_size=8, held_out=held,
                              teacher=teacher if objective == "distill" else None, temperature=2.0)
        result = PassManager([recover]).run(program)
        assert recover.report.objective == objective and result.records
        assert program.num_parameters() == damaged.num_parameters()
        after[objective] = _held_out_kl(program, teacher, held)
    assert after["distill"] < 0.5 * kl_before, (kl_before, after)
    assert after["distill"] < after["lm"], after


def test_the_recover_stage_distills_from_the_program_the_recipe_received(damaged):
    from fxslice.passes import prune_recipe
    from fxslice.testing import trained_tiny_causal_lm

    teacher = capture(trained_tiny_causal_lm("llama"))
    stage = Recover(rank=4, steps=20, lr=1e-2, batch_size=8, text="", held_out=8, objective="distill", temperature=2.0)
    assert Recover.from_dict(stage.to_dict()) == stage and stage.learns_from_teacher
    calibration = arithmetic_sequences(64, seed=4)
    program = teacher.clone()
    recipe = Recipe((*prune_recipe(target=0.2, shots=1).stages, stage))
    result = recipe.run(program, calibration=calibration)  # the teacher: the recipe's own copy of `teacher`
    report = result.stages[-1][1].report
    assert report["objective"] == "distill" and len(report["losses"]) == 20
    assert report["losses"][-1] < report["losses"][0]
    assert "distilled" in "\n".join(stage.summary(result.stages[-1][1]))
    with pytest.raises(InvalidOption, match="nothing to learn"):  # a recipe that compresses nothing before it
        Recipe((stage,)).run(teacher.clone(), calibration=calibration)
    with pytest.raises(InvalidOption, match="vocabulary"):
        other = capture(Lookup(teacher.vocab_size + 4))
        Recipe((stage,)).run(damaged.clone(), calibration=calibration, teacher=other)


@pytest.mark.parametrize(("options", "message"), [
    (dict(objective="kd"), "objective"), (dict(temperature=0), "temperature"), (dict(temperature=True), "temperature"),
])
def test_bad_distillation_options_are_refused(options, message):
    with pytest.raises(InvalidOption, match=message):
        Recover(**options)
