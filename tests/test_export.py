"""Exports load where fxslice is not installed: each is opened in a fresh process in which `import fxslice` fails."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fxslice import InvalidOption, capture, load
from fxslice.models.export import export_pt2
from fxslice.models.io import save
from fxslice.models.kvcache import capture_cached
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


@pytest.mark.parametrize("kind", ["sliced", "pruned", "quantized", "cached"])
def test_a_pt2_export_runs_with_pytorch_alone_and_gives_fxslices_logits(kind, tmp_path, exportable):
    program = exportable(kind)
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


RUN_ONNX_WITHOUT_FXSLICE = """
import sys, numpy as np, torch
sys.modules["fxslice"] = None
import onnxruntime
path, ids_path, next_path, out_path = sys.argv[1:5]
session = onnxruntime.InferenceSession(path)
names = [i.name for i in session.get_inputs()]
ids, following = torch.load(ids_path).numpy(), torch.load(next_path).numpy()
if len(names) == 1:
    torch.save([torch.from_numpy(session.run(None, {names[0]: ids})[0])], out_path)
else:  # prefill into an empty cache, then one decoding step on the caches it returned
    shapes = [session.get_inputs()[i].shape for i in range(2, len(names))]
    caches = [np.zeros((ids.shape[0], s[1], ids.shape[1] + 1, s[3]), dtype=np.float32) for s in shapes]
    first = session.run(None, {"input_ids": ids, "past_length": np.array(0), **dict(zip(names[2:], caches))})
    second = session.run(None, {"input_ids": following, "past_length": np.array(ids.shape[1]),
                                **dict(zip(names[2:], first[1:]))})
    torch.save([torch.from_numpy(first[0]), torch.from_numpy(second[0])], out_path)
"""


@pytest.mark.parametrize("kind", ["sliced", "pruned", "quantized", "cached"])
def test_an_onnx_export_runs_in_onnxruntime_without_fxslice(kind, tmp_path, exportable):
    pytest.importorskip("onnxruntime")
    from fxslice.models.export import export_onnx

    program = exportable(kind)
    export_onnx(program, tmp_path / "model.onnx")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    following = torch.randint(0, 128, (2, 1), generator=torch.Generator().manual_seed(2))
    torch.save(ids, tmp_path / "ids.pt")
    torch.save(following, tmp_path / "next.pt")
    done = subprocess.run([sys.executable, "-c", RUN_ONNX_WITHOUT_FXSLICE, str(tmp_path / "model.onnx"),
                           str(tmp_path / "ids.pt"), str(tmp_path / "next.pt"), str(tmp_path / "out.pt")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    got = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        if kind == "cached":
            kv = program.cache.allocate(2, 10, torch.float32)
            expected = [program.step(ids, 0, kv), program.step(following, 9, kv)]
        else:
            expected = [program(ids)]
    for a, b in zip(got, expected, strict=True):
        assert float((a - b).abs().max() / b.abs().max()) < 1e-4


@pytest.mark.slow
@pytest.mark.expensive  # the ONNX export of SmolLM2 alone takes over a minute
def test_smollm2_with_its_kv_cache_exports_to_pt2_and_onnx_that_run_without_fxslice(smollm2, tmp_path):
    pytest.importorskip("onnxruntime")
    from fxslice.models.export import export_onnx

    program = capture_cached(smollm2[0])
    export_pt2(program, tmp_path / "model.pt2")
    export_onnx(program, tmp_path / "model.onnx")
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(1))
    following = torch.randint(0, 49152, (1, 1), generator=torch.Generator().manual_seed(2))
    for name, data in (("ids", ids), ("next", following)):
        torch.save(data, tmp_path / f"{name}.pt")
    with torch.no_grad():
        kv = program.cache.allocate(1, 17, torch.float32)
        expected = [program.step(ids, 0, kv), program.step(following, 16, kv)]
    pt2 = subprocess.run([sys.executable, "-c", RUN_WITHOUT_FXSLICE, str(tmp_path / "model.pt2"), str(tmp_path / "ids.pt"),
                          str(tmp_path / "pt2.pt")], capture_output=True, text=True)
    assert pt2.returncode == 0, pt2.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "pt2.pt"), expected[0], rtol=1e-5, atol=1e-4)
    onnx = subprocess.run([sys.executable, "-c", RUN_ONNX_WITHOUT_FXSLICE, str(tmp_path / "model.onnx"),
                           str(tmp_path / "ids.pt"), str(tmp_path / "next.pt"), str(tmp_path / "onnx.pt")],
                          capture_output=True, text=True)
    assert onnx.returncode == 0, onnx.stderr[-2000:]
    for a, b in zip(torch.load(tmp_path / "onnx.pt"), expected, strict=True):
        assert float((a - b).abs().max() / b.abs().max()) < 1e-4
