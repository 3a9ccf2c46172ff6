"""A recipe: calibration data and an ordered list of stages, validated before anything runs, written and
read as YAML or JSON, and recorded (with every pass's diff summary) in the saved model's `fxslice.json`.

    calibration: {source: wikitext2:validation, windows: 32, length: 2048, seed: 0}
    stages:
      - {stage: cleanup}
      - {stage: slicegpt, sparsity: 0.25}
      - {stage: fuse_gqa}

A stage is named by its `kind` from the catalogue the caller gives (`fxslice.passes.STAGES` holds the
built-in ones) or by `module.path:ClassName` / `file.py:ClassName` for a user's own. A recipe file that names
code (such a stage, or a user's pass in a `passes` stage) runs that code, so reading one is refused unless the
caller passes `trust_code=True`; a `file.py` is then found from the recipe's folder, and every name is imported
and checked while the recipe is read, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fxslice.core.errors import InvalidOption
from fxslice.core.imports import import_object, names_code, rebase
from fxslice.core.memory import release_freed
from fxslice.core.pass_manager import Pass
from fxslice.core.program import Program
from fxslice.recipes.stage import CAPTURED, Stage, StageContext, StageResult

__all__ = ["Calibration", "Recipe", "RecipeResult", "resolve_stage"]

FORMAT = 1  # of the recipe file


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """Where calibration windows come from (`fxslice.data.load_text` sources)."""

    source: str = "wikitext2:validation"
    windows: int = 32
    length: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("windows", "length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidOption(f"calibration {name} must be a positive integer, got {value!r}")

    def load(self, program: Program) -> torch.Tensor:
        from fxslice.data import load_text, token_windows
        from fxslice.data.text import check_varied

        if program.tokenizer is None:
            raise InvalidOption("the model comes without a tokenizer; calibration needs one to read the text")
        context = (program.config or {}).get("max_position_embeddings")
        windows = token_windows(program.tokenizer, load_text(self.source), self.length, count=self.windows,
                                seed=self.seed, max_length=context)
        check_varied(windows, self.source)
        return windows


@dataclass
class RecipeResult:
    program: Program
    stages: list[tuple[Stage, StageResult]]
    dense_parameters: int
    parameters: int

    @property
    def passes(self) -> list[Pass]:
        """Every pass run, in order: `fxslice.replay(result.passes, other_capture, result.program)`."""
        return [p for _, r in self.stages for p in r.passes]

    def record(self) -> dict[str, Any]:
        """What goes into `fxslice.json`: per stage its config, report, time and every pass's diff summary."""
        return {
            "dense_parameters": self.dense_parameters,
            "parameters": self.parameters,
            "stages": [{"stage": stage.kind, "seconds": round(result.seconds, 2), "report": result.report,
                        "passes": result.pass_entries()} for stage, result in self.stages],
        }


