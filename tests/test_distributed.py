"""Data-parallel calibration with `torch.distributed` (gloo, 2 processes on the CPU): each rank streams its share of
the windows, the statistics are summed with all_reduce, and every rank gets what one process gets."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

WINDOWS = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(0))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slice_and_prune(windows: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from fxslice import PassManager, capture
    from fxslice.calibration.moments import linear_statistics
    from fxslice.passes import CleanupIR, FuseNorms, ProjectNormWriters
    from fxslice.passes.slicegpt.slice_stream import SliceStream, constant_widths
    from fxslice.testing import tiny_causal_lm

    torch.manual_seed(0)
    model = tiny_causal_lm("llama")
    program = capture(model).to(torch.float64)
    stats = linear_statistics(program.clone(), windows, batch_size=2, gradients=True)
    slicer = SliceStream(windows, constant_widths(0.25), batch_size=2)
    PassManager([CleanupIR(), ProjectNormWriters(), FuseNorms(), slicer]).run(program)
    return slicer.bases, {k: stats.A(k) for k in stats.inputs}, {k: stats.G(k) for k in stats.output_gradients}


def _worker(rank: int, size: int, port: int, out: str, windows: torch.Tensor) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        result = _slice_and_prune(windows)
    except Exception as exc:  # noqa: BLE001 - the error itself is what the parent checks
        result = repr(exc)
    torch.save(result, f"{out}.{rank}")
    dist.destroy_process_group()


def _spawn(tmp_path, windows_per_rank: list[torch.Tensor]) -> list:
    size = len(windows_per_rank)
    port = _free_port()
    context = mp.get_context("spawn")
    procs = [context.Process(target=_worker, args=(r, size, port, str(tmp_path / "out"), windows_per_rank[r]))
             for r in range(size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0, f"a rank exited with {p.exitcode}"
    return [torch.load(tmp_path / f"out.{r}", weights_only=False) for r in range(size)]


@pytest.mark.skipif(sys.platform == "win32", reason="gloo over TCP")
def test_two_gloo_ranks_compute_the_bases_and_curvature_of_one_process(tmp_path):
    bases, a, g = _slice_and_prune(WINDOWS)
    ranks = _spawn(tmp_path, [WINDOWS, WINDOWS])
    for got_bases, got_a, got_g in ranks:
        assert len(got_bases) == len(bases)
        for q, p in zip(got_bases, bases, strict=True):  # the same subspace (eigenvector signs may differ)
            torch.testing.assert_close(q @ q.T, p @ p.T, rtol=0, atol=1e-10)
        for mine, theirs in ((got_a, a), (got_g, g)):
            assert mine.keys() == theirs.keys()
            for k in mine:
                torch.testing.assert_close(mine[k], theirs[k], rtol=1e-12, atol=1e-12)
    for q, p in zip(ranks[0][0], ranks[1][0], strict=True):
        assert torch.equal(q, p)  # every rank the same bases, bit for bit


def test_ranks_given_different_windows_all_refuse_without_hanging(tmp_path):
    ranks = _spawn(tmp_path, [WINDOWS, WINDOWS[:4]])
    assert all(isinstance(r, str) and "different calibration data" in r for r in ranks), ranks


@pytest.mark.skipif(sys.platform == "win32", reason="gloo over TCP")
def test_the_cli_under_torchrun_saves_what_one_process_saves(tiny_model_dir, tmp_path):
    """`torchrun --nproc-per-node 2 -m fxslice.cli prune ...`: two gloo ranks, one saved model, one report, and the
    model one process makes (the same groups pruned; weights equal up to the order the ranks' sums were added in)."""
    import subprocess

    from fxslice.models.io import load

    model = tiny_model_dir("llama")
    flags = ["prune", str(model), "--target", "0.2", "--shots", "2", "--calib-windows", "4", "--calib-length", "32",
             "--eval", "none"]
    one = subprocess.run([sys.executable, "-m", "fxslice.cli", *flags, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "fxslice.cli", *flags, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("saved ") == 1 and two.stderr.count("saving to") == 1  # rank 0 alone reports and saves
    a, b = load(tmp_path / "one"), load(tmp_path / "two")
    assert a.num_parameters() == b.num_parameters() < load(tmp_path / "one").record["dense_parameters"]
    probe = a.probe_input()
    torch.testing.assert_close(b(probe), a(probe), rtol=1e-4, atol=1e-5)
    wa, wb = dict(a.gm.named_parameters()), dict(b.gm.named_parameters())
    assert wa.keys() == wb.keys() and all(wa[k].shape == wb[k].shape for k in wa)
