"""A job killed half-way continues from its checkpoint: are the weights those of an uninterrupted run, and how much
time did the kill cost? One JSON object.

    python benchmarks/resume.py [--job prune|quantize] [--model smollm2] [--target 0.166] [--shots 4]
                                [--bits 4] [--calib-windows 8] [--calib-length 512] [--kill-at 0.5]
                                [--step-every 0] [--work DIR]

Three runs of `fxslice prune MODEL ... --eval none --out DIR` (`--job quantize`: `fxslice quantize MODEL --bits B
...`, GPTQ, checkpointed between its weights), each a fresh process: uninterrupted (its time T);
killed with SIGKILL (no handler runs: as an out-of-memory kill or a lost machine) at `kill-at` x T; and the same
command again, which continues from what the killed run left. The saved files' weight and graph digests must match.
`--step-every` sets how many seconds at least separate two checkpoints within a stage, and the rule that they also
wait ten times the last one's writing time is lifted (the job's defaults, `fxslice.jobs.checkpoint.STEP_EVERY` and
`STEP_WRITE_RATIO`: five minutes at least, so on a short run none would fall before the kill).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

#: the CLI with the checkpoint interval set first (argv[1]), the command line after it
LAUNCH = ("import sys; from fxslice.jobs import checkpoint; checkpoint.STEP_EVERY = float(sys.argv.pop(1)); "
          "checkpoint.STEP_WRITE_RATIO = 0.0; "
          "from fxslice.cli import run; sys.argv[0] = 'fxslice'; run()")


def _command(args: argparse.Namespace, out: Path) -> list[str]:
    job = (["prune", args.model, "--target", str(args.target), "--shots", str(args.shots)] if args.job == "prune"
           else ["quantize", args.model, "--bits", str(args.bits)])
    return [sys.executable, "-c", LAUNCH, str(args.step_every), *job, "--calib-windows", str(args.calib_windows),
            "--calib-length", str(args.calib_length), "--eval", "none", "--out", str(out)]


def _run(command: list[str], log: Path, kill_after: float | None = None) -> tuple[float, int]:
    """Run `command` (its output to `log`), killed after `kill_after` seconds when given; (seconds, return code)."""
    start = time.perf_counter()
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        try:
            code = process.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            code = process.wait()
    return time.perf_counter() - start, code


def _digests(out: Path) -> dict[str, str]:
    record = json.loads((out / "fxslice.json").read_text())
    return {k: record[k] for k in ("weights_sha256", "graph_sha256")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", choices=("prune", "quantize"), default="prune")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--bits", type=int, default=4, help="with --job quantize")
    parser.add_argument("--target", type=float, default=0.166)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--calib-windows", type=int, default=8)
    parser.add_argument("--calib-length", type=int, default=512)
    parser.add_argument("--kill-at", type=float, default=0.5, help="the kill, as a fraction of the uninterrupted time")
    parser.add_argument("--step-every", type=float, default=0.0,
                        help="least seconds between two checkpoints within a stage")
    parser.add_argument("--work", type=Path, default=None, help="a scratch folder (removed after the run)")
    args = parser.parse_args()
    if not 0 < args.kill_at < 1:
        parser.error(f"--kill-at must lie strictly between 0 and 1, got {args.kill_at}")
    work = Path(tempfile.mkdtemp(prefix="fxslice-resume-", dir=args.work))
    try:
        whole_seconds, code = _run(_command(args, work / "whole"), work / "whole.log")
        if code != 0:
            sys.exit(f"the uninterrupted run failed ({code}):\n{(work / 'whole.log').read_text()[-3000:]}")
        kill_after = args.kill_at * whole_seconds
        killed_seconds, code = _run(_command(args, work / "cut"), work / "killed.log", kill_after)
        if code == 0:
            sys.exit(f"the run ended before the kill at {kill_after:.0f} s: give --kill-at a smaller fraction")
        resume = work / "cut.resume"
        left = sorted(p.name for p in resume.iterdir()) if resume.is_dir() else []
        resumed_seconds, code = _run(_command(args, work / "cut"), work / "resumed.log")
        if code != 0:
            sys.exit(f"the resumed run failed ({code}):\n{(work / 'resumed.log').read_text()[-3000:]}")
        said = [line for line in (work / "resumed.log").read_text().splitlines() if "continuing the interrupted" in line]
        whole, cut = _digests(work / "whole"), _digests(work / "cut")
        print(json.dumps({
            "benchmark": "resume", "date": date.today().isoformat(), "machine": platform.machine(),
            "command": " ".join(["fxslice", *_command(args, Path("OUT"))[4:]]), "step_every": args.step_every,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "whole_seconds": round(whole_seconds, 1), "killed_after_seconds": round(killed_seconds, 1),
            "checkpoints_left": left, "resumed_from": said[0].strip() if said else None,
            "resumed_seconds": round(resumed_seconds, 1),
            "killed_plus_resumed_over_whole": round((killed_seconds + resumed_seconds) / whole_seconds, 3),
            "resumed_over_whole": round(resumed_seconds / whole_seconds, 3),
            "identical_weights": whole["weights_sha256"] == cut["weights_sha256"],
            "identical_graph": whole["graph_sha256"] == cut["graph_sha256"],
        }, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