@dataclass(frozen=True)
class Recipe:
    stages: tuple[Stage, ...]
    calibration: Calibration | None = None
    name: str = ""
    #: facts the program holds when the recipe starts (a recipe that continues on a cleaned or sliced program)
    start: tuple[str, ...] = (CAPTURED,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        object.__setattr__(self, "start", tuple(sorted(set(self.start))))
        bad = [s for s in self.stages if not isinstance(s, Stage)]
        if bad:
            raise InvalidOption(f"a recipe holds stages; got {type(bad[0]).__name__}")
        self.validate()

    def validate(self) -> frozenset[str]:
        """Refuse a wrong order up front: each stage's `needs` must hold and none of its `refuses`.
        Returns the facts that hold after the last stage."""
        held = set(self.start)
        for i, stage in enumerate(self.stages):
            missing = sorted(stage.needs - held)
            if missing:
                givers = ", ".join(f"'{s.kind}'" for s in self.stages if set(missing) & s.provides) or "no stage here"
                raise InvalidOption(f"recipe stage {i} '{stage.kind}' needs {', '.join(missing)}, which no earlier "
                                    f"stage provides (provided by: {givers}); put that stage first")
            clash = sorted(stage.refuses & held)
            if clash:
                raise InvalidOption(f"recipe stage {i} '{stage.kind}' cannot run on a program that is already "
                                    f"{', '.join(clash)}; move it before the stage that makes it so")
            held |= stage.provides
        return frozenset(held)

    def check(self, program: Program, first: int = 0) -> None:
        """The options of each stage from `first` on against `program` (`Stage.check`), before any long work."""
        for stage in self.stages[first:]:
            stage.check(program)

    def run(self, program: Program, *, calibration: torch.Tensor | None = None, progress: bool = False,
            teacher: Program | None = None, done: Sequence[StageResult] = (), dense_parameters: int | None = None,
            after_stage: Callable[[int, StageResult], None] | None = None,
            partial: dict[str, Any] | None = None,
            after_step: Callable[[int, dict[str, Any], list[Pass]], None] | None = None) -> RecipeResult:
        """Run every stage on `program` in place. `calibration` (token ids [n, length]) overrides the
        recipe's calibration section. `teacher` is what a distilling stage learns from: by default a copy of
        `program` as given, kept (one more copy of the weights) only until the last stage that reads it.

        A run that continues an interrupted one gives the results of the stages `done` (the first ones, already
        applied to `program`) and the parameters before them; `after_stage(i, result)` is called as each stage
        ends (where a job writes its checkpoint). Within a stage that works in steps, `after_step(i, state, passes)`
        is called after each (`StageContext.step_done`), and `partial` is the state stage `len(done)` left when it
        was interrupted after some: it continues from there."""
        first = len(done)
        if first > len(self.stages):
            raise InvalidOption(f"{first} stages are done, but the recipe has {len(self.stages)}")
        todo = self.stages[first:]
        self.check(program, first)
        if calibration is None and any(s.calibrates for s in todo):
            if self.calibration is None:
                calibrating = next(s for s in todo if s.calibrates)
                raise InvalidOption(f"stage '{calibrating.kind}' calibrates but the recipe has no calibration section")
            calibration = self.calibration.load(program)
        learners = [i for i, s in enumerate(self.stages) if s.learns_from_teacher and i >= first]
        context = StageContext(calibration, progress=progress)
        if learners:
            context.teacher = teacher if teacher is not None else program.clone()
        del teacher  # the context alone holds it, so that dropping it there frees it
        dense = program.num_parameters() if dense_parameters is None else dense_parameters
        results = list(zip(self.stages, done, strict=False))
        for i, stage in enumerate(todo, start=first):
            start = time.perf_counter()
            context.resume = partial if i == first else None
            context.step_done = None if after_step is None else functools.partial(after_step, i)
            result = stage.run(program, context)
            result.seconds = time.perf_counter() - start
            results.append((stage, result))
            if learners and i == learners[-1]:
                context.teacher = None  # no later stage reads it: give its memory back
            release_freed()
            if after_stage is not None:
                after_stage(i, result)
        program.record["facts"] = sorted(self.validate())
        return RecipeResult(program, results, dense, program.num_parameters())

    # files ------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"format": FORMAT}
        if self.name:
            data["name"] = self.name
        if self.start != (CAPTURED,):
            data["start"] = list(self.start)
        if self.calibration is not None:
            data["calibration"] = dataclasses.asdict(self.calibration)
        data["stages"] = [s.to_dict() for s in self.stages]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], catalogue: Mapping[str, type[Stage]], *, trust_code: bool = False,
                  folder: Path | None = None) -> Recipe:
        """The recipe `data` describes. Names of user code are refused unless `trust_code`; with it, a relative
        `file.py` is found from `folder` (the recipe file's) and imported now."""
        if not isinstance(data, Mapping) or not isinstance(data.get("stages"), list) or not data["stages"]:
            raise InvalidOption("a recipe is a mapping with a non-empty list 'stages'")
        unknown = sorted(set(data) - {"format", "name", "start", "calibration", "stages"})
        if unknown:
            raise InvalidOption(f"recipe: unknown key(s) {', '.join(unknown)}; known: format, name, start, calibration, "
                                "stages")
        if data.get("format", FORMAT) != FORMAT:
            raise InvalidOption(f"recipe format {data['format']} is not supported (this fxslice reads {FORMAT})")
        entries = []
        for i, entry in enumerate(data["stages"]):
            if not isinstance(entry, Mapping) or "stage" not in entry:
                raise InvalidOption(f"recipe stage {i}: a mapping with a 'stage' key is expected, got {entry!r}")
            entries.append(dict(entry))
        _check_trusted(entries, catalogue, trust_code)
        stages = []
        for i, entry in enumerate(entries):
            name = str(entry["stage"])
            try:
                stage_cls = resolve_stage(rebase(name, folder) if folder else name, catalogue)
                for field in stage_cls.code_fields:
                    if folder and isinstance(entry.get(field), list):
                        entry[field] = [_rebased(v, folder) for v in entry[field]]
                stages.append(stage_cls.from_dict(entry))
            except TypeError as exc:
                raise InvalidOption(f"recipe stage {i} '{name}': {exc}") from exc
        calib = data.get("calibration")
        if isinstance(calib, Mapping) and "batch_size" in calib:  # recipes written before it went: it did nothing
            warnings.warn("recipe calibration: batch_size is ignored (each stage has its own); remove it", stacklevel=2)
            calib = {k: v for k, v in calib.items() if k != "batch_size"}
        try:
            calibration = Calibration(**calib) if calib is not None else None
        except TypeError as exc:
            raise InvalidOption(f"recipe calibration: {exc}") from exc
        return cls(tuple(stages), calibration, str(data.get("name", "")), tuple(data.get("start", (CAPTURED,))))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        text = _dump_yaml(self.to_dict()) if path.suffix in (".yaml", ".yml") else json.dumps(self.to_dict(), indent=1)
        path.write_text(text, encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path, catalogue: Mapping[str, type[Stage]], *, trust_code: bool = False) -> Recipe:
        """Read a recipe file; one that names code is refused unless `trust_code` (see the module's docstring)."""
        path = Path(path)
        if not path.is_file():
            raise InvalidOption(f"recipe file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InvalidOption(f"recipe {path} is not a text file (not UTF-8); a recipe is YAML or JSON") from None
        except OSError as exc:
            raise InvalidOption(f"cannot read the recipe {path}: {exc.strerror}") from None
        try:
            if path.suffix == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as exc:  # noqa: BLE001 - a parser's own error types vary
            raise InvalidOption(f"recipe {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from exc
        return cls.from_dict(data, catalogue, trust_code=trust_code, folder=path.resolve().parent)


def _check_trusted(entries: list[dict[str, Any]], catalogue: Mapping[str, type[Stage]], trust_code: bool) -> None:
    """Refuse, before anything is imported, a recipe that names code the caller did not opt in to run."""
    if trust_code:
        return
    named = []
    for i, entry in enumerate(entries):
        stage = entry["stage"]
        if names_code(stage) and stage not in catalogue:
            named.append(f"stage {i} '{stage}'")
            continue
        for field in getattr(catalogue.get(stage), "code_fields", ()):
            values = entry.get(field)
            named += [f"stage {i} {field} '{v}'" for v in _strings(values) if names_code(v)]
    if named:
        raise InvalidOption(f"this recipe names code ({', '.join(named)}), and a recipe that names code runs it when "
                            "read. If you trust it, say so: --trust-code on the command line, trust_code=True in Python")


def _strings(value: Any) -> list[Any]:
    """Every plain value inside a code field: a name, a list of names, entries with arguments (`{pass: NAME, ...}`)."""
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, Mapping):
        return [s for v in value.values() for s in _strings(v)]
    return [value]


def _rebased(value: Any, folder: Path) -> Any:
    """`value` with every `file.py:Name` inside it resolved from the recipe's folder."""
    if isinstance(value, Mapping):
        return {k: _rebased(v, folder) for k, v in value.items()}
    return rebase(value, folder) if names_code(value) else value


def resolve_stage(name: str, catalogue: Mapping[str, type[Stage]]) -> type[Stage]:
    """A stage class by catalogue name, or `module.path:Class` / `file.py:Class`."""
    if name in catalogue:
        return catalogue[name]
    if ":" not in name:
        raise InvalidOption(f"unknown stage '{name}'; built-in: {', '.join(catalogue)}; or module:Class / file.py:Class")
    cls = import_object(name, "stage")
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise InvalidOption(f"'{name}' is not a Stage class")
    return cls


def _dump_yaml(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)
