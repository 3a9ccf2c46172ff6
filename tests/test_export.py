"""Exports load where fxslice is not installed: each is opened in a fresh process in which `import fxslice` fails."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fxslice import InvalidOption, PassManager, capture, load
from fxslice.models.export import export_pt2
from fxslice.models.io import save
from fxslice.models.kvcache import capture_cached
from fxslice.passes import prune_recipe, slicegpt_recipe
from fxslice.passes.quantize import QuantizeWeights
from fxslice.testing import tiny_causal_lm

RUN_WITHOUT_FXSLICE = """
import json, sys, torch
sys.modules["fxslice"] = None  # `import fxslice` now fails
path, ids_path, out_path = sys.argv[1:4]
extra = {"fxslice.json": ""}
program = torch.export.load(path, extra_files=extra)
meta = json.loads(extra["fxslice.json"])
ids = torch.load(ids_path)
module = program.module()
if meta["kv_cache"] is None:
    logits = module(ids)
else:
    kv = [torch.zeros(ids.shape[0], h, ids.shape[1] + 4, d) for h, d in meta["kv_cache"]]
    logits = module(ids, torch.tensor(0), *kv)
torch.save(logits, out_path)
"""


def _compressed(kind: str):
    calibration = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    program = capture(tiny_causal_lm("llama"))
    if kind == "sliced":
        slicegpt_recipe(sparsity=0.25, batch_size=4).run(program, calibration=calibration)
    elif kind == "pruned":
        prune_recipe(target=0.2, shots=1, batch_size=4).run(program, calibration=calibration)
    elif kind == "quantized":
        PassManager([QuantizeWeights(4, group_size=16)]).run(program)
    return program


@pytest.mark.parametrize("kind", ["sliced", "pruned", "quantized", "cached"])
def test_a_pt2_export_runs_with_pytorch_alone_and_gives_fxslices_logits(kind, tmp_path):
    if kind == "cached":
        program = capture_cached(tiny_causal_lm("llama"))
    else:
        program = _compressed(kind)
    save(program, tmp_path / "model")
    reloaded = load(tmp_path / "model")
    export_pt2(reloaded, tmp_path / "model.pt2")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.save(ids, tmp_path / "ids.pt")
    done = subprocess.run([sys.executable, "-c", RUN_WITHOUT_FXSLICE, str(tmp_path / "model.pt2"),
                           str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), reloaded(ids), rtol=1e-5, atol=1e-5)


def test_export_refuses_an_existing_file_and_an_edited_model(tmp_path):
    program = capture(tiny_causal_lm("llama"))
    save(program, tmp_path / "model")
    (tmp_path / "taken.pt2").write_bytes(b"")
    with pytest.raises(InvalidOption, match="already exists"):
        export_pt2(program, tmp_path / "taken.pt2")
    record = json.loads((tmp_path / "model" / "fxslice.json").read_text())
    record["parameters"] += 1
    (tmp_path / "model" / "fxslice.json").write_text(json.dumps(record))
    done = subprocess.run([sys.executable, "-m", "fxslice.cli", "export", str(tmp_path / "model"), "--out",
                           str(tmp_path / "x.pt2")], capture_output=True, text=True)
    assert done.returncode != 0 and not (tmp_path / "x.pt2").exists()
