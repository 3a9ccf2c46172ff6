"""The architecture matrix: fuse + rotate (a different random Q per segment) must keep the logits."""

import pytest
import torch

from fxslice import PassManager
from fxslice.analysis.roles import SHORTCUT
from fxslice.analysis.stream import stream_analysis
from fxslice.core import TOLERANCE, relative_error
from fxslice.core.graph import role_of
from fxslice.passes import exact_pipeline
from fxslice.passes.slicegpt.rotations import random_orthogonal
from fxslice.testing import TINY_CONFIGS


def run_exact(program, seed=3):
    ids = program.probe_input()
    with torch.no_grad():
        before = program(ids)
        PassManager(exact_pipeline(random_orthogonal(seed))).run(program)
        after = program(ids)
    return relative_error(after, before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_fuse_and_rotate_keep_the_logits(tiny, name, dtype):
    model, program = tiny(name)
    program = program.to(dtype)
    err = run_exact(program)
    stream = program.analysis(stream_analysis)
    shortcuts = [n for n in program.graph.nodes if role_of(n) == SHORTCUT]
    print(f"{type(model).__name__:<22} {name:<12} {str(dtype)[6:]:<8} exact  max rel. error {err:.2e}  "
          f"segments {len(stream.segments)}  shortcuts {len(shortcuts)}")
    assert err <= TOLERANCE[dtype]
    assert all(n.is_plain_rms for n in stream.norms)
    assert len(shortcuts) == len(stream.shortcuts) > 0  # every residual edge crossed bases: all Q differ


def test_rotation_really_changed_the_weights(tiny):
    _, program = tiny("llama")
    before = {k: v.clone() for k, v in program.gm.state_dict().items()}
    run_exact(program)
    after = program.gm.state_dict()
    changed = [k for k in before if k in after and before[k].shape == after[k].shape and not torch.equal(before[k], after[k])]
    assert any("q_proj" in k for k in changed) and any("down_proj" in k for k in changed)


@pytest.mark.slow
def test_smollm2_fuse_and_rotate_exact_in_float64(smollm2):
    _, program = smollm2
    program = program.to(torch.float64)
    err = run_exact(program)
    print(f"LlamaForCausalLM       SmolLM2-135M float64  exact  max rel. error {err:.2e}")
    assert err <= 1e-9
