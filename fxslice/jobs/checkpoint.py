"""Checkpoints of a compression job, so that an interrupted run continues where it stopped.

As each stage that calibrates ends, `compress` writes the program as it stands (an fxslice directory), the graph of
its KV-cache capture and what the job has measured into `OUT.resume/stage-K/` (K stages done), atomically. Run
again, the same job finds the newest one, checks that it belongs to the same run (the model's files, the recipe, the
settings that change a result) and goes on with stage K+1. The stages compute deterministically from what the
checkpoint holds, so a resumed run saves the bytes an uninterrupted one saves. The folder goes once the model is
saved; a run of other settings is refused beside it rather than allowed to remove it.

A stage that works in long steps (the Surgeon's shots, GPTQ's weights) is checkpointed between them too, as `stage-K.S` (K stages
and S steps of the next done) with the state the stage continues from; not after every step, but once at least
`STEP_EVERY` seconds, and `STEP_WRITE_RATIO` times as long as the last checkpoint took to write, have passed since
the last one (so that writing checkpoints takes at most a tenth of a long stage).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fxslice.core.errors import CorruptModel, InvalidOption
from fxslice.core.program import Program
from fxslice.models.io import graph_over, load, save, write_directory, write_graph
from fxslice.models.kvcache import CacheLayout
from fxslice.recipes import StageResult

__all__ = ["JobCheckpoint", "Restored", "model_identity"]

FORMAT = 1
STATE, PROGRAM, CACHE_GRAPH = "state.json", "program", "cache-graph.json"
PREFIX = "stage-"
#: least seconds between two checkpoints when the second falls within a stage
STEP_EVERY = 300.0
#: and at least this many times as long as the last checkpoint took to write
STEP_WRITE_RATIO = 10.0


@dataclass
class Restored:
    """What a checkpoint gives back: the program after the first `len(stages)` stages, its KV-cache capture's graph
    (shapes only, `Program.skeleton`; None where the capture has none or could not follow), those stages' results
    and what the job measured before them; `partial`: the state stage `len(stages)` left after `steps` steps (see
    `fxslice.recipes.StageContext.step_done`), None where the checkpoint fell between stages."""

    program: Program
    cached: Program | None
    stages: list[StageResult]
    dense_parameters: int
    perplexity: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    folder: Path | None = None
    partial: dict[str, Any] | None = None
    steps: int = 0


def model_identity(model: str | os.PathLike) -> dict[str, Any]:
    """What names the model a run compresses: a hub or built-in name as given; a local file or folder by its path
    and the size and modification time of each file in it (a checkpoint replaced in place is another model)."""
    path = Path(model)
    if not path.exists():
        return {"name": str(model)}
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return {"path": str(path.resolve()),
            "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}}


def steps_in_words(n: int) -> str:
    """'1 step', '2 steps': how messages about a stage in progress count its steps."""
    return f"{n} step{'' if n == 1 else 's'}"


class JobCheckpoint:
    """The checkpoints of the run `run` (a JSON-able description of everything that changes its result) that saves
    to `out`: kept in `OUT.resume/`."""

    def __init__(self, out: Path, run: dict[str, Any]):
        self.folder = out.with_name(out.name + ".resume")
        self.run = json.loads(json.dumps(run, sort_keys=True, default=str))
        self._reading: Path | None = None  # the generation a resumed program may still read weights from
        #: stages, and steps of the next, the newest checkpoint holds (0: none written or restored)
        self.stages_done = self.steps_done = 0
        self._written_at, self._write_seconds = time.monotonic(), 0.0

    def _generations(self) -> list[tuple[tuple[int, int], Path]]:
        if not self.folder.is_dir():
            return []
        found = []
        for p in self.folder.iterdir():
            stages, _, steps = p.name[len(PREFIX):].partition(".")
            if (p.name.startswith(PREFIX) and stages.isdigit() and (steps.isdigit() or not steps)
                    and (p / STATE).is_file()):
                found.append(((int(stages), int(steps or 0)), p))
        return sorted(found)

    def step_due(self) -> bool:
        """Whether a checkpoint within a stage is worth writing now (see `STEP_EVERY`)."""
        return time.monotonic() - self._written_at >= max(STEP_EVERY, STEP_WRITE_RATIO * self._write_seconds)

    def where(self) -> str:
        """What the newest checkpoint holds, in words."""
        steps = f" and {steps_in_words(self.steps_done)} of the next" if self.steps_done else ""
        return f"{self.stages_done} stages{steps}"

    def restore(self, *, lazy: bool) -> Restored | None:
        """The newest checkpoint of this run, its weights left in its files when `lazy`; None when there is none.
        A checkpoint of another run is refused, naming what differs."""
        generations = self._generations()
        if not generations:
            return None
        (done, steps), path = generations[-1]
        try:
            state = json.loads((path / STATE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptModel(f"the checkpoint {path} cannot be read ({exc}); remove {self.folder} to start over") from None
        if state.get("format") != FORMAT:
            raise InvalidOption(f"the checkpoint {path} was written by another fxslice (format {state.get('format')}); "
                                f"remove {self.folder} to start over")
        ran = state.get("run", {})
        differs = sorted(k for k in set(ran) | set(self.run) if ran.get(k) != self.run.get(k))
        if differs:
            raise InvalidOption(f"{self.folder} holds the checkpoint of another run (it differs in: "
                                f"{', '.join(differs)}); run that job again to finish it, or start this one over "
                                "(--restart; resume=False in Python), which removes the checkpoint")
        program = load(path / PROGRAM, lazy=lazy)
        cached = None
        if state.get("cache") is not None:
            cached = graph_over(path / CACHE_GRAPH, program, CacheLayout.from_json(state["cache"])).skeleton()
        self._reading, self.stages_done, self.steps_done = path, done, steps
        stages = [StageResult(report=s["report"], seconds=s["seconds"], entries=s["passes"]) for s in state["stages"]]
        partial = state.get("partial")
        if len(stages) != done or (partial is None) != (steps == 0):
            raise CorruptModel(f"the checkpoint {path} records {len(stages)} stages"
                               f"{' and a stage in progress' if partial is not None else ''}, its name says {path.name}")
        return Restored(program, cached, stages, state["dense_parameters"], state.get("perplexity", {}),
                        state.get("seconds", {}), state.get("notes", []), path, partial, steps)

    def write(self, program: Program, cached: Program | None, stages: list[dict[str, Any]],
              measured: dict[str, Any], partial: dict[str, Any] | None = None, steps: int = 0) -> Path:
        """Write the checkpoint after `len(stages)` stages (their entries as in the record) and, with `partial` (the
        state the next stage continues from), `steps` steps of the next, atomically; remove the older ones (except
        one the program still reads from)."""
        if (partial is None) != (steps == 0):
            raise InvalidOption("a checkpoint within a stage needs both the stage's state and its steps")
        start = time.monotonic()
        done = len(stages)
        self.folder.mkdir(exist_ok=True)
        target = self.folder / (f"{PREFIX}{done}.{steps}" if steps else f"{PREFIX}{done}")
        if target.exists():
            shutil.rmtree(target)
        state = {"format": FORMAT, "run": self.run, "stages": stages,
                 "cache": cached.cache.to_json() if cached is not None and cached.cache is not None else None,
                 "partial": partial, **measured}

        def write(tmp: Path) -> None:
            save(program, tmp / PROGRAM)
            if state["cache"] is not None:
                write_graph(cached, tmp / CACHE_GRAPH)  # type: ignore[arg-type]
            (tmp / STATE).write_text(json.dumps(state, indent=1, default=str), encoding="utf-8")

        try:
            write_directory(target, write)  # all of it or nothing
        except BaseException:
            if not any(self.folder.iterdir()):
                self.folder.rmdir()  # no empty folder left behind either
            raise
        self.stages_done, self.steps_done = done, steps
        self._written_at = time.monotonic()
        self._write_seconds = self._written_at - start
        for _, older in self._generations():
            if older not in (target, self._reading):
                shutil.rmtree(older, ignore_errors=True)
        return target

    def discard(self) -> None:
        """Remove every checkpoint of the job (it finished, or the user starts over)."""
        shutil.rmtree(self.folder, ignore_errors=True)
